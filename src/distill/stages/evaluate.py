"""`evaluate`: run models on an eval set and score them (SQL by execution, JSON records by schema and fields).

    eval:
      kind: evaluate
      models: [student, sft, dpo, merged, teacher]   # pipeline models or model-producing stages
      eval_set: pipelines/data/sql_dialect/eval.jsonl  # format: distill.evaluate.evalset
      prompt: prompts/sql/answer.jinja                # the answer stage's templates, so the
      system_prompt: prompts/sql/system.jinja         #   models see what they were trained on
      max_tokens: 512
      baseline: student        # report examples: rows the candidate wins/loses against the baseline
      candidate: merged        #   (defaults: the first model, the last stage-made model)

Each model generates greedily (temperature 0) through its backend (vLLM, an OpenAI-compatible
server, or transformers), one model at a time, each in its own process so that engine memory is
returned before the next; the SQL is extracted from each completion (last ```sql block) and scored
in the SQL sandbox (`distill.evaluate.scoring`). Templates get `question`, `dialect` (display
name), `schema_ddl` (the CREATE statements of the row's database) and every other key of the row.

Output (layout `eval`): `data/part-<i>.parquet` holds the per-row results of model i (columns
`model`, `id`, `category`, `question`, `gold_sql`, `prediction`, `completion`, `verdict`, `correct`,
`error_type`, `error`, `excluded_reason`, ...), committed one model at a time (a rerun resumes
after the last finished model); `metrics.json` ({"models": {name: metrics}, ...}); and
`report/index.html`, `report/report.md` with PNG plots.

JSON extraction: when the pipeline's task is `json` (or, without a task, the eval set's rows carry a
gold `record` instead of `sql`), rows are `id`, `text`, `record`, optional `category`; templates
get `text`, `schema_json` (the task's schema file) and the row's other keys; each completion is
scored by `distill.evaluate.json_scoring` (valid JSON, schema validity, exact match, field
accuracy, per-field accuracy). Same shards, metrics.json (with `"task": "json"`) and report.
"""

from __future__ import annotations

import json
import multiprocessing as mp
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from distill.config import speed
from distill.core.context import StageContext
from distill.stages.base import StageConfig

CODE_VERSION = "1"
SUBPROCESS = True


class Config(StageConfig):
    kind: Literal["evaluate"]
    models: list[str] = Field(..., min_length=1, description="Models to evaluate, in report order.")
    eval_set: str = Field(
        ...,
        description="Eval set JSONL: SQL rows (id, question, sql, db and/or setup_sql, category) or "
        "JSON-extraction rows (id, text, record, category).",
    )
    prompt: str = Field(..., description="Jinja2 template of the user message (as in the answer stage).")
    system_prompt: str | None = Field(None, description="Jinja2 template of the system message.")
    max_tokens: int = Field(512, ge=1)
    dialect: str | None = Field(None, description="Default: the task's dialect (duckdb without a task).")
    timeout_s: float | None = Field(None, description="Per-query timeout (default: the task's).")
    max_rows: int | None = None
    limit: int | None = Field(None, description="Evaluate only the first N rows of the eval set.")
    databases: list[str] = Field(
        default_factory=list,
        description="Database files/globs the eval rows use, so edits to them re-run the stage "
        "(the task's schema files are covered already).",
    )
    chat_template_kwargs: dict[str, Any] = Field(default_factory=dict)
    baseline: str | None = speed(None, description="Report: the model examples compare against.")
    candidate: str | None = speed(None, description="Report: the model whose wins/losses are shown.")
    examples: int = speed(4, description="Report: wins and losses shown (each).")
    workers: int = speed(2, description="SQL sandbox worker processes.")
    isolate_models: bool = speed(True, description="Generate each model in its own process.")

    OUTPUT: ClassVar[str] = "eval"
    ACCEPTS: ClassVar[frozenset[str] | None] = frozenset()

    @model_validator(mode="after")
    def _refs(self) -> Config:
        if len(set(self.models)) != len(self.models):
            raise ValueError("models lists a model twice")
        for k in ("baseline", "candidate"):
            v = getattr(self, k)
            if v is not None and v not in self.models:
                raise ValueError(f"{k} {v!r} is not one of models")
        return self

    def files(self) -> list[str]:
        return [p for p in (self.eval_set, self.prompt, self.system_prompt) if p] + list(self.databases)

    def model_refs(self) -> list[tuple[str, str]]:
        return [("models", m) for m in self.models]


def check(cfg: Config, lp: Any) -> list[str]:
    """The eval set loads and the templates render on its first row."""
    from distill.errors import DistillError
    from distill.evaluate.evalset import load_eval_set

    kind = getattr(lp.pipeline.task, "kind", None)
    if _is_json(lp.pipeline.task, lp.path(cfg.eval_set)):
        return _check_json(cfg, lp)
    if kind not in (None, "sql"):
        return [f"evaluate scores SQL by execution or JSON records; the pipeline's task is {kind!r}"]
    try:
        rows = load_eval_set(lp.path(cfg.eval_set))
    except DistillError as e:
        return list(e.lines)
    try:
        r = _Renderer(cfg, lp)
        r.messages(
            {**rows[0].template_vars(), "schema_ddl": "CREATE TABLE t (x INTEGER);", "dialect": "DuckDB"}
        )
    except ValueError as e:
        return [str(e)]
    return []


class _Renderer:
    """The prompt templates, rendered as the answer stage renders them (StrictUndefined, stripped)."""

    def __init__(self, cfg: Config, lp: Any) -> None:
        import jinja2

        self.cfg = cfg
        env = jinja2.Environment(undefined=jinja2.StrictUndefined, autoescape=False)  # noqa: S701 - plain text
        self.templates = []
        for role, rel in (("system", cfg.system_prompt), ("user", cfg.prompt)):
            if not rel:
                continue
            path = lp.path(rel)
            try:
                self.templates.append((role, rel, env.from_string(path.read_text(encoding="utf-8"))))
            except FileNotFoundError:
                raise ValueError(f"{rel}: template file not found under {lp.root}") from None
            except jinja2.TemplateSyntaxError as e:
                raise ValueError(f"{rel}:{e.lineno}: template syntax error: {e.message}") from None

    def messages(self, v: dict[str, Any]) -> list[dict[str, str]]:
        import jinja2

        out = []
        for role, rel, t in self.templates:
            try:
                out.append({"role": role, "content": t.render(**v).strip()})
            except jinja2.UndefinedError as e:
                raise ValueError(f"{rel}: {e.message}; available variables: {', '.join(sorted(v))}") from None
        return out


# ------------------------------------------------------------------------------------------------
# generation (optionally in a child process per model)
# ------------------------------------------------------------------------------------------------


def _generate(model: Any, requests: list[dict[str, Any]], opts: dict[str, Any]) -> list[dict[str, Any]]:
    from distill.backends import GenRequest, Sampling, get_backend

    sampling = Sampling(n=1, temperature=0.0, top_p=1.0, max_tokens=opts["max_tokens"], seed=opts["seed"])
    reqs = [GenRequest(r["id"], tuple(r["messages"]), sampling) for r in requests]
    backend = get_backend(model, seed=opts["seed"], scratch=Path(opts["scratch"]), chat_template=opts["chat_template"],
                          chat_template_kwargs=opts["chat_template_kwargs"] or None)  # fmt: skip
    try:
        resps = backend.generate(reqs)
    finally:
        backend.close()
    out = []
    for r in resps:
        c = r.completions[0] if r.completions else None
        out.append({"id": r.id, "completion": c.text if c else None, "finish_reason": c.finish_reason if c else None,
                    "completion_tokens": c.tokens if c else None, "prompt_tokens": r.prompt_tokens, "gen_error": r.error})  # fmt: skip
    return out


def _child(model: Any, requests: list[dict[str, Any]], opts: dict[str, Any], out_path: str) -> None:
    from distill.core.artifacts import write_json_atomic

    write_json_atomic(Path(out_path), _generate(model, requests, opts))


def _generate_isolated(
    model: Any, requests: list[dict[str, Any]], opts: dict[str, Any], out_path: Path
) -> list[dict[str, Any]]:
    out_path.unlink(missing_ok=True)
    proc = mp.get_context("spawn").Process(target=_child, args=(model, requests, opts, str(out_path)))
    proc.start()
    proc.join()
    if proc.exitcode != 0 or not out_path.is_file():
        raise RuntimeError(
            f"generation for model {model.name} failed in its process (exit code {proc.exitcode}); see the log"
        )
    res: list[dict[str, Any]] = json.loads(out_path.read_text())
    out_path.unlink()
    return res


# ------------------------------------------------------------------------------------------------


def _result_schema() -> Any:
    """Fixed column types, so shards of different models (some all-null columns) concatenate."""
    import polars as pl

    s, b = pl.String, pl.Boolean
    return {
        "model": s, "id": s, "category": s, "question": s, "gold_sql": s, "prediction": s, "completion": s,
        "verdict": s, "correct": b, "valid_sql": b, "exact_match": b, "excluded_reason": s, "error_type": s,
        "error": s, "gold_result": s, "pred_result": s, "elapsed_s": pl.Float64, "finish_reason": s,
        "completion_tokens": pl.Int64, "gen_error": s,
    }  # fmt: skip


def run(ctx: StageContext) -> dict[str, Any]:
    import polars as pl

    from distill.evaluate.evalset import load_eval_set
    from distill.evaluate.scoring import Evaluator, aggregate
    from distill.stages.generate import DIALECT_NAMES
    from distill.tasks.sql import extract_sql

    cfg: Config = ctx.cfg
    task = ctx.task
    if _is_json(task, ctx.path(cfg.eval_set)):
        return _run_json(ctx)
    if getattr(task, "kind", None) not in (None, "sql"):
        raise ValueError(f"evaluate scores SQL by execution; the pipeline's task is {task.kind!r}")
    dialect = cfg.dialect or getattr(task, "dialect", None) or "duckdb"
    timeout_s = cfg.timeout_s or float(getattr(task, "timeout_s", 5.0))
    max_rows = cfg.max_rows or int(getattr(task, "max_rows", 10_000))
    rows = load_eval_set(ctx.path(cfg.eval_set))
    if cfg.limit is not None:
        rows = rows[: cfg.limit]
    renderer = _Renderer(cfg, ctx.lp)
    shards = ctx.shards()
    done = shards.committed()
    per_model: dict[str, dict[str, Any]] = {}
    frames: list[pl.DataFrame] = []
    with Evaluator(rows, ctx.scratch_dir / "eval", dialect, timeout_s, max_rows, cfg.workers) as ev:
        ev.analyze_gold()
        excluded = [r.id for r in rows if not ev.gold[r.id].ok]
        if excluded:
            ctx.log.info(
                f"{len(excluded)} of {len(rows)} eval rows excluded (gold not runnable or not deterministic)"
            )
        requests = []
        for r in rows:
            v = {
                **r.template_vars(),
                "dialect": DIALECT_NAMES.get(dialect, dialect),
                "schema_ddl": ev.dbs[r.db_key].ddl,
            }
            requests.append({"id": r.id, "messages": renderer.messages(v)})
        for i, name in enumerate(cfg.models):
            if i in done:
                df = shards.read(i)
                ctx.log.info(f"{name}: results already committed; reusing them")
            else:
                model = ctx.model(name)
                opts = {
                    "max_tokens": cfg.max_tokens,
                    "seed": ctx.seed,
                    "scratch": str(ctx.scratch_dir / f"gen-{i}"),
                    "chat_template": ctx.path(model.spec.chat_template).read_text(encoding="utf-8") if model.spec.chat_template else None,
                    "chat_template_kwargs": cfg.chat_template_kwargs,
                }  # fmt: skip
                ctx.log.info(f"{name}: generating {len(requests)} answers ({model.spec.backend})")
                if cfg.isolate_models:
                    gens = _generate_isolated(model, requests, opts, ctx.scratch_dir / f"gen-{i}.json")
                else:
                    gens = _generate(model, requests, opts)
                by_id = {g["id"]: g for g in gens}
                preds = {rid: extract_sql(g["completion"]) for rid, g in by_id.items()}
                results, _ = ev.score(preds, {rid: g["completion"] for rid, g in by_id.items()})
                for res in results:
                    g = by_id.get(res["id"], {})
                    res.update(model=name, finish_reason=g.get("finish_reason"), completion_tokens=g.get("completion_tokens"),
                               gen_error=g.get("gen_error"))  # fmt: skip
                df = pl.DataFrame(results, schema=_result_schema())
                shards.commit(i, df)
            res_rows = df.to_dicts()
            per_model[name] = aggregate(res_rows)
            frames.append(df)
            m = per_model[name]
            ctx.log.info(f"{name}: execution accuracy {m['execution_accuracy']} over {m['runnable']} rows")
    metrics = {
        "models": per_model,
        "eval_set": cfg.eval_set,
        "dialect": dialect,
        "n": len(rows),
        "runnable": next(iter(per_model.values()))["runnable"] if per_model else 0,
    }
    (ctx.out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str) + "\n")
    _report(ctx, cfg, metrics, pl.concat(frames, how="diagonal_relaxed").to_dicts())
    return {
        "n": metrics["n"],
        "runnable": metrics["runnable"],
        "execution_accuracy": {k: v["execution_accuracy"] for k, v in per_model.items()},
        "valid_sql_rate": {k: v["valid_sql_rate"] for k, v in per_model.items()},
        "error_rate": {k: v["error_rate"] for k, v in per_model.items()},
        "exact_match": {k: v["exact_match"] for k, v in per_model.items()},
        "excluded": next(iter(per_model.values()))["excluded"] if per_model else {},
    }


def _report(ctx: StageContext, cfg: Config, metrics: dict[str, Any], results: list[dict[str, Any]]) -> None:
    from distill.core import runner
    from distill.evaluate.report import (
        ReportData,
        build_report,
        default_comparison,
        pipeline_context,
        report_style,
    )

    try:
        funnel, losses = pipeline_context(ctx.lp, runner.plan(ctx.lp))
    except Exception as e:  # the report must not fail the evaluation
        ctx.log.warning(f"report: could not read the pipeline's other artifacts ({type(e).__name__}: {e})")
        funnel, losses = [], {}
    base, cand = default_comparison(ctx.lp, list(cfg.models))
    data = ReportData(
        title=f"{ctx.lp.pipeline.name}: {ctx.name}",
        models=metrics["models"],
        results=results,
        funnel=funnel,
        losses=losses,
        baseline=cfg.baseline or base,
        candidate=cfg.candidate or cand,
        examples=cfg.examples,
        info={
            "pipeline": ctx.lp.pipeline.name,
            **({"about": ctx.lp.pipeline.description} if ctx.lp.pipeline.description else {}),
            "eval set": cfg.eval_set,
            **(
                {"schema": metrics.get("schema")}
                if metrics.get("task") == "json"
                else {"dialect": metrics["dialect"]}
            ),
            "rows": metrics["n"],
            "scored": metrics["runnable"],
        },  # fmt: skip
        **report_style(metrics.get("task")),
    )
    page = build_report(ctx.out / "report", data)
    ctx.log.info(f"report: {page}")


# ------------------------------------------------------------------------------------------------
# JSON extraction (distill.evaluate.json_scoring); the SQL path above does not go through here
# ------------------------------------------------------------------------------------------------


def _is_json(task: Any, eval_path: Path) -> bool:
    kind = getattr(task, "kind", None)
    if kind is not None:
        return bool(kind == "json")
    from distill.evaluate.json_scoring import is_json_eval_set

    return is_json_eval_set(eval_path)


def _schema(task: Any, lp: Any) -> tuple[str | None, dict[str, Any] | None, str | None]:
    """(schema path as configured, parsed schema, its text) of a json task; Nones without one."""
    rel = getattr(task, "schema_file", None)
    if not rel:
        return None, None, None
    from distill.tasks.json_task import load_schema

    path = lp.path(rel)
    return rel, load_schema(path), path.read_text(encoding="utf-8")


def _json_vars(row: Any, schema_text: str | None) -> dict[str, Any]:
    v = row.template_vars()
    if schema_text is not None:
        v.setdefault("schema_json", schema_text)  # as the generate stage renders the same template
    return v


def _check_json(cfg: Config, lp: Any) -> list[str]:
    from distill.errors import DistillError
    from distill.evaluate.json_scoring import load_json_eval_set

    try:
        rows = load_json_eval_set(lp.path(cfg.eval_set))
    except DistillError as e:
        return list(e.lines)
    try:
        _, _, text = _schema(lp.pipeline.task, lp)
    except (OSError, ValueError) as e:
        return [f"task.schema: {e}"]
    try:
        _Renderer(cfg, lp).messages(_json_vars(rows[0], text))
    except ValueError as e:
        return [str(e)]
    return []


def _run_json(ctx: StageContext) -> dict[str, Any]:
    import polars as pl

    from distill.evaluate.json_scoring import JsonScorer, aggregate, load_json_eval_set, result_schema

    cfg: Config = ctx.cfg
    schema_rel, schema, schema_text = _schema(ctx.task, ctx.lp)
    rows = load_json_eval_set(ctx.path(cfg.eval_set))
    if cfg.limit is not None:
        rows = rows[: cfg.limit]
    renderer = _Renderer(cfg, ctx.lp)
    scorer = JsonScorer(rows, schema)
    excluded = [rid for rid, why in scorer.gold_reason.items() if why]
    if excluded:
        ctx.log.warning(
            f"{len(excluded)} of {len(rows)} eval rows excluded (gold record not valid under the schema)"
        )
    requests = [{"id": r.id, "messages": renderer.messages(_json_vars(r, schema_text))} for r in rows]
    shards = ctx.shards()
    done = shards.committed()
    per_model: dict[str, dict[str, Any]] = {}
    frames: list[pl.DataFrame] = []
    for i, name in enumerate(cfg.models):
        if i in done:
            df = shards.read(i)
            ctx.log.info(f"{name}: results already committed; reusing them")
        else:
            by_id = {g["id"]: g for g in _model_generations(ctx, cfg, i, name, requests)}
            results, _ = scorer.score({rid: g["completion"] for rid, g in by_id.items()})
            for res in results:
                g = by_id.get(res["id"], {})
                res.update(model=name, finish_reason=g.get("finish_reason"), completion_tokens=g.get("completion_tokens"),
                           gen_error=g.get("gen_error"))  # fmt: skip
            df = pl.DataFrame(results, schema=result_schema())
            shards.commit(i, df)
        per_model[name] = aggregate(df.to_dicts())
        frames.append(df)
        m = per_model[name]
        ctx.log.info(
            f"{name}: exact match {m['exact_match']}, field accuracy {m['field_accuracy']}, "
            f"schema valid {m['schema_valid_rate']}, valid JSON {m['valid_json_rate']} over {m['runnable']} rows"
        )
    first = next(iter(per_model.values()), {})
    metrics = {
        "task": "json",
        "models": per_model,
        "eval_set": cfg.eval_set,
        "schema": schema_rel,
        "n": len(rows),
        "runnable": first.get("runnable", 0),
    }
    (ctx.out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str) + "\n")
    _report(ctx, cfg, metrics, pl.concat(frames, how="diagonal_relaxed").to_dicts())
    keys = ("exact_match", "field_accuracy", "schema_valid_rate", "valid_json_rate", "error_rate")
    return {
        "n": metrics["n"],
        "runnable": metrics["runnable"],
        **{k: {name: m[k] for name, m in per_model.items()} for k in keys},
        "excluded": first.get("excluded", {}),
    }


def _model_generations(
    ctx: StageContext, cfg: Config, i: int, name: str, requests: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Greedy completions of model `name` (the i-th of `models`) for the requests."""
    model = ctx.model(name)
    opts = {
        "max_tokens": cfg.max_tokens,
        "seed": ctx.seed,
        "scratch": str(ctx.scratch_dir / f"gen-{i}"),
        "chat_template": ctx.path(model.spec.chat_template).read_text(encoding="utf-8") if model.spec.chat_template else None,
        "chat_template_kwargs": cfg.chat_template_kwargs,
    }  # fmt: skip
    ctx.log.info(f"{name}: generating {len(requests)} answers ({model.spec.backend})")
    if cfg.isolate_models:
        return _generate_isolated(model, requests, opts, ctx.scratch_dir / f"gen-{i}.json")
    return _generate(model, requests, opts)
