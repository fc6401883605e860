"""`export`: dataset artifacts -> a Hub dataset repo, a model -> a Hub model repo, with cards.

    export:
      kind: export
      inputs: [verified, pairs, eval]      # dataset stages (one config each) and evaluate stages
      model: merged                        # a model-producing stage (full model or LoRA adapter)
      to_dir: exports/sql-duckdb           # writes exactly what would be pushed: the dataset repo
      model_to_dir: null                   #   here, the model repo in <to_dir>-model (default)
      repo_id: null                        # e.g. me/sql-duckdb-data: push the dataset repo
      model_repo_id: null                  # e.g. me/sql-duckdb-0.5b: push the model repo
      private: true
      revision: null                       # a branch (created when missing); default main
      commit_message: null
      include_dropped: false               # also export curation's dropped rows (<config>_dropped)
      license: other

Evaluate-stage inputs are not exported as data: their metrics go into the model card (model-index)
and the card's results table. Provenance (teacher models and revisions, prompt templates and their
hashes, sampling parameters, the curation funnel, dedup and decontamination settings, training
hyper-parameters) is read from the manifests of every upstream artifact.

The artifact holds `dataset/`, `model/` (what is pushed) and `export.json` (commits pushed). The
token is read by huggingface_hub from HF_TOKEN or the login cache and never reaches a config,
log line or manifest; a rerun with unchanged content makes no new commit.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from distill.config import speed
from distill.core.context import StageContext
from distill.stages.base import StageConfig

CODE_VERSION = "1"

DATA_LAYOUTS = frozenset({"text", "questions", "generations", "sft", "pairs"})
_BOOKKEEPING = {"kind", "inputs", "description"}
_SAMPLING_KEYS = (
    "n",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "max_tokens",
    "seed",
    "stop",
    "repetition_penalty",
)
_HPARAM_KEYS = (
    "method", "lora", "learning_rate", "lr", "epochs", "num_epochs", "max_steps", "batch_size",
    "per_device_batch_size", "gradient_accumulation_steps", "max_length", "beta", "loss_type", "prompt_loss_weight",
    "packing", "warmup_ratio", "warmup_steps", "weight_decay", "lr_scheduler", "precision", "chain",
    "dtype",
)  # fmt: skip
_RESULT_KEYS = (
    "steps",
    "final_loss",
    "train_loss",
    "eval_loss",
    "train_tokens",
    "tensors",
    "verify_max_abs_logit_diff",
)


class Config(StageConfig):
    kind: Literal["export"]
    model: str | None = Field(None, description="Model-producing stage (or pipeline model) to export.")
    to_dir: str | None = Field(None, description="Write the dataset repo folder here (relative to root).")
    model_to_dir: str | None = Field(
        None, description="Write the model repo folder here (default <to_dir>-model)."
    )
    repo_id: str | None = Field(None, description="Dataset repo to push to (org/name).")
    model_repo_id: str | None = Field(None, description="Model repo to push to (org/name).")
    private: bool = True
    revision: str | None = Field(None, description="Branch to push to (created when missing).")
    commit_message: str | None = speed(None)
    include_dropped: bool = False
    license: str = "other"
    pretty_name: str | None = None
    language: list[str] = Field(default_factory=lambda: ["en"])
    tags: list[str] = Field(default_factory=list)

    OUTPUT: ClassVar[str] = "export"
    ACCEPTS: ClassVar[frozenset[str] | None] = DATA_LAYOUTS | {"eval"}

    @model_validator(mode="after")
    def _something(self) -> Config:
        if not self.inputs and not self.model:
            raise ValueError("export needs dataset `inputs` and/or a `model`")
        for k in ("repo_id", "model_repo_id"):
            v = getattr(self, k)
            if v is not None and (v.count("/") != 1 or v.startswith("/") or v.endswith("/")):
                raise ValueError(f"{k} {v!r}: write it as owner/name")
        if self.model_repo_id and not self.model:
            raise ValueError("model_repo_id is set but no `model` to export")
        return self

    def model_refs(self) -> list[tuple[str, str]]:
        return [("model", self.model)] if self.model else []


# ------------------------------------------------------------------------------------------------
# provenance from manifests
# ------------------------------------------------------------------------------------------------


def _manifest(path: Path) -> dict[str, Any]:
    try:
        return json.loads((Path(path) / "manifest.json").read_text())  # type: ignore[no-any-return]
    except (OSError, ValueError):
        return {}


def ancestry(path: Path) -> list[dict[str, Any]]:
    """The manifests of an artifact and all its upstream artifacts, upstream first, each once."""
    seen: dict[str, dict[str, Any]] = {}
    order: list[str] = []

    def visit(p: Path) -> None:
        man = _manifest(p)
        fp = man.get("fingerprint")
        if not fp or fp in seen:
            return
        seen[fp] = man
        for inp in (man.get("inputs") or {}).values():
            visit(Path(inp["path"]))
        order.append(fp)

    visit(Path(path))
    return [seen[f] for f in order]


def _model_desc(ctx: StageContext, ref: str | None) -> dict[str, Any]:
    if ref and ref in ctx.lp.pipeline.models:
        spec = ctx.lp.pipeline.models[ref]
        return {"model": spec.id, "revision": spec.revision, "backend": spec.backend}
    return {"model": f"stage {ref}" if ref else None, "revision": None, "backend": None}


def dataset_provenance(ctx: StageContext, art_path: Path) -> dict[str, Any]:
    teachers, generation, curation, stages = [], [], [], []
    for man in ancestry(art_path):
        cfg = man.get("config") or {}
        kind, name = man.get("kind"), man.get("stage")
        files = (man.get("parts") or {}).get("files") or {}
        metrics = man.get("metrics") or {}
        stages.append({"stage": name, "kind": kind, "fingerprint": man.get("fingerprint"), "created_at": man.get("created_at"),
                       "config": {k: v for k, v in cfg.items() if k not in _BOOKKEEPING}, "rows": man.get("rows"),
                       "metrics": metrics, "versions": man.get("versions")})  # fmt: skip
        if kind == "generate":
            t = {"stage": name, **_model_desc(ctx, cfg.get("model"))}
            teachers.append(t)
            templates = [
                {"path": p, "sha256": files.get(p, "")}
                for p in (cfg.get("prompt"), cfg.get("system_prompt"))
                if p
            ]
            generation.append({"stage": name, "mode": cfg.get("mode", "answer"),
                               "sampling": {k: cfg[k] for k in _SAMPLING_KEYS if cfg.get(k) not in (None, [], {})},
                               "templates": templates})  # fmt: skip
        if "rows_in" in metrics and "rows_out" in metrics:
            curation.append({"stage": name, "kind": kind, "rows_in": metrics["rows_in"], "rows_out": metrics["rows_out"],
                             "dropped": metrics.get("dropped") if isinstance(metrics.get("dropped"), dict) else {},
                             "dedup": cfg.get("dedup"), "decontaminate": cfg.get("decontaminate") or []})  # fmt: skip
    return {"teachers": teachers, "generation": generation, "curation": curation, "stages": stages}


def training_stages(ctx: StageContext, model_art: Path) -> list[dict[str, Any]]:
    out = []
    for man in ancestry(model_art):
        kind = man.get("kind")
        if kind not in ("cpt", "sft", "dpo", "merge"):
            continue
        cfg = man.get("config") or {}
        m = man.get("metrics") or {}
        if kind == "merge":
            method = str(m.get("method") or cfg.get("method") or "merge")
            hp: dict[str, Any] = {"base": cfg.get("base")}
            if cfg.get("models"):
                hp["models"] = ", ".join(
                    f"{x['model']}" + (f" (weight {x['weight']})" if x.get("weight") is not None else "")
                    + (f" (density {x['density']})" if x.get("density") is not None else "") for x in cfg["models"])  # fmt: skip
            for k in ("parameters", "slices", "mergekit", "dtype", "out_dtype"):
                hp[k] = cfg.get(k)
            if method.startswith("adapters"):
                hp.update(combination=cfg.get("combination"), density=cfg.get("density"))
        else:
            method = cfg.get("method") or ("lora" if isinstance(cfg.get("lora"), dict) else "-")
            hp = {k: cfg[k] for k in _HPARAM_KEYS if k in cfg and k != "method"}
        out.append({"stage": man.get("stage"), "kind": kind, "method": method,
                    "hparams": {k: v for k, v in hp.items() if v not in (None, [], {}, "")},
                    "results": {k: m[k] for k in _RESULT_KEYS if m.get(k) is not None}})  # fmt: skip
    return out


# ------------------------------------------------------------------------------------------------


def run(ctx: StageContext) -> dict[str, Any]:
    from distill import hub
    from distill.core.artifacts import Artifact

    cfg: Config = ctx.cfg
    task = ctx.task
    dialect = getattr(task, "dialect", None)
    task_desc = f"text-to-SQL in the {dialect} dialect" if getattr(task, "kind", None) == "sql" else (
        "structured JSON output" if getattr(task, "kind", None) == "json" else "its task")  # fmt: skip
    tags = list(cfg.tags) + (
        ["sql", "text-to-sql", str(dialect)] if getattr(task, "kind", None) == "sql" else []
    )
    endpoint = os.environ.get("HF_ENDPOINT") or None
    data_inputs = {n: a for n, a in ctx.inputs.items() if a.layout in DATA_LAYOUTS}
    eval_inputs = {n: a for n, a in ctx.inputs.items() if a.layout == "eval"}
    metrics: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    pretty = cfg.pretty_name or f"{ctx.lp.pipeline.name} data"

    evals = []
    for n, a in eval_inputs.items():
        p = a.path / "metrics.json"
        if p.is_file():
            m = json.loads(p.read_text())
            evals.append({"stage": n, "eval_set": m.get("eval_set"), "dialect": m.get("dialect"), "n": m.get("n"),
                          "runnable": m.get("runnable"), "models": m.get("models", {}),
                          "task": m.get("task") or "sql", "schema": m.get("schema")})  # fmt: skip

    dataset_dir = ctx.out / "dataset"
    parts_written: list[hub.DatasetPart] = []
    if data_inputs:
        parts = []
        for n, a in data_inputs.items():
            dropped = a.data_files("dropped")
            parts.append(hub.DatasetPart(n, a.layout, a.data_files(), dropped[0] if dropped else None,
                                         provenance=dataset_provenance(ctx, a.path)))  # fmt: skip
        parts_written = hub.write_dataset_data(dataset_dir, parts, cfg.include_dropped)
        card = hub.dataset_card(
            parts_written, pretty_name=pretty, pipeline=ctx.lp.pipeline.name, task_desc=task_desc, license=cfg.license,
            repo_id=cfg.repo_id, models=[cfg.model_repo_id] if cfg.model_repo_id else [], tags=tags, language=cfg.language,
        )  # fmt: skip
        prov = {"pipeline": ctx.lp.pipeline.name, "configs": {p.name: p.provenance for p in parts_written},
                "evaluations": evals}  # fmt: skip
        hub.finish_dataset_dir(dataset_dir, card, prov)
        metrics["dataset_rows"] = {p.name: p.rows for p in parts_written}

    model_dir = ctx.out / "model"
    if cfg.model:
        rm = ctx.model(cfg.model)
        is_adapter = rm.adapter is not None
        src = Path(rm.adapter) if is_adapter else Path(rm.path)
        if not src.is_dir():
            raise ValueError(
                f"model {cfg.model!r}: {src} is not a local folder; only local models can be exported"
            )
        root = None
        if cfg.model in ctx.input_paths:
            root = (Artifact(ctx.input_paths[cfg.model]).manifest.get("model") or {}).get("root_model")
        elif cfg.model in ctx.lp.pipeline.models:
            root = cfg.model
        spec = ctx.lp.pipeline.models.get(root) if root else None
        base_id = (
            spec.id
            if spec is not None and not spec.id.startswith("tiny:") and not ctx.path(spec.id).exists()
            else None
        )
        stages = training_stages(ctx, ctx.input_paths[cfg.model]) if cfg.model in ctx.input_paths else []
        card = hub.model_card(
            model_name=cfg.model_repo_id or f"{ctx.lp.pipeline.name}-{cfg.model}", pipeline=ctx.lp.pipeline.name,
            task_desc=task_desc, is_adapter=is_adapter, base_id=base_id, base_revision=spec.revision if spec else None,
            stages=stages, evals=evals, this=cfg.model, license=cfg.license, repo_id=cfg.model_repo_id,
            dataset_repo=cfg.repo_id, dataset_configs=[p.name for p in parts_written], tags=tags,
        )  # fmt: skip
        hub.build_model_dir(model_dir, src, card, base_hub_id=base_id)
        metrics["model_files"] = sum(1 for f in model_dir.rglob("*") if f.is_file())

    if cfg.to_dir:
        target = ctx.path(cfg.to_dir)
        if data_inputs:
            hub.sync_dir(dataset_dir, target)
            extra["dataset_dir"] = str(target)
        if cfg.model:
            mt = ctx.path(cfg.model_to_dir) if cfg.model_to_dir else target.with_name(target.name + "-model")
            hub.sync_dir(model_dir, mt)
            extra["model_dir"] = str(mt)
    elif cfg.model_to_dir and cfg.model:
        hub.sync_dir(model_dir, ctx.path(cfg.model_to_dir))
        extra["model_dir"] = str(ctx.path(cfg.model_to_dir))

    pushes = []
    if cfg.repo_id and data_inputs:
        pushes.append(hub.push_folder(dataset_dir, cfg.repo_id, "dataset", private=cfg.private, revision=cfg.revision,
                                      commit_message=cfg.commit_message, endpoint=endpoint))  # fmt: skip
    if cfg.model_repo_id and cfg.model:
        pushes.append(hub.push_folder(model_dir, cfg.model_repo_id, "model", private=cfg.private, revision=cfg.revision,
                                      commit_message=cfg.commit_message, endpoint=endpoint))  # fmt: skip
    for p in pushes:
        ctx.log.info(f"pushed {p['repo_type']} {p['repo_id']}@{p['revision']}: "
                     + (f"commit {p['commit']}" if p["committed"] else "unchanged, no new commit"))  # fmt: skip
    (ctx.out / "export.json").write_text(json.dumps({"pushes": pushes, **extra}, indent=2) + "\n")
    metrics["pushed"] = [
        {k: p[k] for k in ("repo_id", "repo_type", "revision", "commit", "committed")} for p in pushes
    ]
    ctx.manifest_extra["export"] = {"pushes": metrics["pushed"], **extra}
    return metrics
