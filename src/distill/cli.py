"""The `distill` command line. Thin: parses options and calls into the package.

Heavy libraries (torch, transformers, vllm, polars) are imported inside commands only, so that
`distill --help` and cached runs start instantly.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from distill.errors import DistillError

app = typer.Typer(
    name="distill",
    help="Specialize a small model: teacher generation, curation, LoRA CPT/SFT/DPO, merge, eval, export.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

# ----------------------------------------------------------------------------------------------
# shared options
# ----------------------------------------------------------------------------------------------
PipelineArg = Annotated[Path, typer.Argument(help="Pipeline YAML file.", show_default=False)]
ProfileOpt = Annotated[
    list[str] | None, typer.Option("--profile", "-p", help="Profile(s) to apply, in order.")
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override: key.path=value (value read as YAML). Repeatable."),
]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging on the console.")]


def _load(pipeline: Path, profile: list[str] | None, set_: list[str] | None) -> Any:
    from distill.config import load_pipeline

    return load_pipeline(pipeline, profile or [], set_ or [])


def _console() -> Any:
    from rich.console import Console

    return Console(soft_wrap=True)


def _print_plan(lp: Any, plans: dict[str, Any], title: str, show_action: bool) -> None:
    from rich.table import Table

    t = Table(title=title, title_justify="left", show_lines=False)
    for col in (
        ["stage", "kind", "state"] + (["action"] if show_action else []) + ["fingerprint", "rows", "why"]
    ):
        t.add_column(col, overflow="fold")
    for name, p in plans.items():
        row = [name, p.kind, p.state]
        if show_action:
            row.append(p.action or "-")
        row += [p.fingerprint[:12], "-" if p.rows is None else str(p.rows), "; ".join(p.reasons)]
        t.add_row(*row)
    _console().print(t)


# ----------------------------------------------------------------------------------------------
# pipeline commands
# ----------------------------------------------------------------------------------------------
def _run(
    pipeline: Path,
    profile: list[str] | None,
    set_: list[str] | None,
    only: list[str] | None = None,
    from_: str | None = None,
    until: str | None = None,
    force: list[str] | None = None,
    dry_run: bool = False,
    kinds: list[str] | None = None,
    with_deps: bool = False,
    verbose: bool = False,
    command: str = "run",
) -> None:
    import time

    from distill.core import runner
    from distill.core.log import setup_logging

    t0 = time.time()
    lp = _load(pipeline, profile, set_)
    plans = runner.plan(lp)
    to_run = runner.select(
        lp,
        plans,
        only=only or [],
        from_=from_,
        until=until,
        force=force or [],
        kinds=kinds or [],
        with_deps=with_deps,
    )
    if dry_run:
        _print_plan(lp, plans, f"plan for {lp.pipeline.name} (dry run: nothing is executed)", True)
        return
    if not to_run:
        reused = sum(1 for p in plans.values() if p.action == "reuse")
        print(
            f"{lp.pipeline.name}: nothing to do; {reused} stage(s) cached in {lp.workdir} ({time.time() - t0:.2f}s)"
        )
        return
    logfile = setup_logging(lp.workdir, command, verbose)
    _print_plan(lp, plans, f"plan for {lp.pipeline.name}", True)
    ran = runner.run_pipeline(lp, plans, to_run, logfile)
    reused = sum(1 for p in plans.values() if p.action == "reuse")
    print(
        f"{lp.pipeline.name}: ran {len(ran)} stage(s), reused {reused}, in {time.time() - t0:.1f}s; "
        f"artifacts in {lp.workdir}; log {logfile}"
    )


@app.command()
def run(
    pipeline: PipelineArg,
    profile: ProfileOpt = None,
    set_: SetOpt = None,
    only: Annotated[
        list[str] | None, typer.Option("--only", help="Run only this stage (repeatable).")
    ] = None,
    from_: Annotated[
        str | None, typer.Option("--from", help="Run this stage and everything downstream.")
    ] = None,
    until: Annotated[
        str | None, typer.Option("--until", help="Run up to this stage (with its ancestors).")
    ] = None,
    force: Annotated[
        list[str] | None, typer.Option("--force", help="Rerun this stage (and downstream) even if cached.")
    ] = None,
    with_deps: Annotated[
        bool, typer.Option("--with-deps", help="Also run missing ancestors of selected stages.")
    ] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print what would run, what is reused and why.")
    ] = False,
    verbose: VerboseOpt = False,
) -> None:
    """Run the pipeline: stages in dependency order, reusing every cached artifact."""
    _run(pipeline, profile, set_, only, from_, until, force, dry_run, None, with_deps, verbose)


def _kind_command(name: str, kinds: list[str], doc: str) -> None:
    def cmd(
        pipeline: PipelineArg,
        stage: Annotated[
            str | None, typer.Argument(help="Only this stage (default: every stage of the kind).")
        ] = None,
        profile: ProfileOpt = None,
        set_: SetOpt = None,
        force: Annotated[bool, typer.Option("--force", help="Rerun even if cached.")] = False,
        with_deps: Annotated[
            bool, typer.Option("--with-deps", help="Also run missing inputs first.")
        ] = False,
        dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan only.")] = False,
        verbose: VerboseOpt = False,
    ) -> None:
        only = [stage] if stage else None
        if stage:
            lp = _load(pipeline, profile, set_)
            if stage in lp.stages and lp.kind_of(stage) not in kinds:
                raise DistillError(
                    f"stage {stage!r} is a {lp.kind_of(stage)} stage; `distill {name}` runs {', '.join(kinds)}"
                )
        forced = None
        if force:
            lp = _load(pipeline, profile, set_)
            forced = [stage] if stage else [s for s in lp.stages if lp.kind_of(s) in kinds]
        _run(pipeline, profile, set_, only, None, None, forced, dry_run, kinds, with_deps, verbose, name)

    cmd.__doc__ = doc
    app.command(name)(cmd)


_kind_command("generate", ["generate"], "Run the generate stages (teacher outputs), resumably.")
_kind_command(
    "curate", ["corpus", "load", "curate", "pairs"], "Run the data stages: corpus, load, curate, pairs."
)
_kind_command("train", ["cpt", "sft", "dpo", "merge"], "Run the training stages: cpt, sft, dpo (and merge).")
_kind_command("evaluate", ["evaluate"], "Run the evaluate stages.")


@app.command("export")
def export_cmd(
    pipeline: PipelineArg,
    stage: Annotated[
        str | None, typer.Argument(help="Only this export stage (default: every export stage).")
    ] = None,
    profile: ProfileOpt = None,
    set_: SetOpt = None,
    to_dir: Annotated[
        Path | None, typer.Option("--to-dir", help="Write the dataset repo folder here (model: <dir>-model).")
    ] = None,
    repo_id: Annotated[
        str | None, typer.Option("--repo-id", help="Dataset repo to push (owner/name).")
    ] = None,
    model_repo_id: Annotated[
        str | None, typer.Option("--model-repo-id", help="Model repo to push (owner/name).")
    ] = None,
    private: Annotated[
        bool | None, typer.Option("--private/--public", help="Visibility of repos created.")
    ] = None,
    revision: Annotated[
        str | None, typer.Option("--revision", help="Branch to push to (created when missing).")
    ] = None,
    message: Annotated[str | None, typer.Option("--message", "-m", help="Commit message.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Rerun even if cached.")] = False,
    with_deps: Annotated[bool, typer.Option("--with-deps", help="Also run missing inputs first.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan only.")] = False,
    verbose: VerboseOpt = False,
) -> None:
    """Run the export stages: dataset/model repo folders with cards, pushed to the Hub when a repo is set.

    The options override the export stage's keys (to_dir, repo_id, model_repo_id, private, revision,
    commit_message). The Hub token comes from HF_TOKEN or `hf auth login`, never from here.
    """
    lp = _load(pipeline, profile, set_)
    names = [stage] if stage else [s for s in lp.stages if lp.kind_of(s) == "export"]
    if stage and stage in lp.stages and lp.kind_of(stage) != "export":
        raise DistillError(
            f"stage {stage!r} is a {lp.kind_of(stage)} stage; `distill export` runs export stages"
        )
    over = list(set_ or [])
    values = {"to_dir": str(to_dir.resolve()) if to_dir else None, "repo_id": repo_id, "model_repo_id": model_repo_id,
              "private": private, "revision": revision, "commit_message": message}  # fmt: skip
    for n in names:
        for k, v in values.items():
            if v is not None:
                over.append(f"stages.{n}.{k}={json.dumps(v)}")
    forced = names if force else None
    _run(
        pipeline,
        profile,
        over,
        [stage] if stage else None,
        None,
        None,
        forced,
        dry_run,
        ["export"],
        with_deps,
        verbose,
        "export",
    )


@app.command()
def status(
    pipeline: PipelineArg,
    profile: ProfileOpt = None,
    set_: SetOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """State of every stage: done, stale (and what changed), missing, partial or failed."""
    from distill.core import runner

    lp = _load(pipeline, profile, set_)
    plans = runner.plan(lp)
    if as_json:
        print(
            json.dumps(
                {"pipeline": lp.pipeline.name, "stages": [p.as_json() for p in plans.values()]}, indent=2
            )
        )
        return
    _print_plan(lp, plans, f"{lp.pipeline.name} ({lp.workdir})", False)


@app.command()
def validate(
    pipeline: PipelineArg,
    profile: ProfileOpt = None,
    set_: SetOpt = None,
    all_profiles: Annotated[
        bool, typer.Option("--all-profiles", help="Also validate with each profile.")
    ] = False,
) -> None:
    """Check the config, its files and templates, and the stage graph. Exit 2 on any error."""
    from distill.validate import validate_pipeline

    names = validate_pipeline(pipeline, profile or [], set_ or [], all_profiles)
    print(f"{pipeline}: valid ({', '.join(names)})")


@app.command()
def show(
    pipeline: PipelineArg,
    stage: Annotated[str, typer.Argument(help="Stage whose artifact to show.")],
    rows: Annotated[int, typer.Option("--rows", "-n", help="Rows to print.")] = 5,
    profile: ProfileOpt = None,
    set_: SetOpt = None,
) -> None:
    """A readable peek at a stage's artifact: rows as a table, or a model's manifest summary."""
    from distill.show import show_artifact

    lp = _load(pipeline, profile, set_)
    show_artifact(lp, stage, rows)


@app.command()
def gc(
    pipeline: PipelineArg,
    profile: ProfileOpt = None,
    set_: SetOpt = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List what would be removed.")] = False,
) -> None:
    """Remove artifacts that no current stage fingerprint refers to."""
    from distill.core.gc import collect

    lp = _load(pipeline, profile, set_)
    removed, freed = collect(lp, dry_run)
    verb = "would remove" if dry_run else "removed"
    for p in removed:
        print(f"{verb} {p}")
    print(f"{verb} {len(removed)} folder(s), {freed / 1e6:.1f} MB")


@app.command()
def env() -> None:
    """Versions and devices, for bug reports."""
    from distill.envinfo import env_report

    for k, v in env_report().items():
        print(f"{k}: {v}")


@app.command("tiny-model")
def tiny_model(
    out: Annotated[Path, typer.Argument(help="Output folder.")],
    arch: Annotated[str, typer.Option(help="llama or qwen2.")] = "llama",
    seed: Annotated[int, typer.Option(help="Seed (weights and tokenizer are deterministic for it).")] = 0,
    hidden: Annotated[int, typer.Option(help="Hidden size.")] = 128,
    layers: Annotated[int, typer.Option(help="Number of layers.")] = 2,
    heads: Annotated[int, typer.Option(help="Attention heads (head dim = hidden / heads).")] = 2,
    vocab: Annotated[int, typer.Option(help="Tokenizer vocabulary size.")] = 1024,
) -> None:
    """Write a small random-weight causal LM with a trained tokenizer and chat template."""
    from distill.tiny import build_tiny_model

    if arch not in ("llama", "qwen2"):
        raise DistillError(f"--arch {arch}: unknown architecture; use llama or qwen2")
    p = build_tiny_model(out, arch, seed, hidden, layers, heads, vocab_size=vocab)
    meta = json.loads((p / "distill_tiny.json").read_text())
    print(f"wrote {arch} with {meta['params']:,} parameters to {p}")


@app.command("merge")
def merge_cmd(
    config: Annotated[
        Path, typer.Argument(help="mergekit-style merge YAML (merge_method, base_model, models/slices).")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output model folder.")],
    max_shard_size: Annotated[str, typer.Option(help="Largest safetensors shard, e.g. 5GB.")] = "5GB",
    seed: Annotated[int | None, typer.Option(help="Seed for random methods (DARE).")] = None,
) -> None:
    """Merge models from a mergekit-style YAML; model paths are relative to the YAML file."""
    from distill.merge.cli import merge_from_yaml

    print(json.dumps(merge_from_yaml(config, out, max_shard_size, seed)))


@app.command("evaluate-sql")
def evaluate_sql_cmd(
    eval_set: Annotated[
        Path, typer.Option("--eval-set", help="Eval set JSONL (id, question, sql, db/setup_sql, category).")
    ],
    predictions: Annotated[Path, typer.Option("--predictions", help="Predictions JSONL (id, sql).")],
    dialect: Annotated[str, typer.Option(help="SQL dialect of gold and predictions.")] = "duckdb",
    out: Annotated[
        Path | None, typer.Option("--out", help="Write results.jsonl and metrics.json here.")
    ] = None,
    timeout_s: Annotated[float, typer.Option(help="Per-query timeout in seconds.")] = 5.0,
    workers: Annotated[int, typer.Option(help="Sandbox worker processes.")] = 2,
) -> None:
    """Score a predictions file by execution (no model); the last line printed is a JSON summary."""
    from distill.evaluate.cli import evaluate_sql

    summary = evaluate_sql(eval_set, predictions, dialect, out, timeout_s, workers)
    if out is not None:
        print(
            f"per-row results in {out / 'results.jsonl'}, metrics in {out / 'metrics.json'}", file=sys.stderr
        )
    print(json.dumps(summary))


@app.command("report")
def report_cmd(
    pipeline: PipelineArg,
    profile: ProfileOpt = None,
    set_: SetOpt = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Folder for the report (default <workdir>/report).")
    ] = None,
) -> None:
    """Rebuild the evaluation report (HTML, Markdown, PNG plots) from the pipeline's artifacts."""
    from distill.evaluate.cli import rebuild_report

    print(rebuild_report(pipeline, profile or [], set_ or [], out))


@app.command("estimate-memory")
def estimate_memory(
    model: Annotated[str, typer.Argument(help="Hub id (only config.json is fetched) or local model folder.")],
    method: Annotated[str, typer.Option(help="full, lora or qlora.")] = "lora",
    lora_r: Annotated[int, typer.Option("--lora-r", help="LoRA rank.")] = 16,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Per-device batch size.")] = 8,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens per sequence.")] = 1024,
    precision: Annotated[str, typer.Option(help="fp32, bf16 or fp16.")] = "bf16",
    gradient_checkpointing: Annotated[
        bool,
        typer.Option("--gradient-checkpointing/--no-gradient-checkpointing", help="Recompute activations."),
    ] = False,
    optimizer: Annotated[str, typer.Option(help="adamw, adamw8bit or sgd.")] = "adamw",
    device: Annotated[str, typer.Option(help="cuda or cpu (what the runtime overhead is for).")] = "cuda",
    revision: Annotated[str | None, typer.Option(help="Hub revision.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Memory breakdown for training (weights, gradients, optimizer, activations, LoRA) and inference (KV cache)."""
    from distill.train.memory import estimate, format_table, load_config

    choices = {
        "method": (method, ("full", "lora", "qlora")),
        "precision": (precision, ("fp32", "bf16", "fp16")),
        "optimizer": (optimizer, ("adamw", "adamw8bit", "sgd")),
        "device": (device, ("cuda", "cpu")),
    }
    for key, (val, allowed) in choices.items():
        if val not in allowed:
            raise DistillError(f"--{key} {val}: use one of {', '.join(allowed)}")
    try:
        conf = load_config(model, revision)
    except Exception as e:  # missing folder, no network, unknown repo
        raise DistillError(
            f"{model}: cannot read the model config ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            "pass a local model folder or a reachable Hub id"
        ) from None
    try:
        est = estimate(
            conf,
            method=method,
            lora_r=lora_r,
            batch_size=batch_size,
            seq_len=seq_len,
            precision=precision,
            gradient_checkpointing=gradient_checkpointing,
            optimizer=optimizer,
            device=device,
            model=model,
        )
    except (KeyError, TypeError, ValueError) as e:
        raise DistillError(
            f"{model}: cannot estimate from this config ({e}); it needs hidden size, layers, heads, vocab"
        ) from None
    print(json.dumps(est, indent=2) if as_json else format_table(est))


@app.command()
def dedup(
    input_path: Annotated[
        Path, typer.Argument(metavar="INPUT", help="Parquet or JSONL file (by extension).")
    ],
    column: Annotated[str, typer.Option("--column", help="Text column compared.")],
    out: Annotated[Path, typer.Option("--out", help="Where the kept rows go (.parquet or .jsonl).")],
    id_column: Annotated[
        str | None,
        typer.Option("--id-column", help="Column identifying rows in --clusters (default: row index)."),
    ] = None,
    threshold: Annotated[
        float, typer.Option("--threshold", help="Jaccard similarity of shingle sets.")
    ] = 0.8,
    ngram: Annotated[
        int, typer.Option("--ngram", help="Shingle length (words, or characters with --char).")
    ] = 5,
    num_perm: Annotated[int, typer.Option("--num-perm", help="MinHash permutations.")] = 128,
    clusters: Annotated[
        Path | None,
        typer.Option("--clusters", help="One row per input row: id, cluster, kept (.parquet or .jsonl)."),
    ] = None,
    char: Annotated[
        bool, typer.Option("--char", help="Character n-gram shingles instead of word n-grams.")
    ] = False,
    seed: Annotated[
        int, typer.Option("--seed", help="Seed of the hash functions (results are deterministic for it).")
    ] = 0,
) -> None:
    """Remove near-duplicate rows (MinHash LSH): keeps the first row of each cluster."""
    from distill.errors import UsageError

    if not 0.0 < threshold < 1.0:
        raise UsageError(f"--threshold {threshold}: must be between 0 and 1")
    if ngram < 1 or num_perm < 16:
        raise UsageError("--ngram must be >= 1 and --num-perm >= 16")
    for p in [out] + ([clusters] if clusters else []):
        if not p.name.lower().endswith((".parquet", ".jsonl", ".ndjson")):
            raise UsageError(f"{p}: output must end in .parquet or .jsonl")
    from distill.curate.dedup import dedup_file

    try:
        rep = dedup_file(
            input_path,
            column,
            out,
            id_column,
            clusters,
            threshold,
            ngram,
            num_perm,
            seed,
            "char" if char else "word",
        )
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(str(e).splitlines()[0]) from None
    print(
        f"{input_path}: {rep.rows_in} rows, {rep.duplicate_clusters} near-duplicate clusters; "
        f"kept {rep.rows_out}, removed {rep.rows_in - rep.rows_out} -> {out}"
        + (f" (clusters: {clusters})" if clusters else "")
        + f" in {rep.seconds:.2f}s"
    )


# ----------------------------------------------------------------------------------------------
# entry point
# ----------------------------------------------------------------------------------------------
def main() -> None:
    try:
        app()
    except DistillError as e:
        for line in e.lines:
            print(f"error: {line}" if not line.startswith(("error", "  ")) else line, file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print("interrupted; committed work is kept and a rerun resumes from it", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
