"""`distill validate` checks for training stages (no model is loaded)."""

from __future__ import annotations

from typing import Any


def check_training(cfg: Any, lp: Any) -> list[str]:
    errors = []
    acc = cfg.launcher.accelerate_config
    if acc and not lp.path(acc).is_file():
        errors.append(
            f"launcher.accelerate_config: {acc} does not exist (relative paths resolve against {lp.root})"
        )
    base = cfg.base
    if base in lp.stages:
        up = lp.stages[base]
        method = getattr(up, "method", None)
        if cfg.chain == "merge" and method in ("prompt_tuning", "prefix_tuning"):
            errors.append(
                f"base: {base} trains a {method} adapter, which cannot be merged; train it last in the chain"
            )
        if cfg.chain == "stack" and method is not None and method not in ("lora", "qlora"):
            errors.append(f"chain: stack needs a LoRA adapter upstream; {base} uses method {method}")
    return errors
