"""One training run: a JSON-serializable job, executed in this process or by N launched processes.

A training stage prepares its data and a job (`distill.train.stage`), then calls `execute(job)`.
With one process the job runs here (the stage already runs in its own spawned process); with
`launcher.num_processes > 1` or an accelerate config it is launched with `accelerate launch` (FSDP,
DeepSpeed configs passed through) or `torchrun` (DDP; gloo on CPU), each rank running `run_job` via
`python -m distill.train.worker job.json`; rank 0 writes the result file.

`run_job`: load tokenizer and model, apply the method, build the TRL trainer with CPU-safe explicit
arguments (TRL's defaults assume a GPU: bf16 on, gradient checkpointing on), resume from the last
complete checkpoint in the stage's scratch folder, train, evaluate, save the adapter (or full
model) with the tokenizer and chat template, the resolved config and the metrics.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from distill.core.log import get_logger

log = get_logger("train")

CHECKPOINT_PREFIX = "checkpoint-"
SPLIT_FILE = "batch_split.json"
TRAINING_INFO = "distill_training.json"


# ------------------------------------------------------------------------------------------------
# checkpoints
# ------------------------------------------------------------------------------------------------


def complete_checkpoints(folder: Path) -> list[Path]:
    """Checkpoint folders whose trainer state was written (it is written last), oldest first."""
    if not folder.is_dir():
        return []
    out = []
    for d in folder.iterdir():
        if d.is_dir() and d.name.startswith(CHECKPOINT_PREFIX) and d.name[len(CHECKPOINT_PREFIX) :].isdigit():
            out.append(d)
    out.sort(key=lambda d: int(d.name[len(CHECKPOINT_PREFIX) :]))
    return [d for d in out if (d / "trainer_state.json").is_file()]


def prepare_resume(folder: Path, split: dict[str, Any]) -> Path | None:
    """The checkpoint to resume from, after removing partial checkpoints (killed mid-save).

    Checkpoints written with another per-device batch / accumulation / process split are dropped:
    the data position is counted in micro batches, so it would not carry over.
    """
    folder.mkdir(parents=True, exist_ok=True)
    split_file = folder / SPLIT_FILE
    if split_file.is_file():
        old = json.loads(split_file.read_text())
        if old != split:
            log.warning(
                f"checkpoints in {folder} were written with batch split {old}, now {split}; starting over"
            )
            for d in folder.iterdir():
                if d.is_dir():
                    shutil.rmtree(d)
    split_file.write_text(json.dumps(split))
    complete = set(complete_checkpoints(folder))
    for d in folder.iterdir():
        if d.is_dir() and d.name.startswith(CHECKPOINT_PREFIX) and d not in complete:
            log.info(f"removing incomplete checkpoint {d.name}")
            shutil.rmtree(d)
    done = complete_checkpoints(folder)
    return done[-1] if done else None


# ------------------------------------------------------------------------------------------------
# trainer arguments
# ------------------------------------------------------------------------------------------------


def common_args(cfg: Any, job: dict[str, Any]) -> dict[str, Any]:
    import torch

    on_cuda = torch.cuda.is_available()
    precision = job["precision"]
    kw: dict[str, Any] = dict(
        output_dir=job["output_dir"],
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=job["learning_rate"],
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_steps if cfg.warmup_steps is not None else cfg.warmup_ratio,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        optim=cfg.optimizer,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps or -1,
        seed=job["seed"],
        data_seed=job["seed"],
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=not on_cuda,
        gradient_checkpointing=cfg.gradient_checkpointing,
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        report_to=[r for r in cfg.report_to if r != "none"] or "none",
        disable_tqdm=True,
        dataloader_pin_memory=on_cuda,
        prediction_loss_only=True,
        log_level="warning",
        dataset_num_proc=cfg.dataset_num_proc,
    )
    if cfg.report_to and cfg.report_to != ["none"]:
        # beside the model in the artifact (the checkpoint folder is scratch, removed on success)
        kw["logging_dir"] = str(Path(job["model_dir"]).parent / "logs")
    if job["num_processes"] > 1:
        backend = cfg.launcher.backend
        kw["ddp_backend"] = ("nccl" if on_cuda else "gloo") if backend == "auto" else backend
        kw["ddp_find_unused_parameters"] = False
    if job.get("has_eval"):
        if cfg.early_stopping_patience is not None:
            every = cfg.eval_steps or cfg.save_steps
            kw.update(
                eval_strategy="steps",
                eval_steps=every,
                save_steps=every,  # load_best_model_at_end needs checkpoints on eval steps
                load_best_model_at_end=True,
                metric_for_best_model="eval_loss",
                greater_is_better=False,
            )
        elif cfg.eval_steps:
            kw.update(eval_strategy="steps", eval_steps=cfg.eval_steps)
    return kw


def build_trainer(
    cfg: Any,
    job: dict[str, Any],
    model: Any,
    tok: Any,
    train_ds: Any,
    eval_ds: Any,
    peft_cfg: Any,
    callbacks: list[Any],
) -> Any:
    kind = job["kind"]
    kw = common_args(cfg, job)
    if kind == "cpt":
        from trl import SFTConfig

        from distill.train.trainers import CountingSFTTrainer

        args = SFTConfig(
            **kw,
            dataset_text_field="text",
            max_length=cfg.max_length,
            packing=cfg.packing,
            packing_strategy="wrapped",
            padding_free=False,
            completion_only_loss=False,
            eos_token=None,
        )
        return CountingSFTTrainer(
            model=model,
            args=args,
            train_dataset=train_ds,
            eval_dataset=eval_ds,
            processing_class=tok,
            peft_config=peft_cfg,
            callbacks=callbacks,
        )
    if kind == "sft":
        from trl import SFTConfig

        from distill.train.trainers import WeightedSFTTrainer

        # Data arrive tokenized, truncated (and packed) by distill.train.data: max_length=None here
        args = SFTConfig(**kw, max_length=None, packing=False, padding_free=job["padding_free"])
        return WeightedSFTTrainer(
            model=model,
            args=args,
            train_dataset=train_ds,
            eval_dataset=eval_ds,
            processing_class=tok,
            peft_config=peft_cfg,
            callbacks=callbacks,
            prompt_loss_weight=cfg.prompt_loss_weight,
        )
    if kind == "dpo":
        from trl import DPOConfig

        from distill.train.trainers import CountingDPOTrainer

        losses = [cfg.loss_type]
        weights = [1.0]
        if cfg.sft_weight > 0:
            losses.append("sft")
            weights.append(cfg.sft_weight)
        dpo_args = DPOConfig(
            **kw,
            beta=cfg.beta,
            loss_type=losses,
            loss_weights=weights,
            max_length=cfg.max_length,
            truncation_mode="keep_start",
            precompute_ref_log_probs=False,
            padding_free=False,
        )
        ref_model = None
        if peft_cfg is None and not _is_peft(model):
            # full / partial / BitFit: the reference is a frozen copy of the starting weights (TRL would
            # otherwise reload it from config._name_or_path, losing the revision)
            import copy

            ref_model = copy.deepcopy(model)
            ref_model.requires_grad_(False)
        return CountingDPOTrainer(
            model=model,
            ref_model=ref_model,
            args=dpo_args,
            train_dataset=train_ds,
            eval_dataset=eval_ds,
            processing_class=tok,
            peft_config=peft_cfg,
            callbacks=callbacks,
        )
    raise ValueError(f"unknown training kind {kind!r}")


def _is_peft(model: Any) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


# ------------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------------


def quiet_libraries() -> None:
    """No per-file progress bars or advisory warnings from transformers/datasets in the run output."""
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()


def _stage_config(job: dict[str, Any]) -> Any:
    from distill.stages import stage_config_class

    return stage_config_class(job["kind"]).model_validate(job["cfg"])


def _attach_logfile(job: dict[str, Any]) -> None:
    """Launched ranks log into the run log too (the stage process already does)."""
    lf = job.get("logfile")
    root = logging.getLogger("distill")
    if not lf or any(isinstance(h, logging.FileHandler) for h in root.handlers):
        return
    fh = logging.FileHandler(lf, encoding="utf-8")
    fh.setFormatter(logging.Formatter("%(asctime)s %(process)d %(name)s %(levelname)s %(message)s"))
    root.addHandler(fh)
    root.setLevel(logging.INFO)


def _load_dataset(path: str | None) -> Any:
    if not path:
        return None
    from datasets import Dataset

    return Dataset.from_parquet(path)


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """Train as described by `job` (on every rank); rank 0 saves and returns the result."""
    import torch

    from distill.train.callbacks import DistillCallback
    from distill.train.models import freeze_for, load_model, load_tokenizer, peft_config_for, trainable_report

    _attach_logfile(job)
    quiet_libraries()
    cfg = _stage_config(job)
    chain = job["chain"]
    t0 = time.time()
    tok = load_tokenizer(
        chain["tokenizer_path"],
        chain["base_revision"] if chain["tokenizer_path"] == chain["base_path"] else None,
        chain.get("chat_template"),
        chain.get("trust_remote_code", False),
    )
    model = load_model(
        chain["base_path"],
        cfg.method,
        job["precision"],
        chain["base_revision"],
        chain.get("trust_remote_code", False),
        job.get("attn_implementation"),
    )
    if cfg.method == "qlora":
        from peft import prepare_model_for_kbit_training

        # before any adapter is attached: casts norms to fp32 and enables input gradients
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    peft_cfg = None
    if chain.get("upstream_adapter"):
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, chain["upstream_adapter"], is_trainable=True)
    elif cfg.method in ("lora", "qlora", "ia3", "prompt_tuning", "prefix_tuning"):
        peft_cfg = peft_config_for(cfg, model)
    else:
        freeze_for(cfg, model)

    train_ds = _load_dataset(job["train_file"])
    eval_ds = _load_dataset(job.get("eval_file"))
    cb = DistillCallback(f"{job['stage']} ({job['kind']})")
    callbacks: list[Any] = [cb]
    if cfg.early_stopping_patience is not None:
        from transformers import EarlyStoppingCallback

        callbacks.append(EarlyStoppingCallback(cfg.early_stopping_patience, cfg.early_stopping_threshold))
    trainer = build_trainer(cfg, job, model, tok, train_ds, eval_ds, peft_cfg, callbacks)
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    # our callback logs into the run log; transformers' own would print dicts to stdout
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    report = trainable_report(trainer.model)
    if trainer.accelerator.is_main_process:
        log.info(
            f"{job['stage']}: method {cfg.method}: {report['trainable_params']:,} trainable of "
            f"{report['total_params']:,} parameters ({100 * report['trainable_share']:.3f}%)"
        )
    setup_s = time.time() - t0
    resume = job.get("resume_from")
    t1 = time.time()
    out = trainer.train(resume_from_checkpoint=resume)
    train_s = time.time() - t1
    peak_rss_mb = _peak_rss_mb()  # before saving, which can copy the weights once more
    tokens = trainer.tokens_seen()
    eval_metrics: dict[str, Any] = {}
    if eval_ds is not None:
        eval_metrics = trainer.evaluate()
    state = trainer.state
    result: dict[str, Any] = {}
    if trainer.accelerator.is_main_process:
        losses = [(r["step"], r["loss"]) for r in cb.history if "loss" in r]
        evals = [(r["step"], r["eval_loss"]) for r in cb.history if "eval_loss" in r]
        result = {
            "steps": int(state.global_step),
            "max_steps": int(state.max_steps),
            "epochs": round(float(state.epoch or 0.0), 4),
            "resumed_from_step": cb.start_step,
            "train_loss": round(float(out.training_loss), 6),
            "final_loss": losses[-1][1] if losses else None,
            "loss_history": losses,
            "eval_loss": eval_metrics.get("eval_loss"),
            "eval_history": evals,
            "train_tokens": tokens,
            "tokens_per_s": round(tokens / train_s, 1) if train_s > 0 else None,
            "train_s": round(train_s, 2),
            "setup_s": round(setup_s, 2),
            "learning_rate": job["learning_rate"],
            "precision": job["precision"],
            "effective_batch_size": cfg.effective_batch_size,
            "num_processes": job["num_processes"],
            "best_checkpoint_step": _best_step(state),
            "peak_rss_mb": peak_rss_mb,
            **report,
        }
        if job["kind"] == "dpo":
            for k in ("rewards/margins", "rewards/accuracies", "rewards/chosen", "rewards/rejected"):
                vals = [r[k] for r in cb.history if k in r]
                if vals:
                    result[k.replace("/", "_")] = vals[-1]
        if torch.cuda.is_available():
            result["peak_gpu_mem_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    _save(trainer, tok, job, cfg, result)
    trainer.accelerator.wait_for_everyone()
    return result


def _peak_rss_mb() -> float:
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux


def _best_step(state: Any) -> int | None:
    ck = getattr(state, "best_model_checkpoint", None)
    if ck:
        try:
            return int(str(ck).rstrip("/").rsplit("-", 1)[1])
        except (ValueError, IndexError):
            return None
    return None


def _save(trainer: Any, tok: Any, job: dict[str, Any], cfg: Any, result: dict[str, Any]) -> None:
    """Adapter (or full model) + tokenizer with chat template + resolved config and metrics."""
    model_dir = Path(job["model_dir"])
    # every rank enters save_model: FSDP/DeepSpeed gather the full state dict collectively
    trainer.save_model(str(model_dir))
    if not trainer.accelerator.is_main_process:
        return
    tok.save_pretrained(str(model_dir))
    ref = (
        model_dir / "ref"
    )  # DPO on a continued adapter keeps a frozen copy named "ref": not part of the result
    if ref.is_dir() and (ref / "adapter_config.json").is_file():
        shutil.rmtree(ref)
    ac = model_dir / "adapter_config.json"
    if ac.is_file():
        # reloadable anywhere: the absolute base, not the (possibly relative or empty) load path
        acj = json.loads(ac.read_text())
        acj["base_model_name_or_path"] = job["chain"]["base_path"]
        acj["revision"] = job["chain"]["base_revision"]
        ac.write_text(json.dumps(acj, indent=2))
    for stray in ("training_args.bin", "README.md"):
        (model_dir / stray).unlink(missing_ok=True)
    info = {
        "kind": job["kind"],
        "stage": job["stage"],
        "config": job["cfg"],
        "resolved": {
            "learning_rate": job["learning_rate"],
            "precision": job["precision"],
            "padding_free": job.get("padding_free"),
            "seed": job["seed"],
            "effective_batch_size": cfg.effective_batch_size,
            "chain": job["chain"],
        },
        "metrics": result,
    }
    (model_dir / TRAINING_INFO).write_text(json.dumps(info, indent=2, default=str))
    tmp = Path(job["result_file"] + ".tmp")
    tmp.write_text(json.dumps(result, default=str))
    os.replace(tmp, job["result_file"])


def standalone_job(
    kind: str,
    settings: dict[str, Any],
    base_path: str,
    train_file: str,
    workdir: Path,
    eval_file: str | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """A job outside a pipeline (benchmarks, experiments): `settings` are the stage's YAML keys, the
    data files are what `distill.train.stage.prepare_data` writes (tokenized rows for sft)."""
    from distill.stages import stage_config_class
    from distill.train.models import resolve_precision

    cfg = stage_config_class(kind).model_validate({"kind": kind, "base": "model", **settings})
    workdir.mkdir(parents=True, exist_ok=True)
    base = str(Path(base_path).resolve())
    return {
        "kind": kind,
        "stage": kind,
        "cfg": cfg.model_dump(mode="json"),
        "seed": seed,
        "learning_rate": cfg.resolved_learning_rate(),
        "precision": resolve_precision(cfg.precision),
        "padding_free": kind == "sft" and (cfg.padding_free is True or cfg.packing),
        "attn_implementation": None,
        "chain": {
            "base_path": base,
            "base_revision": None,
            "tokenizer_path": base,
            "root_model": "model",
            "chat_template": None,
            "trust_remote_code": False,
            "upstream_adapter": None,
        },
        "train_file": train_file,
        "eval_file": eval_file,
        "has_eval": eval_file is not None,
        "output_dir": str(workdir / "checkpoints"),
        "model_dir": str(workdir / "model"),
        "result_file": str(workdir / "result.json"),
        "logfile": None,
        "num_processes": cfg.launcher.num_processes,
        "resume_from": None,
    }


# ------------------------------------------------------------------------------------------------
# execution: here, or launched on N processes
# ------------------------------------------------------------------------------------------------


def launch_command(job: dict[str, Any], job_file: Path) -> list[str]:
    launcher = job["cfg"].get("launcher") or {}
    n = int(launcher.get("num_processes", 1))
    acc = launcher.get("accelerate_config")
    port = launcher.get("main_process_port") or _free_port()
    if acc:
        import torch

        if not torch.cuda.is_available() and n > 1:
            # accelerate launches several CPU processes only through MPI; torchrun does it directly
            raise ValueError(
                "launcher.accelerate_config: accelerate launch starts one process on a CPU-only machine; "
                "remove accelerate_config to run DDP over gloo with torchrun"
            )
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(acc),
               "--num_processes", str(n), "--main_process_port", str(port)]  # fmt: skip
        return [*cmd, "-m", "distill.train.worker", str(job_file)]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(n),
        "--nnodes",
        "1",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(port),
        "-m",
        "distill.train.worker",
        str(job_file),
    ]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def execute(job: dict[str, Any], scratch: Path) -> dict[str, Any]:
    """Run the job here (1 process) or through the launcher; return rank 0's result."""
    Path(job["result_file"]).unlink(missing_ok=True)
    if job["num_processes"] == 1 and not job["cfg"].get("launcher", {}).get("accelerate_config"):
        return run_job(job)
    job_file = scratch / "job.json"
    job_file.write_text(json.dumps(job, indent=2, default=str))
    cmd = launch_command(job, job_file)
    out_log = scratch / "launcher.log"
    log.info(f"launching {job['num_processes']} training processes: {' '.join(cmd[2:])}")
    from distill.train.watchdog import WATCH_ENV

    env = {**os.environ, "PYTHONUNBUFFERED": "1", WATCH_ENV: str(os.getpid())}
    with open(out_log, "ab") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            rc = proc.wait()
        except BaseException:
            _kill_group(proc)
            raise
    if rc != 0 or not Path(job["result_file"]).is_file():
        lines = out_log.read_text(errors="replace").strip().splitlines()
        # the ranks' own exception, not the launcher's CalledProcessError/ChildFailedError about it
        launcher_errs = ("CalledProcessError", "ChildFailedError")
        errs = [ln.strip() for ln in lines if re.match(r"^\s*[\w.]*(Error|Exception)\b", ln)
                and not any(x in ln for x in launcher_errs)] or lines[-3:]  # fmt: skip
        raise RuntimeError(
            f"training processes failed (exit code {rc}): {errs[-1] if errs else ''} (full output: {out_log})"
        )
    return json.loads(Path(job["result_file"]).read_text())


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    import signal

    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
