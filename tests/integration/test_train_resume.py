"""kill -9 in the middle of training, rerun: training resumes from the last checkpoint (step count,
optimizer, scheduler, RNG and data position carry over), and matches an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.test_train_support import ROWS_PLUGIN, chat_rows, write_jsonl

pytestmark = pytest.mark.slow

STEPS, SAVE = 120, 30


def project(root: Path, model: Path) -> Path:
    write_jsonl(root / "data/sft.jsonl", chat_rows(256, seed=3))
    p = root / "pipeline.yaml"
    p.write_text(
        f"""\
name: resume
models:
  student: {{id: {model}}}
stages:
  rows: {{kind: train_rows, path: data/sft.jsonl, layout: sft}}
  sft: {{kind: sft, inputs: [rows], base: student, method: full, learning_rate: 0.001, max_steps: {STEPS},
         save_steps: {SAVE}, save_total_limit: 2, batch_size: 16, max_length: 128, logging_steps: 10,
         lora: {{dropout: 0.1}}, eval_split: 0}}
"""
    )
    return p


def distill(root: Path, *args: str, **kw) -> subprocess.Popen:
    env = {
        **os.environ,
        "DISTILL_PLUGINS": ROWS_PLUGIN,
        "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
        "OMP_NUM_THREADS": "1",
    }
    return subprocess.Popen(
        [sys.executable, "-m", "distill.cli", *args],
        cwd=root,
        env=env,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kw,
    )


def sft_manifest(root: Path, name: str) -> dict:
    [m] = list((root / f"runs/{name}/sft").glob("*/manifest.json"))
    return json.loads(m.read_text())


def test_kill_9_then_rerun_resumes_from_checkpoint(tmp_path, tiny_llama):
    # reference: the same training without interruption
    ref_root = tmp_path / "ref"
    ref_root.mkdir()
    proc = distill(ref_root, "run", str(project(ref_root, tiny_llama)))
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    ref = sft_manifest(ref_root, "resume")["metrics"]

    root = tmp_path / "killed"
    root.mkdir()
    p = project(root, tiny_llama)
    proc = distill(root, "run", str(p))
    ckpts: list[Path] = []
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        ckpts = [
            c
            for c in root.glob("runs/resume/sft/.tmp-*/scratch/checkpoints/checkpoint-*")
            if (c / "trainer_state.json").is_file()
        ]
        if ckpts:
            break
        time.sleep(0.2)
    assert ckpts, "no checkpoint appeared before the run ended"
    os.killpg(proc.pid, signal.SIGKILL)  # the runner and its training child, mid-training
    proc.wait()
    time.sleep(2)  # let an orphan (if any) notice its parent is gone
    killed_at = max(int(c.name.split("-")[1]) for c in ckpts)
    assert killed_at < STEPS

    proc = distill(root, "run", str(p))
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    m = sft_manifest(root, "resume")["metrics"]
    assert m["steps"] == STEPS
    assert SAVE <= m["resumed_from_step"] < STEPS
    assert "resumed from checkpoint" in out or "resuming from checkpoint" in out
    # the resumed run logs only the steps after the checkpoint, and they match the uninterrupted run
    ref_loss = dict(map(tuple, ref["loss_history"]))
    got = [(s, v) for s, v in m["loss_history"] if s > m["resumed_from_step"]]
    assert got and all(abs(ref_loss[s] - v) < 1e-3 for s, v in got), (got, ref_loss)
