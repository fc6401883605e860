"""`pairs`: preference pairs (TRL `prompt` / `chosen` / `rejected`) from n samples per prompt.

Strategies:
- `verifier` (default): every sample is verified by the task (SQL: parse, read-only check,
  execution; JSON: parse + schema) and checked for agreement (the gold answer's result when the
  row has one, else the majority result of the prompt's passing samples). chosen = a sample that
  passes and agrees; rejected = one that fails, with the failure type recorded
  (`rejected_failure`: wrong_result, disagrees_majority, exec_error, parse_error, ...). Samples
  whose correctness is unknown (no majority, failed reference) are never used. With
  `agreement: none`, passing the verifier is enough to be chosen (rejected = parse/exec errors).
- `student`: the inputs are the teacher's generations and the student's (`student: <stage>`);
  chosen = a correct teacher sample, rejected = the student's own wrong sample, judged against
  the reference or the teacher's majority result.
- `judge`: a model (`judge:`, usually the teacher) scores every sample with a prompt template;
  chosen = the best-scored, rejected = the worst, when they differ by at least `judge_min_margin`.

Output layout `pairs`: `prompt` (list of messages), `chosen` / `rejected` (one assistant message
each), `id`, `chosen_verdict`, `rejected_failure`, `chosen_sample`, `rejected_sample` (and the
scores for `judge`). Metrics: prompts, pairs, prompts without a correct or without a failing
sample, failure types of the rejected answers.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from distill.config import speed
from distill.core.context import StageContext
from distill.stages.base import StageConfig

CODE_VERSION = "1"
SUBPROCESS = True  # the judge strategy loads a model; its memory must go back after the stage

DEFAULT_JUDGE_PROMPT = """You are grading an answer to a request. Read the request and the answer,
then rate how correct and helpful the answer is on a scale from 1 (wrong or useless) to 10
(correct and complete). Reply with one line of the form "Score: N".

Request:
{{ question }}

Answer:
{{ answer }}
"""


class Config(StageConfig):
    kind: Literal["pairs"]
    strategy: Literal["verifier", "student", "judge"] = "verifier"
    student: str | None = Field(
        None, description="strategy student: the input stage with the student's generations."
    )
    verify: Literal["auto", "sql", "json", "none"] = "auto"
    agreement: Literal["auto", "majority", "reference", "none"] = Field(
        "auto",
        description="How a passing sample is judged correct: gold result (reference), the samples' "
        "majority result, auto (reference where the row has one), or none (passing the verifier is enough).",
    )
    min_votes: int = Field(1, ge=1)
    reference_column: str | None = None
    pairs_per_prompt: int = Field(1, ge=1)
    rejected_priority: list[str] | None = Field(
        None, description="Failure types in the order rejected answers are picked."
    )
    answer: Literal["auto", "raw", "extracted", "fenced"] = "auto"
    sql_pick: Literal["first", "last"] = "last"
    drop_truncated: bool = Field(True, description="Never use truncated samples (finish_reason != stop).")
    judge: str | None = Field(None, description="strategy judge: the pipeline model that scores answers.")
    judge_prompt: str | None = Field(
        None, description="Jinja template file with {{ question }}, {{ answer }}, {{ prompt }}."
    )
    judge_score_pattern: str = Field(
        r"(?i)score\s*[:=]?\s*(\d+(?:\.\d+)?)", description="Regex; group 1 is the score."
    )
    judge_min_margin: float = 1.0
    judge_max_tokens: int = 64
    workers: int | None = speed(None)

    OUTPUT: ClassVar[str] = "pairs"
    ACCEPTS: ClassVar[frozenset[str] | None] = frozenset({"generations"})

    @model_validator(mode="after")
    def _strategy(self) -> Config:
        if self.strategy == "student":
            if not self.student:
                raise ValueError(
                    "strategy student needs `student:` naming the input with the student's generations"
                )
            if self.student not in self.inputs or len(self.inputs) != 2:
                raise ValueError(
                    "strategy student needs exactly two inputs: the teacher's generations and `student`"
                )
        if self.strategy == "judge" and not self.judge:
            raise ValueError("strategy judge needs `judge:` naming a pipeline model")
        try:
            if re.compile(self.judge_score_pattern).groups < 1:
                raise ValueError("judge_score_pattern needs a capture group for the score")
        except re.error as e:
            raise ValueError(f"judge_score_pattern: invalid regex: {e}") from None
        return self

    def files(self) -> list[str]:
        return [self.judge_prompt] if self.judge_prompt else []

    def model_refs(self) -> list[tuple[str, str]]:
        return [("judge", self.judge)] if self.strategy == "judge" and self.judge else []


def check(cfg: Config, lp: Any) -> list[str]:
    from distill.stages.curate import resolve_verify

    try:
        resolve_verify(cfg.verify, lp.pipeline.task)
    except ValueError as e:
        return [str(e)]
    if cfg.strategy == "judge" and cfg.judge_prompt:
        import jinja2

        try:
            jinja2.Environment(undefined=jinja2.StrictUndefined).from_string(
                lp.path(cfg.judge_prompt).read_text(encoding="utf-8")
            ).render(question="q", answer="a", prompt=[])
        except (OSError, jinja2.TemplateError) as e:
            return [f"judge_prompt: {e}"]
    return []


# ------------------------------------------------------------------------------------------------


def _prepare(ctx: StageContext, name: str) -> Any:
    import polars as pl

    from distill.curate.verify import normalize_input
    from distill.stages.curate import ensure_ids

    cfg: Config = ctx.cfg
    df = normalize_input(ctx.input(name).read(), f"input {name}")
    verify = _verify_kind(ctx)
    ref_col = cfg.reference_column or ("sql" if verify == "sql" else "reference")
    if ref_col in df.columns:
        df = df.with_columns(pl.col(ref_col).cast(pl.String).alias("_reference"))
        if ref_col == "sql":
            df = df.drop("sql")
    df = ensure_ids(df)
    bad = pl.lit(False)
    if "error" in df.columns:
        bad = bad | pl.col("error").is_not_null()
    if cfg.drop_truncated and "finish_reason" in df.columns:
        bad = bad | (pl.col("finish_reason").is_not_null() & (pl.col("finish_reason") != "stop"))
    return df.filter(~bad)


def _verify_kind(ctx: StageContext) -> str:
    from distill.stages.curate import resolve_verify

    return resolve_verify(ctx.cfg.verify, ctx.task)


def _verified(ctx: StageContext, df: Any) -> Any:
    """Run the task's verifier over `df` (all rows at once: one sandbox)."""
    import polars as pl

    from distill.curate.verify import verify_json, verify_none, verify_sql

    cfg: Config = ctx.cfg
    verify = _verify_kind(ctx)
    empty = pl.col("_completion").is_null() | (pl.col("_completion").str.strip_chars() == "")
    if verify == "sql":
        from distill.curate.verify import open_sql_sandbox

        task = ctx.task
        with (
            open_sql_sandbox(task, ctx.files(task.schemas), ctx.scratch_dir / "db", cfg.workers) as sb,
            ctx.progress(df.height, f"{ctx.name}: verify sql", "queries") as prog,
        ):
            out = verify_sql(df, sb, cfg.sql_pick, progress=prog.advance)
    elif verify == "json":
        from distill.tasks.json_task import load_schema, make_validator

        out = verify_json(df, make_validator(load_schema(ctx.path(ctx.task.schema_file))))
    else:
        out = verify_none(df)
    return out.with_columns(
        pl.when(empty).then(pl.lit("empty")).otherwise(pl.col("verdict")).alias("verdict")
    )


def _answers(ctx: StageContext, df: Any) -> Any:
    import polars as pl

    from distill.stages.curate import answer_expr

    verify = _verify_kind(ctx)
    ans = answer_expr(ctx.cfg.answer, verify)
    if verify == "sql":  # nothing extracted: the raw text is the (rejected) answer
        ans = pl.when(pl.col("sql").is_null()).then(pl.col("_completion").str.strip_chars()).otherwise(ans)
    if verify == "json":
        ans = pl.when(ans.is_null()).then(pl.col("_completion").str.strip_chars()).otherwise(ans)
    return df.with_columns(ans.alias("_answer"))


_UNKNOWN = ("no_majority", "reference_failed", "no_reference")


def run(ctx: StageContext) -> dict[str, Any]:
    import polars as pl

    from distill.curate.pairs import DEFAULT_PRIORITY, build_pairs

    cfg: Config = ctx.cfg
    priority = tuple(cfg.rejected_priority or DEFAULT_PRIORITY)
    stats: dict[str, Any] = {}
    if cfg.strategy == "judge":
        pairs, stats = _judge_pairs(ctx)
    else:
        from distill.curate.verify import agreement

        if cfg.strategy == "verifier":
            df = _verified(
                ctx, _prepare(ctx, next(iter(ctx.inputs)) if len(ctx.inputs) == 1 else _one_input(ctx))
            )
            df = agreement(df, cfg.agreement, cfg.min_votes)
            df = _answers(ctx, df).with_columns(
                pl.when(pl.col("verdict") != "pass")
                .then(pl.col("verdict"))
                .otherwise(pl.col("agree_fail"))
                .alias("failure")
            )
            chosen = df.filter(pl.col("failure").is_null())
            rejected = df.filter(pl.col("failure").is_not_null() & ~pl.col("failure").is_in(_UNKNOWN))
            stats["samples"] = df.height
        else:  # student
            student_name = str(cfg.student)
            teacher_name = next(n for n in cfg.inputs if n != student_name)
            t = _prepare(ctx, teacher_name).with_columns(pl.lit("teacher").alias("_side"))
            s = _prepare(ctx, student_name).with_columns(pl.lit("student").alias("_side"))
            both = _verified(ctx, pl.concat([t, s], how="diagonal_relaxed"))
            tv = agreement(both.filter(pl.col("_side") == "teacher"), cfg.agreement, cfg.min_votes)
            tv = _answers(ctx, tv).with_columns(
                pl.when(pl.col("verdict") != "pass")
                .then(pl.col("verdict"))
                .otherwise(pl.col("agree_fail"))
                .alias("failure")
            )
            chosen = tv.filter(pl.col("failure").is_null())
            accepted = chosen.group_by("id").agg(
                pl.col("agree_key").first().alias("_accepted"),
                pl.col("ordered_hash").first().alias("_acc_ordered")
                if "ordered_hash" in chosen.columns
                else pl.lit(None).alias("_acc_ordered"),
                (pl.col("_ref_ordered").first() if "_ref_ordered" in chosen.columns else pl.lit(False)).alias(
                    "_need_order"
                ),
            )
            sv = _answers(ctx, both.filter(pl.col("_side") == "student")).join(accepted, on="id", how="inner")
            wrong = (pl.col("agree_key") != pl.col("_accepted")) | (
                pl.col("_need_order").fill_null(False) & (pl.col("ordered_hash") != pl.col("_acc_ordered"))
                if "ordered_hash" in sv.columns
                else pl.lit(False)
            )
            sv = sv.with_columns(
                pl.when(pl.col("verdict") != "pass")
                .then(pl.col("verdict"))
                .when(wrong)
                .then(pl.lit("wrong_result"))
                .alias("failure")
            )
            rejected = sv.filter(pl.col("failure").is_not_null())
            stats["teacher_samples"], stats["student_samples"] = t.height, s.height
            stats["student_correct"] = int(sv.filter(pl.col("failure").is_null()).height)
        extra = [c for c in ("verdict", "votes", "agreement") if c in chosen.columns]
        pairs = build_pairs(chosen, rejected, cfg.pairs_per_prompt, priority, tuple(extra))
        prompts = set(chosen["id"].to_list()) | set(rejected["id"].to_list())
        stats.update(
            prompts=len(prompts),
            prompts_without_correct=len(prompts - set(chosen["id"].to_list())),
            prompts_without_failure=len(prompts - set(rejected["id"].to_list())),
        )
    ctx.write_table(pairs)
    failures = pairs.group_by("rejected_failure").len().sort("len", descending=True) if pairs.height else None
    stats["pairs"] = pairs.height
    stats["rejected_failure"] = {r: int(n) for r, n in failures.iter_rows()} if failures is not None else {}
    if pairs.height == 0:
        why = (
            f"no prompt has two answers scored at least {cfg.judge_min_margin:g} apart"
            if cfg.strategy == "judge"
            else "no prompt has both a correct and a failing sample"
        )
        ctx.log.warning(f"{ctx.name}: no pairs: {why}")
    ctx.log.info(f"{ctx.name}: {pairs.height} pairs from {stats.get('prompts', 0)} prompts")
    return stats


def _one_input(ctx: StageContext) -> str:
    raise ValueError(
        f"strategy {ctx.cfg.strategy} reads one generations input; {ctx.name} has {len(ctx.inputs)}"
    )


# ------------------------------------------------------------------------------------------------
# judge
# ------------------------------------------------------------------------------------------------


def _number(s: str | None) -> float | None:
    try:
        return float(s) if s is not None else None
    except ValueError:
        return None


def _judge_pairs(ctx: StageContext) -> tuple[Any, dict[str, Any]]:
    import jinja2
    import polars as pl

    from distill.backends import GenRequest, Sampling, get_backend
    from distill.curate.pairs import score_pairs

    cfg: Config = ctx.cfg
    name = next(iter(ctx.inputs)) if len(ctx.inputs) == 1 else _one_input(ctx)
    df = _prepare(ctx, name)
    df = df.filter(pl.col("_completion").is_not_null() & (pl.col("_completion").str.strip_chars() != ""))
    df = df.with_columns(pl.col("_completion").str.strip_chars().alias("_answer"))
    text = cfg.judge_prompt and ctx.path(cfg.judge_prompt).read_text(encoding="utf-8")
    tmpl = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True).from_string(
        text or DEFAULT_JUDGE_PROMPT
    )
    from distill.stages.curate import question_text

    q = df.select(question_text(df).alias("q"))["q"].to_list()
    reqs = []
    for i, (prompt, question, answer) in enumerate(
        zip(df["_prompt"].to_list(), q, df["_answer"].to_list(), strict=True)
    ):
        content = tmpl.render(prompt=prompt, question=question or "", answer=answer)
        reqs.append(
            GenRequest(
                id=str(i),
                messages=({"role": "user", "content": content},),
                sampling=Sampling(n=1, temperature=0.0, max_tokens=cfg.judge_max_tokens, seed=ctx.seed),
            )
        )
    assert cfg.judge is not None  # the config validator guarantees it for strategy judge
    backend = get_backend(ctx.model(cfg.judge), seed=ctx.seed, scratch=ctx.scratch_dir)
    try:
        responses = backend.generate(reqs)
    finally:
        backend.close()
    pat = re.compile(cfg.judge_score_pattern)
    scores: list[float | None] = []
    raws: list[str | None] = []
    for r in responses:
        out = r.completions[0].text if r.completions else None
        raws.append(out)
        found = list(pat.finditer(out or ""))  # the last one: judges state the verdict at the end
        scores.append(_number(found[-1].group(1)) if found else None)
    df = df.with_columns(
        pl.Series("score", scores, dtype=pl.Float64), pl.Series("judge_output", raws, dtype=pl.String)
    )
    pairs = score_pairs(df, cfg.judge_min_margin)
    stats = {
        "samples": df.height,
        "judged": len(reqs),
        "judge_unparsed": int(df["score"].null_count()),
        "prompts": int(df["id"].n_unique()),
    }
    return pairs, stats
