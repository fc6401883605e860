"""Each filter drops what it should, with its reason, through the funnel."""

from __future__ import annotations

import polars as pl
import pytest

from distill.curate import filters as F
from distill.curate.funnel import Funnel

TEXTS = {
    "ok": "SELECT name FROM customers WHERE city = 'Paris' ORDER BY name",
    "blank": "   \n\t ",
    "short": "SELECT 1",
    "refuse": "I'm sorry, but I can't help with that request.",
    "refuse2": "As an AI language model, I cannot write that query.",
    "filler": "Here you go: SELECT 1 FROM t. I hope this helps! Feel free to ask more.",
    "loop": " ".join(["the query the query the query"] * 10),
    "french": "Voici la requête qui renvoie les clients qui habitent à Paris, triés par leur nom de famille.",
    "english": "Here is the query that returns the customers who live in Paris, sorted by their last name.",
}


def frame() -> pl.DataFrame:
    keys = list(TEXTS)
    return pl.DataFrame(
        {
            "key": keys,
            "completion": [TEXTS[k] for k in keys],
            "finish_reason": ["length" if k == "ok" else "stop" for k in keys],
            "completion_tokens": [len(TEXTS[k].split()) for k in keys],
            "error": [None] * len(keys),
        },
        schema_overrides={"error": pl.String},
    ).vstack(
        pl.DataFrame(
            {
                "key": ["null"],
                "completion": [None],
                "finish_reason": [None],
                "completion_tokens": [0],
                "error": ["RuntimeError: boom"],
            },
            schema={
                "key": pl.String,
                "completion": pl.String,
                "finish_reason": pl.String,
                "completion_tokens": pl.Int64,
                "error": pl.String,
            },
        )
    )


def dropped_keys(check: F.Check, df: pl.DataFrame | None = None) -> dict[str, str | None]:
    f = Funnel(df if df is not None else frame())
    f.drop("t", check.drop, check.reason, check.detail)
    d = f.dropped()
    assert set(d["reason"].to_list()) <= {check.reason}
    return dict(zip(d["key"].to_list(), d["detail"].to_list(), strict=True))


def test_empty() -> None:
    assert set(dropped_keys(F.empty("completion"))) == {"blank", "null"}


def test_length_bounds() -> None:
    assert set(dropped_keys(F.min_chars("completion", 10))) == {"blank", "short"}
    got = dropped_keys(F.max_chars("completion", 85))
    assert set(got) == {"loop", "french", "english"} and got["loop"].endswith("chars > 85")
    assert set(dropped_keys(F.min_tokens("completion_tokens", 3))) == {"blank", "short", "null"}
    assert set(dropped_keys(F.max_tokens("completion_tokens", 16))) == {"loop", "french", "english"}


def test_truncated_and_errors() -> None:
    assert dropped_keys(F.truncated("finish_reason")) == {"ok": "finish_reason=length"}
    assert dropped_keys(F.generation_error("error")) == {"null": "RuntimeError: boom"}


def test_refusal_and_boilerplate() -> None:
    got = dropped_keys(F.refusal("completion"))
    assert set(got) == {"refuse", "refuse2"}
    assert got["refuse"] == "I'm sorry, but I can't"
    assert set(dropped_keys(F.boilerplate("completion"))) == {"filler"}
    assert set(dropped_keys(F.refusal("completion", [r"\bParis\b"]))) == {"ok", "french", "english"}


def test_regex_must_and_must_not() -> None:
    must = dropped_keys(F.must_match("completion", r"(?i)\bselect\b"))
    assert set(must) == {
        "blank",
        "refuse",
        "refuse2",
        "loop",
        "french",
        "english",
    }  # nulls are kept (no text to judge)
    assert set(dropped_keys(F.must_not_match("completion", r"ORDER BY"))) == {"ok"}
    with pytest.raises(Exception, match="unterminated|missing"):
        F.must_match("completion", "([a-z")


def test_repetitive() -> None:
    assert set(dropped_keys(F.repetitive("completion", 0.5))) == {"loop"}


def test_language() -> None:
    got = dropped_keys(
        F.language("completion", "en", 0.5), frame().filter(pl.col("key").is_in(["french", "english"]))
    )
    assert set(got) == {"french"} and got["french"].startswith("fr:")
    assert (
        dropped_keys(
            F.language("completion", ["en", "fr"]), frame().filter(pl.col("key").is_in(["french", "english"]))
        )
        == {}
    )


def test_json_invalid() -> None:
    df = pl.DataFrame(
        {
            "key": ["a", "b", "c", "d"],
            "completion": ['{"x": 1}', '```json\n{"x": "one"}\n```', "{x: 1}", "no json here"],
        }
    )
    schema = {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}
    got = dropped_keys(F.json_invalid("completion", schema), df)
    assert got == {"b": "json_schema_error", "c": "json_parse_error", "d": "json_parse_error"}


def test_funnel_counts_and_order() -> None:
    f = Funnel(frame())
    for c in (
        F.generation_error("error"),
        F.empty("completion"),
        F.truncated("finish_reason"),
        F.refusal("completion"),
    ):
        f.drop(f"filter:{c.reason}", c.drop, c.reason, c.detail)
    m = f.metrics()
    assert m["rows_in"] == 10 and m["rows_out"] == 10 - 5
    assert list(m["dropped"].items()) == [
        ("generation_error", 1),
        ("empty", 1),
        ("truncated", 1),
        ("refusal", 2),
    ]
    assert [s["rows"] for s in m["steps"]] == [9, 8, 7, 5]
    d = f.dropped()
    assert (
        d.height == 5
        and d["__row"].is_sorted()
        and set(d.columns) >= {"reason", "detail", "step", "completion"}
    )
