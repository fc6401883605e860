"""TRL trainers with the few additions distill needs.

- `TokenCountMixin`: counts real (non-pad) tokens per optimizer step, for tokens/s.
- `WeightedSFTTrainer`: SFT with a fractional prompt-loss weight. TRL 1.16 only has a boolean
  `completion_only_loss`, so this subclass reads a per-token `completion_mask` column (which we keep
  through packing, see `distill.train.data`), turns it into weights (1 on completion tokens,
  `prompt_loss_weight` on prompt tokens) in `LossWeightCollator`, and computes
  `-(log_probs * w).sum() / sum(w)` with TRL's fused LM head (no full logits). The normalizer is the
  weight sum over the whole accumulated batch (and all processes), like transformers' token count
  for plain NLL, so the gradient does not depend on how the effective batch is split.
- `CountingSFTTrainer` (cpt) and `CountingDPOTrainer` (dpo): the TRL trainers plus token counting.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from trl import DPOTrainer, SFTTrainer


class TokenCountMixin:
    """Counts non-pad tokens seen by `training_step` on this process (a tensor, to avoid a sync per step)."""

    _distill_tokens: Any = 0

    def training_step(self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> Any:
        if "attention_mask" in inputs:
            n = inputs["attention_mask"].sum()
        else:  # padding-free: one flattened row without pads
            n = torch.tensor(inputs["input_ids"].numel())
        self._distill_tokens = self._distill_tokens + n.detach()
        return super().training_step(model, inputs, num_items_in_batch)  # type: ignore[misc]

    def tokens_seen(self) -> int:
        """Tokens over all processes (a collective: call it on every rank)."""
        t = torch.as_tensor(self._distill_tokens, device=self.accelerator.device).reshape(1).float()  # type: ignore[attr-defined]
        return int(self.accelerator.gather(t).sum().item())  # type: ignore[attr-defined]


class CountingSFTTrainer(TokenCountMixin, SFTTrainer):
    pass


class CountingDPOTrainer(TokenCountMixin, DPOTrainer):
    pass


@dataclass
class LossWeightCollator:
    """Wraps TRL's language-modeling collator: adds `loss_weights` laid out like `input_ids`
    (right-padded rows, or the one flattened row in padding-free mode), 0 on padding."""

    base: Any
    prompt_loss_weight: float

    @property
    def padding_free(self) -> bool:
        return bool(getattr(self.base, "padding_free", False))

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        masks = [list(ex["completion_mask"]) for ex in examples]
        stripped = [{k: v for k, v in ex.items() if k != "completion_mask"} for ex in examples]
        batch = self.base(stripped)
        shape = batch["input_ids"].shape
        weights = torch.zeros(shape, dtype=torch.float32)
        per_ex = [
            torch.where(torch.tensor(m, dtype=torch.bool), 1.0, float(self.prompt_loss_weight)) for m in masks
        ]
        if self.padding_free:
            flat = torch.cat(per_ex)
            weights[0, : flat.numel()] = flat
        else:
            for i, w in enumerate(per_ex):
                weights[i, : w.numel()] = w
        batch["loss_weights"] = weights
        return batch


class WeightedSFTTrainer(TokenCountMixin, SFTTrainer):
    """SFTTrainer with `prompt_loss_weight` (0 = completion only, 1 = whole sequence)."""

    def __init__(self, *args: Any, prompt_loss_weight: float = 0.0, **kwargs: Any) -> None:
        self.prompt_loss_weight = float(prompt_loss_weight)
        super().__init__(*args, **kwargs)
        # TRL refuses a custom collator with padding-free batches, so wrap the one it built
        self.data_collator = LossWeightCollator(self.data_collator, self.prompt_loss_weight)

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if self._signature_columns is not None and "completion_mask" not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, "completion_mask"]

    @staticmethod
    def _valid_weights(batch: dict[str, Any]) -> torch.Tensor:
        """Weights of the positions that are scored (next-token labels not -100)."""
        labels = batch["labels"][..., 1:]
        return batch["loss_weights"][..., 1:] * (labels != -100)

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> Any:
        if not batch_samples or "loss_weights" not in batch_samples[0]:
            return super()._get_num_items_in_batch(batch_samples, device)
        total = sum(self._valid_weights(b).sum() for b in batch_samples)
        total = torch.as_tensor(total, dtype=torch.float32)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            total = self.accelerator.gather(total.to(device)).sum()
        return total.to(device)

    def compute_loss(
        self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        if return_outputs:
            raise ValueError("distill's SFT trainer computes the loss only (prediction_loss_only=True)")
        mode = "train" if model.training else "eval"
        weights = inputs.pop("loss_weights")
        inputs["use_cache"] = False
        outputs = model(**inputs, fused_lm_head=True)
        log_probs = outputs.log_probs  # (B, T-1), zero where the label is -100
        w = weights[:, 1:].to(log_probs.dtype)
        if w.shape[1] != log_probs.shape[1]:
            # prompt-learning PEFT (prompt/prefix tuning) prepends virtual tokens with -100 labels
            w = torch.nn.functional.pad(w, (log_probs.shape[1] - w.shape[1], 0))
        w = w * outputs.label_mask.to(log_probs.dtype)
        denom = w.sum() if num_items_in_batch is None else num_items_in_batch
        loss = -(log_probs * w).sum() / torch.as_tensor(denom, dtype=log_probs.dtype).clamp(min=1e-6)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # like Trainer: the normalizer counts every process, and DDP averages the gradients
            loss = loss * self.accelerator.num_processes

        completion = w >= 1.0  # completion tokens carry weight 1
        n_valid = self.accelerator.gather_for_metrics(completion.sum()).sum()
        n_correct = self.accelerator.gather_for_metrics((outputs.is_top1.bool() & completion).sum()).sum()
        self._metrics[mode]["mean_token_accuracy"].append(
            (n_correct / n_valid).item() if n_valid > 0 else 0.0
        )
        if mode == "train":
            if "attention_mask" in inputs:
                n_tok = self.accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
            else:
                n_tok = (
                    self.accelerator.gather_for_metrics(
                        torch.tensor(inputs["input_ids"].numel(), device=inputs["input_ids"].device)
                    )
                    .sum()
                    .item()
                )
            self._total_train_tokens += int(n_tok)
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        return loss
