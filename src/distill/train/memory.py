"""Memory planner: how much memory training (and inference) of a model will take, from its config.

It starts from the usual rules of thumb -- inference ~ params x bytes/param x 1.2; training with Adam ~
3-4x the weights plus activations -- and refines them from the model's config:

- parameters are counted per layer from the config (embeddings, attention with grouped KV heads, gated
  or plain MLP, norms, untied head), so LoRA parameters can be counted per targeted projection;
- weights: fp32 master weights for full fine-tuning (plus the bf16/fp16 copies autocast caches during
  a step), the compute dtype for a frozen LoRA base, ~0.52 byte/param for a 4-bit NF4 (QLoRA) base;
- gradients (fp32, trainable parameters only) and optimizer states (AdamW 8 bytes/param, 8-bit AdamW
  2, SGD 0), plus the optimizer step's temporaries;
- activations saved for backward per token and layer (norm inputs in fp32, projection inputs, RoPE,
  SDPA inputs/outputs, gated MLP, LoRA dropout copies), only the layer inputs plus one layer with
  gradient checkpointing; the LM head's chunked log-prob tile (TRL never builds the full logits);
- KV cache for inference: 2 x layers x kv_heads x head_dim x tokens x bytes;
- a constant runtime overhead: the Python/torch/transformers/TRL process on CPU (resident memory), the
  CUDA context and allocator slack on GPU.

`estimate(config, ...)` returns a dict breakdown in bytes and GB; `estimate_model(model_id_or_path)`
loads only the config (a Hub id downloads config.json, nothing else).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

GB = 1024**3
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
# Resident memory of a training process before the model: interpreter, torch, transformers, TRL, PEFT,
# datasets imports (0.53 GB measured) plus the trainer and data set-up (see bench/memory.py).
CPU_RUNTIME_GB = 0.55
# CUDA context and kernels (not in torch.cuda.max_memory_allocated, but taken from the GPU)
CUDA_CONTEXT_GB = 0.5
# caching-allocator fragmentation on GPU
CUDA_SLACK = 0.10

GATED_MLP = {
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
    "phi3",
}


def _get(cfg: dict[str, Any], *names: str, default: Any = None) -> Any:
    for n in names:
        if cfg.get(n) is not None:
            return cfg[n]
    return default


def load_config(model: str, revision: str | None = None, trust_remote_code: bool = False) -> dict[str, Any]:
    """The model's config as a dict: a local folder's config.json, or a Hub id's (config only)."""
    p = Path(model).expanduser()
    if not p.exists() and (model.startswith(("/", "./", "../", "~")) or model.count("/") > 1):
        raise FileNotFoundError(f"no such model folder {model}")
    if p.is_dir():
        f = p / "config.json"
        if not f.is_file():
            raise FileNotFoundError(f"{model}: no config.json in this folder")
        cfg = json.loads(f.read_text())
    elif p.is_file():
        cfg = json.loads(p.read_text())
    else:
        from huggingface_hub import hf_hub_download

        cfg = json.loads(Path(hf_hub_download(model, "config.json", revision=revision)).read_text())
    # multimodal wrappers keep the language model under text_config
    if isinstance(cfg.get("text_config"), dict) and "num_hidden_layers" not in cfg:
        cfg = {
            **cfg["text_config"],
            "model_type": cfg["text_config"].get("model_type", cfg.get("model_type")),
        }
    return cfg


class Shape:
    """The sizes that matter, read from a config dict (Llama/Qwen/Mistral/Gemma/GPT-2/NeoX naming)."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.model_type = str(cfg.get("model_type", ""))
        self.vocab = int(_get(cfg, "vocab_size", "padded_vocab_size"))
        self.hidden = int(_get(cfg, "hidden_size", "n_embd", "d_model"))
        self.layers = int(_get(cfg, "num_hidden_layers", "n_layer", "num_layers"))
        self.heads = int(_get(cfg, "num_attention_heads", "n_head"))
        self.kv_heads = int(
            _get(cfg, "num_key_value_heads", "multi_query_group_num", default=self.heads) or self.heads
        )
        self.head_dim = int(
            _get(cfg, "head_dim", default=self.hidden // self.heads) or self.hidden // self.heads
        )
        inner = _get(cfg, "intermediate_size", "n_inner", "ffn_dim")
        self.intermediate = int(inner) if inner else 4 * self.hidden
        if "tie_word_embeddings" in cfg:
            self.tied = bool(cfg["tie_word_embeddings"])
        else:  # the architectures' own defaults
            self.tied = self.model_type in ("gpt2", "gemma", "gemma2", "gemma3_text")
        plain = ("gpt2", "gpt_neox", "falcon", "phi")
        self.gated = self.model_type in GATED_MLP or (
            self.model_type not in plain and cfg.get("hidden_act") in ("silu", "swiglu", "gelu_pytorch_tanh")
        )
        self.attn_bias = bool(
            cfg.get("attention_bias", self.model_type in ("qwen2", "qwen2_moe", "gpt2", "gpt_neox", "phi"))
        )
        self.mlp_bias = bool(cfg.get("mlp_bias", self.model_type in ("gpt2", "gpt_neox", "phi")))
        self.positions = int(_get(cfg, "n_positions", default=0) or 0) if self.model_type == "gpt2" else 0
        self.norm_params = 2 if self.model_type in ("gpt2", "gpt_neox", "phi") else 1  # LayerNorm has a bias
        experts = _get(cfg, "num_local_experts", "num_experts", default=1) or 1
        self.experts = int(experts)

    # parameters of one decoder layer, by module
    def proj_shapes(self) -> dict[str, tuple[int, int]]:
        h, d = self.hidden, self.head_dim
        q, kv = self.heads * d, self.kv_heads * d
        shapes = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h)}
        if self.gated:
            shapes.update(
                {
                    "gate_proj": (h, self.intermediate),
                    "up_proj": (h, self.intermediate),
                    "down_proj": (self.intermediate, h),
                }
            )
        else:
            shapes.update({"up_proj": (h, self.intermediate), "down_proj": (self.intermediate, h)})
        return shapes

    def layer_params(self) -> int:
        shapes = self.proj_shapes()
        mlp = {k: v for k, v in shapes.items() if k in ("gate_proj", "up_proj", "down_proj")}
        attn = {k: v for k, v in shapes.items() if k not in mlp}
        n = sum(i * o for i, o in attn.values()) + self.experts * sum(i * o for i, o in mlp.values())
        if self.attn_bias:
            n += self.heads * self.head_dim + 2 * self.kv_heads * self.head_dim
            if self.model_type in ("gpt2", "gpt_neox", "phi"):
                n += self.hidden  # output projection bias
        if self.mlp_bias:
            n += self.experts * (self.intermediate + self.hidden)
        if self.experts > 1:
            n += self.hidden * self.experts  # router
        n += 2 * self.hidden * self.norm_params
        return n

    def embed_params(self) -> int:
        return self.vocab * self.hidden + self.positions * self.hidden

    def head_params(self) -> int:
        return 0 if self.tied else self.vocab * self.hidden

    def total_params(self) -> int:
        return (
            self.embed_params()
            + self.layers * self.layer_params()
            + self.hidden * self.norm_params
            + self.head_params()
        )

    def lora_params(self, r: int, targets: list[str] | str | None) -> int:
        shapes = self.proj_shapes()
        if targets in (None, "all-linear") or targets == ["all-linear"]:
            names = list(shapes)
        else:
            names = [t for t in ([targets] if isinstance(targets, str) else targets) if t in shapes]
        per_layer = 0
        for n in names:
            i, o = shapes[n]
            per_layer += r * (i + o) * (self.experts if n in ("gate_proj", "up_proj", "down_proj") else 1)
        return per_layer * self.layers


def _activation_bytes_per_token(
    s: Shape, e: int, method: str, lora_dropout: float, lora_targets: int
) -> float:
    """Bytes saved for backward per token in one decoder layer (eager/SDPA Llama-style block)."""
    h, d = s.hidden, s.head_dim
    q, kv, inter = s.heads * d, s.kv_heads * d, s.intermediate
    residual = 2 * h * 4  # the two norm inputs: the residual stream stays fp32
    attn = e * (h + 2 * (q + kv) + (2 * q + 2 * kv) + q)  # normed input, RoPE, SDPA in/out, o_proj input
    mlp = e * (h + (4 * inter if s.gated else 2 * inter))  # normed input, gate/up/act/product (or fc/act)
    total = residual + attn + mlp
    if method in ("lora", "qlora") and lora_dropout > 0:
        # LoRA's dropout makes a fresh copy (and a mask) of each adapted projection's input
        total += lora_targets * (e + 1)
    if method == "qlora":
        total += e * (h + inter)  # dequantized-weight matmuls keep extra input copies
    return total


def _transient_bytes_per_token(s: Shape, e: int, method: str, lora_out: int) -> float:
    """Bytes per token per layer of forward temporaries (created, then freed within the layer).

    The CPU allocator (glibc malloc) reuses freed blocks poorly when they sit between activations that
    stay alive until backward, so on CPU these count towards the peak; on GPU the caching allocator
    reuses them (the allocator slack covers what it does not).
    """
    h, q, kv = s.hidden, s.heads * s.head_dim, s.kv_heads * s.head_dim
    if method in ("lora", "qlora"):
        # each adapted projection: the base output, the adapter output and its scaled copy, before the sum
        return 3 * e * lora_out
    return e * (2 * h + q + kv)  # RoPE products and residual sums


def estimate(
    config: dict[str, Any],
    method: str = "lora",
    lora_r: int = 16,
    lora_targets: list[str] | str | None = None,
    lora_dropout: float = 0.05,
    batch_size: int = 8,
    seq_len: int = 1024,
    precision: str = "bf16",
    gradient_checkpointing: bool = False,
    optimizer: str = "adamw",
    device: str = "cuda",
    sequences_per_example: int = 1,
    reference_copy: bool = False,
    model: str = "",
) -> dict[str, Any]:
    """Training-memory breakdown for one process (bytes and GB), plus inference figures.

    `method`: full | lora | qlora (partial/bitfit/ia3/prompt/prefix map to the nearest: partial and
    bitfit -> full-sized weights with fewer trainable parameters are treated as full, the adapter methods
    as lora). `sequences_per_example`: 2 for DPO (chosen and rejected). `reference_copy`: DPO with full
    fine-tuning keeps a frozen copy of the weights.
    """
    s = Shape(config)
    P = s.total_params()
    e = DTYPE_BYTES[precision]
    m = {
        "partial": "full",
        "bitfit": "full",
        "ia3": "lora",
        "prompt_tuning": "lora",
        "prefix_tuning": "lora",
    }.get(method, method)
    if m not in ("full", "lora", "qlora"):
        raise ValueError(f"method {method!r}: use full, lora or qlora")
    tokens = batch_size * seq_len * sequences_per_example

    # adapted projection inputs per token per layer (for LoRA dropout copies)
    shapes = s.proj_shapes()
    if lora_targets in (None, "all-linear"):
        tnames = list(shapes)
    else:
        tnames = [
            t for t in ([lora_targets] if isinstance(lora_targets, str) else lora_targets) if t in shapes
        ]
    lora_in = sum(shapes[t][0] for t in tnames)
    lora_out = sum(shapes[t][1] for t in tnames)
    lora_p = s.lora_params(lora_r, lora_targets) if m in ("lora", "qlora") else 0

    if m == "full":
        weights = 4 * P
        autocast_cache = (
            e * (P - s.embed_params()) if e < 4 else 0
        )  # autocast keeps low-precision copies of matmul weights
        trainable = P
    elif m == "lora":
        weights = e * P + 4 * lora_p
        autocast_cache = 0
        trainable = lora_p
    else:
        emb = s.embed_params() + s.head_params()
        weights = int(0.52 * (P - emb)) + 2 * emb + 4 * lora_p
        autocast_cache = 0
        trainable = lora_p
    grads = 4 * trainable
    if optimizer in ("adamw", "adam"):
        opt_states, opt_step = 8 * trainable, 4 * trainable  # m and v; the step's sqrt(v) temporaries
    elif optimizer == "adamw8bit":
        opt_states, opt_step = 2 * trainable, 0
    elif optimizer == "sgd":
        opt_states, opt_step = 0, 0
    else:
        raise ValueError(f"optimizer {optimizer!r}: use adamw, adamw8bit or sgd")
    per_layer_tok = _activation_bytes_per_token(s, e, m, lora_dropout, lora_in)
    if gradient_checkpointing:
        acts = tokens * (s.layers * s.hidden * 4 + per_layer_tok)
    else:
        acts = tokens * s.layers * per_layer_tok
    acts += tokens * s.hidden * 4 * 2  # embedding output and final norm
    head_tile = min(tokens, 4096) * min(s.vocab, 32768) * 4  # TRL's chunked log-prob tile (fp32)
    acts += head_tile
    transient = tokens * s.layers * _transient_bytes_per_token(s, e, m, lora_out) if device == "cpu" else 0
    ref = weights - 4 * lora_p if reference_copy else 0
    runtime = CUDA_CONTEXT_GB * GB if device == "cuda" else CPU_RUNTIME_GB * GB
    # peak: weights + optimizer states + gradients + activations (+ the step's temporaries when they exceed
    # the activations, which are freed by then)
    step_peak = max(acts + autocast_cache + transient, opt_step)
    subtotal = weights + ref + grads + opt_states + step_peak
    slack = CUDA_SLACK * subtotal if device == "cuda" else 0
    total = subtotal + slack + runtime
    kv_bytes_tok = 2 * s.layers * s.kv_heads * s.head_dim * e
    infer_w = P * (0.52 if m == "qlora" else e)
    comps = {
        "weights": weights,
        "reference_model": ref,
        "gradients": grads,
        "optimizer_states": opt_states,
        "activations": acts,
        "autocast_weight_copies": autocast_cache,
        "forward_temporaries": transient,
        "lora_params": 4 * lora_p,
        "allocator_slack": slack,
        "runtime_overhead": runtime,
    }
    return {
        "model": model,
        "model_type": s.model_type,
        "params": P,
        "trainable_params": trainable,
        "trainable_share": round(trainable / P, 6) if P else 0.0,
        "lora_params": lora_p,
        "method": method,
        "precision": precision,
        "optimizer": optimizer,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "gradient_checkpointing": gradient_checkpointing,
        "device": device,
        "components_bytes": {k: int(v) for k, v in comps.items()},
        "components_gb": {k: round(v / GB, 4) for k, v in comps.items()},
        "total_bytes": int(total),
        "total_gb": round(total / GB, 4),
        "inference": {
            "weights_gb": round(infer_w / GB, 4),
            "rule_of_thumb_gb": round(infer_w * 1.2 / GB, 4),
            "kv_cache_gb": round(kv_bytes_tok * batch_size * seq_len / GB, 4),
            "kv_cache_bytes_per_token": kv_bytes_tok,
            "total_gb": round((infer_w * 1.2 + kv_bytes_tok * batch_size * seq_len) / GB, 4),
        },
        "rules_of_thumb": {
            "inference_gb": round(P * e * 1.2 / GB, 4),
            "training_adam_gb": [round(3 * P * e / GB, 4), round(4 * P * e / GB, 4)],
        },
    }


def estimate_model(model: str, revision: str | None = None, **kw: Any) -> dict[str, Any]:
    return estimate(load_config(model, revision), model=model, **kw)


def _optimizer_kind(optim: str) -> str:
    o = optim.lower()
    if "8bit" in o:
        return "adamw8bit"
    if o.startswith("sgd"):
        return "sgd"
    return "adamw"


def estimate_for_stage(
    cfg: Any, base_path: str, revision: str | None, precision: str, trust_remote_code: bool = False
) -> dict[str, Any]:
    """The estimate for a training stage's config (per process)."""
    from distill.train.models import cuda_available

    conf = load_config(base_path, revision, trust_remote_code)
    kind = cfg.kind
    targets = cfg.lora.target_modules
    if targets is None:
        from distill.train.models import default_lora_targets

        targets = default_lora_targets(str(conf.get("model_type", "")))
    return estimate(
        conf,
        method=cfg.method,
        lora_r=cfg.lora.r,
        lora_targets=targets,
        lora_dropout=cfg.lora.dropout,
        batch_size=cfg.batch_size,
        seq_len=cfg.max_length,
        precision=precision,
        gradient_checkpointing=cfg.gradient_checkpointing,
        optimizer=_optimizer_kind(cfg.optimizer),
        device="cuda" if cuda_available() else "cpu",
        sequences_per_example=2 if kind == "dpo" else 1,
        reference_copy=kind == "dpo" and cfg.method in ("full", "partial", "bitfit"),
        model=base_path,
    )


def check_fits(est: dict[str, Any]) -> str | None:
    """A warning when the estimate exceeds the free memory of the visible GPU (or the available RAM)."""
    need = est["total_bytes"]
    hint = "try gradient_checkpointing: true, a smaller batch_size with more gradient_accumulation_steps, or method: lora/qlora"
    if est["device"] == "cuda":
        import torch

        free, total = torch.cuda.mem_get_info()
        if need > free:
            return (
                f"training needs about {need / GB:.1f} GB but the GPU has {free / GB:.1f} GB free "
                f"({total / GB:.1f} GB total); {hint}"
            )
        return None
    try:
        import psutil

        avail = psutil.virtual_memory().available
    except ImportError:
        return None
    if need > avail:
        return f"training needs about {need / GB:.1f} GB but only {avail / GB:.1f} GB of RAM is available; {hint}"
    return None


def format_table(est: dict[str, Any]) -> str:
    lines = [
        f"{est['model'] or 'model'} ({est['model_type']}): {est['params'] / 1e6:,.1f}M parameters; "
        f"method {est['method']}, {est['precision']}, batch {est['batch_size']} x {est['seq_len']} tokens, "
        f"optimizer {est['optimizer']}, gradient checkpointing {'on' if est['gradient_checkpointing'] else 'off'}, {est['device']}",
        f"trainable: {est['trainable_params']:,} ({100 * est['trainable_share']:.3f}%)",
        "",
        "training (per process)        GB",
    ]
    for k, v in est["components_gb"].items():
        if v or k in ("weights", "activations"):
            lines.append(f"  {k.replace('_', ' '):<26}{v:>8.3f}")
    lines.append(f"  {'total':<26}{est['total_gb']:>8.3f}")
    inf = est["inference"]
    lines += [
        "",
        "inference                     GB",
        f"  {'weights':<26}{inf['weights_gb']:>8.3f}",
        f"  {'weights x 1.2 (rule)':<26}{inf['rule_of_thumb_gb']:>8.3f}",
        f"  {'KV cache (batch x seq)':<26}{inf['kv_cache_gb']:>8.3f}",
        f"  {'total':<26}{inf['total_gb']:>8.3f}",
        "",
        f"rules of thumb: inference ~{est['rules_of_thumb']['inference_gb']:.3f} GB; full training with Adam "
        f"~{est['rules_of_thumb']['training_adam_gb'][0]:.3f}-{est['rules_of_thumb']['training_adam_gb'][1]:.3f} GB + activations",
    ]
    return "\n".join(lines)
