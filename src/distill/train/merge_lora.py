"""Merging adapters into their base, and resolving what a training stage builds on.

- `merge_adapter(base_path, adapter_path, out_dir)`: PEFT `merge_and_unload` of a LoRA/IA3 adapter,
  saved as a plain transformers model (safetensors) plus the adapter's tokenizer and chat template.
  The merge stage calls it too.
- `ensure_merged(workdir, fingerprint, ...)`: the merged model of an upstream adapter artifact, cached
  once under `<workdir>/.merged/<fingerprint[:16]>/` (written atomically: a temp folder renamed into
  place under a file lock). Artifacts are immutable, so the merge never goes into the upstream folder.
- `resolve_chain(ctx, ref, chain)`: everything a training stage needs about its `base:` (a pipeline
  model or an earlier model-producing stage), following `chain: merge|stack`.
- `resolve_base(ctx, ref)`: just the path of a full model for `ref` (merging an adapter if needed), for
  the merge and evaluate stages.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from distill.core.context import StageContext

MERGED_DIR = ".merged"
MERGED_MARKER = "distill_merged.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
)


def _torch_dtype_of(config: Any) -> Any:
    import torch

    dt = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dt, str):
        dt = getattr(torch, dt, None)
    return dt if isinstance(dt, torch.dtype) else torch.float32


def merge_adapter(
    base_path: str | Path,
    adapter_path: str | Path,
    out_dir: str | Path,
    base_revision: str | None = None,
    trust_remote_code: bool = False,
    save_dtype: str | None = None,
) -> Path:
    """Merge the PEFT adapter at `adapter_path` into the model at `base_path`; write a full model to `out_dir`.

    The merge runs in fp32 (the adapter delta is added exactly), then the weights are cast to the base's
    stored dtype (or `save_dtype`: float32/bfloat16/float16, or fp32/bf16/fp16). The tokenizer (with its chat template) comes
    from the adapter folder when it has one (training stages save it there), else from the base.
    Prompt/prefix-tuning adapters have no weights to merge and raise ValueError.
    """
    import torch
    from peft import PeftConfig, PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    adapter_path, out_dir = Path(adapter_path), Path(out_dir)
    pcfg = PeftConfig.from_pretrained(str(adapter_path))
    if getattr(pcfg, "is_prompt_learning", False):
        raise ValueError(
            f"{adapter_path}: a {pcfg.peft_type} adapter adds virtual tokens and cannot be merged into the "
            "base weights; serve it as an adapter"
        )
    base_cfg = AutoConfig.from_pretrained(
        str(base_path), revision=base_revision, trust_remote_code=trust_remote_code
    )
    aliases = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "auto": None}
    name = aliases.get(save_dtype, save_dtype) if save_dtype else None
    if name is not None and not isinstance(getattr(torch, name, None), torch.dtype):
        raise ValueError(f"save_dtype {save_dtype!r}: use float32, bfloat16 or float16")
    target = getattr(torch, name) if name else _torch_dtype_of(base_cfg)
    base = AutoModelForCausalLM.from_pretrained(
        str(base_path), revision=base_revision, dtype=torch.float32, trust_remote_code=trust_remote_code
    )
    peft_model: Any = PeftModel.from_pretrained(base, str(adapter_path))
    merged = peft_model.merge_and_unload()
    merged = merged.to(target)
    out_dir.mkdir(parents=True, exist_ok=True)
    # save the merged (plain) model, never the PeftModel after merging: that writes an empty adapter
    merged.save_pretrained(out_dir, safe_serialization=True)
    tok_src = (
        adapter_path
        if any((adapter_path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
        else base_path
    )
    tok = AutoTokenizer.from_pretrained(
        str(tok_src), revision=None if tok_src == adapter_path else base_revision
    )
    tok.save_pretrained(out_dir)
    gen = Path(base_path) / "generation_config.json"
    if gen.is_file() and not (out_dir / "generation_config.json").is_file():
        shutil.copy2(gen, out_dir / "generation_config.json")
    return out_dir


def merged_dir(workdir: Path, fingerprint: str) -> Path:
    return workdir / MERGED_DIR / fingerprint[:16]


def ensure_merged(
    workdir: Path,
    fingerprint: str,
    base_path: str,
    adapter_path: str | Path,
    base_revision: str | None = None,
    trust_remote_code: bool = False,
    merged_from: dict[str, Any] | None = None,
) -> Path:
    """The merged model of an adapter artifact (identified by its fingerprint), built once and cached.

    If `base_path` is itself a cached merge that has been deleted, `merged_from` (the provenance recorded
    in the upstream manifest) rebuilds it first.
    """
    final = merged_dir(workdir, fingerprint)
    if (final / MERGED_MARKER).is_file():
        return final
    if merged_from and not Path(base_path).exists():
        base_path = str(materialize(workdir, merged_from))
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.parent / ".lock", "w") as lockf:
        fcntl.flock(lockf, fcntl.LOCK_EX)
        if (final / MERGED_MARKER).is_file():
            return final
        tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        merge_adapter(base_path, adapter_path, tmp, base_revision, trust_remote_code)
        (tmp / MERGED_MARKER).write_text(
            json.dumps(
                {"fingerprint": fingerprint, "base_path": str(base_path), "adapter": str(adapter_path)},
                indent=2,
            )
        )
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
    return final


def materialize(workdir: Path, merged_from: dict[str, Any]) -> Path:
    """Rebuild a cached merge from its provenance record (see `ChainBase.merged_from`)."""
    return ensure_merged(
        workdir,
        merged_from["fingerprint"],
        merged_from["base_path"],
        merged_from["adapter"],
        merged_from.get("base_revision"),
        merged_from.get("trust_remote_code", False),
        merged_from.get("merged_from"),
    )


@dataclass
class ChainBase:
    """What a training stage builds on.

    `base_path`: the full model to load (a Hub id or a local folder; a cached merge for `chain: merge`).
    `upstream_adapter`: for `chain: stack`, the upstream adapter that training continues.
    `tokenizer_path`: where the tokenizer (with the chat template used so far) is read from.
    `merged_from`: provenance of a cached merge, so that it can be rebuilt if deleted.
    """

    base_path: str
    base_revision: str | None
    tokenizer_path: str
    root_model: str
    chat_template: str | None = None
    trust_remote_code: bool = False
    upstream_adapter: str | None = None
    upstream_method: str | None = None
    merged_from: dict[str, Any] | None = None
    identity: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve_chain(ctx: StageContext, ref: str, chain: str = "merge") -> ChainBase:
    """Resolve `base: <ref>` of a training stage (see `ChainBase`)."""
    rm = ctx.model(ref)
    trust = bool(getattr(rm.spec, "trust_remote_code", False))
    if rm.stage is None:  # a pipeline model
        tmpl = rm.spec.chat_template
        text = ctx.path(tmpl).read_text(encoding="utf-8") if tmpl else None
        return ChainBase(rm.path, rm.revision, rm.path, ref, text, trust, identity=rm.identity)
    art = ctx.inputs.get(ref) if ref in ctx.input_paths else None
    man = art.manifest if art is not None else {}
    info = man.get("model") or {"type": "full"}
    root = str(info.get("root_model") or ref)
    if rm.adapter is None:  # a full model (full fine-tune, partial, BitFit, or a merge stage)
        return ChainBase(rm.path, None, rm.path, root, None, trust, identity=rm.identity)
    method = info.get("method")
    base_merge = info.get("merged_from")
    if chain == "stack":
        if method not in (None, "lora", "qlora"):
            raise ValueError(f"base {ref!r} is a {method} adapter; chain: stack continues LoRA adapters only")
        base_path = rm.path
        if base_merge and not Path(base_path).exists():
            base_path = str(materialize(ctx.workdir, base_merge))
        return ChainBase(
            base_path,
            rm.revision,
            str(rm.adapter),
            root,
            None,
            trust,
            upstream_adapter=str(rm.adapter),
            upstream_method=method,
            merged_from=base_merge,
            identity=rm.identity,
        )
    if method in ("prompt_tuning", "prefix_tuning"):
        raise ValueError(
            f"base {ref!r} is a {method} adapter, which cannot be merged into weights; "
            "train it last in the chain, or use lora/ia3 upstream"
        )
    provenance = {
        "fingerprint": rm.identity,
        "base_path": rm.path,
        "base_revision": rm.revision,
        "adapter": str(rm.adapter),
        "trust_remote_code": trust,
        "merged_from": base_merge,
    }
    merged = ensure_merged(ctx.workdir, rm.identity, rm.path, rm.adapter, rm.revision, trust, base_merge)
    return ChainBase(
        str(merged), None, str(merged), root, None, trust, merged_from=provenance, identity=rm.identity
    )


def resolve_base(ctx: StageContext, ref: str) -> str:
    """A loadable full model (local folder or Hub id) for `ref`: a pipeline model, or a stage's model with
    its adapter merged (cached under `<workdir>/.merged/`)."""
    return resolve_chain(ctx, ref, "merge").base_path
