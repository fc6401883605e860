"""`cpt`: continued pretraining of the student on raw domain text (causal LM loss on every token).

Input layout `text` (column `text`, e.g. from a `corpus` stage). Each document is tokenized (with the
tokenizer's BOS, if it adds one), EOS is appended, and the stream is packed into fixed blocks of
`max_length` tokens (TRL's "wrapped" packing: no padding, 1.3x the tokens/s of unpacked documents on
CPU). Output: a model artifact (a LoRA adapter by default). See `distill.train` for the methods,
chaining, checkpoints and multi-process launch shared with `sft` and `dpo`.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from distill.core.context import StageContext
from distill.train.options import TrainStageConfig

CODE_VERSION = "1"
SUBPROCESS = True


class Config(TrainStageConfig):
    kind: Literal["cpt"]
    text_field: str = Field("text", description="Column holding the documents.")
    packing: bool = Field(
        True, description="Pack the EOS-separated token stream into full blocks of max_length."
    )

    ACCEPTS: ClassVar[frozenset[str] | None] = frozenset({"text"})


def check(cfg: Config, lp: Any) -> list[str]:
    from distill.train.checks import check_training

    return check_training(cfg, lp)


def run(ctx: StageContext) -> dict[str, Any]:
    from distill.train.stage import run_training

    return run_training(ctx)
