"""LoRA adapters: fold one into its base, or combine several into one adapter.

- `merge_adapter_into_base` writes a standalone model (safetensors + config + tokenizer with its
  chat template) from base + adapter. It streams tensor by tensor through `LoraOnBase` (peak
  memory: one tensor); adapters using PEFT features the tensor-wise path does not cover (DoRA,
  ...) fall back to PEFT's `merge_and_unload`, which holds the whole model in memory.
- `combine_adapters` builds one adapter from several trained on the same base with PEFT's
  `add_weighted_adapter` (`cat` concatenates ranks r1 + r2 and is exact; `linear`, `svd`, `ties`,
  `dare_*`, `magnitude_prune` as PEFT defines them).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from distill.errors import DistillError

ADAPTER_COMBINATIONS = (
    "cat",
    "linear",
    "svd",
    "ties",
    "ties_svd",
    "dare_linear",
    "dare_ties",
    "dare_linear_svd",
    "dare_ties_svd",
    "magnitude_prune",
    "magnitude_prune_svd",
)


def read_adapter_config(adapter_dir: str | Path) -> dict[str, Any]:
    p = Path(adapter_dir) / "adapter_config.json"
    if not p.is_file():
        raise DistillError(f"{adapter_dir}: no adapter_config.json; is it a PEFT adapter folder?")
    data: dict[str, Any] = json.loads(p.read_text())
    return data


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def merge_adapter_into_base(
    base_path: str | Path,
    adapter_path: str | Path,
    out_dir: str | Path,
    dtype: str | None = None,
    out_dtype: str | None = None,
    chat_template: str | None = None,
    max_shard_size: str | int = "5GB",
    on_tensor: Any = None,
) -> dict[str, Any]:
    """base + LoRA adapter -> standalone model folder. Returns merge stats (see `engine.run_merge`)."""
    from distill.merge.config import parse_merge_config
    from distill.merge.engine import run_merge
    from distill.merge.io import LoraOnBase, SafetensorsModel, UnsupportedAdapter

    base = SafetensorsModel(base_path)
    try:
        src = LoraOnBase(base, adapter_path)
    except UnsupportedAdapter as e:
        return merge_adapter_peft(base_path, adapter_path, out_dir, out_dtype or dtype, reason=str(e))
    cfg = parse_merge_config(
        {"merge_method": "passthrough", "models": [{"model": "model"}], "dtype": dtype, "out_dtype": out_dtype,
         "chat_template": chat_template},
        "lora merge",
    )  # fmt: skip
    stats = run_merge(cfg, {"model": src}, Path(out_dir), max_shard_size, on_tensor=on_tensor)
    stats["method"] = "lora"
    return stats


def merge_adapter_peft(
    base_path: str | Path,
    adapter_path: str | Path,
    out_dir: str | Path,
    dtype: str | None = None,
    reason: str = "",
) -> dict[str, Any]:
    """Fallback: PEFT `merge_and_unload` on the whole model in memory (the training package's helper)."""
    from distill.train.merge_lora import merge_adapter

    merge_adapter(base_path, adapter_path, out_dir, save_dtype=dtype)
    return {"method": "lora", "engine": "peft", "fallback_reason": reason}


def _has_tokenizer(p: Path) -> bool:
    return (p / "tokenizer_config.json").is_file() and (
        (p / "tokenizer.json").is_file() or (p / "tokenizer.model").is_file()
    )


def combine_adapters(
    base_path: str | Path,
    adapters: list[tuple[str | Path, float]],
    out_dir: str | Path,
    combination: str = "cat",
    density: float | None = None,
    svd_rank: int | None = None,
    majority_sign_method: str = "total",
    seed: int = 0,
) -> dict[str, Any]:
    """Combine LoRA adapters (same base) into one adapter folder with PEFT's `add_weighted_adapter`."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    if combination not in ADAPTER_COMBINATIONS:
        raise DistillError(
            f"adapter combination {combination!r}: use one of {', '.join(ADAPTER_COMBINATIONS)}"
        )
    if len(adapters) < 2:
        raise DistillError("combining adapters needs at least two adapters")
    if combination not in ("cat", "linear", "svd") and density is None:
        raise DistillError(f"adapter combination {combination!r} needs a density")
    cfgs = [read_adapter_config(p) for p, _ in adapters]
    for (p, _), c in zip(adapters, cfgs, strict=True):
        if c.get("peft_type", "LORA") != "LORA":
            raise DistillError(f"{p}: only LoRA adapters can be combined (got {c.get('peft_type')})")
        if c.get("modules_to_save"):
            # PEFT's add_weighted_adapter has no rule for fully trained modules (and fails saving them)
            raise DistillError(
                f"{p}: the adapter also trains whole modules ({', '.join(c['modules_to_save'])}); adapter-level "
                "combination cannot merge those. Merge the models instead (method linear/ties/task_arithmetic)"
            )
    torch.manual_seed(seed)  # dare_* combinations draw their masks from the global RNG
    model = AutoModelForCausalLM.from_pretrained(str(base_path), dtype=torch.float32)
    names = [f"a{i}" for i in range(len(adapters))]
    peft_model = PeftModel.from_pretrained(model, str(adapters[0][0]), adapter_name=names[0])
    for name, (p, _) in zip(names[1:], adapters[1:], strict=True):
        peft_model.load_adapter(str(p), adapter_name=name)
    try:
        peft_model.add_weighted_adapter(
            names,
            [float(w) for _, w in adapters],
            "combined",
            combination_type=combination,  # type: ignore[arg-type]
            svd_rank=svd_rank,
            density=density,
            majority_sign_method=majority_sign_method,  # type: ignore[arg-type]
        )
    except ValueError as e:
        raise DistillError(f"PEFT could not combine the adapters ({combination}): {e}") from None
    out = Path(out_dir)
    tmp = out.parent / f".{out.name}.combine"
    shutil.rmtree(tmp, ignore_errors=True)
    peft_model.save_pretrained(str(tmp), selected_adapters=["combined"])
    src = tmp / "combined" if (tmp / "combined").is_dir() else tmp
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file():
            shutil.copy2(f, out / f.name)
    shutil.rmtree(tmp, ignore_errors=True)
    # keep the base path absolute so the adapter reloads from anywhere
    acfg = read_adapter_config(out)
    acfg["base_model_name_or_path"] = (
        str(Path(base_path).resolve()) if Path(base_path).exists() else str(base_path)
    )
    (out / "adapter_config.json").write_text(json.dumps(acfg, indent=2))
    tok_src = Path(adapters[0][0]) if _has_tokenizer(Path(adapters[0][0])) else Path(base_path)
    from distill.merge.engine import copy_tokenizer

    copy_tokenizer(tok_src, out)
    return {"method": f"adapters:{combination}", "rank": int(acfg.get("r", 0)), "adapters": len(adapters)}
