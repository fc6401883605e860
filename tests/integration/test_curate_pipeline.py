"""curate and pairs as pipeline stages: load samples -> curate (filters, SQL verification by
execution, agreement, decontamination, dedup) -> sft artifact + dropped.parquet + funnel, and
load -> pairs (verifier and student strategies)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from distill.config import load_pipeline
from distill.core import runner
from distill.core.artifacts import Artifact
from distill.validate import validate_pipeline

SHOP = """
CREATE TABLE customers (id INTEGER PRIMARY KEY, name VARCHAR, city VARCHAR, tags VARCHAR[]);
CREATE TABLE orders (id INTEGER PRIMARY KEY, customer_id INTEGER, amount DECIMAL(10,2), placed DATE);
INSERT INTO customers VALUES (1,'Ada','Paris',['vip']),(2,'Bo','Lyon',[]),(3,'Cy','Paris',NULL),(4,'Di','Rome',['new']);
INSERT INTO orders VALUES (1,1,10.50,'2024-01-02'),(2,1,20.00,'2024-02-03'),(3,2,5.25,'2024-02-10'),
  (4,3,99.99,'2024-03-01'),(5,4,1.00,'2024-03-05');
"""


def fence(sql: str) -> str:
    return f"Here is the query:\n```sql\n{sql}\n```"


# (id, question, gold sql or None, [(completion, finish_reason, expected fate)])
CASES: list[tuple[str, str, str | None, list[tuple[str, str, str]]]] = [
    (
        "q1",
        "How many customers are there?",
        "SELECT count(*) FROM customers",
        [
            (fence("SELECT count(*) FROM customers"), "stop", "kept"),
            (fence("SELECT count(id) FROM customers;"), "stop", "extra_sample"),
            (fence("SELECT count(*) FROM orders"), "stop", "wrong_result"),
            ("SELECT COUNT(*) AS n FROM customers", "stop", "extra_sample"),
        ],
    ),
    (
        "q2",
        "Which customers live in Paris?",
        "SELECT name FROM customers WHERE city = 'Paris'",
        [
            (fence("SELECT name FROM customers WHERE city = 'Paris' ORDER BY name"), "stop", "kept"),
            (fence("SELEC name FROM customers"), "stop", "parse_error"),
            (fence("SELECT name FROM customers WHERE city = 'Lyon'"), "stop", "wrong_result"),
            (fence("COPY customers TO 'stolen.csv'"), "stop", "disallowed"),
        ],
    ),
    (
        "q3",
        "Total order amount per customer name, largest first.",
        "SELECT c.name, sum(o.amount) AS total FROM customers c JOIN orders o ON o.customer_id = c.id GROUP BY c.name ORDER BY total DESC",
        [
            (
                fence(
                    "SELECT c.name, sum(o.amount) FROM customers c JOIN orders o ON o.customer_id = c.id GROUP BY 1 ORDER BY 2 DESC"
                ),
                "stop",
                "kept",
            ),
            (
                fence(
                    "SELECT c.name, sum(o.amount) FROM customers c JOIN orders o ON o.customer_id = c.id GROUP BY 1 ORDER BY 2"
                ),
                "stop",
                "wrong_result",
            ),
            (fence("SELECT nme FROM customers"), "stop", "exec_error"),
            ("I'm sorry, but I cannot help with that.", "stop", "refusal"),
        ],
    ),
    (
        "q4",
        "How many orders were placed in February 2024?",
        None,
        [
            (
                fence(
                    "SELECT count(*) FROM orders WHERE placed >= DATE '2024-02-01' AND placed < DATE '2024-03-01'"
                ),
                "stop",
                "kept",
            ),
            (fence("SELECT count(*) FROM orders WHERE month(placed) = 2"), "stop", "extra_sample"),
            (fence("SELECT count(*) FROM orders"), "stop", "disagrees_majority"),
            (fence("SELECT count(*) FROM orders WHERE"), "length", "truncated"),
        ],
    ),
    (
        "q5",
        "How many orders were placed in February of 2024?",
        None,
        [  # a near-duplicate question
            (
                fence("SELECT count(*) FROM orders WHERE month(placed) = 2 AND year(placed) = 2024"),
                "stop",
                "duplicate_near",
            ),
        ],
    ),
    (
        "q6",
        "List the cities of all customers.",
        None,
        [  # in the eval set: contaminated
            (fence("SELECT city FROM customers"), "stop", "contaminated_ngram"),
        ],
    ),
    (
        "q7",
        "Show every customer's town.",
        None,
        [  # different words, same SQL as an eval query
            (fence("select CITY from customers;"), "stop", "contaminated_sql"),
        ],
    ),
    (
        "q9",
        "How many customers are there?",
        None,
        [  # the same question and answer as q1, under another id
            (fence("SELECT count(*) FROM customers"), "stop", "duplicate_exact"),
        ],
    ),
    (
        "q8",
        "What is the largest order amount?",
        None,
        [
            (
                fence(
                    "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) SELECT count(*) FROM r"
                ),
                "stop",
                "timeout",
            ),
            ("", "stop", "empty"),
        ],
    ),
]

EVAL = [
    {"question": "List the cities of all customers.", "sql": "SELECT city FROM customers"},
    {"question": "Which products are out of stock?", "sql": "SELECT name FROM products WHERE stock = 0"},
]


def generations(cases: list, model: str = "teacher") -> str:
    rows = []
    for qid, q, gold, samples in cases:
        for i, (comp, finish, _fate) in enumerate(samples):
            r: dict[str, Any] = {
                "id": qid,
                "sample": i,
                "messages": [
                    {"role": "system", "content": "Write DuckDB SQL."},
                    {"role": "user", "content": q},
                ],
                "completion": comp,
                "finish_reason": finish,
                "prompt_tokens": 12,
                "completion_tokens": len(comp.split()),
                "model": model,
                "error": None,
                "question": q,
                "schema": "shop",
            }
            if gold:
                r["sql"] = gold
            rows.append(r)
    return "".join(json.dumps(r) + "\n" for r in rows)


PIPELINE = """
name: curate-it
seed: 7
task: {kind: sql, dialect: duckdb, schemas: "schemas/*.sql", timeout_s: 1.0}
stages:
  answers: {kind: load, paths: [gens.jsonl], format: generations, output: generations}
  student_answers: {kind: load, paths: [student.jsonl], format: generations, output: generations}
  verified:
    kind: curate
    inputs: [answers]
    filters: {min_chars: 1}
    decontaminate: {eval_files: [eval.jsonl], ngram: 4}
    dedup: {exact: true, near: {threshold: 0.6, ngram: 2}}
    workers: 2
  prefs: {kind: pairs, inputs: [answers], pairs_per_prompt: 2}
  student_prefs: {kind: pairs, inputs: [answers, student_answers], strategy: student, student: student_answers}
"""

STUDENT = [
    (
        "q1",
        "How many customers are there?",
        "SELECT count(*) FROM customers",
        [
            (fence("SELECT count(*) FROM orders"), "stop", "wrong_result"),
            (fence("SELECT count(*) FROM customers"), "stop", "correct"),
        ],
    ),
    (
        "q4",
        "How many orders were placed in February 2024?",
        None,
        [
            (fence("SELECT count(*) FROM orders WHERE month(placed) = 1"), "stop", "wrong_result"),
        ],
    ),
    (
        "q3",
        "Total order amount per customer name, largest first.",
        None,
        [
            (fence("SELECT name, FROM"), "stop", "parse_error"),
        ],
    ),
]


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = tmp_path_factory.mktemp("curate")
    (root / "schemas").mkdir()
    (root / "schemas" / "shop.sql").write_text(SHOP)
    (root / "gens.jsonl").write_text(generations(CASES))
    (root / "student.jsonl").write_text(generations(STUDENT, "student"))
    (root / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in EVAL))
    (root / "pipeline.yaml").write_text(PIPELINE)
    lp = load_pipeline(root / "pipeline.yaml")
    plans = runner.plan(lp)
    runner.run_pipeline(lp, plans, list(lp.stages))
    return root, lp, runner.plan(lp)


def artifact(project: Any, stage: str) -> Artifact:
    _, _, plans = project
    assert plans[stage].state == "done"
    return Artifact(plans[stage].path)


def test_validate(project: Any) -> None:
    root, _, _ = project
    assert validate_pipeline(root / "pipeline.yaml", [], []) == ["no profile"]


def test_curate_funnel(project: Any) -> None:
    art = artifact(project, "verified")
    out, dropped = art.read(), art.read("dropped")
    expected = {(qid, i): fate for qid, _, _, s in CASES for i, (_, _, fate) in enumerate(s)}
    fate = {(r["id"], r["sample"]): "kept" for r in out.iter_rows(named=True)}
    fate.update({(r["id"], r["sample"]): r["reason"] for r in dropped.iter_rows(named=True)})
    assert fate == expected
    m = art.manifest
    metrics = m["metrics"]
    assert metrics["rows_in"] == len(expected) and metrics["rows_out"] == out.height == m["rows"]
    counts = dropped.group_by("reason").len()
    assert metrics["dropped"] == {r: n for r, n in counts.iter_rows()} | {}
    assert sum(metrics["dropped"].values()) + metrics["rows_out"] == metrics["rows_in"]
    assert (
        metrics["decontamination"]["contaminated_ngram"] == 1
        and metrics["decontamination"]["contaminated_sql"] == 1
    )
    # every dropped row says why, and keeps its original columns
    assert dropped["reason"].null_count() == 0 and dropped["step"].null_count() == 0
    assert "stolen.csv" in dropped.filter(pl.col("reason") == "disallowed")["completion"][0]
    assert not (art.path / "stolen.csv").exists() and not Path("stolen.csv").exists()
    detail = dict(zip(dropped["reason"].to_list(), dropped["detail"].to_list(), strict=True))
    assert "near-duplicate of prompt q4" in detail["duplicate_near"]
    assert detail["duplicate_exact"] == "same as prompt q1"
    assert "nme" in detail["exec_error"]


def test_curate_output_layout(project: Any) -> None:
    out = artifact(project, "verified").read().sort("id")
    row = out.row(0, named=True)
    assert row["messages"] == row["prompt"] + row["completion"]
    assert row["completion"] == [
        {"role": "assistant", "content": "```sql\nSELECT count(*) FROM customers\n```"}
    ]
    assert row["prompt"][-1] == {"role": "user", "content": "How many customers are there?"}
    assert row["sql"] == "SELECT count(*) FROM customers" and row["verdict"] == "pass" and row["result_hash"]
    assert row["reference_sql"] == "SELECT count(*) FROM customers" and row["agreement"] == "reference"
    assert out.filter(pl.col("id") == "q4")["agreement"].to_list() == ["majority"]
    assert out.filter(pl.col("id") == "q4")["votes"].to_list() == [2]
    assert not [c for c in out.columns if c.startswith("_")]
    # the dataset loads with `datasets` as TRL reads it
    import datasets

    ds = datasets.load_dataset(
        "parquet", data_files=[str(p) for p in artifact(project, "verified").data_files()], split="train"
    )
    assert ds[0]["completion"][0]["role"] == "assistant" and len(ds) == out.height


def test_verifier_pairs(project: Any) -> None:
    pairs = artifact(project, "prefs").read().sort("id", "rejected_sample")
    assert set(pairs.columns) >= {"prompt", "chosen", "rejected", "id", "chosen_verdict", "rejected_failure"}
    got = [(r["id"], r["rejected_failure"]) for r in pairs.iter_rows(named=True)]
    # up to two per prompt, the most informative failures first (q2's COPY is left out), in sample order
    assert got == [
        ("q1", "wrong_result"),
        ("q2", "parse_error"),
        ("q2", "wrong_result"),
        ("q3", "wrong_result"),
        ("q3", "exec_error"),
        ("q4", "disagrees_majority"),
    ]
    r = pairs.row(0, named=True)
    assert r["chosen"][0]["content"] == "```sql\nSELECT count(*) FROM customers\n```"
    assert r["rejected"][0]["content"] == "```sql\nSELECT count(*) FROM orders\n```"
    assert r["prompt"][-1]["content"] == "How many customers are there?" and r["chosen_verdict"] == "pass"
    m = artifact(project, "prefs").manifest["metrics"]
    assert m["pairs"] == 6 and m["rejected_failure"]["wrong_result"] == 3
    assert m["prompts_without_failure"] == 4  # q5, q6, q7, q9 have one passing sample each


def test_student_pairs(project: Any) -> None:
    pairs = artifact(project, "student_prefs").read().sort("id")
    got = [(r["id"], r["rejected_failure"], r["rejected"][0]["content"]) for r in pairs.iter_rows(named=True)]
    assert got == [
        ("q1", "wrong_result", "```sql\nSELECT count(*) FROM orders\n```"),
        ("q3", "parse_error", "```sql\nSELECT name, FROM\n```"),
        ("q4", "wrong_result", "```sql\nSELECT count(*) FROM orders WHERE month(placed) = 1\n```"),
    ]
    assert artifact(project, "student_prefs").manifest["metrics"]["student_correct"] == 1


def test_rerun_is_cached(project: Any) -> None:
    _, lp, _ = project
    assert {p.state for p in runner.plan(lp).values()} == {"done"}


def test_judge_strategy_runs_the_model(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """strategy judge sends every sample through the judge model (a tiny random Llama here, via
    the transformers backend) with the prompt template, and parses a score from each output. The
    pairing on scores is unit-tested (test_score_pairs); a random model's scores are whatever digit
    it happens to emit, so this checks the plumbing: one judgement per sample, counted."""
    monkeypatch.setenv("DISTILL_INPROCESS", "1")
    (tmp_path / "schemas").mkdir()
    (tmp_path / "schemas" / "shop.sql").write_text(SHOP)
    (tmp_path / "gens.jsonl").write_text(generations(CASES[:3]))
    (tmp_path / "judge.jinja").write_text("Rate 1-10.\nQ: {{ question }}\nA: {{ answer }}\nScore:")
    (tmp_path / "pipeline.yaml").write_text(
        f"""
name: judge-it
seed: 3
models:
  teacher: {{id: "{tiny_llama}", backend: transformers, dtype: float32, batch_size: 8}}
task: {{kind: sql, dialect: duckdb, schemas: "schemas/*.sql"}}
stages:
  answers: {{kind: load, paths: [gens.jsonl], format: generations, output: generations}}
  judged:
    kind: pairs
    inputs: [answers]
    strategy: judge
    judge: teacher
    judge_prompt: judge.jinja
    judge_score_pattern: "(\\\\d+)"
    judge_min_margin: 1
    judge_max_tokens: 16
"""
    )
    lp = load_pipeline(tmp_path / "pipeline.yaml")
    plans = runner.plan(lp)
    runner.run_pipeline(lp, plans, list(lp.stages))
    art = Artifact(runner.plan(lp)["judged"].path)
    m = art.manifest["metrics"]
    n_samples = sum(len(s) for _, _, _, s in CASES[:3])
    assert m["judged"] == m["samples"] == n_samples and 0 <= m["judge_unparsed"] <= n_samples
    pairs = art.read()
    assert m["pairs"] == pairs.height
    assert set(pairs.columns) >= {"prompt", "chosen", "rejected", "chosen_score", "rejected_score"}
    for r in pairs.iter_rows(named=True):
        assert r["chosen_score"] - r["rejected_score"] >= 1
