"""`merge`: fold a LoRA adapter into its base, merge several fine-tunes, or combine adapters.

    merged: {kind: merge, base: dpo}                                  # LoRA of `dpo` folded into its base
    souped: {kind: merge, method: ties, base: student,
             models: [{model: sft, weight: 0.5, density: 0.5}, {model: dpo, weight: 0.5, density: 0.5}]}
    slerp:  {kind: merge, method: slerp, base: sft, models: [{model: dpo}],
             parameters: {t: [{filter: self_attn, value: [0, 1]}, {value: 0.5}]}}
    stack:  {kind: merge, method: passthrough,
             slices: [{sources: [{model: sft, layer_range: [0, 2]}]}, {sources: [{model: dpo, layer_range: [1, 2]}]}]}
    inline: {kind: merge, mergekit: {merge_method: ties, base_model: student, models: [...]}}  # mergekit YAML as is
    lora2:  {kind: merge, method: adapters, combination: cat, models: [{model: sft_a, weight: 1}, {model: sft_b, weight: 1}]}

Model names are pipeline models or model-producing stages; a stage that produced a LoRA adapter
enters a merge as base+adapter, applied tensor by tensor (nothing is materialized first). Output:
a full model folder (safetensors + config + tokenizer with chat template), or for `adapters` a
combined LoRA adapter (unless `merge_into_base`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from distill.config import Strict, speed
from distill.core.context import StageContext
from distill.stages.base import StageConfig

CODE_VERSION = "1"
SUBPROCESS = True  # adapter combinations load whole models through PEFT

Method = Literal[
    "lora",
    "linear",
    "task_arithmetic",
    "ties",
    "dare_ties",
    "dare_linear",
    "slerp",
    "passthrough",
    "adapters",
]


class ModelEntry(Strict):
    model: str = Field(..., description="Pipeline model or model-producing stage.")
    weight: float | None = None
    density: float | None = None
    parameters: dict[str, Any] | None = Field(None, description="Other per-model mergekit parameters.")

    def mergekit_parameters(self) -> dict[str, Any] | None:
        p = dict(self.parameters or {})
        if self.weight is not None:
            p["weight"] = self.weight
        if self.density is not None:
            p["density"] = self.density
        return p or None


class SliceSource(Strict):
    model: str
    layer_range: tuple[int, int]
    parameters: dict[str, Any] | None = None


class SliceDef(Strict):
    sources: list[SliceSource] = Field(min_length=1)
    base_model: str | None = None
    parameters: dict[str, Any] | None = None


class Config(StageConfig):
    kind: Literal["merge"]
    method: Method | None = Field(None, description="Default: `lora` when only `base` is given.")
    base: str | None = Field(None, description="Base model (for lora: the adapter stage to fold in).")
    models: list[ModelEntry] = Field(default_factory=list)
    slices: list[SliceDef] | None = None
    parameters: dict[str, Any] = Field(
        default_factory=dict, description="Global mergekit parameters (t, normalize, ...)."
    )
    mergekit: dict[str, Any] | None = Field(
        None,
        description="A mergekit config inlined as is; its model names are pipeline models/stages (or paths).",
    )
    dtype: str | None = Field(None, description="Compute dtype of inputs (float32, bfloat16, float16).")
    out_dtype: str | None = None
    chat_template: str | None = Field(None, description="'auto', a template file, or a Jinja string.")
    combination: str = Field(
        "cat", description="For method adapters: PEFT combination (cat, linear, svd, ties, dare_*)."
    )
    density: float | None = Field(None, description="For method adapters with ties/dare/magnitude_prune.")
    merge_into_base: bool = Field(
        False, description="For method adapters: also fold the result into the base."
    )
    verify: bool = Field(False, description="Check merged logits against adapter-on-base (lora method).")
    seed: int | None = Field(None, description="Seed for DARE (default: pipeline seed).")
    max_shard_size: str = speed("5GB")

    OUTPUT: ClassVar[str] = "model"
    ACCEPTS: ClassVar[frozenset[str] | None] = frozenset()
    USES_TASK: ClassVar[bool] = False

    @model_validator(mode="after")
    def _shape(self) -> Config:
        m = self.resolved_method()
        if self.mergekit is not None:
            if self.models or self.slices or self.parameters or self.base or self.method:
                raise ValueError(
                    "with `mergekit` (an inline mergekit config) leave method/base/models/slices/parameters to it"
                )
            from distill.errors import ConfigError
            from distill.merge.config import parse_merge_config

            try:
                parse_merge_config(self.mergekit, "mergekit")
            except ConfigError as e:
                raise ValueError("; ".join(e.lines)) from None
            return self
        if m == "lora":
            if not self.base or self.models or self.slices:
                raise ValueError(
                    "method lora takes only `base`: the stage whose adapter is folded into its base"
                )
        elif m == "adapters":
            if len(self.models) < 2:
                raise ValueError("method adapters needs at least two adapter stages in `models`")
        elif m == "passthrough":
            if not self.slices and len(self.models) != 1:
                raise ValueError("passthrough needs `slices` (layer ranges) or exactly one model")
        elif not self.models and not self.slices:
            raise ValueError(f"method {m} needs `models` (or `slices`)")
        if self.models and self.slices:
            raise ValueError("give `models` or `slices`, not both")
        return self

    def resolved_method(self) -> str:
        if self.method:
            return self.method
        if self.mergekit is not None:
            return "config"
        return "lora" if self.base and not self.models and not self.slices else "linear"

    def model_refs(self) -> list[tuple[str, str]]:
        refs: list[tuple[str, str]] = []
        if self.base:
            refs.append(("base", self.base))
        for m in self.models:
            refs.append(("models", m.model))
        for s in self.slices or []:
            if s.base_model:
                refs.append(("slices", s.base_model))
            for src in s.sources:
                refs.append(("slices", src.model))
        if self.mergekit is not None:
            refs += [("mergekit", r) for r in _bare_names(self.mergekit)]
        out: list[tuple[str, str]] = []
        for k, r in refs:
            if r not in [x for _, x in out]:
                out.append((k, r))
        return out

    def mergekit_dict(self) -> dict[str, Any]:
        """This stage's merge as a mergekit-style mapping (names stay pipeline names)."""
        d: dict[str, Any] = {"merge_method": self.resolved_method()}
        if self.base:
            d["base_model"] = self.base
        if self.slices:
            d["slices"] = [s.model_dump(exclude_none=True) for s in self.slices]
        else:
            d["models"] = [
                {"model": m.model, **({"parameters": p} if (p := m.mergekit_parameters()) else {})}
                for m in self.models
            ]
        for k in ("dtype", "out_dtype", "chat_template"):
            if getattr(self, k):
                d[k] = getattr(self, k)
        if self.parameters:
            d["parameters"] = dict(self.parameters)
        return d


def _bare_names(data: dict[str, Any]) -> list[str]:
    """Model names an inline mergekit config refers to (bare names; paths are not pipeline references)."""
    out = []
    for ref in _yaml_refs(data):
        for part in ref.split("+"):
            name = part.split("@")[0]
            if name and "/" not in name and not name.startswith(".") and name not in out:
                out.append(name)
    return out


def _yaml_refs(data: Any) -> list[str]:
    refs = []
    if isinstance(data, dict):
        if isinstance(data.get("base_model"), str):
            refs.append(data["base_model"])
        for m in data.get("models") or []:
            if isinstance(m, dict) and isinstance(m.get("model"), str):
                refs.append(m["model"])
        for s in data.get("slices") or []:
            if isinstance(s, dict):
                if isinstance(s.get("base_model"), str):
                    refs.append(s["base_model"])
                for src in s.get("sources") or []:
                    if isinstance(src, dict) and isinstance(src.get("model"), str):
                        refs.append(src["model"])
    return refs


def check(cfg: Config, lp: Any) -> list[str]:
    errors = []
    if cfg.resolved_method() == "lora" and cfg.base in lp.pipeline.models:
        errors.append(
            f"base {cfg.base!r} is a pipeline model, not an adapter stage: there is nothing to fold in"
        )
    return errors


# ------------------------------------------------------------------------------------------------


def _root_model(ctx: StageContext, ref: str) -> str | None:
    if ref in ctx.lp.pipeline.models:
        return ref
    if ref in ctx.input_paths:
        from distill.core.artifacts import Artifact

        info = Artifact(ctx.input_paths[ref]).manifest.get("model") or {}
        return info.get("root_model")
    return None


def _open(ctx: StageContext, ref: str) -> Any:
    """A tensor source for a pipeline model or stage (adapters applied on the fly)."""
    from distill.merge.engine import locate_model, open_model_ref
    from distill.merge.io import LoraOnBase, SafetensorsModel

    if ref not in ctx.lp.pipeline.models and ref not in ctx.lp.stages:
        return open_model_ref(ref, ctx.root)  # a path inside a mergekit YAML
    rm = ctx.model(ref)
    spec = rm.path if not rm.revision else f"{rm.path}@{rm.revision}"
    base = SafetensorsModel(locate_model(spec, ctx.root), label=ref)
    if rm.adapter is not None:
        return LoraOnBase(base, rm.adapter, label=ref)
    return base


def run(ctx: StageContext) -> dict[str, Any]:
    from distill.merge.config import parse_merge_config
    from distill.merge.engine import run_merge

    cfg: Config = ctx.cfg
    method = cfg.resolved_method()
    out = ctx.model_dir
    seed = cfg.seed if cfg.seed is not None else ctx.seed
    first_ref = cfg.base or (cfg.models[0].model if cfg.models else None)
    if method == "adapters":
        return _run_adapters(ctx, cfg, seed)
    if method == "lora":
        from distill.merge.engine import locate_model
        from distill.merge.lora import merge_adapter_into_base

        assert cfg.base is not None
        rm = ctx.model(cfg.base)
        if rm.adapter is None:
            raise ValueError(f"stage {cfg.base!r} produced a full model, not an adapter: nothing to fold in")
        base_dir = locate_model(rm.path if not rm.revision else f"{rm.path}@{rm.revision}", ctx.root)
        with ctx.progress(None, f"{ctx.name}: merging tensors", "tensors") as prog:
            stats = merge_adapter_into_base(base_dir, rm.adapter, out, cfg.dtype, cfg.out_dtype, cfg.chat_template,
                                            cfg.max_shard_size, on_tensor=lambda i, n: prog.advance(1))  # fmt: skip
        ctx.manifest_extra["model"] = {"type": "full", "base_path": str(base_dir), "base_revision": rm.revision,
                                       "root_model": _root_model(ctx, cfg.base), "merged_from": [cfg.base]}  # fmt: skip
        if cfg.verify:
            stats["verify_max_abs_logit_diff"] = verify_merge(str(base_dir), rm.adapter, out)
        return stats
    if method == "config":
        assert cfg.mergekit is not None
        mk = parse_merge_config(cfg.mergekit, f"stages.{ctx.name}.mergekit")
        first_ref = mk.base_model or mk.referenced_models()[0]
    else:
        mk = parse_merge_config(cfg.mergekit_dict(), f"stages.{ctx.name}")
    if mk.seed is None:
        mk.seed = seed
    sources = {ref: _open(ctx, ref) for ref in mk.referenced_models()}
    with ctx.progress(None, f"{ctx.name}: merging tensors", "tensors") as prog:
        stats = run_merge(mk, sources, out, cfg.max_shard_size, on_tensor=lambda i, n: prog.advance(1))
    stats["method"] = method if method != "config" else f"config:{mk.merge_method}"
    root = _root_model(ctx, first_ref) if first_ref else None
    donor = sources[mk.base_model or mk.referenced_models()[0]]
    ctx.manifest_extra["model"] = {
        "type": "full",
        "base_path": str(donor.path),
        "base_revision": None,
        "root_model": root,
        "merged_from": mk.referenced_models(),
    }
    return stats


def _run_adapters(ctx: StageContext, cfg: Config, seed: int) -> dict[str, Any]:
    from distill.merge.lora import combine_adapters, merge_adapter_into_base

    rms = [ctx.model(m.model) for m in cfg.models]
    bases = {rm.path for rm in rms}
    if any(rm.adapter is None for rm in rms):
        bad = next(m.model for m, rm in zip(cfg.models, rms, strict=True) if rm.adapter is None)
        raise ValueError(f"method adapters combines LoRA adapters, but {bad!r} is a full model")
    if len(bases) != 1:
        raise ValueError(f"adapters to combine must share one base model; got {sorted(bases)}")
    base_path = rms[0].path
    pairs = [
        (rm.adapter, m.weight if m.weight is not None else 1.0) for m, rm in zip(cfg.models, rms, strict=True)
    ]
    adapter_dir = ctx.scratch_dir / "combined" if cfg.merge_into_base else ctx.model_dir
    stats = combine_adapters(base_path, pairs, adapter_dir, cfg.combination, cfg.density, seed=seed)  # type: ignore[arg-type]
    root = _root_model(ctx, cfg.models[0].model)
    if cfg.merge_into_base:
        stats.update(
            {
                f"fold_{k}": v
                for k, v in merge_adapter_into_base(base_path, adapter_dir, ctx.model_dir, cfg.dtype).items()
            }
        )
        ctx.manifest_extra["model"] = {"type": "full", "base_path": base_path, "base_revision": rms[0].revision,
                                       "root_model": root}  # fmt: skip
    else:
        ctx.manifest_extra["model"] = {
            "type": "adapter",
            "base_path": base_path,
            "base_revision": rms[0].revision,
            "root_model": root,
        }
    return stats


def verify_merge(base_path: str, adapter: Path | None, merged: Path, n_tokens: int = 32) -> float:
    """Max |logit difference| between adapter-on-base and the merged model on fixed tokens (fp32)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    ref = PeftModel.from_pretrained(base, str(adapter)).eval() if adapter else base.eval()
    vocab = int(base.config.vocab_size)
    ids = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab, (2, n_tokens), generator=ids)
    with torch.no_grad():
        a = ref(x).logits
        del ref, base
        m = AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32).eval()
        b = m(x).logits
    return float((a - b).abs().max())
