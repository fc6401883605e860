"""Exact and near-duplicate removal on a column, and the `distill dedup` command.

Exact: rows whose normalized text equals an earlier row's are duplicates. Normalization steps,
applied in the order given: `nfkc` (Unicode NFKC), `lower`, `whitespace` (runs collapsed, ends
stripped), `punctuation` (non-word, non-space characters removed), `sql` (sqlglot canonical form,
literals kept), `sql_template` (canonical form with literals replaced by `?`).

Near: MinHash LSH clusters (see `distill.curate.minhash`); the rule for which row of a cluster
is kept is the same for both: the first row (lowest input index).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from distill.curate import minhash

NORMALIZE_STEPS = ("nfkc", "lower", "whitespace", "punctuation", "sql", "sql_template")


def normalized(expr: pl.Expr, steps: Sequence[str], dialect: str = "duckdb") -> pl.Expr:
    """The normalization of an expression (a string column) by `steps`, in order."""
    e = expr.cast(pl.String)
    for step in steps:
        if step == "nfkc":
            e = e.str.normalize("NFKC")
        elif step == "lower":
            e = e.str.to_lowercase()
        elif step == "whitespace":
            e = e.str.replace_all(r"\s+", " ").str.strip_chars()
        elif step == "punctuation":
            e = e.str.replace_all(r"[^\w\s]", "")
        elif step in ("sql", "sql_template"):
            from distill.tasks.sql import canonical_sql

            param = step == "sql_template"

            def canon(s: str, p: bool = param) -> str:
                return canonical_sql(s, dialect, parameterize_literals=p)

            e = e.map_elements(canon, return_dtype=pl.String)
        else:
            raise ValueError(f"unknown normalization {step!r}; choose from {', '.join(NORMALIZE_STEPS)}")
    return e


def exact_first_index(df: pl.DataFrame, key: pl.Expr) -> pl.Series:
    """For each row, the position of the first row with the same key (itself if it is the first);
    null keys are never duplicates."""
    idx = pl.col("__pos")
    return (
        df.select(key.alias("__key"))
        .with_row_index("__pos")
        .select(
            pl.when(pl.col("__key").is_null()).then(idx).otherwise(idx.first().over("__key")).cast(pl.Int64)
        )
        .to_series()
    )


@dataclass
class DedupReport:
    rows_in: int
    rows_out: int
    clusters: int
    duplicate_clusters: int
    candidates: int
    verified_pairs: int
    bands: int
    rows_per_band: int
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def near_dedup_frame(
    df: pl.DataFrame,
    column: str,
    threshold: float = 0.8,
    ngram: int = 5,
    num_perm: int = 128,
    seed: int = 0,
    shingle: str = "word",
) -> tuple[np.ndarray, np.ndarray, minhash.NearDuplicates]:
    """(cluster representative row index per row, kept mask, details) for `df[column]`."""
    if column not in df.columns:
        raise ValueError(f"column {column!r} not found; columns are: {', '.join(df.columns)}")
    texts = df[column]
    if texts.dtype != pl.String:
        texts = texts.cast(pl.String)
    nd = minhash.near_duplicates(texts, threshold, ngram, num_perm, seed, shingle)
    return nd.cluster, nd.kept, nd


# ------------------------------------------------------------------------------------------------
# the `distill dedup` command
# ------------------------------------------------------------------------------------------------


def read_table(path: Path) -> pl.DataFrame:
    """Parquet, or JSON Lines (.jsonl/.ndjson, optionally .gz), or a JSON array (.json)."""
    name = path.name.lower()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if name.endswith(".parquet"):
        return pl.read_parquet(path)
    if name.endswith((".jsonl", ".ndjson", ".jsonl.gz", ".ndjson.gz")):
        if name.endswith(".gz"):
            import gzip

            with gzip.open(path, "rb") as f:
                data = f.read()
            return pl.read_ndjson(data, infer_schema_length=None)
        return pl.read_ndjson(path, infer_schema_length=None)
    if name.endswith(".json"):
        import json

        rows = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(rows, list):
            raise ValueError(f"{path}: expected a JSON array of objects")
        return pl.DataFrame(rows, infer_schema_length=None)
    raise ValueError(f"{path}: unknown format; use .parquet, .jsonl/.ndjson or .json")


def write_table(df: pl.DataFrame, path: Path) -> None:
    name = path.name.lower()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    if name.endswith(".parquet"):
        df.write_parquet(tmp)
    elif name.endswith((".jsonl", ".ndjson")):
        df.write_ndjson(tmp)
    else:
        raise ValueError(f"{path}: unknown output format; use .parquet or .jsonl")
    tmp.replace(path)


def dedup_file(
    input_path: Path,
    column: str,
    out: Path,
    id_column: str | None = None,
    clusters_out: Path | None = None,
    threshold: float = 0.8,
    ngram: int = 5,
    num_perm: int = 128,
    seed: int = 0,
    shingle: str = "word",
) -> DedupReport:
    """Read a table, remove near-duplicates of `column`, write the kept rows to `out` and (if
    given) `clusters_out` with one row per input row: id, cluster (the id of the row kept for
    its cluster), kept."""
    t0 = time.perf_counter()
    df = read_table(input_path)
    if column not in df.columns:
        raise ValueError(f"{input_path}: no column {column!r}; columns are: {', '.join(df.columns)}")
    if id_column is not None:
        if id_column not in df.columns:
            raise ValueError(
                f"{input_path}: no id column {id_column!r}; columns are: {', '.join(df.columns)}"
            )
        ids = df[id_column]
        dup = ids.is_duplicated()
        if dup.any():
            first = int(dup.arg_true()[0])
            raise ValueError(
                f"{input_path}: --id-column {id_column}: row {first} repeats id {ids[first]!r}; ids must be unique"
            )
    else:
        ids = pl.Series("id", np.arange(df.height, dtype=np.int64))
    cluster, kept, nd = near_dedup_frame(df, column, threshold, ngram, num_perm, seed, shingle)
    write_table(df.filter(pl.Series(kept)), out)
    if clusters_out is not None:
        cl = pl.DataFrame({"id": ids, "cluster": ids.gather(cluster), "kept": kept})
        write_table(cl, clusters_out)
    sizes = np.bincount(cluster, minlength=df.height)
    return DedupReport(
        rows_in=df.height,
        rows_out=int(kept.sum()),
        clusters=int((sizes > 0).sum()),
        duplicate_clusters=int((sizes > 1).sum()),
        candidates=nd.candidates,
        verified_pairs=len(nd.pairs),
        bands=nd.bands,
        rows_per_band=nd.rows,
        seconds=round(time.perf_counter() - t0, 3),
    )
