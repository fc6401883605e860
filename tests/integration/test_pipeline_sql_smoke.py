"""The flagship pipeline's smoke profile end to end, offline: every stage, the report, the no-op
rerun, and the partial rerun after a prompt-template change. Slow (about 10 minutes on 2 cores):
run with `make test-e2e` (CI runs it after the default suite)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.e2e]


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
    """A copy of the pipeline, its data and prompts, so the test can edit a template."""
    proj = tmp_path_factory.mktemp("flagship")
    shutil.copytree(REPO / "pipelines", proj / "pipelines")
    shutil.copytree(REPO / "prompts", proj / "prompts")
    return proj


@pytest.fixture(scope="module")
def first_run(project: Path) -> subprocess.CompletedProcess[str]:
    t0 = time.time()
    r = distill("run", "pipelines/sql_dialect.yaml", "--profile", "smoke", cwd=project)
    print(f"smoke run: {time.time() - t0:.0f}s")
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def status(project: Path) -> dict[str, dict]:
    r = distill("status", "pipelines/sql_dialect.yaml", "--profile", "smoke", "--json", cwd=project)
    assert r.returncode == 0, r.stderr
    return {s["name"]: s for s in json.loads(r.stdout)["stages"]}


def test_every_stage_leaves_a_non_empty_artifact(project, first_run):
    st = status(project)
    assert {s["state"] for s in st.values()} == {"done"}, st
    for name in ("corpus", "questions", "answers", "verified", "pairs", "eval"):
        assert st[name]["rows"] and st[name]["rows"] > 0, (name, st[name])
    for name in ("cpt", "sft", "dpo", "merged"):
        model = Path(st[name]["path"]) / "model"
        assert any(model.glob("*.safetensors")), name
    answers = pl.read_parquet(sorted((Path(st["answers"]["path"]) / "data").glob("*.parquet")))
    assert answers["completion"].str.contains("SELECT").all()
    pairs = pl.read_parquet(sorted((Path(st["pairs"]["path"]) / "data").glob("*.parquet")))
    assert {"prompt", "chosen", "rejected"} <= set(pairs.columns)
    assert set(pairs["rejected_failure"].unique()) - {None}, "rejected answers carry their failure type"
    verified = json.loads((Path(st["verified"]["path"]) / "manifest.json").read_text())
    assert verified["metrics"]["rows_in"] > verified["metrics"]["rows_out"] > 0


def test_report_and_export(project, first_run):
    st = status(project)
    ev = Path(st["eval"]["path"])
    metrics = json.loads((ev / "metrics.json").read_text())
    assert set(metrics["models"]) == {"student", "cpt", "sft", "dpo", "merged", "teacher"}
    for m in metrics["models"].values():
        assert 0.0 <= m["valid_sql_rate"] <= 1.0
    html = (ev / "report" / "index.html").read_text()
    assert "student" in html and "merged" in html and "<img" in html
    from datasets import load_dataset

    ds = load_dataset(str(project / "exports" / "sql-duckdb-smoke"), "verified")
    assert ds["train"].num_rows == st["verified"]["rows"]


def test_rerun_is_a_noop(project, first_run):
    t0 = time.time()
    r = distill("run", "pipelines/sql_dialect.yaml", "--profile", "smoke", cwd=project)
    print(f"cached rerun: {time.time() - t0:.2f}s")
    assert r.returncode == 0
    assert "nothing to do; 11 stage(s) cached" in r.stdout


def test_template_change_reruns_only_affected_stages(project, first_run):
    tpl = project / "prompts/sql/answer.jinja"
    tpl.write_text(tpl.read_text() + "\nAnswer with one query.\n")
    st = status(project)
    for name in ("corpus", "cpt", "questions"):
        assert st[name]["state"] == "done", (name, st[name])
    assert st["answers"]["state"] == "stale"
    assert "prompts/sql/answer.jinja changed" in st["answers"]["reason"]
    assert st["verified"]["reason"] == "input answers changed"
    assert st["eval"]["state"] == "stale"
    r = distill(
        "run",
        "pipelines/sql_dialect.yaml",
        "--profile",
        "smoke",
        "--only",
        "answers",
        "--only",
        "verified",
        "--only",
        "pairs",
        cwd=project,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "ran 3 stage(s), reused 0" in r.stdout, r.stdout[-500:]
    after = status(project)
    for name in ("answers", "verified", "pairs", "corpus", "cpt", "questions"):
        assert after[name]["state"] == "done", name
    assert after["sft"]["state"] == "stale"
