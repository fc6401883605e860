"""Exact and near-duplicate removal, checked against exact Jaccard on real near-duplicates."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

from distill.cli import app
from distill.curate import minhash
from distill.curate.dedup import dedup_file, exact_first_index, normalized, read_table

DATA = Path(__file__).resolve().parents[1] / "data" / "dedup_corpus"
WORD = re.compile(r"\w+")


def shingles(text: str, n: int) -> set[tuple[str, ...]]:
    """Word n-grams of lower-cased \\w+ tokens; a text shorter than n words is one shingle."""
    toks = WORD.findall(text.lower())
    if not toks:
        return set()
    if len(toks) < n:
        return {tuple(toks)}
    return {tuple(toks[i : i + n]) for i in range(len(toks) - n + 1)}


def exact_jaccard(texts: list[str], n: int) -> dict[tuple[int, int], float]:
    sets = [shingles(t, n) for t in texts]
    out = {}
    for i in range(len(sets)):
        for j in range(i + 1, len(sets)):
            a, b = sets[i], sets[j]
            inter = len(a & b)
            if inter:
                out[(i, j)] = inter / len(a | b)
    return out


@pytest.fixture(scope="module")
def docs() -> list[dict]:
    return [json.loads(ln) for ln in (DATA / "duckdb_docs_versions_sample.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------------
# exact
# ------------------------------------------------------------------------------------------------


def test_normalization_steps() -> None:
    df = pl.DataFrame({"t": ["Hello,  World!", "hello world", "HELLO\tWORLD!!", "ｈｅｌｌｏ world", None]})
    k = lambda steps: df.select(normalized(pl.col("t"), steps))["t"].to_list()  # noqa: E731
    assert k(["lower", "whitespace"]) == [
        "hello, world!",
        "hello world",
        "hello world!!",
        "ｈｅｌｌｏ world",
        None,
    ]
    assert k(["nfkc", "lower", "whitespace", "punctuation"]) == [
        "hello world",
        "hello world",
        "hello world",
        "hello world",
        None,
    ]
    sql = pl.DataFrame(
        {
            "s": [
                "select a from t where x = 1",
                "SELECT a\nFROM t WHERE x=1 -- c",
                "SELECT a FROM t WHERE x = 2",
            ]
        }
    )
    assert len(set(sql.select(normalized(pl.col("s"), ["sql"]))["s"])) == 2
    assert len(set(sql.select(normalized(pl.col("s"), ["sql_template"]))["s"])) == 1
    with pytest.raises(ValueError, match="unknown normalization"):
        normalized(pl.col("s"), ["stem"])


def test_exact_first_index() -> None:
    df = pl.DataFrame({"t": ["a", "b", "A ", "c", "b", None, None]})
    first = exact_first_index(df, normalized(pl.col("t"), ["lower", "whitespace"]))
    assert first.to_list() == [0, 1, 0, 3, 1, 5, 6]  # nulls are never duplicates


# ------------------------------------------------------------------------------------------------
# near
# ------------------------------------------------------------------------------------------------


def test_near_dedup_matches_exact_jaccard(docs: list[dict]) -> None:
    """Real near-duplicates (the same DuckDB doc page across versions): precision and recall of
    'same cluster' against exact Jaccard >= 0.7 on word 5-grams, and of what was removed."""
    texts = [d["text"] for d in docs]
    thr = 0.7
    jac = exact_jaccard(texts, 5)
    true = {p for p, v in jac.items() if v >= thr}
    assert len(true) > 300
    res = minhash.near_duplicates(texts, threshold=thr, ngram=5, num_perm=128, seed=0)
    n = len(texts)
    cl = res.cluster
    same = {(i, j) for i in range(n) for j in range(i + 1, n) if cl[i] == cl[j]}
    tp = len(same & true)
    precision, recall = tp / len(same), tp / len(true)
    assert precision >= 0.9 and recall >= 0.9, (precision, recall)
    # what was removed: each removed page has a true near-duplicate in its cluster, and pages with
    # an earlier true near-duplicate are removed
    removed = np.flatnonzero(~res.kept)
    justified = sum(
        any(jac.get((min(i, j), max(i, j)), 0) >= thr for j in np.flatnonzero(cl == cl[i]) if j != i)
        for i in removed
    )
    should = [i for i in range(n) if any(jac.get((j, i), 0) >= thr for j in range(i))]
    assert justified / len(removed) >= 0.95
    assert sum(not res.kept[i] for i in should) / len(should) >= 0.9
    # the keep rule: the lowest row of each cluster
    assert all(res.kept[c] and c == min(np.flatnonzero(cl == c)) for c in set(cl.tolist()))
    # verified pairs really are similar (estimate within MinHash error of the truth)
    est_err = [
        abs(e - jac.get((int(i), int(j)), 0.0)) for (i, j), e in zip(res.pairs, res.jaccard, strict=True)
    ]
    assert np.mean(est_err) < 0.05


def test_near_dedup_is_deterministic(docs: list[dict]) -> None:
    texts = [d["text"] for d in docs[:120]]
    a = minhash.near_duplicates(texts, 0.8, seed=3)
    b = minhash.near_duplicates(list(texts), 0.8, seed=3)  # a fresh run on the same input
    assert np.array_equal(a.cluster, b.cluster) and np.array_equal(a.pairs, b.pairs)
    sig1, _ = minhash.signatures(texts, seed=3)
    sig2, _ = minhash.signatures(texts, seed=4)
    assert np.array_equal(sig1, minhash.signatures(texts, seed=3)[0]) and not np.array_equal(sig1, sig2)


def test_paraphrases_with_different_sql_are_not_merged() -> None:
    """Advising questions: paraphrases of one SQL template, mostly not lexical duplicates. Near
    dedup merges only near-identical wordings; a merged pair from two SQL templates must have the
    same words (a data quirk: one question text appears under two templates)."""
    rows = [json.loads(ln) for ln in (DATA / "advising_questions_sample.jsonl").read_text().splitlines()]
    texts = [r["text"] for r in rows]
    res = minhash.near_duplicates(texts, threshold=0.8, ngram=2, seed=0)
    assert 0 < res.removed < len(rows) * 0.1
    for i, j in res.pairs.tolist():
        if rows[i]["cluster_id"] != rows[j]["cluster_id"]:
            assert WORD.findall(texts[i].lower()) == WORD.findall(texts[j].lower())


def test_empty_and_short_texts() -> None:
    texts = ["", None, "", "one two", "one two", "a b c d e f g h", "a b c d e f g x"]
    res = minhash.near_duplicates(pl.Series(texts, dtype=pl.String), threshold=0.5, ngram=3)
    # empty / null texts have no shingles and stay singletons; short texts are one shingle
    assert res.cluster.tolist()[:3] == [0, 1, 2] and res.shingles.tolist()[:4] == [0, 0, 0, 1]
    assert res.cluster[4] == 3
    assert res.cluster[6] == 5  # 5 of 6 trigrams shared: J = 5/7 > 0.5


def test_char_shingles() -> None:
    texts = ["SELECT name FROM customers", "SELECT  name FROM customer", "DELETE FROM orders WHERE x"]
    res = minhash.near_duplicates(texts, threshold=0.7, ngram=4, shingle="char")
    assert res.cluster.tolist() == [0, 0, 2]
    with pytest.raises(ValueError, match="shingle"):
        minhash.near_duplicates(texts, shingle="byte")


def test_lsh_params_match_datasketch() -> None:
    from datasketch.lsh import _optimal_param

    for thr, k in ((0.5, 64), (0.7, 128), (0.8, 128), (0.9, 256)):
        assert minhash.lsh_params(thr, k) == tuple(_optimal_param(thr, k, 0.5, 0.5))


# ------------------------------------------------------------------------------------------------
# the command
# ------------------------------------------------------------------------------------------------


def test_dedup_command(tmp_path: Path, docs: list[dict]) -> None:
    src = tmp_path / "docs.jsonl"
    src.write_text(
        "".join(json.dumps({"id": d["id"], "text": d["text"], "path": d["path"]}) + "\n" for d in docs)
    )
    out, clusters = tmp_path / "kept.parquet", tmp_path / "clusters.jsonl"
    r = CliRunner().invoke(
        app,
        [
            "dedup",
            str(src),
            "--column",
            "text",
            "--id-column",
            "id",
            "--threshold",
            "0.7",
            "--out",
            str(out),
            "--clusters",
            str(clusters),
        ],
    )
    assert r.exit_code == 0, r.output
    assert "near-duplicate clusters" in r.output
    kept = pl.read_parquet(out)
    cl = read_table(clusters)
    assert cl.columns == ["id", "cluster", "kept"] and cl.height == len(docs)
    assert cl["id"].to_list() == [d["id"] for d in docs]
    # a cluster is named by its kept row; exactly the kept rows are written, in input order
    assert (cl["kept"] == (cl["id"] == cl["cluster"])).all()
    assert kept["id"].to_list() == cl.filter("kept")["id"].to_list()
    assert set(cl["cluster"]) == set(kept["id"])
    assert kept.columns == ["id", "text", "path"]
    # same result from the library call, and without --id-column the row index is the id
    rep = dedup_file(src, "text", tmp_path / "k2.jsonl", None, tmp_path / "c2.parquet", threshold=0.7)
    c2 = pl.read_parquet(tmp_path / "c2.parquet")
    assert c2["id"].to_list() == list(range(len(docs)))
    assert c2["kept"].to_list() == cl["kept"].to_list() and rep.rows_out == kept.height


def test_dedup_command_errors(tmp_path: Path) -> None:
    src = tmp_path / "x.jsonl"
    src.write_text('{"id": 1, "text": "a"}\n{"id": 1, "text": "b"}\n')
    run = lambda *a: CliRunner().invoke(app, ["dedup", str(src), *a])  # noqa: E731
    r = run("--column", "nope", "--out", str(tmp_path / "o.parquet"))
    assert r.exit_code != 0 and "no column 'nope'" in str(r.exception)
    r = run("--column", "text", "--id-column", "id", "--out", str(tmp_path / "o.parquet"))
    assert "ids must be unique" in str(r.exception)
    r = run("--column", "text", "--out", str(tmp_path / "o.csv"))
    assert "must end in .parquet or .jsonl" in str(r.exception)
