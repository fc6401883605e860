"""Settings shared by the training stage kinds (`cpt`, `sft`, `dpo`).

Only pydantic and the core are imported here: pipeline loading must stay instant.

Fingerprint rule for batching: the *effective* batch (per-device batch x gradient accumulation x
processes) is what changes the result, so it is fingerprinted; how it is split between the
per-device batch, accumulation and processes is speed-only. `semantic()` therefore drops
`batch_size`, `gradient_accumulation_steps` and `launcher` and adds `effective_batch_size`.
The loss is normalized over the whole accumulated batch (tokens, or loss weights for SFT), so
two splits of the same effective batch give the same gradients up to float rounding.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from distill.config import Strict, speed
from distill.stages.base import StageConfig

Method = Literal["lora", "qlora", "full", "partial", "bitfit", "ia3", "prompt_tuning", "prefix_tuning"]
ADAPTER_METHODS = frozenset({"lora", "qlora", "ia3", "prompt_tuning", "prefix_tuning"})
MERGEABLE_METHODS = frozenset({"lora", "qlora", "ia3"})
Precision = Literal["auto", "fp32", "bf16", "fp16"]


class LoraOptions(Strict):
    """LoRA / QLoRA adapter settings (PEFT `LoraConfig`)."""

    r: int = Field(16, ge=1, description="Rank of the update matrices.")
    alpha: float = Field(
        32,
        gt=0,
        description="Scaling numerator: the update is scaled by alpha/r (alpha/sqrt(r) with rsLoRA).",
    )
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | str | None = Field(
        None,
        description="Module names to adapt; default: every attention and MLP projection of the architecture "
        "(e.g. q/k/v/o/gate/up/down_proj for Llama/Qwen2), or 'all-linear'.",
    )
    use_rslora: bool = False
    use_dora: bool = False
    modules_to_save: list[str] | None = Field(
        None, description="Modules trained in full beside the adapter (e.g. ['embed_tokens'] for new tokens)."
    )


class PartialOptions(Strict):
    """Partial fine-tuning: everything frozen except the last N decoder layers and/or the head."""

    last_n_layers: int = Field(2, ge=0, description="Train the last N decoder layers (0: none).")
    train_head: bool = Field(
        True, description="Train the LM head (with tied embeddings: the embeddings too)."
    )
    train_final_norm: bool = True


class IA3Options(Strict):
    target_modules: list[str] | None = Field(
        None, description="Default: k/v projections and the MLP down projection."
    )
    feedforward_modules: list[str] | None = Field(None, description="Default: the MLP down projection.")


class VirtualTokenOptions(Strict):
    """Prompt tuning / prefix tuning."""

    num_virtual_tokens: int = Field(20, ge=1)
    init_text: str | None = Field(
        None, description="Prompt tuning: initialize the soft prompt from this text."
    )


class Launcher(Strict):
    """How many processes train (DDP/FSDP/DeepSpeed through accelerate or torchrun). Speed only."""

    num_processes: int = Field(1, ge=1)
    backend: Literal["auto", "nccl", "gloo"] = Field("auto", description="auto: nccl with CUDA, gloo on CPU.")
    accelerate_config: str | None = Field(
        None, description="accelerate config YAML (FSDP/DeepSpeed); launched with `accelerate launch`."
    )
    main_process_port: int | None = None


class TrainStageConfig(StageConfig):
    """Fields common to cpt, sft and dpo. Subclasses set `kind`, `ACCEPTS` and kind-specific fields."""

    base: str = Field(..., description="A pipeline model name or an earlier cpt/sft/dpo/merge stage.")
    method: Method = "lora"
    lora: LoraOptions = Field(default_factory=LoraOptions)
    partial: PartialOptions = Field(default_factory=PartialOptions)
    ia3: IA3Options = Field(default_factory=IA3Options)
    virtual_tokens: VirtualTokenOptions = Field(default_factory=VirtualTokenOptions)
    chain: Literal["merge", "stack"] = Field(
        "merge",
        description="How an upstream adapter is applied: merge it into its base (cached under "
        "<workdir>/.merged/) and train a fresh adapter, or stack: keep it unmerged and continue training it on "
        "the original base (for DPO the frozen upstream adapter is the reference).",
    )
    learning_rate: float | None = Field(
        None, gt=0, description="Default depends on the stage kind and method."
    )
    lr_scheduler: str = "cosine"
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    warmup_steps: int | None = Field(None, ge=0, description="Overrides warmup_ratio.")
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    optimizer: str = Field(
        "adamw_torch", description="transformers `optim` name (adamw_torch, adamw_bnb_8bit, sgd, ...)."
    )
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=1, description="Overrides epochs.")
    batch_size: int = speed(8, ge=1, description="Per-device micro batch (speed only; see effective batch).")
    gradient_accumulation_steps: int = speed(1, ge=1)
    max_length: int = Field(1024, ge=8)
    padding_free: bool | Literal["auto"] = speed(
        "auto",
        description="Flatten a batch into one row without padding (auto: on CUDA with flash attention).",
    )
    gradient_checkpointing: bool = speed(False)
    precision: Precision = Field(
        "auto", description="auto: bf16 on CUDA with bf16 support, fp16 on other CUDA, fp32 on CPU."
    )
    seed: int | None = Field(None, description="Default: the pipeline seed.")
    max_samples: int | None = Field(
        None, ge=1, description="Train on at most this many rows (after the eval split)."
    )
    eval_split: float = Field(0.0, ge=0, description="Held-out share (<1) or row count (>=1) for eval loss.")
    eval_steps: int | None = speed(None, ge=1, description="Evaluate every N steps (default: at the end).")
    early_stopping_patience: int | None = Field(
        None, ge=1, description="Stop after N evals without eval-loss gain."
    )
    early_stopping_threshold: float = 0.0
    save_steps: int = speed(
        100, ge=1, description="Checkpoint every N steps into the stage's scratch folder."
    )
    save_total_limit: int = speed(2, ge=1)
    logging_steps: int = speed(10, ge=1)
    report_to: list[str] = speed(
        ["none"], description="transformers report_to: tensorboard, wandb, mlflow, ..."
    )
    dataset_num_proc: int | None = speed(None)
    launcher: Launcher = speed(Launcher())

    OUTPUT: ClassVar[str] = "model"
    USES_TASK: ClassVar[bool] = False
    DEFAULT_LR: ClassVar[dict[str, float]] = {"adapter": 2e-4, "full": 2e-5}

    def model_refs(self) -> list[tuple[str, str]]:
        return [("base", self.base)]

    @field_validator("report_to", mode="before")
    @classmethod
    def _report_to_list(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @model_validator(mode="after")
    def _checks(self) -> TrainStageConfig:
        if self.eval_split >= 1 and self.eval_split != int(self.eval_split):
            raise ValueError("eval_split: use a share below 1 (e.g. 0.05) or a whole row count (e.g. 200)")
        if self.early_stopping_patience is not None and self.eval_split == 0:
            raise ValueError("early_stopping_patience needs an eval split; set eval_split (e.g. 0.05)")
        if self.chain == "stack" and self.method not in ("lora", "qlora"):
            raise ValueError(
                f"chain: stack continues an upstream LoRA adapter; it cannot be used with method {self.method}"
            )
        return self

    @property
    def effective_batch_size(self) -> int:
        return self.batch_size * self.gradient_accumulation_steps * self.launcher.num_processes

    def resolved_learning_rate(self) -> float:
        if self.learning_rate is not None:
            return self.learning_rate
        group = "adapter" if self.method in ADAPTER_METHODS else "full"
        if self.method in ("prompt_tuning", "prefix_tuning"):
            return 1e-2 if self.kind != "dpo" else 1e-3
        return self.DEFAULT_LR[group]

    def semantic(self) -> dict[str, Any]:
        out = super().semantic()
        out["effective_batch_size"] = self.effective_batch_size
        # method-specific options enter only for the methods that read them
        for key, methods in (
            ("lora", {"lora", "qlora"}),
            ("partial", {"partial"}),
            ("ia3", {"ia3"}),
            ("virtual_tokens", {"prompt_tuning", "prefix_tuning"}),
        ):
            if self.method not in methods:
                out.pop(key, None)
        if self.early_stopping_patience is not None:
            out["eval_steps"] = self.eval_steps  # when to evaluate decides when training stops
        return out
