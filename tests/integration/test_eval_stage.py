"""The evaluate stage end to end: a tiny local model (transformers backend) and an 'oracle' behind
an OpenAI-compatible server on 127.0.0.1 that answers each question with its gold SQL; metrics,
per-row results, the report (and its rebuild with `distill report`), and a headless-Chromium
screenshot of the page when Chromium is installed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import polars as pl
import pytest

from distill.config import load_pipeline
from distill.core import runner

SCHEMA = """CREATE TABLE emp (id INTEGER, name VARCHAR, dept VARCHAR, salary INTEGER);
INSERT INTO emp VALUES (1, 'ann', 'eng', 100), (2, 'bob', 'eng', 90), (3, 'cid', 'ops', 80), (4, 'dee', 'hr', 70);
"""
ROWS = [
    {"id": "q1", "question": "How many employees are there?", "sql": "SELECT count(*) FROM emp", "db": "schemas/emp.sql", "category": "agg"},
    {"id": "q2", "question": "List names ordered by salary, highest first.", "sql": "SELECT name FROM emp ORDER BY salary DESC", "db": "schemas/emp.sql", "category": "order"},
    {"id": "q3", "question": "Average salary per department?", "sql": "SELECT dept, avg(salary) FROM emp GROUP BY dept", "db": "schemas/emp.sql", "category": "agg"},
    {"id": "q4", "question": "Pick one at random.", "sql": "SELECT name FROM emp ORDER BY random() LIMIT 1", "db": "schemas/emp.sql", "category": "order"},
]  # fmt: skip


class _Oracle(BaseHTTPRequestHandler):
    answers: dict[str, str] = {}
    seen: list[list[dict[str, str]]] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server API
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.seen.append(body["messages"])
        user = body["messages"][-1]["content"]
        sql = next((s for q, s in self.answers.items() if q in user), "I do not know")
        data = {
            "id": "x", "object": "chat.completion", "model": body.get("model"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": f"```sql\n{sql}\n```"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
        }  # fmt: skip
        raw = json.dumps(data).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def log_message(self, *a: object) -> None:
        return


@pytest.fixture
def oracle():
    _Oracle.answers = {r["question"]: r["sql"] for r in ROWS}
    _Oracle.seen = []
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Oracle)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
    srv.shutdown()
    srv.server_close()


def _pipeline(write_pipeline, base_url: str) -> Path:
    return write_pipeline(
        f"""
        name: evaltest
        seed: 3
        models:
          student: {{id: "tiny:llama", backend: transformers}}
          oracle: {{id: oracle-model, backend: openai, base_url: "{base_url}", max_retries: 0}}
        task: {{kind: sql, dialect: duckdb, schemas: schemas/*.sql}}
        stages:
          eval:
            kind: evaluate
            models: [student, oracle]
            eval_set: eval.jsonl
            prompt: prompts/answer.jinja
            system_prompt: prompts/system.jinja
            max_tokens: 16
        """,
        {
            "schemas/emp.sql": SCHEMA,
            "eval.jsonl": "".join(json.dumps(r) + "\n" for r in ROWS),
            "prompts/answer.jinja": "Schema ({{ dialect }}):\n{{ schema_ddl }}\nQuestion: {{ question }}\nAnswer in ```sql```.",
            "prompts/system.jinja": "You write {{ dialect }} SQL.",
        },
    )


def test_evaluate_stage_scores_models_and_writes_report(write_pipeline, oracle, monkeypatch, tmp_path):
    monkeypatch.setenv("DISTILL_INPROCESS", "1")  # the stage here; each model still in its own process
    p = _pipeline(write_pipeline, oracle)
    lp = load_pipeline(p)
    plans = runner.plan(lp)
    assert runner.run_pipeline(lp, plans, runner.select(lp, plans)) == ["eval"]
    art = runner.plan(lp)["eval"]
    assert art.state == "done"
    man = json.loads((art.path / "manifest.json").read_text())
    m = json.loads((art.path / "metrics.json").read_text())
    assert m["n"] == 4 and m["runnable"] == 3
    oracle_m, student_m = m["models"]["oracle"], m["models"]["student"]
    assert oracle_m["execution_accuracy"] == 1.0 and oracle_m["valid_sql_rate"] == 1.0
    assert student_m["execution_accuracy"] == 0.0  # a random tiny model does not write this SQL
    assert man["metrics"]["execution_accuracy"] == {"student": 0.0, "oracle": 1.0}
    # the oracle saw the rendered templates: system + user, with the schema DDL (no INSERTs)
    msgs = _Oracle.seen[0]
    assert msgs[0] == {"role": "system", "content": "You write DuckDB SQL."}
    assert "CREATE TABLE emp" in msgs[1]["content"] and "INSERT" not in msgs[1]["content"]
    df = pl.read_parquet(sorted((art.path / "data").glob("*.parquet")))
    assert df.height == 8 and set(df["model"]) == {"student", "oracle"}
    q4 = df.filter(pl.col("id") == "q4")
    assert set(q4["verdict"]) == {"excluded"} and q4["excluded_reason"][0].startswith("nondeterministic")
    assert {"question", "gold_sql", "prediction", "verdict", "error", "completion"} <= set(df.columns)
    # the report: page, markdown, plots; oracle wins against the student baseline
    rep = art.path / "report"
    html = (rep / "index.html").read_text()
    assert "oracle" in html and "100.0%" in html and "data:image/png;base64," in html
    assert "Wins (oracle right, student wrong)" in html
    assert (rep / "metrics.png").stat().st_size > 1000 and (rep / "report.md").read_text().startswith(
        "# evaltest: eval"
    )
    # a cached rerun does nothing; `distill report` rebuilds the page from the artifacts
    plans = runner.plan(lp)
    assert runner.select(lp, plans) == []
    out = tmp_path / "rebuilt"
    r = subprocess.run([sys.executable, "-m", "distill.cli", "report", str(p), "--out", str(out)],
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert (out / "index.html").is_file() and (out / "categories.png").is_file()
    if shutil.which("chromium") is None:
        pytest.skip("chromium not installed: no screenshot of the page")
    shot = tmp_path / "shot.png"
    subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--hide-scrollbars", "--window-size=1200,1600",
         f"--screenshot={shot}", (out / "index.html").as_uri()],
        capture_output=True, timeout=120, env={**os.environ, "HOME": str(tmp_path)},
    )  # fmt: skip
    assert shot.is_file() and shot.stat().st_size > 10_000  # a rendered page, not a blank one
