"""Execution-accuracy scoring on a small DuckDB/SQLite eval set: gold-as-prediction scores 100%
on runnable rows, perturbed predictions score what they should, nondeterministic or broken gold
rows are excluded with their reason, and hostile SQL in predictions is contained."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

from distill.errors import DistillError
from distill.evaluate.evalset import load_eval_set, load_predictions
from distill.evaluate.scoring import Evaluator, nondeterminism, tie_groups

SCHEMA = """
CREATE TABLE emp (id INTEGER, name VARCHAR, dept VARCHAR, salary INTEGER);
INSERT INTO emp VALUES (1, 'ann', 'eng', 100), (2, 'bob', 'eng', 90), (3, 'cid', 'ops', 90),
                       (4, 'dee', 'ops', 70), (5, 'eve', 'hr', 90), (6, 'fay', 'hr', 60);
"""


def _digest(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.fixture
def evalset(tmp_path: Path) -> Path:
    d = tmp_path / "ev"
    d.mkdir()
    (d / "emp.sql").write_text(SCHEMA)
    con = duckdb.connect(str(d / "shop.duckdb"))
    con.execute(
        "CREATE TABLE items (sku VARCHAR, price DOUBLE); INSERT INTO items VALUES ('a', 1.5), ('b', 2.0), ('c', 2.0)"
    )
    con.close()
    lite = sqlite3.connect(str(d / "zoo.sqlite"))
    lite.execute("CREATE TABLE animals (name TEXT, legs INTEGER)")
    lite.executemany("INSERT INTO animals VALUES (?, ?)", [("cat", 4), ("bird", 2), ("ant", 6)])
    lite.commit()
    lite.close()
    rows = [
        {"id": "count", "question": "How many employees?", "sql": "SELECT count(*) FROM emp", "db": "emp.sql", "category": "agg"},
        {"id": "by_dept", "question": "Headcount per dept", "sql": "SELECT dept, count(*) AS n FROM emp GROUP BY dept", "db": "emp.sql", "category": "agg"},
        {"id": "ordered", "question": "Names by id", "sql": "SELECT name FROM emp ORDER BY id", "db": "emp.sql", "category": "order"},
        # ties in ORDER BY (salary 90 three times) but no LIMIT: deterministic as a set; any order within ties
        {"id": "ties", "question": "Names by salary desc", "sql": "SELECT name, salary FROM emp ORDER BY salary DESC", "db": "emp.sql", "category": "order"},
        {"id": "top1_unique", "question": "Best paid", "sql": "SELECT name FROM emp ORDER BY salary DESC LIMIT 1", "db": "emp.sql", "category": "order"},
        # excluded: LIMIT cuts through the 90-salary tie, LIMIT without ORDER BY, random, clock, broken gold
        {"id": "top2_tied", "question": "Two best paid", "sql": "SELECT name FROM emp ORDER BY salary DESC LIMIT 2", "db": "emp.sql"},
        {"id": "any3", "question": "Any three", "sql": "SELECT name FROM emp LIMIT 3", "db": "emp.sql"},
        {"id": "rand", "question": "A random one", "sql": "SELECT name FROM emp ORDER BY random() LIMIT 1", "db": "emp.sql"},
        {"id": "clock", "question": "Today", "sql": "SELECT current_date", "db": "emp.sql"},
        {"id": "broken", "question": "?", "sql": "SELECT nope FROM emp", "db": "emp.sql"},
        # other database kinds
        {"id": "duck", "question": "Prices of 2", "sql": "SELECT sku FROM items WHERE price = 2", "db": "shop.duckdb", "category": "other"},
        {"id": "lite", "question": "Legs", "sql": "SELECT sum(legs) FROM animals", "db": "zoo.sqlite", "category": "other"},
        {"id": "setup", "question": "From setup", "sql": "SELECT max(v) FROM t", "setup_sql": "CREATE TABLE t AS SELECT range AS v FROM range(5)", "category": "other"},
        {"id": "setup_on_db", "question": "Setup on a db", "sql": "SELECT count(*) FROM emp2",
         "db": "emp.sql", "setup_sql": "CREATE TABLE emp2 AS SELECT * FROM emp WHERE salary > 80", "category": "other"},
    ]  # fmt: skip
    p = d / "eval.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


EXCLUDED = {"top2_tied", "any3", "rand", "clock", "broken"}


def test_gold_as_prediction_scores_100_percent_on_runnable_rows(evalset, tmp_path):
    rows = load_eval_set(evalset)
    with Evaluator(rows, tmp_path / "w", workers=2) as ev:
        gold = ev.analyze_gold()
        assert {k for k, g in gold.items() if not g.ok} == EXCLUDED
        assert gold["broken"].reason.startswith("gold_error: ")
        assert "LIMIT cuts through rows tied" in gold["top2_tied"].reason
        assert "LIMIT without ORDER BY" in gold["any3"].reason
        assert "random" in gold["rand"].reason and "date/time" in gold["clock"].reason
        assert gold["ties"].groups == [0, 1, 4, 5, 6]  # 100 | 90 90 90 | 70 | 60
        assert gold["ordered"].groups is None
        results, m = ev.score({r.id: r.sql for r in rows})
    assert m["n"] == 14 and m["runnable"] == 9
    assert m["execution_accuracy"] == 1.0 and m["error_rate"] == 0.0 and m["exact_match"] == 1.0
    assert m["valid_sql_rate"] == 1.0
    assert m["excluded"] == {"gold_error": 1, "nondeterministic": 4}
    assert m["per_category"]["other"]["execution_accuracy"] == 1.0 and m["per_category"]["other"]["n"] == 4
    by = {r["id"]: r for r in results}
    assert by["rand"]["verdict"] == "excluded" and by["rand"]["correct"] is None
    assert by["rand"]["excluded_reason"].startswith("nondeterministic")


def test_perturbed_predictions_score_what_they_should(evalset, tmp_path):
    rows = load_eval_set(evalset)
    preds = {r.id: r.sql for r in rows}
    preds.update(
        {
            # still right: same query in another layout (also an exact match after canonicalization),
            # aliases, another order when the gold has none, a permutation within ORDER BY ties
            "count": "select   COUNT(*)\nfrom EMP",
            "by_dept": "SELECT dept, count(*) FROM emp GROUP BY dept ORDER BY dept DESC",
            "ties": "SELECT name, salary FROM emp ORDER BY salary DESC, name DESC",
            # wrong: order broken where the gold orders, wrong rows, wrong value
            "ordered": "SELECT name FROM emp ORDER BY id DESC",
            "top1_unique": "SELECT name FROM emp ORDER BY salary ASC LIMIT 1",
            "duck": "SELECT sku FROM items WHERE price > 1",
            # errors: unknown column, not SQL
            "lite": "SELECT sum(arms) FROM animals",
            "setup": "this is not sql at all",
        }
    )
    del preds["setup_on_db"]  # missing prediction
    with Evaluator(rows, tmp_path / "w") as ev:
        results, m = ev.score(preds)
    by = {r["id"]: r["verdict"] for r in results}
    assert by["count"] == by["by_dept"] == by["ties"] == "correct"
    assert by["ordered"] == by["top1_unique"] == by["duck"] == "wrong_result"
    assert by["lite"] == by["setup"] == "error"
    assert by["setup_on_db"] == "missing"
    # 3 correct of 9 runnable; 3 errors (2 + missing); 3 wrong results
    assert m["correct"] == 3 and m["execution_accuracy"] == pytest.approx(3 / 9, abs=1e-6)
    assert m["error_rate"] == pytest.approx(3 / 9, abs=1e-6) and m["wrong_result_rate"] == pytest.approx(
        3 / 9, abs=1e-6
    )
    # parses: all but the non-SQL text and the missing one (12 of 14)
    assert m["valid_sql_rate"] == pytest.approx(12 / 14, abs=1e-6)
    assert m["exact_match"] == pytest.approx(1 / 9, abs=1e-6)  # only the re-spelled 'count'
    assert next(r for r in results if r["id"] == "count")["exact_match"] is True
    assert m["error_types"]["no_sql"] == 1


def test_hostile_sql_is_contained(evalset, tmp_path):
    rows = load_eval_set(evalset)
    sources = [evalset.parent / f for f in ("emp.sql", "shop.duckdb", "zoo.sqlite")]
    before = {p: _digest(p) for p in sources}
    leak = tmp_path / "leak.csv"
    hostile = {
        "count": "DROP TABLE emp",
        "by_dept": f"COPY emp TO '{leak}'",
        "ordered": f"SELECT * FROM read_csv('{evalset}')",
        "ties": "SELECT 1; DELETE FROM emp",
        "top1_unique": f"ATTACH '{tmp_path / 'x.duckdb'}' AS x",
        "duck": "INSTALL httpfs",
        "lite": "SELECT load_extension('/tmp/evil')",
        "setup": "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) SELECT count(*) FROM r",
        "setup_on_db": "SET enable_external_access = true",
    }
    with Evaluator(rows, tmp_path / "w", timeout_s=1.0) as ev:
        results, m = ev.score(hostile)
        # the databases still answer the gold queries afterwards
        again, m2 = ev.score({r.id: r.sql for r in rows})
    by = {r["id"]: r for r in results if r["id"] in hostile}
    assert all(r["verdict"] == "error" for r in by.values()), {
        k: (r["verdict"], r["error_type"]) for k, r in by.items()
    }
    assert by["setup"]["error_type"] == "timeout"
    assert {by[k]["error_type"] for k in ("count", "by_dept", "ordered", "ties", "top1_unique", "duck")} == {
        "disallowed"
    }
    assert m["execution_accuracy"] == 0.0
    assert m2["execution_accuracy"] == 1.0
    assert {p: _digest(p) for p in sources} == before
    assert not leak.exists() and not (tmp_path / "x.duckdb").exists()


def test_tie_groups_and_static_nondeterminism():
    asc = [[1, "a"], [2, "b"], [2, "c"], [3, "d"]]
    desc = [[1, "a"], [2, "c"], [2, "b"], [3, "d"]]
    assert tie_groups(asc, desc) == [0, 1, 3, 4]
    assert tie_groups(asc, asc) == [0, 1, 2, 3, 4]
    assert nondeterminism("SELECT * FROM t USING SAMPLE 10%", "duckdb").startswith("nondeterministic")
    assert nondeterminism("SELECT uuid()", "duckdb") and nondeterminism("SELECT now()", "duckdb")
    assert nondeterminism("SELECT a FROM t ORDER BY a", "duckdb") is None


def test_eval_set_errors_name_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text(
        '{"id": "a", "question": "q", "sql": "SELECT 1", "setup_sql": "SELECT 1"}\n'
        '{"id": "a", "question": "q", "sql": "SELECT 1", "setup_sql": "SELECT 1"}\n'
        '{"id": "b", "question": "q"}\n'
        '{"id": "c", "question": "q", "sql": "SELECT 1", "db": "missing.duckdb"}\n'
        "not json\n"
    )
    with pytest.raises(DistillError) as e:
        load_eval_set(p)
    text = "\n".join(e.value.lines)
    assert f"{p}:2: id 'a' already used on line 1" in text
    assert f"{p}:3: missing or empty key(s) sql" in text
    assert f"{p}:4: db 'missing.duckdb' not found" in text
    assert f"{p}:5: not valid JSON" in text
    preds = tmp_path / "p.jsonl"
    preds.write_text('{"id": "a", "completion": "Sure:\\n```sql\\nSELECT 2;\\n```"}\n')
    sqls, raws = load_predictions(preds)
    assert sqls == {"a": "SELECT 2"} and raws["a"].startswith("Sure")


def test_evaluate_sql_cli(evalset, tmp_path):
    rows = [json.loads(line) for line in evalset.read_text().splitlines()]
    pred = tmp_path / "pred.jsonl"
    pred.write_text(
        "".join(json.dumps({"id": r["id"], "sql": r["sql"]}) + "\n" for r in rows if r["id"] != "count")
    )
    out = tmp_path / "out"
    r = subprocess.run(
        [sys.executable, "-m", "distill.cli", "evaluate-sql", "--eval-set", str(evalset), "--predictions", str(pred),
         "--dialect", "duckdb", "--out", str(out)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["n"] == 14 and summary["runnable"] == 9 and summary["missing_predictions"] == 1
    assert summary["execution_accuracy"] == pytest.approx(8 / 9, abs=1e-6)
    assert summary["valid_sql_rate"] == pytest.approx(13 / 14, abs=1e-6) and summary[
        "error_rate"
    ] == pytest.approx(1 / 9, abs=1e-6)
    lines = (out / "results.jsonl").read_text().splitlines()
    assert len(lines) == 14
    row = json.loads(lines[0])
    assert {"question", "gold_sql", "prediction", "verdict", "error"} <= set(row)
    assert json.loads((out / "metrics.json").read_text())["per_category"]["agg"]["n"] == 2
    bad = subprocess.run(
        [sys.executable, "-m", "distill.cli", "evaluate-sql", "--eval-set", str(tmp_path / "nope.jsonl"), "--predictions", str(pred)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert bad.returncode == 1 and "no such eval set file" in bad.stderr and "Traceback" not in bad.stderr
