"""Memory planner vs measured peak memory: full and LoRA training of two model sizes.

Each configuration trains for a few steps in a fresh process through distill's real training path
(`distill.train.job.run_job`, continued pretraining with packed fixed-length blocks, so every batch
has exactly batch x seq_len tokens, as the estimate assumes), and reports its peak memory: resident
memory (ru_maxrss) on CPU, torch.cuda.max_memory_allocated on a GPU (compared with the estimate
without the CUDA context and allocator slack, which that counter does not see).

Run from the repo root: .venv/bin/python bench/memory.py [--steps 3]
Last line: JSON with per-run ratios and max_rel_error (target <= 0.25).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIZES = {
    # name: (hidden, layers, heads, intermediate)
    "llama-30m": (640, 6, 10, 1728),
    "llama-100m": (1024, 8, 16, 2752),
}
BATCH, SEQ = 4, 256


def child(spec: dict) -> None:
    """Train one configuration; print its result as JSON."""
    from distill.train.job import run_job, standalone_job

    settings = {
        "method": spec["method"],
        "max_steps": spec["steps"],
        "batch_size": BATCH,
        "max_length": SEQ,
        "precision": "fp32",
        "learning_rate": 1e-4,
        "save_steps": 1000,
        "logging_steps": 1,
        "packing": True,
        "lora": {"r": 16},
    }
    job = standalone_job("cpt", settings, spec["model"], spec["data"], Path(spec["work"]))
    res = run_job(job)
    out = {"peak_rss_mb": res["peak_rss_mb"], "steps": res["steps"], "tokens": res["train_tokens"]}
    import torch

    if torch.cuda.is_available():
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print("RESULT " + json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--child", default=None)
    a = ap.parse_args()
    if a.child:
        child(json.loads(a.child))
        return

    import torch

    from distill.tiny import build_tiny_model
    from distill.train.memory import estimate, load_config

    cuda = torch.cuda.is_available()
    root = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    # documents long enough that packing fills every block
    import random

    rng = random.Random(0)
    words = "select from where group by order count sum avg table city name price year total orders the of".split()
    data = root / "text.parquet"
    from datasets import Dataset

    Dataset.from_list(
        [{"text": " ".join(rng.choice(words) for _ in range(400))} for _ in range(200)]
    ).to_parquet(str(data))
    runs = []
    for name, (h, layers, heads, inter) in SIZES.items():
        mpath = root / name
        build_tiny_model(mpath, "llama", 0, hidden=h, layers=layers, heads=heads, intermediate=inter)
        conf = load_config(str(mpath))
        for method in ("full", "lora"):
            spec = {
                "model": str(mpath),
                "method": method,
                "steps": a.steps,
                "data": str(data),
                "work": str(root / f"w-{name}-{method}"),
            }
            env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
            t0 = time.time()
            r = subprocess.run(
                [sys.executable, __file__, "--child", json.dumps(spec)],
                capture_output=True,
                text=True,
                env=env,
            )
            if r.returncode != 0:
                raise SystemExit(f"{name}/{method} failed:\n{r.stderr[-3000:]}")
            res = json.loads([ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")][-1][7:])
            est = estimate(
                conf,
                method=method,
                lora_r=16,
                lora_targets=None,
                lora_dropout=0.05,
                batch_size=BATCH,
                seq_len=SEQ,
                precision="fp32",
                optimizer="adamw",
                device="cuda" if cuda else "cpu",
            )
            comps = est["components_bytes"]
            if cuda:
                est_mb = (est["total_bytes"] - comps["runtime_overhead"] - comps["allocator_slack"]) / 2**20
                meas_mb = res["peak_gpu_mb"]
            else:
                est_mb = est["total_bytes"] / 2**20
                meas_mb = res["peak_rss_mb"]
            # the model-dependent part alone (without the constant runtime), for a stricter look
            model_part_est = (
                est["total_bytes"] - comps["runtime_overhead"] - comps["allocator_slack"]
            ) / 2**20
            run = {
                "model": name,
                "params": est["params"],
                "method": method,
                "measured_mb": round(meas_mb, 1),
                "estimated_mb": round(est_mb, 1),
                "ratio": round(est_mb / meas_mb, 3),
                "rel_error": round(abs(est_mb - meas_mb) / meas_mb, 3),
                "estimated_model_part_mb": round(model_part_est, 1),
                "components_mb": {k: round(v / 2**20, 1) for k, v in comps.items() if v},
                "wall_s": round(time.time() - t0, 1),
            }
            runs.append(run)
            print(
                f"{name:>11} {method:>4}: params {est['params'] / 1e6:6.1f}M  measured {meas_mb:8.1f} MB  "
                f"estimated {est_mb:8.1f} MB  ratio {run['ratio']:.3f}  ({run['wall_s']}s)",
                flush=True,
            )
    summary = {
        "device": "cuda" if cuda else "cpu",
        "measure": "torch.cuda.max_memory_allocated" if cuda else "peak RSS (ru_maxrss)",
        "batch_size": BATCH,
        "seq_len": SEQ,
        "precision": "fp32",
        "steps": a.steps,
        "runs": runs,
        "max_rel_error": max(r["rel_error"] for r in runs),
        "target_max_rel_error": 0.25,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
