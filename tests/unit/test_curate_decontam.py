"""Decontamination (n-gram and SQL canonical form) and the JSON task."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from distill.curate.decontam import ngram_overlap, ngram_set, read_eval_records, sql_canonical_set
from distill.tasks.json_task import check_json, extract_json, load_schema, make_validator
from distill.tasks.sql import canonical_sql

DATA = Path(__file__).resolve().parents[1] / "data" / "dedup_corpus"


def test_ngram_overlap_on_real_questions() -> None:
    rows = [json.loads(ln) for ln in (DATA / "advising_questions_sample.jsonl").read_text().splitlines()]
    eval_rows, train_rows = rows[:50], rows[50:]
    ev = ngram_set([r["text_filled"] for r in eval_rows], 4)
    # a training set that contains 10 eval questions verbatim (one re-cased, one re-spaced)
    leaked = [r["text_filled"] for r in eval_rows[:10]]
    leaked[0], leaked[1] = leaked[0].upper(), "  ".join(leaked[1].split())
    train = leaked + [r["text_filled"] for r in train_rows]
    hits = ngram_overlap(train, ev, 4)
    assert (hits[:10] > 0).all()
    # brute force: the same counts from Python sets of 4-grams
    import re

    def grams(t: str) -> set[tuple[str, ...]]:
        w = re.findall(r"\w+", t.lower())
        return {tuple(w)} if len(w) < 4 else {tuple(w[i : i + 4]) for i in range(len(w) - 3)}

    evset = set().union(*(grams(r["text_filled"]) for r in eval_rows))
    want = np.array([len(grams(t) & evset) for t in train])
    assert np.array_equal(hits, want)


def test_sql_canonical_match() -> None:
    ev = sql_canonical_set(["SELECT name FROM customers WHERE city = 'Paris'"], "duckdb", parameterize=False)
    assert canonical_sql("select NAME from customers where city='Paris';", "duckdb") in ev
    assert canonical_sql("SELECT name FROM customers WHERE city = 'Lyon'", "duckdb") not in ev
    evp = sql_canonical_set(["SELECT name FROM customers WHERE city = 'Paris'"], "duckdb", parameterize=True)
    assert canonical_sql("SELECT name FROM customers WHERE city = 'Lyon'", "duckdb", True) in evp


def test_read_eval_records(tmp_path: Path) -> None:
    (tmp_path / "e.jsonl").write_text('{"question": "q1", "sql": "SELECT 1"}\n\n{"question": "q2"}\n')
    (tmp_path / "e.json").write_text(json.dumps({"data": [{"question": "q3"}]}))
    assert [r["question"] for r in read_eval_records(tmp_path / "e.jsonl")] == ["q1", "q2"]
    assert read_eval_records(tmp_path / "e.json") == [{"question": "q3"}]
    (tmp_path / "bad.jsonl").write_text("{nope\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1"):
        read_eval_records(tmp_path / "bad.jsonl")


def test_json_task(tmp_path: Path) -> None:
    schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0}},
        "required": ["name"],
        "additionalProperties": False,
    }
    v = make_validator(schema)
    a = check_json('```json\n{"name": "Ada", "age": 36}\n```', v)
    b = check_json('Sure! {"age": 36, "name": "Ada"} is the record.', v)
    assert a.ok and b.ok and a.value_hash == b.value_hash and a.canonical == '{"age":36,"name":"Ada"}'
    assert check_json('{"name": "Ada", "age": -1}', v).error_type == "json_schema_error"
    assert "age" in (check_json('{"name": "Ada", "age": -1}', v).error or "")
    assert check_json('{"name": "Ada", "x": 1}', v).error_type == "json_schema_error"
    assert check_json('{"name": "Ada",}', v).error_type == "json_parse_error"
    assert check_json("   ", v).error_type == "no_json"
    assert extract_json('text {"a": "}"} more {"b": 1}') == '{"a": "}"}'
    p = tmp_path / "s.json"
    p.write_text(json.dumps({"type": "object", "properties": {"x": {"type": "nope"}}}))
    with pytest.raises(ValueError, match="invalid JSON schema"):
        load_schema(p)
