"""Near-duplicate removal: `distill dedup` against datasketch's MinHashLSH, same parameters.

1. Builds a corpus of >= 200,000 documents from real texts in the repository (DuckDB doc
   paragraphs in pipelines/data and tests/data, text-to-SQL questions, GSM8K and Orca chats,
   hh-rlhf turns, sqllogictest SQL) with controlled edits: each document is a random base text
   with a random share (0 to 50 %) of its words substituted, deleted, inserted or swapped.
2. Runs `distill dedup` (a fresh process, as a user would; one small warm-up run first so that
   numba's compiled kernels are cached as they are after the first use on any machine).
3. Runs datasketch: MinHash(num_perm) per document over the same word n-gram shingles, a
   MinHashLSH(threshold, num_perm) with every document inserted, one query per document, and
   union-find over the query results (its clusters).
4. Recall (and precision) of both against exact Jaccard on a sample of documents: every pair
   (sampled document, any document) with Jaccard >= threshold on the shingle sets is a true pair;
   recall is the share of true pairs in the same cluster.

Run from the repo root: `.venv/bin/python bench/dedup.py [--docs N] [--threshold T] ...`.
The last line is one JSON object with distill_docs_s, datasketch_docs_s, speedup,
distill_recall, datasketch_recall, peak_rss_mb (of the distill process), plus details.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl

REPO = Path(__file__).resolve().parent.parent
WORD = re.compile(r"\w+")


# ------------------------------------------------------------------------------------------------
# corpus
# ------------------------------------------------------------------------------------------------


def base_texts() -> list[str]:
    """Distinct real texts of 8+ words from the repository's data."""
    out: list[str] = []

    def paragraphs(text: str) -> None:
        for p in re.split(r"\n\s*\n", text):
            if len(p.split()) >= 8:
                out.append(p.strip())

    for f in sorted((REPO / "pipelines" / "data").rglob("*.md")):
        paragraphs(f.read_text(encoding="utf-8"))
    data = REPO / "tests" / "data"
    for ln in (data / "dedup_corpus" / "duckdb_docs_versions_sample.jsonl").read_text().splitlines():
        paragraphs(json.loads(ln)["text"])
    for ln in (data / "dedup_corpus" / "advising_questions_sample.jsonl").read_text().splitlines():
        out.append(json.loads(ln)["text_filled"])
    for name in ("openai_sft_gsm8k_sample.jsonl", "openai_dpo_orca_sample.jsonl"):
        for ln in (data / "pref_sft_formats" / name).read_text().splitlines():
            paragraphs(json.dumps(json.loads(ln)).replace("\\n", "\n"))
    import gzip

    with gzip.open(data / "pref_sft_formats" / "hh_rlhf_harmless_test_sample.jsonl.gz", "rt") as f:
        for ln in f:
            for turn in re.split(r"\n\n(?:Human|Assistant): ", json.loads(ln)["chosen"]):
                if len(turn.split()) >= 8:
                    out.append(turn.strip())
    for ln in (data / "duckdb_sqllogictest" / "records_sample.jsonl").read_text().splitlines():
        sql = json.loads(ln)["sql"]
        if len(sql.split()) >= 8:
            out.append(sql)
    for ln in (REPO / "pipelines" / "data" / "sql_dialect" / "seeds.jsonl").read_text().splitlines():
        out.append(json.loads(ln)["question"])
    return list(dict.fromkeys(out))


def edit(words: list[str], rate: float, rng: random.Random, vocab: list[str]) -> list[str]:
    w = list(words)
    for _ in range(max(0, round(rate * len(words)))):
        if not w:
            break
        op, i = rng.random(), rng.randrange(len(w))
        if op < 0.4:
            w[i] = rng.choice(vocab)
        elif op < 0.65:
            del w[i]
        elif op < 0.9:
            w.insert(i, rng.choice(vocab))
        elif i + 1 < len(w):
            w[i], w[i + 1] = w[i + 1], w[i]
    return w


def build_corpus(n_docs: int, seed: int) -> tuple[list[str], int]:
    bases = base_texts()
    rng = random.Random(seed)
    vocab = [w for b in bases[:2000] for w in b.split()]
    rates = [0.0, 0.01, 0.03, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5]
    docs = []
    for _ in range(n_docs):
        words = rng.choice(bases).split()
        docs.append(" ".join(edit(words, rng.choice(rates), rng, vocab)))
    return docs, len(bases)


# ------------------------------------------------------------------------------------------------
# datasketch
# ------------------------------------------------------------------------------------------------


def shingle_strings(text: str, n: int) -> list[bytes]:
    toks = WORD.findall(text.lower())
    if not toks:
        return []
    if len(toks) < n:
        return [" ".join(toks).encode()]
    return list({" ".join(toks[i : i + n]).encode() for i in range(len(toks) - n + 1)})


def run_datasketch(docs: list[str], threshold: float, ngram: int, num_perm: int) -> np.ndarray:
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    sigs = []
    for i, d in enumerate(docs):
        m = MinHash(num_perm=num_perm, seed=1)
        sh = shingle_strings(d, ngram)
        if sh:
            m.update_batch(sh)
            lsh.insert(i, m)
        sigs.append(m if sh else None)
    parent = np.arange(len(docs))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for i, m in enumerate(sigs):
        if m is None:
            continue
        for j in lsh.query(m):
            a, b = find(i), find(j)
            if a != b:
                parent[max(a, b)] = min(a, b)
    return np.array([find(i) for i in range(len(docs))])


# ------------------------------------------------------------------------------------------------
# exact Jaccard on a sample
# ------------------------------------------------------------------------------------------------


def true_pairs(docs: list[str], sample: list[int], threshold: float, ngram: int) -> list[tuple[int, int]]:
    """(i, j) for each sampled i and every other j with exact Jaccard >= threshold on shingle sets
    (shingles as 64-bit blake2b digests: collisions are negligible at this size)."""
    import hashlib

    def h(s: bytes) -> int:
        return int.from_bytes(hashlib.blake2b(s, digest_size=8).digest(), "little", signed=True)

    doc_idx, hashes, sizes = [], [], np.zeros(len(docs), dtype=np.int64)
    wanted, own = set(sample), {}
    for i, d in enumerate(docs):
        hs = {h(s) for s in shingle_strings(d, ngram)}
        sizes[i] = len(hs)
        doc_idx.extend([i] * len(hs))
        hashes.extend(hs)
        if i in wanted:
            own[i] = np.array(sorted(hs), dtype=np.int64)
    doc_arr, h_arr = np.array(doc_idx, dtype=np.int64), np.array(hashes, dtype=np.int64)
    order = np.argsort(h_arr, kind="stable")
    doc_arr, h_arr = doc_arr[order], h_arr[order]
    out = []
    for i in sample:
        mine = own[i]
        lo, hi = np.searchsorted(h_arr, mine, side="left"), np.searchsorted(h_arr, mine, side="right")
        others = (
            np.concatenate([doc_arr[a:b] for a, b in zip(lo, hi, strict=True)])
            if len(mine)
            else np.array([], dtype=np.int64)
        )
        js, inter = np.unique(others, return_counts=True)
        jac = inter / (sizes[i] + sizes[js] - inter)
        out.extend((i, int(j)) for j in js[(jac >= threshold) & (js != i)])
    return out


def scores(
    cluster: np.ndarray, sample: list[int], truth: list[tuple[int, int]], jac_ok: set[tuple[int, int]]
) -> tuple[float, float]:
    recall = sum(cluster[i] == cluster[j] for i, j in truth) / max(1, len(truth))
    same = [(i, int(j)) for i in sample for j in np.flatnonzero(cluster == cluster[i]) if j != i]
    precision = sum((i, j) in jac_ok for i, j in same) / max(1, len(same))
    return float(recall), float(precision)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=200_000)
    ap.add_argument("--threshold", type=float, default=0.8)
    ap.add_argument("--ngram", type=int, default=5)
    ap.add_argument("--num-perm", type=int, default=128)
    ap.add_argument("--sample", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    t0 = time.perf_counter()
    docs, n_bases = build_corpus(args.docs, args.seed)
    words = sum(len(d.split()) for d in docs)
    print(
        f"corpus: {len(docs)} documents from {n_bases} base texts, {words / len(docs):.0f} words each on average "
        f"({time.perf_counter() - t0:.1f}s)",
        file=sys.stderr,
    )
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        src = tmp / "corpus.parquet"
        pl.DataFrame({"id": [f"d{i}" for i in range(len(docs))], "text": docs}).write_parquet(src)
        pl.DataFrame(
            {"id": ["a", "b"], "text": ["warm up the kernels", "warm up the kernels!"]}
        ).write_parquet(tmp / "w.parquet")
        distill = [str(REPO / ".venv" / "bin" / "distill"), "dedup"]
        subprocess.run(
            distill + [str(tmp / "w.parquet"), "--column", "text", "--out", str(tmp / "w_out.parquet")],
            check=True,
            capture_output=True,
        )
        cmd = distill + [
            str(src), "--column", "text", "--id-column", "id", "--threshold", str(args.threshold),
            "--ngram", str(args.ngram), "--num-perm", str(args.num_perm),
            "--out", str(tmp / "kept.parquet"), "--clusters", str(tmp / "clusters.parquet"),
        ]  # fmt: skip
        t = time.perf_counter()
        proc = subprocess.run(cmd, check=True, capture_output=True, text=True)
        distill_s = time.perf_counter() - t
        peak_rss_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        print(proc.stdout.strip(), file=sys.stderr)
        cl = pl.read_parquet(tmp / "clusters.parquet")
        pos = {k: i for i, k in enumerate(cl["id"].to_list())}
        d_cluster = np.array([pos[c] for c in cl["cluster"].to_list()])

    t = time.perf_counter()
    ds_cluster = run_datasketch(docs, args.threshold, args.ngram, args.num_perm)
    datasketch_s = time.perf_counter() - t
    print(f"distill {distill_s:.1f}s, datasketch {datasketch_s:.1f}s", file=sys.stderr)

    rng = random.Random(args.seed + 1)
    sample = rng.sample(range(len(docs)), args.sample)
    t = time.perf_counter()
    truth = true_pairs(docs, sample, args.threshold, args.ngram)
    print(
        f"exact Jaccard on {len(sample)} sampled documents: {len(truth)} true pairs ({time.perf_counter() - t:.1f}s)",
        file=sys.stderr,
    )
    ok = set(truth)
    d_rec, d_prec = scores(d_cluster, sample, truth, ok)
    s_rec, s_prec = scores(ds_cluster, sample, truth, ok)
    result = {
        "distill_docs_s": round(len(docs) / distill_s, 1),
        "datasketch_docs_s": round(len(docs) / datasketch_s, 1),
        "speedup": round(datasketch_s / distill_s, 2),
        "distill_recall": round(d_rec, 4),
        "datasketch_recall": round(s_rec, 4),
        "peak_rss_mb": round(peak_rss_mb, 1),
        "distill_precision": round(d_prec, 4),
        "datasketch_precision": round(s_prec, 4),
        "docs": len(docs),
        "distill_s": round(distill_s, 2),
        "datasketch_s": round(datasketch_s, 2),
        "kept_distill": int((d_cluster == np.arange(len(docs))).sum()),
        "kept_datasketch": int((ds_cluster == np.arange(len(docs))).sum()),
        "true_pairs_in_sample": len(truth),
        "threshold": args.threshold,
        "ngram": args.ngram,
        "num_perm": args.num_perm,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
