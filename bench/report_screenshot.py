"""Render an evaluation report in headless Chromium and save a screenshot (docs/report-screenshot.png).

    .venv/bin/python bench/report_screenshot.py PIPELINE.yaml [--profile smoke] [--out docs/report-screenshot.png]
    .venv/bin/python bench/report_screenshot.py            # builds and runs a small demo pipeline first

With a pipeline: `distill report` rebuilds its report from the current artifacts, then Chromium
screenshots it. Without: a demo pipeline runs offline in bench/out/report_demo/ on the repo's SQL
data: a scripted "teacher" (an OpenAI-compatible server on 127.0.0.1 that answers seed questions
with their reference SQL, and with a broken query for about a quarter of the samples) generates
answers, `curate` verifies them by execution (the funnel), the tiny student gets a LoRA SFT (the
loss curve) folded in with `merge`, and `evaluate` scores student, merged model and teacher on
the eval set. The page says what the teacher is; the numbers are real runs of those stages.

Needs Chromium (`apt-get install -y chromium`). Prints one JSON object on its last line.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "pipelines" / "data" / "sql_dialect"
DEMO = ROOT / "bench" / "out" / "report_demo"


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        p = shutil.which(name)
        if p:
            return p
    raise SystemExit("Chromium not found: apt-get install -y chromium")


def screenshot(page: Path, out: Path, width: int = 1200, height: int = 2600) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    home = DEMO / ".chromium-home"
    home.mkdir(parents=True, exist_ok=True)
    cmd = [
        chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--hide-scrollbars", f"--window-size={width},{height}",
        f"--screenshot={out}", page.resolve().as_uri(),
    ]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, timeout=180, env={**os.environ, "HOME": str(home)})
    return out


class _Teacher(BaseHTTPRequestHandler):
    """Answers a question with its reference SQL; about 1 sample in 4 gets a broken query."""

    answers: dict[str, str] = {}
    rng = random.Random(0)
    lock = threading.Lock()

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        user = body["messages"][-1]["content"]
        sql = next((s for q, s in self.answers.items() if q in user), None)
        choices = []
        for i in range(int(body.get("n", 1))):
            with self.lock:
                r = self.rng.random()
            if sql is None:
                text = "I cannot answer that."
            elif r < 0.12:  # a table that does not exist
                broken = re.sub(r"(?i)\bFROM\s+(\w+)", r"FROM \1_typo", sql, count=1)
                text = f"```sql\n{broken}\n```"
            elif r < 0.25:  # runs, but returns other rows
                wrong = sql.replace("ORDER BY", "ORDER BY 1,", 1) if "ORDER BY" in sql else sql + " LIMIT 1"
                text = f"```sql\n{wrong}\n```"
            else:
                text = f"Here is the query:\n```sql\n{sql}\n```"
            choices.append(
                {"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
            )
        raw = json.dumps({"id": "x", "object": "chat.completion", "choices": choices,
                          "usage": {"prompt_tokens": 100, "completion_tokens": 40}}).encode()  # fmt: skip
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def log_message(self, *a: object) -> None:
        return


DEMO_PIPELINE = """\
name: report-demo
description: demo for the report screenshot (scripted teacher, tiny student)
root: {root}
workdir: {work}
seed: 7
models:
  teacher: {{id: scripted-teacher, backend: openai, base_url: "{url}", max_retries: 1}}
  student: {{id: "tiny:llama", backend: transformers}}
task: {{kind: sql, dialect: duckdb, schemas: pipelines/data/sql_dialect/schemas/*.sql}}
stages:
  answers:
    kind: generate
    model: teacher
    source: pipelines/data/sql_dialect/seeds.jsonl
    prompt: prompts/sql/answer.jinja
    system_prompt: prompts/sql/system.jinja
    n: 2
    temperature: 0.8
    max_tokens: 256
    limit: 80
  verified:
    kind: curate
    inputs: [answers]
    verify: sql
  sft:
    kind: sft
    inputs: [verified]
    base: student
    lora: {{r: 8, alpha: 16}}
    learning_rate: 0.002
    max_steps: 24
    batch_size: 4
    max_length: 2048
    logging_steps: 2
  merged:
    kind: merge
    base: sft
  eval:
    kind: evaluate
    models: [student, merged, teacher]
    eval_set: pipelines/data/sql_dialect/eval.jsonl
    prompt: prompts/sql/answer.jinja
    system_prompt: prompts/sql/system.jinja
    max_tokens: 24
    baseline: student
    candidate: teacher
"""


def run_demo() -> Path:
    _Teacher.answers = {}
    for line in (DATA / "seeds.jsonl").read_text().splitlines():
        r = json.loads(line)
        _Teacher.answers[r["question"]] = r["sql"]
    for line in (DATA / "eval.jsonl").read_text().splitlines():
        r = json.loads(line)
        _Teacher.answers[r["question"]] = r["sql"]
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Teacher)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        DEMO.mkdir(parents=True, exist_ok=True)
        p = DEMO / "pipeline.yaml"
        # the teacher's URL changes per run, so it is not part of the fingerprint; the workdir is reused
        p.write_text(
            DEMO_PIPELINE.format(
                root=ROOT, work=DEMO / "runs", url=f"http://127.0.0.1:{srv.server_address[1]}/v1"
            )
        )
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "HF_HUB_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false", "DISTILL_PLAIN": "1"}  # fmt: skip
        subprocess.run([str(ROOT / ".venv" / "bin" / "distill"), "run", str(p)], check=True, env=env)
    finally:
        srv.shutdown()
        srv.server_close()
    return p


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("pipeline", nargs="?", type=Path)
    ap.add_argument("--profile", "-p", action="append", default=[])
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "report-screenshot.png")
    args = ap.parse_args()
    t0 = time.time()
    pipe = args.pipeline or run_demo()
    rep = DEMO / "report"
    cmd = [str(ROOT / ".venv" / "bin" / "distill"), "report", str(pipe), "--out", str(rep)]
    for pr in args.profile:
        cmd += ["--profile", pr]
    page = Path(
        subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
    )
    shot = screenshot(page, args.out)
    print(json.dumps({"page": str(page), "screenshot": str(shot), "bytes": shot.stat().st_size,
                      "seconds": round(time.time() - t0, 1)}))  # fmt: skip


if __name__ == "__main__":
    main()
