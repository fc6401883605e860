"""Artifact store, fingerprints, runner selection, resume, failure, lock (with the test-only `toy` stage)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest

from distill.config import load_pipeline
from distill.core import runner
from distill.core.lock import WorkdirLock
from distill.errors import LockedError, UsageError

PIPE = """\
name: toy
stages:
  a: {kind: toy, count: 6, template: prompts/t.txt}
  b: {kind: toy, inputs: [a], value: y}
  c: {kind: toy, inputs: [b]}
  side: {kind: toy, count: 2}
"""


def cli(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "distill.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture
def pipe(write_pipeline):
    return write_pipeline(PIPE, {"prompts/t.txt": "row {i} {value}\n"})


def states(p: Path, *sets: str) -> dict[str, runner.StagePlan]:
    return runner.plan(load_pipeline(p, [], list(sets)))


def run_all(p: Path, *sets: str, **kw) -> list[str]:
    lp = load_pipeline(p, [], list(sets))
    plans = runner.plan(lp)
    return runner.run_pipeline(lp, plans, runner.select(lp, plans, **kw))


def test_run_then_cached_rerun_reuses_everything(pipe):
    assert run_all(pipe) == ["a", "b", "c", "side"]
    out = states(pipe)
    assert {p.state for p in out.values()} == {"done"}
    a = out["a"]
    df = pl.read_parquet(sorted((a.path / "data").glob("*.parquet")))
    assert df["text"].to_list() == [f"row {i} x" for i in range(6)]
    man = json.loads((a.path / "manifest.json").read_text())
    assert man["rows"] == 6 and man["fingerprint"] == a.fingerprint and a.path.name == a.fingerprint[:12]
    mtime = (a.path / "manifest.json").stat().st_mtime_ns
    assert run_all(pipe) == []
    assert (a.path / "manifest.json").stat().st_mtime_ns == mtime


def test_speed_only_change_keeps_cache(pipe):
    run_all(pipe)
    after = states(pipe, "stages.a.batch_size=999", "stages.a.shard_size=5", "stages.b.description=hello")
    assert {p.state for p in after.values()} == {"done"}


def test_template_byte_change_makes_stage_and_descendants_stale(pipe):
    run_all(pipe)
    (pipe.parent / "prompts/t.txt").write_text("row {i} {value}!\n")
    st = states(pipe)
    assert st["a"].state == "stale" and "prompts/t.txt changed" in st["a"].reasons
    assert st["b"].state == "stale" and st["b"].reasons == ["input a changed"]
    assert st["c"].state == "stale" and st["c"].reasons == ["input b changed"]
    assert st["side"].state == "done"
    assert run_all(pipe) == ["a", "b", "c"]


def test_semantic_change_names_the_key(pipe):
    run_all(pipe)
    st = states(pipe, "stages.b.value=z")
    assert st["a"].state == "done"
    assert st["b"].state == "stale" and st["b"].reasons == ["config value changed"]
    assert st["c"].reasons == ["input b changed"]


def test_selection_only_from_until_force_and_missing_inputs(pipe):
    lp = load_pipeline(pipe)
    plans = runner.plan(lp)
    with pytest.raises(UsageError, match="needs 'a'"):
        runner.select(lp, plans, only=["b"])
    assert runner.select(lp, plans, only=["b"], with_deps=True) == ["a", "b"]
    assert runner.select(lp, plans, until="b") == ["a", "b"]
    with pytest.raises(UsageError, match="did you mean 'side'"):
        runner.select(lp, plans, only=["sid"])
    run_all(pipe)
    lp = load_pipeline(pipe)
    plans = runner.plan(lp)
    assert runner.select(lp, plans, from_="b") == []
    plans = runner.plan(lp)
    assert runner.select(lp, plans, force=["b"]) == ["b", "c"]
    plans = runner.plan(lp)
    assert runner.select(lp, plans, force=["b"], only=["b"]) == ["b"]


def test_dry_run_and_status_json(pipe):
    r = cli("run", "pipeline.yaml", "--dry-run", cwd=pipe.parent)
    assert r.returncode == 0, r.stderr
    assert "never run" in r.stdout and "run" in r.stdout
    assert not (pipe.parent / "runs/toy/a").exists()
    r = cli("status", "pipeline.yaml", "--json", cwd=pipe.parent)
    data = json.loads(r.stdout)
    assert data["pipeline"] == "toy"
    assert [s["name"] for s in data["stages"]] == ["a", "b", "c", "side"]
    assert set(data["stages"][0]) == {"name", "kind", "state", "fingerprint", "path", "rows", "reason"}
    assert data["stages"][0]["state"] == "missing"


def test_kill_mid_stage_leaves_no_visible_artifact_and_resumes(pipe):
    env = {"DISTILL_PLAIN": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "distill.cli",
            "run",
            "pipeline.yaml",
            "--only",
            "a",
            "--set",
            "stages.a.sleep_s=1.5",
        ],
        cwd=pipe.parent,
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    st = states(pipe)["a"]
    tmp = pipe.parent / "runs/toy/a" / f".tmp-{st.fingerprint[:12]}"
    deadline = time.time() + 60
    while time.time() < deadline and not (tmp / "data/part-00000.parquet").exists():
        time.sleep(0.05)
    assert (tmp / "data/part-00000.parquet").exists()
    shard0 = (tmp / "data/part-00000.parquet").read_bytes()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    st = states(pipe)["a"]
    assert st.state == "partial"
    assert not (pipe.parent / "runs/toy/a" / st.fingerprint[:12]).exists()
    assert run_all(pipe, only=["a"]) == ["a"]
    done = states(pipe)["a"]
    assert done.state == "done"
    data = done.path / "data"
    assert (data / "part-00000.parquet").read_bytes() == shard0
    calls = (done.path / "calls.log").read_text().split()
    assert calls.count("0") == 1  # shard 0 was not recomputed
    texts = pl.read_parquet(sorted(data.glob("*.parquet")))["text"].to_list()
    assert texts == [f"row {i} x" for i in range(6)]


def test_failure_keeps_committed_shards_and_reports(pipe):
    r = cli("run", "pipeline.yaml", "--only", "a", cwd=pipe.parent, env={"TOY_FAIL_AT": "1"})
    assert r.returncode == 1
    assert "stage a (toy) failed: RuntimeError: toy failure at shard 1" in r.stderr
    assert "Traceback" not in r.stderr
    st = states(pipe)["a"]
    assert st.state == "failed" and "toy failure" in st.reasons[0] and st.rows == 2
    assert run_all(pipe, only=["a"]) == ["a"]
    done = states(pipe)["a"]
    assert (done.path / "calls.log").read_text().split() == ["0", "1", "2"]


def test_lock_refuses_concurrent_run(pipe):
    lp = load_pipeline(pipe)
    with WorkdirLock(lp.workdir):
        r = cli("run", "pipeline.yaml", cwd=pipe.parent)
        assert r.returncode == 2
        assert f"pid {os.getpid()}" in r.stderr and "Traceback" not in r.stderr
        with pytest.raises(LockedError):
            WorkdirLock(lp.workdir).acquire()
    r = cli("run", "pipeline.yaml", cwd=pipe.parent)
    assert r.returncode == 0, r.stderr


def test_gc_removes_unreferenced_artifacts(pipe):
    run_all(pipe)
    old_b = states(pipe)["b"].path
    run_all(pipe, "stages.b.value=q")
    lp = load_pipeline(pipe, [], ["stages.b.value=q"])
    from distill.core.gc import collect

    victims, _ = collect(lp, dry_run=True)
    assert old_b in victims and old_b.exists()
    collect(lp)
    assert not old_b.exists()
    assert {p.state for p in runner.plan(lp).values()} == {"done"}


def test_cli_cached_run_and_show(pipe):
    r = cli("run", "pipeline.yaml", cwd=pipe.parent)
    assert r.returncode == 0, r.stderr
    assert list((pipe.parent / "runs/toy/logs").glob("*.log"))
    r = cli("run", "pipeline.yaml", cwd=pipe.parent)
    assert "nothing to do; 4 stage(s) cached" in r.stdout
    r = cli("show", "pipeline.yaml", "a", "--rows", "2", cwd=pipe.parent)
    assert r.returncode == 0 and "row 1 x" in r.stdout and "row 2 x" not in r.stdout
