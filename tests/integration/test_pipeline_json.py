"""JSON extraction end to end.

- The evaluate stage on the task's real schema, prompts and eval rows: a tiny local student
  (transformers) and an 'oracle' behind an OpenAI-compatible server on 127.0.0.1 that answers with
  hand-made records (gold, one wrong field, cut-off JSON, schema-invalid); metrics, per-row
  results, the report and its rebuild with `distill report`. A second pipeline without a task
  detects the JSON eval set from its rows.
- `pipelines/json_extraction.yaml --profile smoke`, every stage, offline (slow: about 6 minutes on
  2 cores; `make test-e2e`).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import polars as pl
import pytest

from distill.config import load_pipeline
from distill.core import runner

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "pipelines" / "data" / "json_extraction"
EVAL = [json.loads(line) for line in (DATA / "eval.jsonl").read_text().splitlines()[:5]]


def _answers() -> dict[str, str]:
    """The oracle's reply per eval text: gold, gold, one wrong field, cut-off JSON, duplicate tags."""
    wrong = copy.deepcopy(EVAL[2]["record"])
    wrong["remote"] = not wrong["remote"]
    dup = copy.deepcopy(EVAL[4]["record"])
    dup["tags"] = [dup["tags"][0]] * 2
    return {
        EVAL[0]["text"]: json.dumps(EVAL[0]["record"], ensure_ascii=False),
        EVAL[1]["text"]: "```json\n" + json.dumps(EVAL[1]["record"], indent=2, ensure_ascii=False) + "\n```",
        EVAL[2]["text"]: json.dumps(wrong, ensure_ascii=False),
        EVAL[3]["text"]: '{"title": "' + EVAL[3]["record"]["title"],
        EVAL[4]["text"]: json.dumps(dup, ensure_ascii=False),
    }


class _Oracle(BaseHTTPRequestHandler):
    answers: dict[str, str] = {}
    seen: list[list[dict[str, str]]] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server API
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.seen.append(body["messages"])
        user = body["messages"][-1]["content"]
        content = next((a for t, a in self.answers.items() if t in user), "I do not know")
        data = {
            "id": "x", "object": "chat.completion", "model": body.get("model"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
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
    _Oracle.answers = _answers()
    _Oracle.seen = []
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Oracle)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
    srv.shutdown()
    srv.server_close()


def _files() -> dict[str, str]:
    return {
        "schema.json": (DATA / "schema.json").read_text(),
        "eval.jsonl": "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in EVAL),
        "prompts/extract.jinja": (REPO / "prompts/json/extract.jinja").read_text(),
        "prompts/system.jinja": (REPO / "prompts/json/system.jinja").read_text(),
    }


def test_evaluate_stage_scores_json_records(write_pipeline, oracle, monkeypatch, tmp_path):
    monkeypatch.setenv("DISTILL_INPROCESS", "1")  # the stage here; each model still in its own process
    p = write_pipeline(
        f"""
        name: jsoneval
        seed: 3
        models:
          student: {{id: "tiny:llama", backend: transformers}}
          oracle: {{id: oracle-model, backend: openai, base_url: "{oracle}", max_retries: 0}}
        task: {{kind: json, schema: schema.json}}
        stages:
          eval:
            kind: evaluate
            models: [student, oracle]
            eval_set: eval.jsonl
            prompt: prompts/extract.jinja
            system_prompt: prompts/system.jinja
            max_tokens: 16
        """,
        _files(),
    )
    lp = load_pipeline(p)
    plans = runner.plan(lp)
    assert runner.run_pipeline(lp, plans, runner.select(lp, plans)) == ["eval"]
    art = runner.plan(lp)["eval"]
    assert art.state == "done"
    m = json.loads((art.path / "metrics.json").read_text())
    assert m["task"] == "json" and m["n"] == 5 and m["runnable"] == 5 and m["schema"] == "schema.json"
    o, s = m["models"]["oracle"], m["models"]["student"]
    assert o["exact_match"] == 0.4 and o["correct"] == 2
    assert o["valid_json_rate"] == 0.8 and o["schema_valid_rate"] == 0.6
    assert o["field_accuracy"] == pytest.approx((8 + 8 + 7 + 0 + 7) / 40)
    assert (
        o["per_field"]["remote"] == 0.6 and o["per_field"]["tags"] == 0.6 and o["per_field"]["title"] == 0.8
    )
    assert s["exact_match"] == 0.0 and s["schema_valid_rate"] == 0.0  # a random tiny model cannot extract
    man = json.loads((art.path / "manifest.json").read_text())
    assert man["metrics"]["exact_match"] == {"student": 0.0, "oracle": 0.4}
    # the oracle saw the rendered templates: system + user with the schema and the text
    msgs = _Oracle.seen[0]
    assert msgs[0]["role"] == "system" and "information-extraction engine" in msgs[0]["content"]
    assert '"additionalProperties": false' in msgs[1]["content"] and EVAL[0]["text"] in msgs[1]["content"]
    df = pl.read_parquet(sorted((art.path / "data").glob("*.parquet")))
    assert df.height == 10 and set(df["model"]) == {"student", "oracle"}
    verdicts = dict(df.filter(pl.col("model") == "oracle").select("id", "verdict").iter_rows())
    assert [verdicts[r["id"]] for r in EVAL] == [
        "correct",
        "correct",
        "wrong_record",
        "invalid_json",
        "schema_error",
    ]
    # the report: JSON columns, per-field table, the oracle's wins over the student
    html = (art.path / "report" / "index.html").read_text()
    assert "field accuracy" in html and "Per field" in html and "Wins (oracle right, student wrong)" in html
    assert "execution accuracy" not in html
    # `distill report` rebuilds it from the artifacts
    out = tmp_path / "rebuilt"
    r = subprocess.run([sys.executable, "-m", "distill.cli", "report", str(p), "--out", str(out)],
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr
    md = (out / "report.md").read_text()
    assert "| oracle | 5 | 5 | 40.0% | 75.0% | 60.0% | 80.0% |" in md and "schema: schema.json" in md


def test_without_a_task_the_rows_choose_json_scoring(write_pipeline, oracle, monkeypatch):
    monkeypatch.setenv("DISTILL_INPROCESS", "1")
    files = _files()
    files["prompts/extract.jinja"] = "Extract a JSON record from:\n{{ text }}"
    p = write_pipeline(
        f"""
        name: notask
        models:
          oracle: {{id: oracle-model, backend: openai, base_url: "{oracle}", max_retries: 0}}
        stages:
          eval: {{kind: evaluate, models: [oracle], eval_set: eval.jsonl, prompt: prompts/extract.jinja}}
        """,
        files,
    )
    lp = load_pipeline(p)
    plans = runner.plan(lp)
    runner.run_pipeline(lp, plans, runner.select(lp, plans))
    m = json.loads((runner.plan(lp)["eval"].path / "metrics.json").read_text())["models"]["oracle"]
    # no schema: duplicate tags are not an error, so row 5 only differs in tags
    assert m["schema_valid_rate"] is None and m["valid_json_rate"] == 0.8 and m["exact_match"] == 0.4


# ------------------------------------------------------------------------------------------------
# the flagship pipeline's smoke profile
# ------------------------------------------------------------------------------------------------


def distill(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DISTILL_PLAIN": "1"}
    return subprocess.run(
        [sys.executable, "-m", "distill.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=2400,
    )


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    proj = tmp_path_factory.mktemp("json-flagship")
    shutil.copytree(REPO / "pipelines", proj / "pipelines")
    shutil.copytree(REPO / "prompts", proj / "prompts")
    return proj


@pytest.mark.slow
@pytest.mark.e2e
def test_json_extraction_smoke_profile_end_to_end(project):
    t0 = time.time()
    r = distill("run", "pipelines/json_extraction.yaml", "--profile", "smoke", cwd=project)
    print(f"json smoke run: {time.time() - t0:.0f}s")
    assert r.returncode == 0, r.stderr[-3000:]
    r = distill("status", "pipelines/json_extraction.yaml", "--profile", "smoke", "--json", cwd=project)
    assert r.returncode == 0, r.stderr
    st = {s["name"]: s for s in json.loads(r.stdout)["stages"]}
    assert set(st) == {"answers", "verified", "pairs", "sft", "dpo", "merged", "eval", "export"}
    assert {s["state"] for s in st.values()} == {"done"}, st
    for name in ("answers", "verified", "pairs", "eval"):
        assert st[name]["rows"] and st[name]["rows"] > 0, (name, st[name])
    for name in ("sft", "dpo", "merged"):
        assert any((Path(st[name]["path"]) / "model").glob("*.safetensors")), name
    # the teacher's constrained samples all parse; the verifier (the task schema) still rejects some
    answers = pl.read_parquet(sorted((Path(st["answers"]["path"]) / "data").glob("*.parquet")))
    assert all(isinstance(json.loads(c), dict) for c in answers["completion"])
    verified = json.loads((Path(st["verified"]["path"]) / "manifest.json").read_text())["metrics"]
    assert (
        verified["rows_in"] > verified["rows_out"] > 0 and verified["dropped"].get("json_schema_error", 0) > 0
    )
    sft = pl.read_parquet(sorted((Path(st["verified"]["path"]) / "data").glob("*.parquet")))
    assert all(isinstance(json.loads(c[-1]["content"]), dict) for c in sft["messages"])
    pairs = pl.read_parquet(sorted((Path(st["pairs"]["path"]) / "data").glob("*.parquet")))
    assert {"prompt", "chosen", "rejected"} <= set(pairs.columns)
    assert set(pairs["rejected_failure"].unique()) - {None}, "rejected answers carry their failure type"
    # eval: every model scored with the JSON metrics; the report and the exports exist
    ev = Path(st["eval"]["path"])
    metrics = json.loads((ev / "metrics.json").read_text())
    assert metrics["task"] == "json"
    assert set(metrics["models"]) == {"student", "sft", "dpo", "merged", "teacher"}
    for m in metrics["models"].values():
        for k in ("exact_match", "field_accuracy", "schema_valid_rate", "valid_json_rate"):
            assert 0.0 <= m[k] <= 1.0, (k, m)
        assert set(m["per_field"]) == {
            "title",
            "organizer",
            "location",
            "date",
            "price",
            "currency",
            "tags",
            "remote",
        }
    html = (ev / "report" / "index.html").read_text()
    assert "field accuracy" in html and "merged" in html and "<img" in html
    card = (project / "exports" / "json-extraction-smoke-model" / "README.md").read_text()
    assert "field accuracy" in card and "**merged** (this model)" in card
    from datasets import load_dataset

    ds = load_dataset(str(project / "exports" / "json-extraction-smoke"), "verified")
    assert ds["train"].num_rows == st["verified"]["rows"]
