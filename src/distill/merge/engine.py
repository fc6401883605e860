"""The merge executor: plan every output tensor, check the inputs agree, then stream.

`run_merge(cfg, sources, out_dir)` takes a `MergeConfig` and the opened model sources it names
(`SafetensorsModel` / `LoraOnBase`, keyed by the strings used in the config) and writes a
standalone model folder: safetensors shard(s), config.json, generation config and tokenizer
files (chat template included). Inputs are read one tensor name at a time, so memory holds one
tensor per input (plus the task-vector stack for TIES/DARE), never whole models.

The plan mirrors mergekit's: `models:` becomes one slice over all layers (the base model added
when a method needs it); non-layer tensors (embeddings, final norm, lm_head) are merged with the
first/last slice's inputs at t=0; layer k of a slice of n layers is merged at t = k/(n-1), which
is where gradient parameters are interpolated.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from distill.errors import ConfigError, DistillError
from distill.merge.config import MergeConfig, Param, method_params, resolve
from distill.merge.io import (
    LoraOnBase,
    OutTensor,
    SafetensorsModel,
    StreamingWriter,
    layer_index,
    parse_size,
    torch_dtype,
    with_layer,
)

if TYPE_CHECKING:
    import torch

TOKENIZER_FILES = (
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer.model",
    "added_tokens.json",
    "merges.txt",
    "vocab.json",
    "chat_template.jinja",
    "chat_template.json",
)


class Source(Protocol):
    label: str
    path: Path

    @property
    def config(self) -> dict[str, Any]: ...

    def keys(self) -> list[str]: ...

    def __contains__(self, key: str) -> bool: ...

    def meta(self, key: str) -> tuple[tuple[int, ...], torch.dtype]: ...

    def get(self, key: str) -> torch.Tensor: ...


@dataclass
class _Src:
    ref: str
    start: int
    end: int
    params: dict[str, Any] | None


@dataclass
class _Slice:
    sources: list[_Src]
    base: str | None
    params: dict[str, Any] | None


@dataclass
class _Item:
    out_name: str
    inputs: list[tuple[str, str]]  # (model ref, tensor name in that model)
    slice: _Slice
    t: float
    shape: tuple[int, ...]
    dtype: Any = None
    extra: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------
# opening model references
# ------------------------------------------------------------------------------------------------


def locate_model(spec: str, root: Path | None = None) -> Path:
    """A local folder for `path` or `org/name[@revision]` (Hub ids go through the HF cache)."""
    name, _, rev = spec.partition("@")
    p = Path(name).expanduser()
    if not p.is_absolute() and root is not None:
        p = root / p
    if p.exists():
        return p
    if name.count("/") == 1 and not name.startswith((".", "/")):
        from huggingface_hub import snapshot_download

        try:
            return Path(
                snapshot_download(
                    name,
                    revision=rev or None,
                    allow_patterns=["*.safetensors", "*.json", "*.jinja", "*.model", "*.txt"],
                )
            )
        except Exception as e:  # offline, gated, missing: one line for the user
            raise DistillError(
                f"model {spec!r}: not a local folder and could not be fetched from the Hub ({type(e).__name__}); "
                "download it first or give a local path"
            ) from None
    raise DistillError(f"model {spec!r}: no such folder ({p})")


def open_model_ref(ref: str, root: Path | None = None) -> SafetensorsModel | LoraOnBase:
    """Open `model`, `model+lora` (mergekit syntax), or a PEFT adapter folder (applied to its base)."""
    from distill.merge.lora import is_adapter_dir, read_adapter_config

    model, plus, lora = ref.partition("+")
    path = locate_model(model, root)
    if not plus and is_adapter_dir(path):
        base = read_adapter_config(path).get("base_model_name_or_path")
        if not base:
            raise DistillError(
                f"adapter {path}: adapter_config.json names no base model; write it as base+adapter"
            )
        return LoraOnBase(SafetensorsModel(locate_model(str(base), root), label=str(base)), path, label=ref)
    src = SafetensorsModel(path, label=model)
    if plus:
        return LoraOnBase(src, locate_model(lora, root), label=ref)
    return src


# ------------------------------------------------------------------------------------------------
# checks
# ------------------------------------------------------------------------------------------------


def _tokenizer_dir(src: Source) -> Path:
    if isinstance(src, LoraOnBase) and (src.adapter_dir / "tokenizer_config.json").is_file():
        return src.adapter_dir
    return src.path


def _vocab(src: Source) -> dict[str, int] | str | None:
    d = _tokenizer_dir(src)
    if (d / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        v: dict[str, int] = Tokenizer.from_file(str(d / "tokenizer.json")).get_vocab(with_added_tokens=True)
        return v
    if (d / "tokenizer.model").is_file():
        import hashlib

        return hashlib.sha256((d / "tokenizer.model").read_bytes()).hexdigest()
    return None


def check_compatible(sources: dict[str, Source], same_depth: bool) -> None:
    """Refuse inputs that do not share one architecture and one vocabulary (one clear line)."""
    refs = list(sources)
    first = sources[refs[0]]
    c0 = first.config
    v0 = _vocab(first)
    for ref in refs[1:]:
        src = sources[ref]
        c = src.config
        keys = ["model_type", "hidden_size", "vocab_size", "num_attention_heads", "num_key_value_heads"]
        if same_depth:
            keys.append("num_hidden_layers")
        for k in keys:
            if k in c0 and k in c and c0[k] != c[k]:
                raise DistillError(
                    f"cannot merge {first.label} and {src.label}: {k} is {c0[k]!r} vs {c[k]!r}; "
                    "merged models must share one architecture"
                )
        if (c0.get("architectures") or [None])[0] != (c.get("architectures") or [None])[0]:
            raise DistillError(
                f"cannot merge {first.label} and {src.label}: architectures {c0.get('architectures')} vs "
                f"{c.get('architectures')}"
            )
        v = _vocab(src)
        if v0 is not None and v is not None and v0 != v:
            if isinstance(v0, dict) and isinstance(v, dict):
                diff = sum(1 for tok, i in v.items() if v0.get(tok) != i) + len(set(v0) - set(v))
                detail = f"{len(v0)} vs {len(v)} tokens, {diff} differ"
            else:
                detail = "tokenizer.model files differ"
            raise DistillError(
                f"cannot merge {first.label} and {src.label}: their vocabularies differ ({detail}); "
                "token ids would not line up. Merge models that share one tokenizer"
            )


# ------------------------------------------------------------------------------------------------
# planning
# ------------------------------------------------------------------------------------------------


def num_layers(src: Source) -> int:
    idx = [i for i in (layer_index(k) for k in src.keys()) if i is not None]  # noqa: SIM118 - a tensor source, not a dict
    if idx:
        return max(idx) + 1
    return int(src.config.get("num_hidden_layers") or 0)


def _is_pre(name: str) -> bool:
    """Non-layer tensors before the layers (embeddings) vs after them (final norm, lm_head)."""
    return any(s in name for s in ("embed", "wte", "wpe", "word_embeddings"))


def _slices(cfg: MergeConfig, sources: dict[str, Source]) -> list[_Slice]:
    m = cfg.merge_method
    if cfg.models:
        refs = [x.model for x in cfg.models]
        if len(set(refs)) != len(refs):
            raise ConfigError(
                f"merge config lists model {next(r for r in refs if refs.count(r) > 1)!r} twice"
            )
        srcs = [_Src(x.model, 0, num_layers(sources[x.model]), x.parameters) for x in cfg.models]
        if cfg.base_model and cfg.base_model not in refs:
            if m == "linear":
                raise ConfigError(
                    f"linear merge: base_model {cfg.base_model!r} is not among models; list it with a weight or drop base_model"
                )
            srcs.append(_Src(cfg.base_model, 0, num_layers(sources[cfg.base_model]), None))
        return [_Slice(srcs, None, None)]
    out = []
    for s in cfg.slices or []:
        out.append(_Slice([_Src(x.model, x.layer_range[0], x.layer_range[1], x.parameters) for x in s.sources],
                          s.base_model, s.parameters))  # fmt: skip
    return out


def _validate_slice(cfg: MergeConfig, s: _Slice, i: int) -> None:
    m = cfg.merge_method
    refs = [x.ref for x in s.sources]
    base = s.base or cfg.base_model
    where = f"slice {i}" if cfg.slices else "models"
    if len(set(refs)) != len(refs):
        raise ConfigError(f"{where}: a model appears twice among the inputs")
    if m in ("task_arithmetic", "ties", "dare_ties", "dare_linear", "slerp"):
        if not base:
            raise ConfigError(f"{m} needs base_model")
        if base not in refs:
            raise ConfigError(f"{where}: {m} needs base_model {base!r} among the inputs")
    if m == "slerp" and len(refs) != 2:
        raise ConfigError(
            f"{where}: slerp interpolates exactly two models (base and one other); got {len(refs)}"
        )
    if m == "passthrough" and len(refs) != 1:
        raise ConfigError(f"{where}: passthrough takes one model per slice; got {len(refs)}")


def plan_merge(cfg: MergeConfig, sources: dict[str, Source]) -> tuple[list[_Item], int]:
    """Every output tensor with its inputs, in write order; and the number of output layers."""
    missing = [r for r in cfg.referenced_models() if r not in sources]
    if missing:
        raise DistillError(f"merge config names {missing[0]!r} but no such model was opened")
    slices = _slices(cfg, sources)
    for i, s in enumerate(slices):
        _validate_slice(cfg, s, i)
        for x in s.sources:
            nl = num_layers(sources[x.ref])
            if x.end > nl:
                raise ConfigError(f"layer_range {[x.start, x.end]} of {x.ref!r} goes past its {nl} layers")
    items: list[_Item] = []

    def template(s: _Slice) -> _Src:
        base = s.base or cfg.base_model
        return next((x for x in s.sources if x.ref == base), s.sources[0])

    def add(out_name: str, s: _Slice, inputs: list[tuple[str, str]], t: float) -> None:
        shapes = []
        for ref, name in inputs:
            src = sources[ref]
            if name not in src:
                raise DistillError(
                    f"cannot merge: {src.label} has no tensor {name!r} (needed for {out_name}); "
                    "the inputs do not share one architecture"
                )
            shapes.append((ref, src.meta(name)[0]))
        if len({sh for _, sh in shapes}) != 1:
            detail = ", ".join(f"{sources[r].label}: {list(sh)}" for r, sh in shapes)
            raise DistillError(
                f"cannot merge tensor {out_name}: shapes differ ({detail}); mismatched architectures or vocabularies"
            )
        items.append(_Item(out_name, inputs, s, t, shapes[0][1]))

    def non_layer(s: _Slice, pre: bool) -> None:
        tm = template(s)
        for name in sources[tm.ref].keys():  # noqa: SIM118 - a tensor source, not a dict
            if layer_index(name) is None and _is_pre(name) == pre:
                add(name, s, [(x.ref, name) for x in s.sources], 0.0)

    non_layer(slices[0], True)
    out_layer = 0
    for s in slices:
        tm = template(s)
        n = tm.end - tm.start
        for k in range(n):
            t = k / (n - 1) if n > 1 else 1.0
            names = [nm for nm in sources[tm.ref].keys() if layer_index(nm) == tm.start + k]  # noqa: SIM118 - a tensor source, not a dict
            for name in names:
                add(
                    with_layer(name, out_layer),
                    s,
                    [(x.ref, with_layer(name, x.start + k)) for x in s.sources],
                    t,
                )
            out_layer += 1
    non_layer(slices[-1], False)
    # every input tensor of a models-merge must be used: a tensor only some models have means the
    # architectures differ (e.g. an untied lm_head in one of them)
    if cfg.models:
        used = {name for it in items for _, name in it.inputs}
        for ref in {x.ref for s in slices for x in s.sources}:
            extra = [k for k in sources[ref].keys() if k not in used]  # noqa: SIM118 - a tensor source, not a dict
            if extra:
                raise DistillError(
                    f"cannot merge: {sources[ref].label} has tensor {extra[0]!r} that the other inputs lack; "
                    "the inputs do not share one architecture"
                )
    return items, out_layer


# ------------------------------------------------------------------------------------------------
# execution
# ------------------------------------------------------------------------------------------------


def _merge_one(
    cfg: MergeConfig,
    it: _Item,
    tensors: dict[str, torch.Tensor],
    params: list[Param],
    generator: torch.Generator | None,
) -> torch.Tensor:
    from distill.merge import methods

    m = cfg.merge_method
    s = it.slice
    scopes_shared = [s.params, cfg.parameters]
    shared = {
        p.name: resolve(p, scopes_shared, it.out_name, it.t, it.out_name)
        for p in params
        if p.scope == "shared"
    }
    base = s.base or cfg.base_model
    per: dict[str, dict[str, Any]] = {}
    for src, (ref, in_name) in zip(s.sources, it.inputs, strict=True):
        per[ref] = {}
        for p in params:
            if p.scope == "shared" or (p.scope == "non_base" and ref == base):
                continue
            per[ref][p.name] = resolve(
                p, [src.params, s.params, cfg.parameters], in_name, it.t, f"{ref}:{in_name}"
            )
    refs = [ref for ref, _ in it.inputs]
    if m == "linear":
        return methods.linear(
            [tensors[r] for r in refs], [per[r]["weight"] for r in refs], shared["normalize"]
        )
    if m in methods.TASK_METHODS:
        sparsification, consensus, _, _ = methods.TASK_METHODS[m]
        if m == "task_arithmetic":
            prune = str(shared.get("prune", "none")).lower()
            if prune not in ("none", "magnitude", "random"):
                raise ConfigError(f"parameter prune: {prune!r}; use magnitude, random or none")
            sparsification = None if prune == "none" else prune  # type: ignore[assignment]
        others = [r for r in refs if r != base]
        assert base is not None
        return methods.task_arithmetic(
            tensors[base],
            [tensors[r] for r in others],
            [per[r]["weight"] for r in others],
            [per[r]["density"] for r in others],
            sparsification=sparsification,
            consensus=consensus,
            normalize=shared["normalize"],
            rescale=shared["rescale"],
            lambda_=shared["lambda"],
            generator=generator,
        )
    if m == "slerp":
        other = next(r for r in refs if r != base)
        assert base is not None
        return methods.slerp(shared["t"], tensors[base], tensors[other])
    if m == "passthrough":
        (r,) = refs
        scale = per[r].get("scale")
        return tensors[r] if scale is None else tensors[r] * scale
    raise ConfigError(f"unknown merge method {m!r}")


def run_merge(
    cfg: MergeConfig,
    sources: dict[str, Source],
    out_dir: Path,
    max_shard_size: str | int = "5GB",
    on_tensor: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Merge into `out_dir` (created; existing model files there are replaced). Returns stats."""
    import torch

    t0 = time.time()
    out_dir = Path(out_dir)
    check_compatible({r: sources[r] for r in cfg.referenced_models()}, same_depth=not cfg.slices)
    items, n_layers = plan_merge(cfg, sources)
    in_dtype = torch_dtype(cfg.dtype)
    out_dtype = torch_dtype(cfg.out_dtype) or in_dtype
    for it in items:
        first_ref, first_name = it.inputs[0]
        it.dtype = out_dtype or sources[first_ref].meta(first_name)[1]
    params = method_params(cfg.merge_method)
    # random methods (DARE, prune: random) draw from one seeded generator, in tensor order
    generator = torch.Generator().manual_seed(int(cfg.seed if cfg.seed is not None else 0))
    writer = StreamingWriter(
        out_dir, [OutTensor(it.out_name, it.shape, it.dtype) for it in items], parse_size(max_shard_size)
    )
    peak = 0
    try:
        with torch.no_grad():
            for i, it in enumerate(items):
                tensors: dict[str, torch.Tensor] = {}
                for ref, name in it.inputs:
                    x = sources[ref].get(name)
                    tensors[ref] = x.to(in_dtype) if in_dtype is not None and x.dtype != in_dtype else x
                peak = max(peak, sum(x.numel() * x.element_size() for x in tensors.values()))
                out = _merge_one(cfg, it, tensors, params, generator)
                writer.write(it.out_name, out)
                del tensors, out
                if on_tensor is not None:
                    on_tensor(i + 1, len(items))
        files = writer.close()
    except BaseException:
        writer.abort()
        raise
    donor_ref = cfg.base_model or cfg.referenced_models()[0]
    donor = sources[donor_ref]
    _write_config(donor, out_dir, n_layers, out_dtype or _first_float_dtype(items), sources, items)
    tok_ref = donor_ref
    if cfg.tokenizer_source and cfg.tokenizer_source != "base":
        if cfg.tokenizer_source not in sources:
            raise ConfigError(f"tokenizer_source {cfg.tokenizer_source!r} is not one of the merged models")
        tok_ref = cfg.tokenizer_source
    copy_tokenizer(_tokenizer_dir(sources[tok_ref]), out_dir)
    if (donor.path / "generation_config.json").is_file():
        shutil.copy2(donor.path / "generation_config.json", out_dir / "generation_config.json")
    if cfg.chat_template:
        set_chat_template(out_dir, cfg.chat_template, [sources[r] for r in cfg.referenced_models()])
    (out_dir / "merge_config.json").write_text(json.dumps(cfg.model_dump(exclude_none=True), indent=2))
    return {
        "method": cfg.merge_method,
        "tensors": len(items),
        "bytes": sum(OutTensor(it.out_name, it.shape, it.dtype).nbytes for it in items),
        "shards": len(files),
        "layers": n_layers,
        "peak_input_tensor_bytes": peak,
        "seconds": round(time.time() - t0, 3),
    }


def _first_float_dtype(items: list[_Item]) -> Any:
    return next((it.dtype for it in items if it.dtype is not None and it.dtype.is_floating_point), None)


def _write_config(
    donor: Source, out_dir: Path, n_layers: int, dtype: Any, sources: dict[str, Source], items: list[_Item]
) -> None:
    cfg = dict(donor.config)
    if not cfg:
        raise DistillError(f"{donor.label}: no config.json; cannot write a loadable model")
    if n_layers:
        cfg["num_hidden_layers"] = n_layers
        for k in ("layer_types",):  # per-layer lists must follow the new depth
            if isinstance(cfg.get(k), list) and len(cfg[k]) != n_layers and cfg[k]:
                cfg[k] = [cfg[k][min(i, len(cfg[k]) - 1)] for i in range(n_layers)]
    if dtype is not None:
        name = str(dtype).replace("torch.", "")
        cfg["dtype"] = name
        if "torch_dtype" in cfg:
            cfg["torch_dtype"] = name
    names = {it.out_name for it in items}
    if "lm_head.weight" in names and cfg.get("tie_word_embeddings"):
        cfg["tie_word_embeddings"] = False
    emb = next((it for it in items if it.out_name.endswith("embed_tokens.weight")), None)
    if emb is not None and cfg.get("vocab_size") and emb.shape[0] != cfg["vocab_size"]:
        cfg["vocab_size"] = int(emb.shape[0])
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def copy_tokenizer(src_dir: Path, out_dir: Path) -> list[str]:
    """Copy tokenizer files (chat template included) from a model or adapter folder."""
    out_dir.mkdir(parents=True, exist_ok=True)
    copied = []
    for f in TOKENIZER_FILES:
        if (src_dir / f).is_file():
            shutil.copy2(src_dir / f, out_dir / f)
            copied.append(f)
    return copied


def set_chat_template(out_dir: Path, template: str, sources: list[Source]) -> None:
    """mergekit's `chat_template`: 'auto' (most common among inputs), a file path, or a Jinja string."""
    from collections import Counter

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out_dir))
    if template == "auto":
        found = []
        for s in sources:
            try:
                t = AutoTokenizer.from_pretrained(str(_tokenizer_dir(s))).chat_template
            except Exception:  # a source without a loadable tokenizer simply does not vote
                continue
            if isinstance(t, str) and t.strip():
                found.append(t.strip())
        if not found:
            return
        template = Counter(found).most_common(1)[0][0]
    elif Path(template).is_file():
        template = Path(template).read_text(encoding="utf-8")
    elif "{" not in template:
        raise ConfigError(
            f"chat_template {template!r}: give 'auto', a template file, or a Jinja template string"
        )
    tok.chat_template = template
    tok.save_pretrained(str(out_dir))
