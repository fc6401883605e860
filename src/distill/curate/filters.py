"""Row filters: each is a pure function returning a `Check` — a Polars expression that is true for
the rows to drop, and the reason recorded for them in `dropped.parquet`.

Nulls in a check's expression mean "keep" (the funnel fills them with false). All checks are
vectorized Polars expressions except `language`, which calls a language identifier per row.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import polars as pl

# Refusals as instruction-tuned teachers phrase them. Case-insensitive, searched anywhere.
REFUSAL_PATTERNS: tuple[str, ...] = (
    r"\bI(?:'m| am) (?:sorry|afraid),? but I (?:can(?:'|no)?t|cannot|won't|will not|am unable|'m unable|am not able)\b",
    r"\bI (?:can(?:'|no)?t|cannot|won't|will not|am unable to|'m unable to|am not able to) (?:help|assist|provide|comply|fulfil+|do that|answer|write|generate)\b",
    r"\bas an AI(?: language model| assistant| model)?,? I\b",
    r"\bI (?:must|have to) (?:decline|refuse)\b",
    r"\b(?:sorry|unfortunately),? (?:but )?(?:I|this) (?:can(?:'|no)?t|cannot|is not possible)\b",
)

# Chatty filler that teaches a student nothing but the habit of saying it.
BOILERPLATE_PATTERNS: tuple[str, ...] = (
    r"\bI hope (?:this|that) helps\b",
    r"\b(?:feel free to|don't hesitate to) (?:ask|reach out|let me know)\b",
    r"\blet me know if you (?:have|need) any (?:other|more|further) (?:questions|help)\b",
    r"\bas of my (?:last )?knowledge cutoff\b",
)


@dataclass(frozen=True)
class Check:
    reason: str
    drop: pl.Expr
    detail: pl.Expr | None = None


def _text(col: str | pl.Expr) -> pl.Expr:
    return pl.col(col) if isinstance(col, str) else col


def empty(col: str | pl.Expr) -> Check:
    """Null, empty or whitespace-only text."""
    t = _text(col)
    return Check("empty", t.is_null() | (t.str.strip_chars().str.len_chars() == 0))


def min_chars(col: str | pl.Expr, n: int) -> Check:
    t = _text(col)
    return Check(
        "too_short",
        t.str.strip_chars().str.len_chars() < n,
        pl.format("{} chars < {}", t.str.strip_chars().str.len_chars(), pl.lit(n)),
    )


def max_chars(col: str | pl.Expr, n: int) -> Check:
    t = _text(col)
    return Check("too_long", t.str.len_chars() > n, pl.format("{} chars > {}", t.str.len_chars(), pl.lit(n)))


def min_tokens(tokens_col: str, n: int) -> Check:
    t = pl.col(tokens_col)
    return Check("too_few_tokens", t < n, pl.format("{} tokens < {}", t, pl.lit(n)))


def max_tokens(tokens_col: str, n: int) -> Check:
    t = pl.col(tokens_col)
    return Check("too_many_tokens", t > n, pl.format("{} tokens > {}", t, pl.lit(n)))


def truncated(finish_col: str = "finish_reason") -> Check:
    """The generation stopped for another reason than its stop condition (`length` = token limit)."""
    f = pl.col(finish_col)
    return Check("truncated", f.is_not_null() & (f != "stop"), pl.format("finish_reason={}", f))


def generation_error(error_col: str = "error") -> Check:
    e = pl.col(error_col)
    return Check("generation_error", e.is_not_null(), e)


def _any_pattern(patterns: Sequence[str]) -> str:
    for p in patterns:
        re.compile(p)  # a bad pattern fails here with Python's message, naming it
    return "(?i)(?:" + "|".join(f"(?:{p})" for p in patterns) + ")"


def refusal(col: str | pl.Expr, patterns: Sequence[str] = REFUSAL_PATTERNS) -> Check:
    t = _text(col)
    pat = _any_pattern(patterns)
    return Check("refusal", t.str.contains(pat), t.str.extract(f"({pat})", 1))


def boilerplate(col: str | pl.Expr, patterns: Sequence[str] = BOILERPLATE_PATTERNS) -> Check:
    t = _text(col)
    pat = _any_pattern(patterns)
    return Check("boilerplate", t.str.contains(pat), t.str.extract(f"({pat})", 1))


def must_match(col: str | pl.Expr, pattern: str) -> Check:
    """Drop rows whose text does NOT match `pattern` (a regex; use (?i) for case-insensitive)."""
    re.compile(pattern)
    t = _text(col)
    return Check("missing_pattern", ~t.str.contains(pattern), pl.lit(f"does not match {pattern}"))


def must_not_match(col: str | pl.Expr, pattern: str) -> Check:
    re.compile(pattern)
    t = _text(col)
    return Check("forbidden_pattern", t.str.contains(pattern), pl.lit(f"matches {pattern}"))


def repetitive(col: str | pl.Expr, max_repeat: float, min_words: int = 20) -> Check:
    """Degenerate loops: the share of repeated words (1 - distinct/total over lower-cased `\\w+`
    words) above `max_repeat`, for texts of at least `min_words` words."""
    words = _text(col).str.to_lowercase().str.extract_all(r"\w+")
    n = words.list.len()
    ratio = 1 - words.list.n_unique() / n
    return Check(
        "repetitive", (n >= min_words) & (ratio > max_repeat), pl.format("repeat ratio {}", ratio.round(3))
    )


def language(col: str | pl.Expr, lang: str | Sequence[str], min_prob: float = 0.5) -> Check:
    """Drop text whose identified language is not `lang` (ISO 639-1, or a list of them) with
    probability >= `min_prob`. Uses py3langid (a compact naive-Bayes identifier over byte
    n-grams, ~97 languages); very short texts are unreliable, so pair it with a length bound."""
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    ident = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
    wanted = {lang} if isinstance(lang, str) else set(lang)

    def detect(s: pl.Series) -> pl.Series:
        out: list[str | None] = []
        for text in s.to_list():
            if text is None or not text.strip():
                out.append(None)
                continue
            code, prob = ident.classify(text)
            out.append(None if (code in wanted and prob >= min_prob) else f"{code}:{prob:.2f}")
        return pl.Series(out, dtype=pl.String)

    found = _text(col).map_batches(detect, return_dtype=pl.String)
    return Check("wrong_language", found.is_not_null(), found)


def json_invalid(col: str | pl.Expr, schema: dict | None = None) -> Check:
    """Text that is not JSON (after extraction from a fenced block), or not valid under `schema`."""
    from distill.tasks.json_task import check_json, make_validator

    validator = make_validator(schema) if schema is not None else None

    def run(s: pl.Series) -> pl.Series:
        return pl.Series([check_json(t, validator).error_type for t in s.to_list()], dtype=pl.String)

    err = _text(col).map_batches(run, return_dtype=pl.String)
    return Check("invalid_json", err.is_not_null(), err)
