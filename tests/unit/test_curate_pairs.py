"""Agreement (majority / reference) and pair building from verified candidates."""

from __future__ import annotations

import polars as pl

from distill.curate.pairs import build_pairs
from distill.curate.verify import agreement


def cands(rows: list[tuple[str, int, str, str | None]]) -> pl.DataFrame:
    """(id, sample, verdict, agree_key) -> a verified frame."""
    return pl.DataFrame(
        {
            "id": [r[0] for r in rows],
            "sample": [r[1] for r in rows],
            "verdict": [r[2] for r in rows],
            "agree_key": [r[3] for r in rows],
            "ordered_hash": [r[3] for r in rows],
        },
        schema={
            "id": pl.String,
            "sample": pl.Int64,
            "verdict": pl.String,
            "agree_key": pl.String,
            "ordered_hash": pl.String,
        },
    )


def test_majority() -> None:
    df = cands(
        [
            ("a", 0, "pass", "X"),
            ("a", 1, "pass", "X"),
            ("a", 2, "pass", "Y"),
            ("a", 3, "exec_error", None),
            ("b", 0, "pass", "X"),
            ("b", 1, "pass", "Y"),  # a tie: nobody wins
            ("c", 0, "pass", "Z"),
        ]
    )
    out = agreement(df, "majority", min_votes=1).sort("id", "sample")
    assert out["agree_fail"].to_list() == [
        None,
        None,
        "disagrees_majority",
        None,
        "no_majority",
        "no_majority",
        None,
    ]
    assert out["votes"].to_list() == [2, 2, 1, None, 1, 1, 1]
    strict = agreement(df, "majority", min_votes=2).sort("id", "sample")
    assert strict["agree_fail"].to_list()[-1] == "no_majority"  # one vote is not enough


def test_reference_and_auto() -> None:
    df = cands(
        [
            ("a", 0, "pass", "X"),
            ("a", 1, "pass", "Y"),
            ("b", 0, "pass", "Y"),
            ("b", 1, "pass", "Y"),
            ("c", 0, "pass", "Q"),
        ]
    )
    df = df.with_columns(
        pl.Series("_ref_present", [True, True, True, True, False]),
        pl.Series("_ref_ok", [True, True, False, False, False]),
        pl.Series("_ref_key", ["Y", "Y", None, None, None]),
        pl.Series("_ref_ordered", [False] * 5),
        pl.Series("_ref_ordered_hash", [None] * 5, dtype=pl.String),
    )
    ref = agreement(df, "reference").sort("id", "sample")
    assert ref["agree_fail"].to_list() == [
        "wrong_result",
        None,
        "reference_failed",
        "reference_failed",
        "no_reference",
    ]
    auto = agreement(df, "auto").sort("id", "sample")
    assert auto["agree_fail"].to_list() == [
        "wrong_result",
        None,
        "reference_failed",
        "reference_failed",
        None,
    ]
    assert auto["agreement"].to_list() == ["reference"] * 4 + ["majority"]


def test_reference_order_matters_when_reference_is_ordered() -> None:
    df = cands([("a", 0, "pass", "X"), ("a", 1, "pass", "X")]).with_columns(
        pl.Series("ordered_hash", ["o1", "o2"]),
        pl.lit(True).alias("_ref_present"),
        pl.lit(True).alias("_ref_ok"),
        pl.lit("X").alias("_ref_key"),
        pl.lit(True).alias("_ref_ordered"),
        pl.lit("o1").alias("_ref_ordered_hash"),
    )
    assert agreement(df, "reference").sort("sample")["agree_fail"].to_list() == [None, "wrong_result"]


def test_build_pairs() -> None:
    prompt = [{"role": "user", "content": "q"}]
    rows = []
    for pid in ("p1", "p2", "p3"):
        for s, (ans, failure) in enumerate(
            {
                "p1": [
                    ("good A", None),
                    ("bad 1", "parse_error"),
                    ("good B", None),
                    ("bad 2", "wrong_result"),
                    ("bad 3", "exec_error"),
                ],
                "p2": [("good", None), ("good", None)],  # nothing fails: no pair
                "p3": [("good", None), ("good", "wrong_result")],  # identical texts: no pair
            }[pid]
        ):
            rows.append(
                {
                    "id": pid,
                    "sample": s,
                    "_prompt": prompt,
                    "_answer": ans,
                    "failure": failure,
                    "verdict": "pass" if failure is None else failure,
                }
            )
    df = pl.DataFrame(rows)
    chosen = df.filter(pl.col("failure").is_null())
    rejected = df.filter(pl.col("failure").is_not_null())
    one = build_pairs(chosen, rejected, per_prompt=1, chosen_cols=("verdict",))
    assert one.height == 1
    r = one.row(0, named=True)
    # the most informative failure first: a wrong result beats an error
    assert r["rejected_failure"] == "wrong_result" and r["rejected"][0]["content"] == "bad 2"
    assert r["chosen"] == [{"role": "assistant", "content": "good A"}] and r["chosen_verdict"] == "pass"
    assert r["prompt"] == prompt
    three = build_pairs(chosen, rejected, per_prompt=3)
    assert three["rejected_failure"].to_list() == [
        "parse_error",
        "wrong_result",
        "exec_error",
    ]  # sorted by rejected sample
    # chosen answers cycle over the available correct ones
    assert sorted(c[0]["content"] for c in three["chosen"]) == ["good A", "good A", "good B"]
    custom = build_pairs(chosen, rejected, per_prompt=1, priority=["parse_error"])
    assert custom["rejected_failure"].to_list() == ["parse_error"]


def test_score_pairs() -> None:
    from distill.curate.pairs import score_pairs

    prompt = [{"role": "user", "content": "q"}]
    rows = [
        ("a", 0, 7.0, "x"),
        ("a", 1, 9.0, "y"),
        ("a", 2, None, "z"),  # unparsed judgement: ignored
        ("a", 3, 2.0, "w"),
        ("b", 0, 5.0, "x"),
        ("b", 1, 5.5, "y"),  # below the margin
        ("c", 0, 8.0, "same"),
        ("c", 1, 1.0, "same"),  # identical answers
    ]
    df = pl.DataFrame(
        {
            "id": [r[0] for r in rows],
            "sample": [r[1] for r in rows],
            "score": [r[2] for r in rows],
            "_answer": [r[3] for r in rows],
            "_prompt": [prompt] * len(rows),
        }
    )
    out = score_pairs(df, min_margin=1.0)
    assert out.height == 1
    r = out.row(0, named=True)
    assert (r["id"], r["chosen_sample"], r["rejected_sample"], r["chosen_score"], r["rejected_score"]) == (
        "a",
        1,
        3,
        9.0,
        2.0,
    )
    assert (
        r["chosen"][0]["content"] == "y"
        and r["rejected"][0]["content"] == "w"
        and r["rejected_failure"] == "judge_lower"
    )
    assert score_pairs(df, min_margin=0.5)["id"].to_list() == ["a", "b"]
