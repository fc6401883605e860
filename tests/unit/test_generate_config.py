"""generate stage: config validation, `distill validate` checks, schema DDL and SQL grammar, question selection."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distill.backends.sqlschema import ddl_only, quote_ident, select_grammar, tables
from distill.config import load_pipeline
from distill.errors import ConfigError
from distill.stages.generate import (
    _assign,
    _with_ids,
    check,
    parse_questions,
    request_seed,
    select_questions,
)
from distill.validate import check_loaded

SCHEMA = """\
-- shop: a tiny test schema
CREATE TABLE customers (
    customer_id INTEGER PRIMARY KEY,
    name        VARCHAR NOT NULL,  -- full name
    "Signup Date" DATE,
    tags        VARCHAR[]
);

CREATE TABLE orders (
    order_id    INTEGER PRIMARY KEY,
    customer_id INTEGER REFERENCES customers (customer_id),
    total       DECIMAL(10, 2)
);

INSERT INTO customers VALUES
  (1, 'Ann; the first', DATE '2024-01-02', ['vip']),
  (2, 'Bo', NULL, []);
INSERT INTO orders VALUES (10, 1, 12.50), (11, 2, 3.00);
"""

BASE = """\
name: g
models:
  teacher: {{id: tiny:llama, backend: {backend}}}
task: {{kind: sql, dialect: duckdb, schemas: schemas/*.sql}}
stages:
{stages}
"""

ANSWER_TMPL = "Schema ({{ dialect }}):\n{{ schema_ddl }}\nQuestion: {{ question }}\n"


def _pipe(write_pipeline, stages: str, backend: str = "vllm", files: dict[str, str] | None = None) -> Path:
    base = {
        "schemas/shop.sql": SCHEMA,
        "prompts/answer.jinja": ANSWER_TMPL,
        "prompts/question.jinja": "{{ schema_ddl }}\n{% for e in examples %}- {{ e.question }}\n{% endfor %}Write {{ n }}.",
        "rows.jsonl": json.dumps({"id": "q1", "schema": "shop", "question": "How many customers?"}) + "\n",
        "seeds.jsonl": json.dumps({"schema": "shop", "question": "List all orders."}) + "\n",
    }
    base.update(files or {})
    return write_pipeline(BASE.format(backend=backend, stages=stages), base)


def _errors(path: Path) -> list[str]:
    try:
        lp = load_pipeline(path)
    except ConfigError as e:
        return e.lines
    return check_loaded(lp)


# -- config shape ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stage", "needle"),
    [
        ("  a: {kind: generate, model: teacher, prompt: prompts/answer.jinja}", "exactly one of `inputs`"),
        (
            "  a: {kind: generate, model: teacher, mode: self_instruct, seeds: seeds.jsonl}",
            "needs `prompt`",
        ),
        (
            "  a: {kind: generate, model: teacher, source: rows.jsonl, structured: {regex: 'a+', sql_grammar: true}}",
            "set exactly one of",
        ),
        (
            "  a: {kind: generate, model: teacher, mode: self_instruct, seeds: seeds.jsonl, "
            "prompt: prompts/question.jinja, structured: {sql_grammar: true}}",
            "does not fit mode self_instruct",
        ),
        (
            "  a: {kind: generate, model: teacher, source: rows.jsonl, temprature: 0.5}",
            "did you mean 'temperature'",
        ),
        ("  a: {kind: generate, model: teachr, source: rows.jsonl}", "neither a model nor a stage"),
    ],
)
def test_bad_configs_are_one_line_errors(write_pipeline, stage, needle):
    errs = _errors(_pipe(write_pipeline, stage))
    assert any(needle in e for e in errs), errs
    assert all("\n" not in e for e in errs)


def test_valid_config_passes_check_and_renders(write_pipeline):
    p = _pipe(
        write_pipeline,
        "  a: {kind: generate, model: teacher, source: rows.jsonl, prompt: prompts/answer.jinja, n: 2}\n"
        "  q: {kind: generate, model: teacher, mode: self_instruct, seeds: seeds.jsonl, prompt: prompts/question.jinja}\n"
        "  b: {kind: generate, model: teacher, inputs: [q], prompt: prompts/answer.jinja, structured: {sql_grammar: true}}",
    )
    assert _errors(p) == []
    lp = load_pipeline(p)
    assert lp.stages["q"].output_layout() == "questions"
    assert lp.stages["a"].output_layout() == "generations"
    # speed-only fields stay out of the fingerprint
    sem = lp.stages["a"].semantic()
    assert "shard_size" not in sem and "workers" not in sem and "max_error_rate" not in sem
    assert sem["n"] == 2


def test_check_reports_an_undefined_template_variable(write_pipeline):
    p = _pipe(
        write_pipeline,
        "  a: {kind: generate, model: teacher, source: rows.jsonl, prompt: prompts/bad.jinja}",
        files={"prompts/bad.jinja": "Q: {{ question }} in {{ colour }}"},
    )
    errs = _errors(p)
    assert len(errs) == 1, errs
    assert "prompts/bad.jinja" in errs[0] and "'colour' is undefined" in errs[0] and "rows.jsonl" in errs[0]


def test_check_reports_syntax_errors_and_missing_files(write_pipeline):
    p = _pipe(
        write_pipeline,
        "  a: {kind: generate, model: teacher, source: rows.jsonl, prompt: prompts/broken.jinja}\n"
        "  b: {kind: generate, model: teacher, source: rows.jsonl, prompt: prompts/nowhere.jinja}",
        files={"prompts/broken.jinja": "line one\n{% if x %}unclosed"},
    )
    errs = _errors(p)
    assert any("prompts/broken.jinja:2: template syntax error" in e for e in errs), errs
    assert any("stages.b" in e and "nowhere.jinja" in e and "not found" in e for e in errs), errs


def test_check_reports_unknown_schema_of_a_row(write_pipeline):
    p = _pipe(
        write_pipeline,
        "  a: {kind: generate, model: teacher, source: rows.jsonl, prompt: prompts/answer.jinja}",
        files={"rows.jsonl": json.dumps({"id": "1", "schema": "nope", "question": "?"}) + "\n"},
    )
    errs = _errors(p)
    assert any("schema 'nope' has no file" in e and "shop" in e for e in errs), errs


def test_check_rejects_structured_output_on_transformers(write_pipeline):
    p = _pipe(
        write_pipeline,
        "  a: {kind: generate, model: teacher, source: rows.jsonl, prompt: prompts/answer.jinja, structured: {regex: 'x'}}",
        backend="transformers",
    )
    errs = _errors(p)
    assert any("cannot constrain decoding" in e for e in errs), errs


# -- schema DDL and grammar -----------------------------------------------------------------------


def test_ddl_only_drops_inserts_and_keeps_comments():
    ddl = ddl_only(SCHEMA, "duckdb")
    assert "INSERT" not in ddl and "Ann; the first" not in ddl  # a ';' inside a string does not split
    assert "-- full name" in ddl and "-- shop: a tiny test schema" in ddl
    assert ddl.count("CREATE TABLE") == 2
    import duckdb

    con = duckdb.connect()
    con.execute(ddl)  # still valid DDL
    assert con.execute("select count(*) from customers").fetchone() == (0,)


def test_tables_and_identifier_quoting():
    ts = tables(SCHEMA, "duckdb")
    assert [(t.name, t.columns) for t in ts] == [
        ("customers", ("customer_id", "name", "Signup Date", "tags")),
        ("orders", ("order_id", "customer_id", "total")),
    ]
    assert quote_ident("customer_id") == "customer_id"
    assert quote_ident("Signup Date") == '"Signup Date"'
    assert quote_ident("select") == '"select"'


def test_select_grammar_accepts_valid_queries_only():
    """The Lark form parses with lark; every query it accepts runs on DuckDB against the schema."""
    import duckdb
    import lark
    import xgrammar

    ts = tables(SCHEMA, "duckdb")
    xgrammar.Grammar.from_ebnf(select_grammar(ts, "duckdb", "ebnf"))  # compiles for vLLM's default backend
    parser = lark.Lark(select_grammar(ts, "duckdb", "lark"), start="start")
    con = duckdb.connect()
    con.execute(SCHEMA)
    good = [
        "SELECT COUNT(*) FROM customers WHERE tags IS NOT NULL",
        'SELECT name, "Signup Date" FROM customers WHERE name IS NOT NULL ORDER BY customer_id DESC LIMIT 5',
        "SELECT total FROM orders ORDER BY total",
    ]
    for q in good:
        parser.parse(q)
        con.execute(q).fetchall()
    bad = [
        "SELECT total FROM customers",
        "SELECT * FROM orders",
        "DROP TABLE orders",
        "SELECT COUNT(*) FROM orders ORDER BY total",
    ]
    for q in bad:
        with pytest.raises(lark.exceptions.LarkError):
            parser.parse(q)
    # `loose`: any column of the schema in any table; parses, may not bind (smoke tests want both)
    loose = lark.Lark(select_grammar(ts, "duckdb", "lark", loose=True), start="start")
    loose.parse("SELECT total FROM customers")
    with pytest.raises(duckdb.BinderException):
        con.execute("SELECT total FROM customers")
    with pytest.raises(ValueError, match="no CREATE TABLE"):
        select_grammar([], "duckdb")


# -- question selection, ids, seeds, shard assignment ---------------------------------------------


def test_parse_questions_strips_numbering_and_bullets():
    text = (
        '1. How many orders?\n\n- "Which customer spent most?"\n* Q3: List tags per customer\nok\n2) Fifth?'
    )
    assert parse_questions(text, 10) == [
        "How many orders?",
        "Which customer spent most?",
        "List tags per customer",
        "Fifth?",
    ]
    assert parse_questions(text, 2) == ["How many orders?", "Which customer spent most?"]
    assert parse_questions(None, 3) == []


def test_select_questions_drops_seed_and_repeat_and_excess():
    seeds = {"list all orders."}
    samples = [
        {"completion": "List all  ORDERS.\nHow many orders?\nhow many orders?", "error": None},
        {"completion": None, "error": "HTTP 500: boom"},
        {"completion": "Which city has most customers?\nTotal revenue per year?", "error": None},
    ]
    kept, dropped = select_questions("shop-00000", 0, samples, 3, 4, seeds)
    assert [r["question"] for r in kept] == ["How many orders?"]
    assert kept[0]["id"] == "shop-00000-0-1" and kept[0]["line"] == 1
    reasons = [(r["id"], r["reason"]) for r in dropped]
    assert reasons == [
        ("shop-00000-0-0", "seed_duplicate"),  # case and spacing do not matter
        ("shop-00000-0-2", "duplicate"),
        ("shop-00000-1", "error"),
        ("shop-00000-2-0", "over_per_schema"),  # position 2*3+0 = 6 >= per_schema 4
        ("shop-00000-2-1", "over_per_schema"),
    ]
    # the second request of the schema starts past per_schema: everything is over
    kept2, dropped2 = select_questions("shop-00001", 1, samples[:1], 3, 3, set())
    assert kept2 == [] and {r["reason"] for r in dropped2} == {"over_per_schema", "duplicate"}
    # a sample without any usable line stays on record (its tokens count)
    _, dropped3 = select_questions(
        "shop-00002", 0, [{"completion": " \n?\n", "error": None, "completion_tokens": 5}], 3, 9, set()
    )
    assert [(r["id"], r["reason"], r["completion_tokens"]) for r in dropped3] == [
        ("shop-00002-0", "no_question", 5)
    ]


def test_rows_without_template_use_their_messages_or_prompt():
    from distill.stages.generate import _row_messages

    chat = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "u"},
        {"role": "assistant", "content": "old"},
    ]
    assert _row_messages({"messages": chat}) == chat[:2]  # the answer is regenerated
    assert _row_messages({"prompt": "hi"}) == [{"role": "user", "content": "hi"}]
    with pytest.raises(ValueError, match="neither `messages` nor `prompt`"):
        _row_messages({"question": "q"})


def test_ids_from_column_or_content_hash():
    import polars as pl

    df = pl.DataFrame({"id": [1, 2], "q": ["a", "b"]})
    assert _with_ids(df, "id", "x")[1] == ["1", "2"]
    with pytest.raises(ValueError, match="rows 0 and 1 share the id '7'"):
        _with_ids(pl.DataFrame({"id": [7, 7]}), "id", "x")
    with pytest.raises(ValueError, match="no column 'qid'"):
        _with_ids(df, "qid", "x")
    hashed = _with_ids(pl.DataFrame({"q": ["a", "a", "b"]}), "id", "x")[1]
    assert hashed[1] == hashed[0] + "-1" and len(set(hashed)) == 3
    assert hashed == _with_ids(pl.DataFrame({"q": ["a", "a", "b"]}), "id", "x")[1]


def test_request_seed_is_stable_and_depends_on_seed_and_id():
    assert request_seed(0, "a") == request_seed(0, "a")
    assert request_seed(0, "a") != request_seed(1, "a") != request_seed(0, "b")
    assert 0 <= request_seed(5, "z") < 2**31


def test_assign_is_i_mod_k_on_a_fresh_run():
    assert _assign(list(range(7)), 2) == [[0, 2, 4, 6], [1, 3, 5]]
    assert _assign([3, 5, 6], 2) == [[3, 6], [5]]


def test_stage_config_is_documented_in_the_module_docstring():
    import distill.stages.generate as g

    doc = g.__doc__ or ""
    for key in g.Config.model_fields:
        if key in ("kind", "inputs", "description"):
            continue
        assert f"{key}:" in doc, f"config key {key} is not documented in distill.stages.generate"
    assert check is g.check
