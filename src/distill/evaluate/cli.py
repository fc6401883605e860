"""`distill evaluate-sql` (score a predictions file) and `distill report PIPELINE`."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from distill.errors import UsageError


def write_results(out: Path, results: list[dict[str, Any]], metrics: dict[str, Any]) -> None:
    """`results.jsonl` (one row per eval row) and `metrics.json` under `out`."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.jsonl", "w", encoding="utf-8") as f:
        for r in results:
            f.write(json.dumps(r, ensure_ascii=False, default=str) + "\n")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str) + "\n")


def evaluate_sql(
    eval_set: Path,
    predictions: Path,
    dialect: str = "duckdb",
    out: Path | None = None,
    timeout_s: float = 5.0,
    workers: int = 2,
    max_rows: int = 10_000,
) -> dict[str, Any]:
    """Score a predictions file against an eval set; returns the summary (metrics + bookkeeping)."""
    from distill.evaluate.evalset import load_eval_set, load_predictions
    from distill.evaluate.scoring import Evaluator

    rows = load_eval_set(eval_set)
    sqls, raws = load_predictions(predictions)
    ids = {r.id for r in rows}
    unknown = sorted(set(sqls) - ids)
    with (
        tempfile.TemporaryDirectory(prefix="distill-eval-") as tmp,
        Evaluator(rows, Path(tmp), dialect, timeout_s=timeout_s, max_rows=max_rows, workers=workers) as ev,
    ):
        results, metrics = ev.score(sqls, raws)
    summary = {
        **{
            k: metrics[k]
            for k in ("n", "runnable", "execution_accuracy", "valid_sql_rate", "error_rate", "exact_match")
        },
        "correct": metrics["correct"],
        "excluded": metrics["excluded"],
        "missing_predictions": sum(1 for r in results if r["verdict"] == "missing"),
        "unknown_prediction_ids": len(unknown),
        "dialect": dialect,
    }
    if out is not None:
        write_results(out, results, {**metrics, "unknown_prediction_ids": unknown[:50], "dialect": dialect})
    return summary


def rebuild_report(pipeline: Path, profiles: list[str], overrides: list[str], out: Path | None) -> Path:
    """`distill report`: the report of the pipeline's evaluate stage(s) from current artifacts."""
    from distill.config import load_pipeline
    from distill.core import runner
    from distill.evaluate.report import build_pipeline_report

    lp = load_pipeline(pipeline, profiles, overrides)
    plans = runner.plan(lp)
    evals = [n for n, p in plans.items() if p.kind == "evaluate"]
    if not evals:
        raise UsageError(f"{pipeline}: no evaluate stage in this pipeline; nothing to report")
    done = [n for n in evals if plans[n].state == "done"]
    if not done:
        states = ", ".join(f"{n} is {plans[n].state}" for n in evals)
        raise UsageError(
            f"{pipeline}: no evaluate stage has run yet ({states}); run `distill evaluate {pipeline}` first"
        )
    target = out or (lp.workdir / "report")
    return build_pipeline_report(lp, plans, done, target)
