"""Trainer callbacks: log lines in the run log, a progress bar, and the loss history kept for the manifest."""

from __future__ import annotations

import math
import time
from typing import Any

from transformers import TrainerCallback

from distill.core.log import Progress, get_logger

log = get_logger("train")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


class DistillCallback(TrainerCallback):
    """Collects `history` (every log record) and reports progress on the main process."""

    def __init__(self, desc: str) -> None:
        self.desc = desc
        self.history: list[dict[str, Any]] = []
        self.progress: Progress | None = None
        self.start_step = 0
        self.t_start: float | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.start_step = int(state.global_step)
        self.t_start = time.monotonic()
        if state.is_world_process_zero:
            self.progress = Progress(state.max_steps, self.desc, "steps").__enter__()
            if self.start_step:
                self.progress.advance(self.start_step)
                log.info(f"{self.desc}: resumed from checkpoint at step {self.start_step}/{state.max_steps}")

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if self.progress is not None:
            self.progress.advance(1)

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any
    ) -> None:
        if not logs:
            return
        rec = {
            "step": int(state.global_step),
            **{k: v for k, v in logs.items() if isinstance(v, int | float)},
        }
        if any(isinstance(v, float) and not math.isfinite(v) for v in rec.values()):
            log.warning(f"{self.desc}: non-finite value logged at step {state.global_step}: {rec}")
        self.history.append(rec)
        if state.is_world_process_zero:
            keys = [
                k
                for k in (
                    "loss",
                    "eval_loss",
                    "learning_rate",
                    "grad_norm",
                    "mean_token_accuracy",
                    "rewards/margins",
                    "rewards/accuracies",
                    "eval_rewards/margins",
                )
                if k in rec
            ]
            if keys:
                log.info(
                    f"{self.desc} step {state.global_step}/{state.max_steps}: "
                    + " ".join(f"{k}={_fmt(rec[k])}" for k in keys)
                )

    def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if self.progress is not None:
            self.progress.__exit__(None, None, None)
            self.progress = None
