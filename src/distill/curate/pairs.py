"""Preference pairs (TRL `prompt` / `chosen` / `rejected`) from verified candidates.

`build_pairs(chosen_pool, rejected_pool, per_prompt, priority)`: for each prompt `id`, the chosen
candidates (ranked by `sample`) are paired with the rejected ones (ranked by failure type in
`priority`, then `sample`): pair i = (chosen[i mod #chosen], rejected[i]) for i < per_prompt.
Rows need `id`, `sample`, `_prompt`, `_answer` and, for rejected ones, `failure`.
A pair whose two answers are the same text is skipped.

Failure types, most informative first (a wrong result teaches more than a syntax error):
wrong_result, disagrees_majority, exec_error, static_error, timeout, too_many_rows, parse_error,
disallowed, no_sql, json_schema_error, json_parse_error, no_json, empty, judge_lower.
"""

from __future__ import annotations

import polars as pl

DEFAULT_PRIORITY = (
    "wrong_result",
    "disagrees_majority",
    "exec_error",
    "static_error",
    "timeout",
    "too_many_rows",
    "parse_error",
    "disallowed",
    "no_sql",
    "json_schema_error",
    "json_parse_error",
    "no_json",
    "empty",
    "judge_lower",
)


def failure_rank(priority: tuple[str, ...] | list[str]) -> pl.Expr:
    mapping = {f: i for i, f in enumerate(priority)}
    return pl.col("failure").replace_strict(mapping, default=len(mapping), return_dtype=pl.Int64)


def build_pairs(
    chosen_pool: pl.DataFrame,
    rejected_pool: pl.DataFrame,
    per_prompt: int = 1,
    priority: tuple[str, ...] | list[str] = DEFAULT_PRIORITY,
    chosen_cols: tuple[str, ...] = (),
) -> pl.DataFrame:
    """Pairs in TRL conversational layout plus id, chosen_sample, rejected_sample,
    rejected_failure, and `chosen_<c>` for each name in chosen_cols."""
    ch = chosen_pool.with_columns(
        pl.int_range(pl.len()).over("id", order_by="sample").alias("_c_rank"),
        pl.len().over("id").alias("_n_chosen"),
    )
    rj = rejected_pool.with_columns(failure_rank(priority).alias("_prio")).with_columns(
        pl.int_range(pl.len()).over("id", order_by=["_prio", "sample"]).alias("_r_rank")
    )
    rj = rj.filter(pl.col("_r_rank") < per_prompt)
    n_chosen = ch.group_by("id").agg(pl.col("_n_chosen").first())
    rj = rj.join(n_chosen, on="id", how="inner").with_columns(
        (pl.col("_r_rank") % pl.col("_n_chosen")).alias("_c_rank")
    )
    keep_ch = ["id", "_c_rank", "_prompt", "_answer", "sample", *chosen_cols]
    joined = rj.select("id", "_c_rank", "_r_rank", "_answer", "sample", "failure").join(
        ch.select(keep_ch), on=["id", "_c_rank"], how="inner", suffix="_ch"
    )
    turn = lambda c: pl.concat_list(pl.struct(pl.lit("assistant").alias("role"), pl.col(c).alias("content")))  # noqa: E731
    out = joined.filter(pl.col("_answer") != pl.col("_answer_ch")).select(
        "id",
        pl.col("_prompt").alias("prompt"),
        turn("_answer_ch").alias("chosen"),
        turn("_answer").alias("rejected"),
        pl.col("sample_ch").alias("chosen_sample"),
        pl.col("sample").alias("rejected_sample"),
        pl.col("failure").alias("rejected_failure"),
        *[pl.col(c).alias(f"chosen_{c}") for c in chosen_cols],
    )
    return out.sort("id", "rejected_sample")


def score_pairs(scored: pl.DataFrame, min_margin: float = 1.0) -> pl.DataFrame:
    """Judge-ranked pairs: per prompt, chosen = the best `score` (ties: lowest sample), rejected =
    the worst (ties: highest sample), kept when the scores differ by at least `min_margin` and the
    answers differ. Rows need id, sample, score (null = unparsed, ignored), _prompt, _answer."""
    s = scored.filter(pl.col("score").is_not_null())
    best = (
        s.sort(["id", "score", "sample"], descending=[False, True, False])
        .group_by("id", maintain_order=True)
        .first()
    )
    worst = (
        s.sort(["id", "score", "sample"], descending=[False, False, True])
        .group_by("id", maintain_order=True)
        .first()
    )
    j = best.join(worst.select("id", "sample", "score", "_answer"), on="id", suffix="_rj").filter(
        (pl.col("score") - pl.col("score_rj") >= min_margin) & (pl.col("_answer") != pl.col("_answer_rj"))
    )
    turn = lambda c: pl.concat_list(pl.struct(pl.lit("assistant").alias("role"), pl.col(c).alias("content")))  # noqa: E731
    return j.select(
        "id",
        pl.col("_prompt").alias("prompt"),
        turn("_answer").alias("chosen"),
        turn("_answer_rj").alias("rejected"),
        pl.col("sample").alias("chosen_sample"),
        pl.col("sample_rj").alias("rejected_sample"),
        pl.format("judge:{}", pl.col("score")).alias("chosen_verdict"),
        pl.lit("judge_lower").alias("rejected_failure"),
        pl.col("score").alias("chosen_score"),
        pl.col("score_rj").alias("rejected_score"),
    ).sort("id")
