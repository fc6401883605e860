"""What the cpt, sft and dpo stages share: inputs -> training data -> job -> model artifact.

`run_training(ctx)` resolves the base (merging an upstream adapter into a cached model, or stacking
on it), reads the input artifacts into the layout TRL takes, holds out the eval split, writes the
data into the stage's scratch folder (so launched ranks read the same rows), checks the memory
estimate against the device, finds the checkpoint to resume from, runs the job and records the
model in the manifest.
"""

from __future__ import annotations

import multiprocessing
from pathlib import Path
from typing import Any

from distill.core.context import StageContext
from distill.train.options import ADAPTER_METHODS


def _rows(ctx: StageContext) -> tuple[list[dict[str, Any]], str]:
    rows: list[dict[str, Any]] = []
    names = []
    for name in ctx.cfg.inputs:  # not the base: it is a dependency too, but a model
        df = ctx.input(name).read()
        rows.extend(df.to_dicts())
        names.append(name)
    if not names:
        raise ValueError(f"stage {ctx.name} has no inputs; list the data stage(s) under `inputs:`")
    return rows, "+".join(names)


def _resolve_padding_free(cfg: Any) -> bool:
    if cfg.padding_free != "auto":
        return bool(cfg.padding_free)
    # Padding-free wins with varlen flash attention on GPU; with SDPA on CPU the flattened row pays
    # attention over its whole length under a block mask (0.66-0.86x measured), so pad there.
    from distill.train.models import cuda_available

    if not cuda_available():
        return False
    import importlib.util

    return importlib.util.find_spec("flash_attn") is not None


def _attn_implementation(padding_free: bool) -> str | None:
    """Varlen flash attention for padding-free rows when it is installed (CUDA); otherwise the model's
    default (SDPA), which also keeps packed examples apart, through a block mask built from position ids."""
    if not padding_free:
        return None
    import importlib.util

    from distill.train.models import cuda_available

    return "flash_attention_2" if cuda_available() and importlib.util.find_spec("flash_attn") else None


def _write(records: list[dict[str, Any]], path: Path) -> str:
    from datasets import Dataset

    path.parent.mkdir(parents=True, exist_ok=True)
    Dataset.from_list(records).to_parquet(str(path))
    return str(path)


def prepare_data(ctx: StageContext, cfg: Any, chain: Any, seed: int, padding_free: bool) -> dict[str, Any]:
    """Write train/eval data for the job into scratch/data; return file paths and data stats."""
    from distill.train import data as D

    rows, source = _rows(ctx)
    kind = cfg.kind
    if kind == "cpt":
        records: list[Any] = D.text_records(rows, cfg.text_field, source)
    elif kind == "sft":
        records = D.sft_records(rows, source)
    else:
        records = D.pair_records(rows, source)
    if not records:
        raise ValueError(f"stage {ctx.name}: the inputs ({source}) hold no usable rows")
    train, held = D.split_eval(records, cfg.eval_split, seed)
    if cfg.max_samples is not None:
        train = train[: cfg.max_samples]
    stats: dict[str, Any] = {"train_rows": len(train), "eval_rows": len(held)}
    ddir = ctx.scratch_dir / "data"
    if kind == "sft":
        from distill.train.models import load_tokenizer

        tok = load_tokenizer(
            chain.tokenizer_path,
            chain.base_revision if chain.tokenizer_path == chain.base_path else None,
            chain.chat_template,
            chain.trust_remote_code,
        )
        stops = D.stop_token_ids(tok, _generation_eos(chain))
        train_tok, st = D.tokenize_sft_dataset(train, tok, cfg.max_length, cfg.prompt_loss_weight, stops)
        stats.update({f"data_{k}": v for k, v in st.items()})
        if not train_tok:
            raise ValueError(
                f"stage {ctx.name}: every example lost its completion to max_length={cfg.max_length}"
            )
        if st["truncated"]:
            ctx.log.warning(
                f"{ctx.name}: {st['truncated']} of {len(train)} examples truncated to max_length={cfg.max_length}"
            )
        train_path = ddir / "train.parquet"
        if cfg.packing:
            from datasets import Dataset
            from trl import pack_dataset

            packed = pack_dataset(Dataset.from_list(train_tok), cfg.max_length, "bfd")
            train_path.parent.mkdir(parents=True, exist_ok=True)
            packed.to_parquet(str(train_path))
            stats["data_packed_rows"] = len(packed)
        else:
            _write(train_tok, train_path)
        eval_file = None
        if held:
            eval_tok, _ = D.tokenize_sft_dataset(held, tok, cfg.max_length, cfg.prompt_loss_weight, stops)
            eval_file = _write(eval_tok, ddir / "eval.parquet") if eval_tok else None
        return {"train_file": str(train_path), "eval_file": eval_file, "stats": stats}
    train_file = _write(train, ddir / "train.parquet")
    eval_file = _write(held, ddir / "eval.parquet") if held else None
    return {"train_file": train_file, "eval_file": eval_file, "stats": stats}


def _generation_eos(chain: Any) -> Any:
    import json

    for folder in (chain.base_path, chain.tokenizer_path):
        p = Path(folder) / "generation_config.json"
        if p.is_file():
            try:
                return json.loads(p.read_text()).get("eos_token_id")
            except ValueError:
                return None
    return None


def preflight(ctx: StageContext, cfg: Any, chain: Any, precision: str) -> dict[str, Any] | None:
    """Estimate training memory; warn when it will not fit the visible GPU (or, on CPU, the free RAM)."""
    from distill.train.memory import check_fits, estimate_for_stage

    try:
        est = estimate_for_stage(
            cfg, chain.base_path, chain.base_revision, precision, chain.trust_remote_code
        )
    except Exception as e:  # an estimate must never block training
        ctx.log.debug(f"{ctx.name}: memory estimate unavailable: {e}")
        return None
    msg = check_fits(est)
    if msg:
        ctx.log.warning(f"{ctx.name}: {msg}")
    else:
        ctx.log.info(f"{ctx.name}: estimated peak training memory {est['total_gb']:.2f} GB ({est['device']})")
    return est


def run_training(ctx: StageContext) -> dict[str, Any]:
    from distill.train.job import execute, prepare_resume, quiet_libraries
    from distill.train.merge_lora import resolve_chain
    from distill.train.models import resolve_precision
    from distill.train.watchdog import exit_with_parent

    if multiprocessing.parent_process() is not None:
        exit_with_parent()
    quiet_libraries()
    cfg = ctx.cfg
    if cfg.method == "qlora":
        from distill.train.models import cuda_available

        if not cuda_available():  # fail before preparing data or launching processes
            raise ValueError(
                "method: qlora loads the base in 4-bit through bitsandbytes, which needs a CUDA GPU; "
                "use method: lora on this machine"
            )
    seed = cfg.seed if cfg.seed is not None else ctx.seed
    chain = resolve_chain(ctx, cfg.base, cfg.chain)
    if Path(chain.base_path).exists():
        chain.base_path = str(Path(chain.base_path).resolve())
        chain.tokenizer_path = str(Path(chain.tokenizer_path).resolve())
    precision = resolve_precision(cfg.precision)
    # packed SFT rows must be fed padding-free: position ids restart per example, which is what keeps
    # attention inside each example (padded rows with one attention mask would leak across them)
    padding_free = cfg.kind == "sft" and (cfg.packing or _resolve_padding_free(cfg))
    prepared = prepare_data(ctx, cfg, chain, seed, padding_free)
    ctx.log.info(f"{ctx.name}: {prepared['stats']}")
    est = preflight(ctx, cfg, chain, precision)
    scratch = ctx.scratch_dir
    ckpt_dir = scratch / "checkpoints"
    split = {
        "batch_size": cfg.batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "num_processes": cfg.launcher.num_processes,
    }
    resume = prepare_resume(ckpt_dir, split)
    if resume is not None:
        ctx.log.info(f"{ctx.name}: resuming from {resume.name}")
    cfg_json = cfg.model_dump(mode="json")
    if cfg.launcher.accelerate_config:  # launched from another cwd: make it absolute
        cfg_json["launcher"]["accelerate_config"] = str(ctx.path(cfg.launcher.accelerate_config).resolve())
    job = {
        "kind": cfg.kind,
        "stage": ctx.name,
        "cfg": cfg_json,
        "seed": seed,
        "learning_rate": cfg.resolved_learning_rate(),
        "precision": precision,
        "padding_free": padding_free,
        "attn_implementation": _attn_implementation(padding_free),
        "chain": chain.as_dict(),
        "train_file": prepared["train_file"],
        "eval_file": prepared["eval_file"],
        "has_eval": prepared["eval_file"] is not None,
        "output_dir": str(ckpt_dir),
        "model_dir": str(ctx.model_dir),
        "result_file": str(scratch / "result.json"),
        "logfile": str(ctx.logfile) if ctx.logfile else None,
        "num_processes": cfg.launcher.num_processes,
        "resume_from": str(resume) if resume else None,
    }
    result = execute(job, scratch)
    is_adapter = cfg.method in ADAPTER_METHODS or bool(chain.upstream_adapter)
    ctx.manifest_extra["model"] = {
        "type": "adapter" if is_adapter else "full",
        "base_path": chain.base_path,
        "base_revision": chain.base_revision,
        "root_model": chain.root_model,
        "method": cfg.method,
        "chain": cfg.chain,
        "trainable_params": result.get("trainable_params"),
        "trainable_share": result.get("trainable_share"),
        "merged_from": chain.merged_from,
        "upstream_adapter": chain.upstream_adapter,
    }
    metrics = {**prepared["stats"], **result}
    if est is not None:
        metrics["estimated_memory_gb"] = round(est["total_gb"], 3)
    return metrics
