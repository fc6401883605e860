"""Verification shared by the curate and pairs stages: normalize the input layout, run the task's
verifier on every candidate, and decide agreement (majority over a prompt's passing samples, or
the reference answer).

Internal columns (dropped before writing): `_prompt` (list of {role, content}), `_completion`
(the candidate's text), `_reference` (gold answer text or null).

Verifier columns (kept as provenance): `verdict` ("pass" or the failure type), `error`,
`agree_key` (what passing candidates must share to agree), and per task:
- sql: `sql` (extracted), `result_hash`, `ordered_hash`, `ordered`, `executed`, `sql_canonical`,
  `sql_template`, `parser`;
- json: `json` (canonical text), `result_hash`.
Agreement adds `votes` (samples of the prompt with the same agree_key), `agreement`
(how it was decided) and `agree_fail` (null, or wrong_result | disagrees_majority | no_majority |
reference_failed | no_reference).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl

MSG = pl.Struct({"role": pl.String, "content": pl.String})


# ------------------------------------------------------------------------------------------------
# input layouts
# ------------------------------------------------------------------------------------------------


def _clean_messages(expr: pl.Expr) -> pl.Expr:
    return expr.list.eval(
        pl.struct(
            pl.element().struct.field("role").cast(pl.String).alias("role"),
            pl.element().struct.field("content").cast(pl.String).alias("content"),
        )
    )


def _is_msg_list(dtype: pl.DataType) -> bool:
    return isinstance(dtype, pl.List) and isinstance(dtype.inner, pl.Struct)


def normalize_input(df: pl.DataFrame, where: str = "input") -> pl.DataFrame:
    """Add `_prompt` and `_completion` from a generations table (messages + completion text) or an
    SFT table (prompt/completion lists or strings, or messages ending with the assistant turn)."""
    cols = df.schema
    if "completion" in cols and cols["completion"] == pl.String:
        if "messages" in cols and _is_msg_list(cols["messages"]):
            prompt = _clean_messages(pl.col("messages"))
        elif "prompt" in cols and _is_msg_list(cols["prompt"]):
            prompt = _clean_messages(pl.col("prompt"))
        elif "prompt" in cols and cols["prompt"] == pl.String:
            prompt = pl.concat_list(
                pl.struct(pl.lit("user").alias("role"), pl.col("prompt").alias("content"))
            )
        elif "prompt_text" in cols:
            prompt = pl.concat_list(
                pl.struct(pl.lit("user").alias("role"), pl.col("prompt_text").alias("content"))
            )
        else:
            raise ValueError(
                f"{where}: a string `completion` column needs `messages`, `prompt` or `prompt_text` beside it"
            )
        return df.with_columns(prompt.alias("_prompt"), pl.col("completion").alias("_completion"))
    if (
        "prompt" in cols
        and "completion" in cols
        and _is_msg_list(cols["prompt"])
        and _is_msg_list(cols["completion"])
    ):
        return df.with_columns(
            _clean_messages(pl.col("prompt")).alias("_prompt"),
            pl.col("completion").list.last().struct.field("content").cast(pl.String).alias("_completion"),
        )
    if "messages" in cols and _is_msg_list(cols["messages"]):
        msgs = _clean_messages(pl.col("messages"))
        last = msgs.list.last()
        bad = df.select((last.struct.field("role") != "assistant").fill_null(True).arg_true().first())
        if bad.item() is not None:
            raise ValueError(
                f"{where}: row {bad.item()}: `messages` must end with the assistant turn to be curated"
            )
        return df.with_columns(
            msgs.list.head(msgs.list.len() - 1).alias("_prompt"),
            last.struct.field("content").alias("_completion"),
        )
    raise ValueError(
        f"{where}: cannot find the answer: expected a generations table (messages + completion) "
        f"or an sft table (prompt/completion or messages); columns are {', '.join(cols)}"
    )


def with_answer(df: pl.DataFrame, answer: pl.Expr) -> pl.DataFrame:
    """SFT output columns from `_prompt` and the assistant answer: `messages`, `prompt`, `completion`."""
    turn = pl.concat_list(
        pl.struct(pl.lit("assistant").alias("role"), answer.cast(pl.String).alias("content"))
    )
    return df.with_columns(
        pl.concat_list(pl.col("_prompt"), turn).alias("messages"),
        pl.col("_prompt").alias("prompt"),
        turn.alias("completion"),
    )


# ------------------------------------------------------------------------------------------------
# SQL
# ------------------------------------------------------------------------------------------------


def open_sql_sandbox(task: Any, schema_files: list[Path], db_dir: Path, workers: int | None = None) -> Any:
    """Build each schema's database (once, under db_dir) and start a sandbox for the task."""
    from distill.tasks.sql import SqlSandbox, build_databases

    if not schema_files:
        raise ValueError(f"task.schemas {task.schemas!r} matches no file; fix the glob")
    dbs = build_databases(schema_files, db_dir, task.engine)
    return SqlSandbox(
        dbs,
        dialect=task.dialect,
        timeout_s=task.timeout_s,
        max_rows=task.max_rows,
        workers=workers or task.workers,
        engine=task.engine,
        execute_via_duckdb=task.execute_via_duckdb,
        allowed_statements=task.allowed_statements,
        memory_limit=getattr(task, "memory_limit", "512MB"),
    )


def _schema_column(df: pl.DataFrame, schemas: list[str], column: str = "schema") -> list[str | None]:
    if column in df.columns:
        return df[column].cast(pl.String).to_list()
    if len(schemas) == 1:
        return [schemas[0]] * df.height
    raise ValueError(
        f"the rows have no `{column}` column and the task has {len(schemas)} schemas "
        f"({', '.join(sorted(schemas))}); add a `{column}` column naming each row's schema"
    )


def verify_sql(
    df: pl.DataFrame,
    sandbox: Any,
    pick: str = "last",
    progress: Callable[[int], None] | None = None,
) -> pl.DataFrame:
    """Extract, check and execute each row's `_completion`; add the sql verifier columns (and
    `_ref_*` columns for `_reference` when present)."""
    from distill.tasks.sql import extract_sql

    schemas = _schema_column(df, list(sandbox.settings["db_files"]))
    sqls = [extract_sql(t, pick) for t in df["_completion"].to_list()]

    def tick(_i: int, _r: Any) -> None:
        if progress is not None:
            progress(1)

    res = sandbox.run_many(list(zip(schemas, sqls, strict=True)), on_result=tick, keep_rows=False)
    out = df.with_columns(
        pl.Series("sql", sqls, dtype=pl.String),
        pl.Series("verdict", ["pass" if r.ok else r.error_type for r in res], dtype=pl.String),
        pl.Series("error", [r.error for r in res], dtype=pl.String),
        pl.Series("result_hash", [r.result_hash for r in res], dtype=pl.String),
        pl.Series("ordered_hash", [r.ordered_hash for r in res], dtype=pl.String),
        pl.Series("ordered", [r.ordered for r in res], dtype=pl.Boolean),
        pl.Series("executed", [r.executed for r in res], dtype=pl.Boolean),
        pl.Series("sql_canonical", [r.canonical for r in res], dtype=pl.String),
        pl.Series("sql_template", [r.template for r in res], dtype=pl.String),
        pl.Series("parser", [r.parser if r.ok else None for r in res], dtype=pl.String),
        pl.Series("agree_key", [r.agreement_key for r in res], dtype=pl.String),
    )
    if "_reference" in out.columns:
        out = _sql_reference(out, schemas, sandbox)
    return out


def _sql_reference(df: pl.DataFrame, schemas: list[str | None], sandbox: Any) -> pl.DataFrame:
    """Execute each distinct (schema, reference SQL) once; add _ref_ok/_ref_key/_ref_ordered(_hash)."""
    refs = df["_reference"].to_list()
    uniq = sorted({(s, r) for s, r in zip(schemas, refs, strict=True) if r}, key=lambda x: (str(x[0]), x[1]))
    got = dict(zip(uniq, sandbox.run_many(uniq, keep_rows=False), strict=True)) if uniq else {}
    rows = [got.get((s, r)) if r else None for s, r in zip(schemas, refs, strict=True)]
    return df.with_columns(
        pl.Series("_ref_present", [r is not None for r in rows], dtype=pl.Boolean),
        pl.Series("_ref_ok", [bool(r and r.ok) for r in rows], dtype=pl.Boolean),
        pl.Series("_ref_key", [r.agreement_key if r else None for r in rows], dtype=pl.String),
        pl.Series(
            "_ref_ordered", [bool(r and r.ok and r.ordered and r.executed) for r in rows], dtype=pl.Boolean
        ),
        pl.Series("_ref_ordered_hash", [r.ordered_hash if r else None for r in rows], dtype=pl.String),
        pl.Series("_ref_error", [r.error if r else None for r in rows], dtype=pl.String),
    )


# ------------------------------------------------------------------------------------------------
# JSON
# ------------------------------------------------------------------------------------------------


def verify_json(df: pl.DataFrame, validator: Any) -> pl.DataFrame:
    from distill.tasks.json_task import check_json

    res = [check_json(t, validator) for t in df["_completion"].to_list()]
    out = df.with_columns(
        pl.Series("json", [r.canonical for r in res], dtype=pl.String),
        pl.Series("verdict", ["pass" if r.ok else r.error_type for r in res], dtype=pl.String),
        pl.Series("error", [r.error for r in res], dtype=pl.String),
        pl.Series("result_hash", [r.value_hash for r in res], dtype=pl.String),
        pl.Series("agree_key", [r.value_hash if r.ok else None for r in res], dtype=pl.String),
    )
    if "_reference" in out.columns:
        refs = [check_json(t, None) if t else None for t in out["_reference"].to_list()]
        out = out.with_columns(
            pl.Series("_ref_present", [r is not None for r in refs], dtype=pl.Boolean),
            pl.Series("_ref_ok", [bool(r and r.ok) for r in refs], dtype=pl.Boolean),
            pl.Series("_ref_key", [r.value_hash if r else None for r in refs], dtype=pl.String),
            pl.Series("_ref_ordered", [False] * len(refs), dtype=pl.Boolean),
            pl.Series("_ref_ordered_hash", [None] * len(refs), dtype=pl.String),
            pl.Series("_ref_error", [r.error if r else None for r in refs], dtype=pl.String),
        )
    return out


def verify_none(df: pl.DataFrame) -> pl.DataFrame:
    """No verifier: every candidate passes; agreement compares whitespace-normalized text."""
    key = pl.col("_completion").str.replace_all(r"\s+", " ").str.strip_chars()
    return df.with_columns(
        pl.lit("pass").alias("verdict"),
        pl.lit(None, dtype=pl.String).alias("error"),
        key.hash().cast(pl.String).alias("agree_key"),
    )


# ------------------------------------------------------------------------------------------------
# agreement
# ------------------------------------------------------------------------------------------------


def agreement(df: pl.DataFrame, mode: str, min_votes: int = 1, group: str = "id") -> pl.DataFrame:
    """Add `votes`, `agreement` and `agree_fail` to rows whose verdict is pass (others get nulls).

    - majority: the prompt's (`group`) agree_key with the most passing votes wins if it is the only
      one with that count and has >= min_votes; others fail with disagrees_majority, and every
      candidate of a prompt without a winner fails with no_majority.
    - reference: a candidate agrees when its agree_key equals the reference's (and, when the
      reference SQL has ORDER BY, its rows come in the same order): else wrong_result; a reference
      that does not run fails its candidates with reference_failed; no reference -> no_reference.
    - auto: reference for rows that have one, majority for the others.
    - none: every passing candidate agrees.
    """
    passing = pl.col("verdict") == "pass"
    votes = pl.when(passing).then(pl.len().over(group, "agree_key")).otherwise(None)
    out = df.with_columns(votes.cast(pl.Int64).alias("votes"))
    if mode == "none":
        return out.with_columns(
            pl.when(passing).then(pl.lit("none")).alias("agreement"),
            pl.lit(None, dtype=pl.String).alias("agree_fail"),
        )
    # majority winner per prompt
    counts = (
        out.filter(pl.col("verdict") == "pass")
        .group_by(group, "agree_key")
        .agg(pl.len().alias("n"))
        .with_columns(
            pl.col("n").max().over(group).alias("top"),
            (pl.col("n") == pl.col("n").max().over(group)).sum().over(group).alias("n_top"),
        )
        .filter((pl.col("n") == pl.col("top")) & (pl.col("n_top") == 1) & (pl.col("n") >= min_votes))
        .select(group, pl.col("agree_key").alias("_majority"))
    )
    out = out.join(counts, on=group, how="left")
    maj_fail = (
        pl.when(pl.col("_majority").is_null())
        .then(pl.lit("no_majority"))
        .when(pl.col("agree_key") != pl.col("_majority"))
        .then(pl.lit("disagrees_majority"))
    )
    has_ref = "_ref_present" in out.columns
    if has_ref:
        ref_fail = (
            pl.when(~pl.col("_ref_present"))
            .then(pl.lit("no_reference"))
            .when(~pl.col("_ref_ok"))
            .then(pl.lit("reference_failed"))
            .when(pl.col("agree_key") != pl.col("_ref_key"))
            .then(pl.lit("wrong_result"))
            .when(pl.col("_ref_ordered") & (pl.col("ordered_hash") != pl.col("_ref_ordered_hash")))
            .then(pl.lit("wrong_result"))
        )
    fail: Any
    how: Any
    if mode == "majority" or (mode == "auto" and not has_ref):
        fail, how = maj_fail, pl.lit("majority")
    elif mode == "reference":
        if not has_ref:
            raise ValueError("agreement: reference needs a reference column in the input")
        fail, how = ref_fail, pl.lit("reference")
    elif mode == "auto":
        use_ref = pl.col("_ref_present")
        fail = pl.when(use_ref).then(ref_fail).otherwise(maj_fail)
        how = pl.when(use_ref).then(pl.lit("reference")).otherwise(pl.lit("majority"))
    else:
        raise ValueError(f"unknown agreement mode {mode!r}")
    return out.with_columns(
        pl.when(passing).then(how).alias("agreement"),
        pl.when(passing).then(fail).cast(pl.String).alias("agree_fail"),
    ).drop("_majority")
