"""`sft`: supervised fine-tuning on prompt/completion conversations.

Input layout `sft`: TRL conversational prompt/completion rows (`prompt`: messages, `completion`: one
assistant message) and/or `messages` (the last assistant turn becomes the completion). The chat
template is applied exactly as at inference (rendered, then tokenized without extra special tokens;
a doubled BOS is collapsed), and the end-of-turn/EOS token is trained. The loss covers completion
tokens with weight 1 and prompt tokens with `prompt_loss_weight` (0 = completion only, 1 = whole
sequence). `packing: true` packs examples best-fit into rows of `max_length` without attention
across examples (position ids restart per example). Output: a model artifact.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from distill.core.context import StageContext
from distill.train.options import TrainStageConfig

CODE_VERSION = "1"
SUBPROCESS = True


class Config(TrainStageConfig):
    kind: Literal["sft"]
    prompt_loss_weight: float = Field(
        0.1, ge=0, le=1, description="Loss weight of prompt tokens (0 = completion only, 1 = full sequence)."
    )
    packing: bool = Field(
        False, description="Pack examples (best-fit) into rows of max_length, no cross-attention."
    )

    ACCEPTS: ClassVar[frozenset[str] | None] = frozenset({"sft"})


def check(cfg: Config, lp: Any) -> list[str]:
    from distill.train.checks import check_training

    return check_training(cfg, lp)


def run(ctx: StageContext) -> dict[str, Any]:
    from distill.train.stage import run_training

    return run_training(ctx)
