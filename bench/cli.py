"""CLI start-up and cached-run latency.

Builds a throwaway project with a 7-stage pipeline of real, model-free stage kinds (corpus, load,
curate) over the repo's own data, runs it once, then times (median of several runs, each a fresh
process, as a user would type it):
  - `distill --help`
  - a fully cached `distill run` (every stage reused)
  - `distill status` on the same pipeline

Run from the repo root: `.venv/bin/python bench/cli.py`. Last line: one JSON object.
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DISTILL = [str(REPO / ".venv/bin/distill")]

PIPELINE = """\
name: bench-cli
stages:
  docs: {kind: corpus, paths: ["data/docs/**/*.md"]}
  schemas: {kind: corpus, paths: ["data/schemas/*.sql"], min_chars: 10}
  chat_raw: {kind: load, paths: [data/openai_sft_gsm8k_sample.jsonl], format: messages}
  chat: {kind: curate, inputs: [chat_raw], verify: none, dedup: {exact: true}}
  identity_raw: {kind: load, paths: [data/llamafactory_identity.json], format: alpaca}
  identity: {kind: curate, inputs: [identity_raw], verify: none, dedup: {exact: true}}
  prefs: {kind: load, paths: [data/openai_dpo_orca_sample.jsonl], format: openai_dpo, output: pairs}
"""


def timed(cmd: list[str], cwd: Path, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
        out.append(time.perf_counter() - t0)
        if r.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed: {r.stderr}")
    return out


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="distill-bench-cli-") as tmp:
        proj = Path(tmp)
        data = proj / "data"
        shutil.copytree(REPO / "pipelines/data/sql_dialect/docs", data / "docs")
        shutil.copytree(REPO / "pipelines/data/sql_dialect/schemas", data / "schemas")
        for name in (
            "openai_sft_gsm8k_sample.jsonl",
            "llamafactory_identity.json",
            "openai_dpo_orca_sample.jsonl",
        ):
            shutil.copy(REPO / "tests/data/pref_sft_formats" / name, data / name)
        (proj / "pipeline.yaml").write_text(PIPELINE)
        t0 = time.perf_counter()
        first = subprocess.run([*DISTILL, "run", "pipeline.yaml"], cwd=proj, capture_output=True, text=True)
        first_s = time.perf_counter() - t0
        if first.returncode != 0:
            raise SystemExit(first.stderr)
        help_s = timed([*DISTILL, "--help"], proj, 7)
        cached = timed([*DISTILL, "run", "pipeline.yaml"], proj, 5)
        status = timed([*DISTILL, "status", "pipeline.yaml"], proj, 5)
        check = subprocess.run([*DISTILL, "run", "pipeline.yaml"], cwd=proj, capture_output=True, text=True)
        assert "nothing to do; 7 stage(s) cached" in check.stdout, check.stdout
    result = {
        "help_s": round(statistics.median(help_s), 3),
        "cached_run_s": round(statistics.median(cached), 3),
        "status_s": round(statistics.median(status), 3),
        "first_run_s": round(first_s, 2),
        "stages": 7,
    }
    print(f"distill --help: {help_s}", file=sys.stderr)
    print(f"cached run: {cached}", file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
