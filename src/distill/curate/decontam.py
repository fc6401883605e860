"""Decontamination: find training rows that overlap an evaluation set.

Two independent tests, each reported with its own drop reason:
- `contaminated_ngram`: the training text shares at least `min_overlap` word n-grams (lower-cased
  `\\w+` tokens, `ngram` long; a text shorter than `ngram` words is one n-gram) with some
  evaluation text. The n-grams are hashed to 64 bits and matched with a sorted-array membership
  test, so an eval set of any size costs one pass.
- `contaminated_sql`: the training SQL has the same sqlglot canonical form as some evaluation
  SQL (literals kept, or replaced by `?` with `parameterize`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from distill.curate import minhash


def ngram_set(texts: pl.Series | Sequence[str], ngram: int, seed: int = 0) -> np.ndarray:
    """Sorted unique uint64 hashes of the word n-grams of all `texts`."""
    tok, off = minhash.token_hashes(texts if isinstance(texts, pl.Series) else list(texts), "word", seed)
    _, h = minhash.ngram_hashes(tok, off, ngram)
    return np.unique(h)


def ngram_overlap(
    texts: pl.Series | Sequence[str], eval_ngrams: np.ndarray, ngram: int, seed: int = 0
) -> np.ndarray:
    """Number of n-grams of each text found in `eval_ngrams` (from `ngram_set`)."""
    tok, off = minhash.token_hashes(texts if isinstance(texts, pl.Series) else list(texts), "word", seed)
    doc, h = minhash.ngram_hashes(tok, off, ngram)
    n = len(off) - 1
    if len(eval_ngrams) == 0 or len(h) == 0:
        return np.zeros(n, dtype=np.int64)
    pos = np.searchsorted(eval_ngrams, h)
    pos = np.minimum(pos, len(eval_ngrams) - 1)
    hit = eval_ngrams[pos] == h
    return np.bincount(doc[hit], minlength=n).astype(np.int64)


def sql_canonical_set(sqls: Sequence[str | None], dialect: str, parameterize: bool) -> set[str]:
    from distill.tasks.sql import canonical_sql

    return {canonical_sql(s, dialect, parameterize) for s in sqls if s}


def read_eval_records(path: Path) -> list[dict[str, Any]]:
    """Rows of an evaluation file: JSON Lines, a JSON array, parquet or CSV."""
    name = path.name.lower()
    if name.endswith((".jsonl", ".ndjson")):
        rows = []
        for i, ln in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not ln.strip():
                continue
            try:
                rows.append(json.loads(ln))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: not valid JSON ({e.msg})") from None
        return rows
    if name.endswith(".json"):
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict):
            data = next((v for v in data.values() if isinstance(v, list)), [data])
        return list(data)
    if name.endswith(".parquet"):
        return pl.read_parquet(path).to_dicts()
    if name.endswith(".csv"):
        return pl.read_csv(path).to_dicts()
    raise ValueError(f"{path}: unknown eval file format; use .jsonl, .json, .parquet or .csv")
