"""`dpo`: direct preference optimization on prompt/chosen/rejected pairs (TRL's DPOTrainer).

Input layout `pairs`. The reference model is the policy's starting point: with an adapter method it
is the same model with the adapter disabled (no second copy in memory); with `chain: stack` it is a
frozen copy of the upstream adapter; with full/partial/BitFit it is a frozen copy of the weights.

Defaults keep what SFT taught: plain DPO at common learning rates was seen to collapse a small SQL
model's execution accuracy (0.575 -> 0.20) as chosen and rejected likelihoods fall together. So the
loss adds an SFT term on the chosen answers (`sft_weight`, RPO-style) and the adapter learning rate
is 5e-5 (full fine-tuning: 5e-7).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from distill.core.context import StageContext
from distill.train.options import TrainStageConfig

CODE_VERSION = "1"
SUBPROCESS = True


class Config(TrainStageConfig):
    kind: Literal["dpo"]
    beta: float = Field(0.1, gt=0, description="Strength of the KL anchor to the reference model.")
    loss_type: Literal[
        "sigmoid",
        "hinge",
        "ipo",
        "robust",
        "bco_pair",
        "sppo_hard",
        "aot",
        "aot_unpaired",
        "apo_zero",
        "apo_down",
        "sigmoid_norm",
        "exo_pair",
        "nca_pair",
        "discopop",
    ] = "sigmoid"
    sft_weight: float = Field(
        1.0, ge=0, description="Weight of the added NLL term on chosen answers (0 = plain DPO)."
    )

    ACCEPTS: ClassVar[frozenset[str] | None] = frozenset({"pairs"})
    DEFAULT_LR: ClassVar[dict[str, float]] = {"adapter": 5e-5, "full": 5e-7}


def check(cfg: Config, lp: Any) -> list[str]:
    from distill.train.checks import check_training

    return check_training(cfg, lp)


def run(ctx: StageContext) -> dict[str, Any]:
    from distill.train.stage import run_training

    return run_training(ctx)
