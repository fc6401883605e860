"""JSON-extraction scoring (distill.evaluate.json_scoring) on hand-made predictions against the
real task schema and eval set, the report's JSON tables, and the model card's JSON table."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from distill.errors import DistillError
from distill.evaluate.json_scoring import (
    JsonEvalRow,
    JsonScorer,
    aggregate,
    canonical_json,
    is_json_eval_set,
    load_json_eval_set,
)

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "pipelines" / "data" / "json_extraction"
SCHEMA = json.loads((DATA / "schema.json").read_text())
FIELDS = list(SCHEMA["properties"])


@pytest.fixture(scope="module")
def rows() -> list[JsonEvalRow]:
    return load_json_eval_set(DATA / "eval.jsonl")[:6]


def _dump(rec: object) -> str:
    return json.dumps(rec, ensure_ascii=False)


def test_loads_the_task_eval_set():
    rows = load_json_eval_set(DATA / "eval.jsonl")
    assert len(rows) == 25 and rows[0].id == "eval-event-001"
    assert rows[0].record["currency"] == "EUR" and rows[0].template_vars()["text"] == rows[0].text
    assert is_json_eval_set(DATA / "eval.jsonl")
    assert not is_json_eval_set(REPO / "pipelines" / "data" / "sql_dialect" / "eval.jsonl")


def test_hand_made_predictions_score_what_they_should(rows):
    r0, r1, r2, r3, r4, r5 = rows
    wrong_price = copy.deepcopy(r1.record)
    wrong_price["price"] = 999
    dup_tags = copy.deepcopy(r3.record)
    dup_tags["tags"] = [dup_tags["tags"][0], dup_tags["tags"][0]]  # uniqueItems: schema-invalid
    preds = {
        r0.id: "Here you go:\n```json\n" + _dump(r0.record) + "\n```",  # exact, fenced, with prose
        r1.id: _dump(wrong_price),  # one wrong field
        r2.id: '{"title": "x", "organizer": ',  # invalid JSON (cut off)
        r3.id: _dump(dup_tags),  # parses, 7 of 8 fields right, fails the schema
        r4.id: None,  # no completion
        # r5: absent from the predictions
    }
    results, m = JsonScorer(rows, SCHEMA).score(preds)
    by = {r["id"]: r for r in results}

    assert by[r0.id]["verdict"] == "correct" and by[r0.id]["exact_match"] and by[r0.id]["schema_valid"]
    assert by[r0.id]["fields_correct"] == 8 and by[r0.id]["field_accuracy"] == 1.0

    assert (
        by[r1.id]["verdict"] == "wrong_record" and by[r1.id]["schema_valid"] and not by[r1.id]["exact_match"]
    )
    assert by[r1.id]["fields_correct"] == 7 and by[r1.id]["field_accuracy"] == 7 / 8
    assert json.loads(by[r1.id]["field_match"])["price"] is False
    assert "price" in by[r1.id]["error"]

    assert by[r2.id]["verdict"] == "invalid_json" and not by[r2.id]["valid_json"]
    assert by[r2.id]["error_type"] == "json_parse_error" and by[r2.id]["fields_correct"] == 0

    assert (
        by[r3.id]["verdict"] == "schema_error" and by[r3.id]["valid_json"] and not by[r3.id]["schema_valid"]
    )
    assert by[r3.id]["error_type"] == "json_schema_error" and "tags" in by[r3.id]["error"]
    assert by[r3.id]["fields_correct"] == 7  # only tags differ

    for rid in (r4.id, r5.id):
        assert (
            by[rid]["verdict"] == "missing" and by[rid]["correct"] is False and by[rid]["fields_correct"] == 0
        )

    assert m["n"] == 6 and m["runnable"] == 6 and m["correct"] == 1
    assert m["exact_match"] == pytest.approx(1 / 6, abs=1e-6)
    assert m["valid_json_rate"] == pytest.approx(3 / 6, abs=1e-6)  # r0, r1, r3 parse
    assert m["schema_valid_rate"] == pytest.approx(2 / 6, abs=1e-6)  # r0, r1
    assert m["field_accuracy"] == pytest.approx((8 + 7 + 0 + 7 + 0 + 0) / 8 / 6, abs=1e-6)
    assert m["error_rate"] == pytest.approx(4 / 6, abs=1e-6)  # r2, r3, r4, r5
    assert m["per_field"]["price"] == pytest.approx(2 / 6, abs=1e-6)  # r0 and r3
    assert m["per_field"]["tags"] == pytest.approx(2 / 6, abs=1e-6)  # r0 and r1
    assert m["per_field"]["title"] == pytest.approx(3 / 6, abs=1e-6)
    assert set(m["per_field"]) == set(FIELDS)
    assert m["error_types"] == {
        "wrong_fields": 1,
        "json_parse_error": 1,
        "json_schema_error": 1,
        "missing": 2,
    }
    # aggregate over the stored rows (what the stage does on resume) gives the same numbers
    assert aggregate(results) == m


def test_gold_as_prediction_scores_100_percent():
    rows = load_json_eval_set(DATA / "eval.jsonl")
    _, m = JsonScorer(rows, SCHEMA).score({r.id: _dump(r.record) for r in rows})
    assert m["exact_match"] == 1.0 and m["field_accuracy"] == 1.0 and m["schema_valid_rate"] == 1.0
    assert m["per_field"] == {f: 1.0 for f in FIELDS} and m["error_types"] == {}


def test_canonical_equality_rules(rows):
    r = rows[0]
    gold = r.record
    # key order, integral float, reordered set-like tags (uniqueItems) and NFC do not matter
    pred = {k: gold[k] for k in reversed(FIELDS)}
    pred["price"] = float(gold["price"])
    pred["tags"] = list(reversed(gold["tags"]))
    assert len(gold["tags"]) > 1
    results, _ = JsonScorer([r], SCHEMA).score({r.id: _dump(pred)})
    assert results[0]["verdict"] == "correct"
    # but a boolean is not a number, case counts, and an extra key breaks exact match (and the schema)
    assert canonical_json({"remote": True}) != canonical_json({"remote": 1})
    assert canonical_json("Café") == canonical_json("Cafe\u0301")  # NFC
    cased = dict(gold, title=gold["title"].upper())
    extra = dict(gold, note="x")
    res, _ = JsonScorer([r, r], SCHEMA).score({r.id: _dump(cased)})
    assert res[0]["verdict"] == "wrong_record" and json.loads(res[0]["field_match"])["title"] is False
    res, _ = JsonScorer([r], SCHEMA).score({r.id: _dump(extra)})
    assert res[0]["verdict"] == "schema_error" and res[0]["fields_correct"] == 8 and not res[0]["exact_match"]
    # arrays without uniqueItems keep their order
    assert canonical_json([2, 1], {"type": "array"}) != canonical_json([1, 2], {"type": "array"})


def test_invalid_gold_is_excluded_and_no_schema_scores_gold_keys(rows):
    bad = JsonEvalRow("bad", "text", dict(rows[0].record, date="18 April"))
    results, m = JsonScorer([rows[0], bad], SCHEMA).score({rows[0].id: _dump(rows[0].record), "bad": "{}"})
    assert results[1]["verdict"] == "excluded" and results[1]["excluded_reason"].startswith(
        "gold_invalid: date"
    )
    assert m["runnable"] == 1 and m["exact_match"] == 1.0 and m["excluded"] == {"gold_invalid": 1}
    # without a schema: no schema validity, fields = the gold record's keys
    row = JsonEvalRow("a", "t", {"x": 1, "y": [1, 2]})
    res, m2 = JsonScorer([row]).score({"a": '{"x": 1, "y": [2, 1]}'})
    assert res[0]["schema_valid"] is None and m2["schema_valid_rate"] is None
    assert res[0]["fields_correct"] == 1 and m2["per_field"] == {"x": 1.0, "y": 0.0}


def test_eval_set_errors_name_file_and_line(tmp_path):
    p = tmp_path / "eval.jsonl"
    p.write_text(
        '{"id": "a", "text": "t", "record": {"x": 1}}\n'
        "not json\n"
        '{"id": "b", "text": "t", "record": "x"}\n'
        '{"id": "a", "text": "t", "record": {}}\n'
        '{"id": "c", "record": {}}\n'
    )
    with pytest.raises(DistillError) as e:
        load_json_eval_set(p)
    lines = e.value.lines
    assert any(f"{p}:2: not valid JSON" in x for x in lines)
    assert any(f"{p}:3:" in x and "record" in x for x in lines)
    assert any(f"{p}:4:" in x and "already used on line 1" in x for x in lines)
    assert any(f"{p}:5:" in x and "text" in x for x in lines)


def test_report_shows_json_metrics_per_field_and_examples(tmp_path, rows):
    from distill.evaluate.report import ReportData, build_report, report_style

    scorer = JsonScorer(rows, SCHEMA)
    good, _ = scorer.score({r.id: _dump(r.record) for r in rows})
    bad, _ = scorer.score({r.id: "no idea" for r in rows})
    results = [dict(r, model="merged") for r in good] + [dict(r, model="student") for r in bad]
    models = {"student": aggregate(bad), "merged": aggregate(good)}
    data = ReportData(title="t", models=models, results=results, baseline="student", candidate="merged",
                      **report_style("json"))  # fmt: skip
    page = build_report(tmp_path / "report", data)
    html = page.read_text()
    md = (tmp_path / "report" / "report.md").read_text()
    for text in (html, md):
        assert "field accuracy" in text and "schema valid" in text and "execution accuracy" not in text
        assert "Per field" in text and "organizer" in text
    assert "| merged | 6 | 6 | 100.0% | 100.0% | 100.0% | 100.0% |" in md
    assert "| student | 6 | 6 | 0.0% | 0.0% | 0.0% | 0.0% |" in md
    assert "Wins" in md and rows[0].id in md
    assert (
        "(no JSON)" not in html and html.count(rows[0].record["organizer"]) >= 2
    )  # gold and prediction shown
    assert (tmp_path / "report" / "metrics.png").is_file()
    # the SQL defaults are untouched
    assert ReportData(title="s", models={}).metric_columns[0] == ("execution_accuracy", "execution accuracy")


def test_model_card_shows_json_metrics():
    from distill.hub import model_card

    m = {"exact_match": 0.5, "field_accuracy": 0.75, "schema_valid_rate": 1.0, "valid_json_rate": 1.0}
    card = model_card(model_name="x", pipeline="p", task_desc="structured JSON output", is_adapter=False,
                      base_id=None, base_revision=None, stages=[], this="merged",
                      evals=[{"stage": "eval", "eval_set": "e.jsonl", "n": 4, "runnable": 4, "task": "json",
                              "schema": "schema.json", "models": {"merged": m}}])  # fmt: skip
    assert "| **merged** (this model) | 50.0% | 75.0% | 100.0% | 100.0% |" in card
    assert "field accuracy" in card and "execution accuracy" not in card and "dialect" not in card
    assert "structured extraction" in card  # model-index task name
