"""`curate`: decide what the student learns from the teacher's samples.

Input: a `generations` artifact (n samples per prompt: id, sample, messages, completion,
finish_reason, token counts, error, plus the question row's columns such as `question`, `schema`
and a gold `sql`) or an `sft` artifact (imported data). Steps, each dropping rows with a reason:

1. filters: generation errors, empty, truncated (finish_reason != stop), length bounds in
   characters or tokens, refusal / boilerplate patterns, regex must / must-not, language,
   repetition.
2. verify (the task's verifier): sql = extract, sqlglot parse in the dialect, read-only statement
   check, execution in the DuckDB/SQLite sandbox (failure reasons: no_sql, parse_error,
   disallowed, static_error, exec_error, timeout, too_many_rows, ...); json = parse + schema.
3. agreement: majority (the result most of a prompt's passing samples share) or reference (the
   gold answer's result); `auto` uses the reference where a row has one.
4. decontaminate: n-gram overlap of the question with an eval set; SQL canonical-form match.
5. keep_per_prompt: keep the first `k` surviving samples (lowest `sample`) of each prompt.
6. dedup: exact on a normalized column, then near-duplicates (MinHash LSH) on the question;
   the first row (input order) of each cluster is kept.

Output layout `sft`: `messages` (prompt messages + the assistant answer), `prompt` / `completion`
(TRL conversational prompt-completion), plus provenance (`id`, `sample`, verifier columns such as
`sql`, `result_hash`, `verdict`, `votes`; a gold `sql` column is kept as `reference_sql`).
Every dropped row is in `dropped.parquet` with `reason`, `detail` and `step`; the manifest's
metrics hold the funnel: rows_in, rows_out, dropped {reason: count}, steps.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator

from distill.config import Strict, speed
from distill.core.context import StageContext
from distill.stages.base import StageConfig

CODE_VERSION = "1"

Normalize = Literal["nfkc", "lower", "whitespace", "punctuation", "sql", "sql_template"]


class FilterSettings(Strict):
    column: str | None = Field(None, description="Text the filters read (default: the completion).")
    drop_errors: bool = Field(True, description="Drop rows whose generation failed (`error` set).")
    drop_empty: bool = True
    drop_truncated: bool = Field(
        True, description="Drop rows with finish_reason other than stop (e.g. length)."
    )
    min_chars: int | None = None
    max_chars: int | None = None
    min_tokens: int | None = Field(None, description="Bounds on `completion_tokens`.")
    max_tokens: int | None = None
    refusal: bool | list[str] = Field(
        True, description="true: built-in refusal patterns; or a list of regexes."
    )
    boilerplate: bool | list[str] = Field(
        False, description="true: built-in filler patterns; or a list of regexes."
    )
    must_match: list[str] = Field(default_factory=list, description="Regexes the text must match.")
    must_not_match: list[str] = Field(default_factory=list, description="Regexes the text must not match.")
    language: str | list[str] | None = Field(None, description="ISO 639-1 code(s) the text must be in.")
    language_column: str | None = Field(None, description="Column for the language check (default: column).")
    min_language_prob: float = 0.5
    max_word_repeat: float | None = Field(
        None, description="Drop texts whose share of repeated words exceeds this."
    )

    @field_validator("must_match", "must_not_match")
    @classmethod
    def _regexes(cls, v: list[str]) -> list[str]:
        for p in v:
            try:
                re.compile(p)
            except re.error as e:
                raise ValueError(f"invalid regex {p!r}: {e}") from None
        return v


class NearDedupSettings(Strict):
    threshold: float = Field(0.8, gt=0.0, lt=1.0, description="Jaccard similarity of shingle sets.")
    ngram: int = Field(5, ge=1)
    num_perm: int = Field(128, ge=16, le=1024)
    shingle: Literal["word", "char"] = "word"
    column: str | None = Field(
        None, description="Column compared (default: `question`, else the last user message)."
    )


class DedupSettings(Strict):
    exact: bool = True
    column: str | None = Field(None, description="Column for exact dedup (default: prompt + answer).")
    normalize: list[Normalize] = Field(default_factory=lambda: ["whitespace"])  # type: ignore[arg-type]
    near: NearDedupSettings | None = None


class DecontamSettings(Strict):
    eval_files: list[str] = Field(..., min_length=1, description="Evaluation sets (jsonl/json/parquet/csv).")
    question_field: str = "question"
    sql_field: str | None = "sql"
    column: str | None = Field(
        None, description="Training text compared (default: `question`, else the last user message)."
    )
    ngram: int = Field(8, ge=1)
    min_overlap: int = Field(1, ge=1, description="Shared n-grams that make a row contaminated.")
    sql_canonical: bool = Field(
        True, description="Also drop rows whose SQL canonical form is in the eval set."
    )
    parameterize: bool = Field(False, description="Compare SQL with literals replaced by `?`.")


class Config(StageConfig):
    kind: Literal["curate"]
    filters: FilterSettings = Field(default_factory=FilterSettings)
    verify: Literal["auto", "sql", "json", "none"] = Field(
        "auto", description="auto: the pipeline task's verifier."
    )
    agreement: Literal["auto", "majority", "reference", "none"] = "auto"
    min_votes: int = Field(
        1, ge=1, description="Majority: the winning result needs at least this many samples."
    )
    reference_column: str | None = Field(
        None, description="Gold answer column (default: `sql` for sql, `reference` for json)."
    )
    keep_per_prompt: int | Literal["all"] = 1
    answer: Literal["auto", "raw", "extracted", "fenced"] = Field(
        "auto", description="Assistant turn: auto = fenced SQL / extracted JSON / raw text."
    )
    sql_pick: Literal["first", "last"] = Field("last", description="Which fenced SQL block is the answer.")
    dedup: DedupSettings = Field(default_factory=DedupSettings)
    decontaminate: DecontamSettings | None = None
    workers: int | None = speed(None, description="SQL sandbox worker processes (default: task.workers).")

    OUTPUT: ClassVar[str] = "sft"
    ACCEPTS: ClassVar[frozenset[str] | None] = frozenset({"generations", "sft"})

    @field_validator("keep_per_prompt")
    @classmethod
    def _k(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 1:
            raise ValueError("keep_per_prompt must be >= 1 or 'all'")
        return v

    def files(self) -> list[str]:
        return list(self.decontaminate.eval_files) if self.decontaminate else []


def resolve_verify(verify: str, task: Any) -> str:
    kind = getattr(task, "kind", None)
    if verify == "auto":
        return kind if kind in ("sql", "json") else "none"
    if verify in ("sql", "json") and kind != verify:
        raise ValueError(
            f"verify: {verify} needs a pipeline `task` of kind {verify} (found {kind or 'none'})"
        )
    return verify


def check(cfg: Config, lp: Any) -> list[str]:
    errors = []
    try:
        v = resolve_verify(cfg.verify, lp.pipeline.task)
    except ValueError as e:
        return [str(e)]
    if v == "sql":
        import sqlglot

        from distill.tasks.sql import STATEMENT_KINDS

        task = lp.pipeline.task
        try:
            sqlglot.Dialect.get_or_raise(task.dialect)
        except ValueError as e:
            errors.append(f"task.dialect: {e}")
        bad = [a for a in task.allowed_statements if a.lower() not in STATEMENT_KINDS]
        if bad:
            errors.append(f"task.allowed_statements: unknown {bad}; choose from {', '.join(STATEMENT_KINDS)}")
    for name in ("refusal", "boilerplate"):
        val = getattr(cfg.filters, name)
        if isinstance(val, list):
            for p in val:
                try:
                    re.compile(p)
                except re.error as e:
                    errors.append(f"filters.{name}: invalid regex {p!r}: {e}")
    return errors


# ------------------------------------------------------------------------------------------------


def read_inputs(ctx: StageContext) -> Any:
    import polars as pl

    frames = []
    for name, art in ctx.inputs.items():
        df = art.read()
        if df.height == 0:
            ctx.log.warning(f"input {name} has no rows")
        frames.append(df)
    if not frames:
        raise ValueError(f"stage {ctx.name} has no inputs; set `inputs:` to a generate or load stage")
    return pl.concat(frames, how="diagonal_relaxed") if len(frames) > 1 else frames[0]


def ensure_ids(df: Any) -> Any:
    """`id` (prompt id) and `sample` (index among the prompt's samples) exist after this."""
    import polars as pl

    if "id" not in df.columns:
        key = pl.col("_prompt").list.eval(pl.element().struct.field("content")).list.join("\n")
        df = df.with_columns(key.hash().cast(pl.String).str.slice(0, 16).alias("id"))
    if "sample" not in df.columns:
        df = df.with_columns(pl.int_range(pl.len()).over("id").cast(pl.Int64).alias("sample"))
    return df


def question_text(df: Any) -> Any:
    """The question a row asks: its `question` column, else the last user message of the prompt."""
    import polars as pl

    if "question" in df.columns and df.schema["question"] == pl.String:
        return pl.col("question")
    users = pl.col("_prompt").list.eval(
        pl.element().filter(pl.element().struct.field("role") == "user").struct.field("content")
    )
    return users.list.last()


def answer_expr(style: str, verify: str) -> Any:
    import polars as pl

    if style == "auto":
        style = {"sql": "fenced", "json": "extracted"}.get(verify, "raw")
    raw = pl.col("_completion").str.strip_chars()
    if verify == "sql":
        if style == "raw":
            return raw
        sql = pl.col("sql")
        return pl.format("```sql\n{}\n```", sql) if style == "fenced" else sql
    if verify == "json":
        from distill.tasks.json_task import extract_json

        extracted = pl.col("_completion").map_elements(extract_json, return_dtype=pl.String)
        if style == "raw":
            return raw
        return pl.format("```json\n{}\n```", extracted) if style == "fenced" else extracted
    return raw


def run(ctx: StageContext) -> dict[str, Any]:
    import polars as pl

    from distill.curate import filters as F
    from distill.curate.funnel import ROW, Funnel
    from distill.curate.verify import (
        agreement,
        normalize_input,
        verify_json,
        verify_none,
        verify_sql,
        with_answer,
    )

    cfg: Config = ctx.cfg
    task = ctx.task
    verify = resolve_verify(cfg.verify, task)
    df = normalize_input(read_inputs(ctx), f"stage {ctx.name} input")
    ref_col = cfg.reference_column or ("sql" if verify == "sql" else "reference")
    if ref_col in df.columns:
        df = df.with_columns(pl.col(ref_col).cast(pl.String).alias("_reference"))
        if ref_col == "sql":
            df = df.rename({"sql": "reference_sql"})
    df = ensure_ids(df)
    funnel = Funnel(df)

    # 1. filters --------------------------------------------------------------------------------
    fs = cfg.filters
    text: Any = pl.col(fs.column) if fs.column else pl.col("_completion")
    checks: list[F.Check] = []
    if fs.drop_errors and "error" in df.columns:
        checks.append(F.generation_error("error"))
    if fs.drop_empty:
        checks.append(F.empty(text))
    if fs.drop_truncated and "finish_reason" in df.columns:
        checks.append(F.truncated("finish_reason"))
    if fs.min_chars is not None:
        checks.append(F.min_chars(text, fs.min_chars))
    if fs.max_chars is not None:
        checks.append(F.max_chars(text, fs.max_chars))
    if fs.min_tokens is not None or fs.max_tokens is not None:
        if "completion_tokens" not in df.columns:
            raise ValueError(
                "filters.min_tokens/max_tokens need a `completion_tokens` column (generate stage output)"
            )
        if fs.min_tokens is not None:
            checks.append(F.min_tokens("completion_tokens", fs.min_tokens))
        if fs.max_tokens is not None:
            checks.append(F.max_tokens("completion_tokens", fs.max_tokens))
    if fs.refusal:
        checks.append(F.refusal(text, fs.refusal if isinstance(fs.refusal, list) else F.REFUSAL_PATTERNS))
    if fs.boilerplate:
        checks.append(
            F.boilerplate(
                text, fs.boilerplate if isinstance(fs.boilerplate, list) else F.BOILERPLATE_PATTERNS
            )
        )
    for p in fs.must_match:
        checks.append(F.must_match(text, p))
    for p in fs.must_not_match:
        checks.append(F.must_not_match(text, p))
    if fs.max_word_repeat is not None:
        checks.append(F.repetitive(text, fs.max_word_repeat))
    if fs.language:
        checks.append(
            F.language(
                pl.col(fs.language_column) if fs.language_column else text, fs.language, fs.min_language_prob
            )
        )
    for c in checks:
        funnel.drop(f"filter:{c.reason}", c.drop, c.reason, c.detail)

    # 2. verify ---------------------------------------------------------------------------------
    if verify == "sql":
        from distill.curate.verify import open_sql_sandbox

        with (
            open_sql_sandbox(task, ctx.files(task.schemas), ctx.scratch_dir / "db", cfg.workers) as sb,
            ctx.progress(funnel.df.height, f"{ctx.name}: verify sql", "queries") as prog,
        ):
            funnel.df = verify_sql(funnel.df, sb, cfg.sql_pick, progress=prog.advance)
    elif verify == "json":
        from distill.tasks.json_task import load_schema, make_validator

        validator = make_validator(load_schema(ctx.path(task.schema_file)), where=task.schema_file)
        funnel.df = verify_json(funnel.df, validator)
    else:
        funnel.df = verify_none(funnel.df)
    funnel.drop("verify", pl.col("verdict") != "pass", pl.col("verdict"), pl.col("error"))

    # 3. agreement ------------------------------------------------------------------------------
    funnel.df = agreement(funnel.df, cfg.agreement, cfg.min_votes)
    detail = pl.format("votes={}", pl.col("votes"))
    if "_ref_error" in funnel.df.columns:
        detail = (
            pl.when(pl.col("agree_fail") == "reference_failed").then(pl.col("_ref_error")).otherwise(detail)
        )
    funnel.drop("agreement", pl.col("agree_fail").is_not_null(), pl.col("agree_fail"), detail)

    # 4. decontaminate --------------------------------------------------------------------------
    decontam_stats: dict[str, Any] = {}
    if cfg.decontaminate is not None:
        decontam_stats = _decontaminate(ctx, funnel, cfg.decontaminate, verify)

    # 5. keep per prompt ------------------------------------------------------------------------
    if cfg.keep_per_prompt != "all":
        rank = pl.int_range(pl.len()).over("id", order_by=["sample", ROW])
        funnel.drop(
            "keep_per_prompt",
            rank >= cfg.keep_per_prompt,
            "extra_sample",
            pl.format("prompt {}", pl.col("id")),
        )

    # the assistant answer (SFT columns are built for the survivors only, so that dropped rows
    # keep the input's own `messages` / `completion`)
    funnel.df = funnel.df.with_columns(answer_expr(cfg.answer, verify).alias("_answer"))

    # 6. dedup ----------------------------------------------------------------------------------
    near_stats = _dedup(ctx, funnel, cfg.dedup, verify)

    out = with_answer(funnel.df, pl.col("_answer"))
    out = out.drop(
        [c for c in out.columns if c.startswith("_")]
        + [c for c in ("agree_key", "agree_fail") if c in out.columns]
    )
    dropped = funnel.dropped()
    dropped = dropped.rename({ROW: "input_row"}).drop(
        [c for c in dropped.columns if c.startswith("_") and c != ROW]
    )
    ctx.write_table(out)
    ctx.write_table(dropped, "dropped")
    metrics = funnel.metrics()
    if decontam_stats:
        metrics["decontamination"] = decontam_stats
    if near_stats:
        metrics["near_dedup"] = near_stats
    if verify != "none" and "verdict" in dropped.columns:
        metrics["verify"] = verify
    if out.height == 0:
        ctx.log.warning(f"{ctx.name}: no rows survived curation; see dropped.parquet for the reasons")
    ctx.log.info(
        f"{ctx.name}: {metrics['rows_in']} rows in, {metrics['rows_out']} out; dropped "
        + (", ".join(f"{k}={v}" for k, v in metrics["dropped"].items()) or "none")
    )
    return metrics


def _decontaminate(ctx: StageContext, funnel: Any, dc: DecontamSettings, verify: str) -> dict[str, Any]:
    import polars as pl

    from distill.curate.decontam import ngram_overlap, ngram_set, read_eval_records, sql_canonical_set

    questions: list[str] = []
    sqls: list[str] = []
    n_eval = 0
    for pat in dc.eval_files:
        files = ctx.files(pat)
        if not files:
            raise ValueError(f"decontaminate.eval_files: {pat!r} matches no file")
        for f in files:
            recs = read_eval_records(f)
            n_eval += len(recs)
            for i, r in enumerate(recs):
                if not isinstance(r, dict):
                    raise ValueError(f"{f}: record {i} is not an object")
                q = r.get(dc.question_field)
                if q:
                    questions.append(str(q))
                if dc.sql_field and r.get(dc.sql_field):
                    sqls.append(str(r[dc.sql_field]))
    if n_eval and not questions and not sqls:
        raise ValueError(
            f"decontaminate: no `{dc.question_field}`"
            + (f" or `{dc.sql_field}`" if dc.sql_field else "")
            + f" field in {', '.join(dc.eval_files)}; set question_field / sql_field"
        )
    text = pl.col(dc.column) if dc.column else question_text(funnel.df)
    eval_ngrams = ngram_set(questions, dc.ngram, ctx.seed)
    train = funnel.df.select(text.cast(pl.String).alias("t"))["t"]
    overlap = ngram_overlap(train, eval_ngrams, dc.ngram, ctx.seed)
    n_q = funnel.drop(
        "decontaminate",
        pl.Series(overlap >= dc.min_overlap),
        "contaminated_ngram",
        pl.format("{} shared {}-grams", pl.Series(overlap), pl.lit(dc.ngram)) if len(overlap) else None,
    )
    n_sql = 0
    if dc.sql_canonical and sqls and "sql" in funnel.df.columns:
        dialect = ctx.task.dialect if verify == "sql" else "duckdb"
        eval_set = sql_canonical_set(sqls, dialect, dc.parameterize)
        col = "sql_template" if dc.parameterize else "sql_canonical"
        if col in funnel.df.columns:
            train_canon = funnel.df[col]
        else:
            from distill.tasks.sql import canonical_sql

            train_canon = funnel.df["sql"].map_elements(
                lambda s: canonical_sql(s, dialect, dc.parameterize), return_dtype=pl.String
            )
        n_sql = funnel.drop(
            "decontaminate",
            train_canon.is_in(list(eval_set)),
            "contaminated_sql",
            pl.lit("SQL matches an eval query"),
        )
    return {
        "eval_rows": n_eval,
        "eval_questions": len(questions),
        "eval_sql": len(sqls),
        "contaminated_ngram": n_q,
        "contaminated_sql": n_sql,
    }


def _dedup(ctx: StageContext, funnel: Any, dd: DedupSettings, verify: str) -> dict[str, Any]:
    import polars as pl

    from distill.curate.dedup import exact_first_index, near_dedup_frame, normalized

    if dd.exact and funnel.df.height:
        steps = list(dd.normalize)
        if dd.column is None:
            key_src = pl.concat_str(
                [
                    pl.col("_prompt").list.eval(pl.element().struct.field("content")).list.join("\n"),
                    pl.col("_answer"),
                ],
                separator="\n<|answer|>\n",
            )
            key = normalized(key_src, steps)
        elif (
            dd.column == "sql"
            and steps
            and steps[-1] in ("sql", "sql_template")
            and "sql_canonical" in funnel.df.columns
        ):
            pre = normalized(
                pl.col("sql_template" if steps[-1] == "sql_template" else "sql_canonical"), steps[:-1]
            )
            key = pre
        else:
            if dd.column not in funnel.df.columns:
                raise ValueError(
                    f"dedup.column: no column {dd.column!r}; columns are {', '.join(funnel.df.columns)}"
                )
            key = normalized(pl.col(dd.column), steps, getattr(ctx.task, "dialect", "duckdb"))
        first = exact_first_index(funnel.df, key)
        pos = pl.Series(range(funnel.df.height))
        ids = funnel.df["id"].cast(pl.String)
        funnel.drop(
            "dedup_exact",
            first != pos,
            "duplicate_exact",
            pl.format("same as prompt {}", ids.gather(first)) if funnel.df.height else None,
        )
    stats: dict[str, Any] = {}
    if dd.near is not None and funnel.df.height:
        nd = dd.near
        col = "_near_text"
        src = pl.col(nd.column) if nd.column else question_text(funnel.df)
        frame = funnel.df.with_columns(src.cast(pl.String).alias(col))
        cluster, kept, res = near_dedup_frame(
            frame, col, nd.threshold, nd.ngram, nd.num_perm, ctx.seed, nd.shingle
        )
        ids = funnel.df["id"].cast(pl.String)
        funnel.drop(
            "dedup_near",
            pl.Series(~kept),
            "duplicate_near",
            pl.format("near-duplicate of prompt {}", ids.gather(pl.Series(cluster))),
        )
        stats = {
            "candidates": res.candidates,
            "verified_pairs": int(len(res.pairs)),
            "bands": res.bands,
            "rows": res.rows,
        }
    return stats
