"""Loading the student and applying a fine-tuning method (the PEFT taxonomy behind one `method` key).

- `load_tokenizer` / `load_model`: the base (or merged) model with the dtype the method and precision need;
  QLoRA loads a 4-bit NF4 base through bitsandbytes and needs CUDA.
- `peft_config_for`: the PEFT config of an adapter method (LoRA/QLoRA/IA3/prompt/prefix tuning), passed to
  TRL's trainers, which wrap the model themselves (and, for DPO, use the adapter-disabled model as reference).
- `freeze_for`: the in-place parameter selection of the non-adapter methods (full, partial, BitFit).
- `trainable_report`: trainable-parameter count and share, which every stage reports.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# Attention and MLP projections per architecture (`model_type`): LoRA's "sensible default" is all of
# them (QLoRA paper: adapting every linear layer is what recovers full fine-tuning quality). Unknown
# architectures fall back to PEFT's "all-linear" (every nn.Linear except the output head).
LORA_TARGETS: dict[str, list[str]] = {
    **{
        t: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        for t in (
            "llama",
            "mistral",
            "mixtral",
            "qwen2",
            "qwen2_moe",
            "qwen3",
            "qwen3_moe",
            "gemma",
            "gemma2",
            "gemma3_text",
            "olmo",
            "olmo2",
            "granite",
            "smollm3",
            "cohere",
        )
    },
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "phi": ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "falcon": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "starcoder2": ["q_proj", "k_proj", "v_proj", "o_proj", "c_fc", "c_proj"],
}


def default_lora_targets(model_type: str) -> list[str] | str:
    return list(LORA_TARGETS.get(model_type, [])) or "all-linear"


def cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def resolve_precision(precision: str) -> str:
    """auto -> bf16 on CUDA with bf16 support, fp16 on other CUDA, fp32 on CPU."""
    if precision != "auto":
        if precision == "fp16" and not cuda_available():
            raise ValueError("precision: fp16 mixed precision needs CUDA; use bf16 or fp32 on CPU")
        return precision
    if cuda_available():
        import torch

        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def weight_dtype(method: str, precision: str) -> torch.dtype:
    """Frozen base weights of adapter methods are stored in the compute dtype (they get no optimizer
    state, so low precision costs nothing); fully trained weights stay fp32 master weights under
    autocast, the usual mixed-precision recipe."""
    import torch

    if method in ("lora", "qlora", "ia3", "prompt_tuning", "prefix_tuning"):
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    return torch.float32


def load_tokenizer(
    path: str, revision: str | None = None, chat_template: str | None = None, trust_remote_code: bool = False
) -> Any:
    """The model's tokenizer; `chat_template` (Jinja text) overrides the model's own. A pad token is set."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    if chat_template:
        tok.chat_template = chat_template
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(
    path: str,
    method: str,
    precision: str,
    revision: str | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
) -> Any:
    """Load the causal LM for training with `method` (`precision` already resolved, not 'auto')."""
    import torch
    from transformers import AutoModelForCausalLM

    kw: dict[str, Any] = {"revision": revision, "trust_remote_code": trust_remote_code}
    if attn_implementation:
        kw["attn_implementation"] = attn_implementation
    if method == "qlora":
        if not torch.cuda.is_available():
            raise ValueError(
                "method: qlora loads the base in 4-bit through bitsandbytes, which needs a CUDA GPU; "
                "use method: lora on this machine"
            )
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise ValueError(
                "method: qlora needs the bitsandbytes package; pip install bitsandbytes"
            ) from None
        from transformers import BitsAndBytesConfig

        compute = torch.bfloat16 if precision == "bf16" else torch.float16
        kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute,
            bnb_4bit_quant_storage=compute,
        )
        kw["dtype"] = compute
        kw["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))}
    else:
        kw["dtype"] = weight_dtype(method, precision)
    return AutoModelForCausalLM.from_pretrained(path, **kw)


def peft_config_for(cfg: Any, model: Any) -> Any:
    """The PEFT config of an adapter method, or None for full/partial/BitFit."""
    method = cfg.method
    model_type = getattr(model.config, "model_type", "")
    if method in ("lora", "qlora"):
        from peft import LoraConfig

        lo = cfg.lora
        return LoraConfig(
            r=lo.r,
            lora_alpha=lo.alpha,
            lora_dropout=lo.dropout,
            target_modules=lo.target_modules or default_lora_targets(model_type),
            use_rslora=lo.use_rslora,
            use_dora=lo.use_dora,
            modules_to_save=lo.modules_to_save,
            bias="none",
            task_type="CAUSAL_LM",
        )
    if method == "ia3":
        from peft import IA3Config

        # None lets PEFT pick its per-architecture defaults (k/v and the MLP down projection)
        return IA3Config(
            target_modules=cfg.ia3.target_modules,
            feedforward_modules=cfg.ia3.feedforward_modules,
            task_type="CAUSAL_LM",
        )
    if method == "prompt_tuning":
        from peft import PromptTuningConfig, PromptTuningInit

        vt = cfg.virtual_tokens
        kw: dict[str, Any] = {}
        if vt.init_text:
            kw = {
                "prompt_tuning_init": PromptTuningInit.TEXT,
                "prompt_tuning_init_text": vt.init_text,
                "tokenizer_name_or_path": model.name_or_path,
            }
        return PromptTuningConfig(num_virtual_tokens=vt.num_virtual_tokens, task_type="CAUSAL_LM", **kw)
    if method == "prefix_tuning":
        from peft import PrefixTuningConfig

        return PrefixTuningConfig(
            num_virtual_tokens=cfg.virtual_tokens.num_virtual_tokens, task_type="CAUSAL_LM"
        )
    return None


def _decoder_layers(model: Any) -> list[Any]:
    """The list of decoder blocks (Llama-style `model.layers`, GPT-2 `transformer.h`, GPT-NeoX `layers`)."""
    import torch

    best: list[Any] = []
    for _, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) > len(best):
            best = list(mod)
    return best


def freeze_for(cfg: Any, model: Any) -> None:
    """Select trainable parameters for full / partial / BitFit (in place)."""
    method = cfg.method
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return
    for p in model.parameters():
        p.requires_grad_(False)
    if method == "bitfit":
        n = 0
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.requires_grad_(True)
                n += p.numel()
        if n == 0:
            raise ValueError(
                f"method: bitfit trains bias terms only, but {type(model).__name__} has no biases; "
                "use lora or partial for this model"
            )
        return
    if method == "partial":
        opts = cfg.partial
        layers = _decoder_layers(model)
        if opts.last_n_layers > len(layers):
            raise ValueError(
                f"partial.last_n_layers={opts.last_n_layers} but the model has {len(layers)} layers"
            )
        for layer in layers[len(layers) - opts.last_n_layers :] if opts.last_n_layers else []:
            for p in layer.parameters():
                p.requires_grad_(True)
        if opts.train_head:
            head = model.get_output_embeddings()
            if head is not None:
                for p in head.parameters():
                    p.requires_grad_(True)
        if opts.train_final_norm:
            base = getattr(model, model.base_model_prefix, model)
            norm = (
                getattr(base, "norm", None)
                or getattr(base, "ln_f", None)
                or getattr(base, "final_layer_norm", None)
            )
            if norm is not None:
                for p in norm.parameters():
                    p.requires_grad_(True)
        if not any(p.requires_grad for p in model.parameters()):
            raise ValueError("method: partial with last_n_layers: 0 and train_head: false trains nothing")
        return
    raise ValueError(f"unknown method {method!r}")


def trainable_report(model: Any) -> dict[str, Any]:
    """Trainable parameters (count, total, share). Tied weights count once."""
    seen: set[int] = set()
    total = trainable = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = p.numel()
        # 4-bit bitsandbytes params store two values per byte
        if p.__class__.__name__ == "Params4bit":
            n *= 2
        total += n
        if p.requires_grad:
            trainable += n
    return {
        "trainable_params": int(trainable),
        "total_params": int(total),
        "trainable_share": round(trainable / total, 6) if total else 0.0,
    }


def read_chat_template(path: Path | None) -> str | None:
    return path.read_text(encoding="utf-8") if path is not None else None
