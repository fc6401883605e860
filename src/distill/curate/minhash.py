"""MinHash signatures, LSH banding and near-duplicate clusters.

Pipeline (all deterministic for a seed):

1. Tokens: lower-cased `\\w+` words (or characters, whitespace collapsed) per document, hashed
   once each with Polars' vectorized `hash(seed)` -> one uint64 per token plus document offsets.
2. Shingles and signatures in one compiled pass (numba): each window of `ngram` consecutive token
   hashes is folded into a 64-bit shingle hash (a document shorter than `ngram` tokens is one
   shingle), mixed (splitmix64) down to 32 bits, and pushed through `num_perm` hash functions
   h_k(x) = (a_k * x + b_k) >> 32 with random 64-bit a_k (odd), b_k — Dietzfelbinger's
   multiply-add-shift family, 2-universal on 32-bit keys — keeping the per-document minimum.
3. LSH: the signature is cut into `bands` x `rows` (chosen like datasketch's MinHashLSH: the
   pair minimizing the weighted false-positive + false-negative areas under the S-curve for the
   threshold, with weights 0.3/0.7 when candidates are verified, since verification removes the
   extra false positives; 0.5/0.5 otherwise, as datasketch); each band is hashed to a 64-bit key and documents with equal keys are candidates.
   Within a bucket (sorted by row index) every member is paired with the first member and with
   its predecessor, which links the bucket without enumerating all pairs of a large bucket.
4. Candidate pairs whose estimated Jaccard (share of equal signature slots) is below the
   threshold are dropped (precision), the rest are edges of a graph whose connected components
   (scipy) are the clusters. A cluster's id is its lowest row index; that row is the one kept.

Why numba for step 2: the work is (shingles x num_perm) multiply-add-shift-min operations, and
numpy needs a full pass over memory for each of the four per permutation (about 10x slower
measured here); no maintained library computes MinHash over pre-hashed integer shingles in bulk.
Documents with no tokens get no shingles and are never near-duplicates of anything (exact dedup
is the tool for empty texts).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import polars as pl

MAX32 = np.uint32(0xFFFFFFFF)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_FOLD = np.uint64(0x9E3779B97F4A7C15)


def _njit(fn: Any) -> Any:
    from numba import njit

    return njit(cache=True, nogil=True)(fn)


_kernels: dict[str, Any] = {}


def _kernel(name: str) -> Any:
    """Compile (or load from numba's on-disk cache) a kernel on first use, keeping numba out of
    import time."""
    k = _kernels.get(name)
    if k is None:
        k = _njit(globals()[f"_{name}_py"])
        _kernels[name] = k
    return k


def _minhash_py(tok, offsets, ngram, a, b, out, counts):  # type: ignore[no-untyped-def]
    n_docs = offsets.shape[0] - 1
    k_perm = a.shape[0]
    s32 = np.uint64(32)
    s30 = np.uint64(30)
    s27 = np.uint64(27)
    s31 = np.uint64(31)
    m1 = np.uint64(0xBF58476D1CE4E5B9)
    m2 = np.uint64(0x94D049BB133111EB)
    fold = np.uint64(0x9E3779B97F4A7C15)
    maxv = np.uint32(0xFFFFFFFF)
    for d in range(n_docs):
        s = offsets[d]
        e = offsets[d + 1]
        length = e - s
        row = out[d]
        for k in range(k_perm):
            row[k] = maxv
        if length == 0:
            counts[d] = 0
            continue
        n_sh = length - ngram + 1
        width = ngram
        if n_sh < 1:
            n_sh = 1
            width = length
        counts[d] = n_sh
        for i in range(n_sh):
            h = np.uint64(0)
            for j in range(width):
                h = (h ^ tok[s + i + j]) * fold
            # splitmix64 finalizer, then the top 32 bits as the shingle id
            h = (h ^ (h >> s30)) * m1
            h = (h ^ (h >> s27)) * m2
            h = h ^ (h >> s31)
            x = h >> s32
            for k in range(k_perm):
                v = np.uint32((a[k] * x + b[k]) >> s32)
                if v < row[k]:
                    row[k] = v


def _ngram_hashes_py(tok, offsets, ngram, out_doc, out_hash):  # type: ignore[no-untyped-def]
    n_docs = offsets.shape[0] - 1
    fold = np.uint64(0x9E3779B97F4A7C15)
    p = 0
    for d in range(n_docs):
        s = offsets[d]
        e = offsets[d + 1]
        length = e - s
        if length == 0:
            continue
        n_sh = length - ngram + 1
        width = ngram
        if n_sh < 1:
            n_sh = 1
            width = length
        for i in range(n_sh):
            h = np.uint64(0)
            for j in range(width):
                h = (h ^ tok[s + i + j]) * fold
            out_doc[p] = d
            out_hash[p] = h
            p += 1
    return p


def _band_keys_py(sig, bands, rows, out):  # type: ignore[no-untyped-def]
    n = sig.shape[0]
    fold = np.uint64(0x9E3779B97F4A7C15)
    m1 = np.uint64(0xBF58476D1CE4E5B9)
    s29 = np.uint64(29)
    for d in range(n):
        for bnd in range(bands):
            h = np.uint64(bnd + 1) * m1
            base = bnd * rows
            for r in range(rows):
                h = (h ^ np.uint64(sig[d, base + r])) * fold
                h = h ^ (h >> s29)
            out[d, bnd] = h


def _pair_equal_py(sig, pairs, out):  # type: ignore[no-untyped-def]
    k_perm = sig.shape[1]
    for p in range(pairs.shape[0]):
        i = pairs[p, 0]
        j = pairs[p, 1]
        eq = 0
        for k in range(k_perm):
            if sig[i, k] == sig[j, k]:
                eq += 1
        out[p] = eq / k_perm


# ------------------------------------------------------------------------------------------------
# tokens
# ------------------------------------------------------------------------------------------------


def token_hashes(
    texts: pl.Series | list[str], shingle: str = "word", seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """(uint64 hash per token, int64 offsets of length n_docs+1). `shingle` is "word" (lower-cased
    `\\w+` tokens) or "char" (lower-cased characters, runs of whitespace collapsed to one space).
    Null texts have no tokens."""
    import polars as pl

    s = texts if isinstance(texts, pl.Series) else pl.Series("text", list(texts), dtype=pl.String)
    s = s.cast(pl.String).str.to_lowercase()
    if shingle == "word":
        toks = s.str.extract_all(r"\w+")
    elif shingle == "char":
        toks = s.str.replace_all(r"\s+", " ").str.strip_chars().str.split("")
    else:
        raise ValueError(f"shingle must be 'word' or 'char', not {shingle!r}")
    lens = toks.list.len().fill_null(0).to_numpy().astype(np.int64)
    offsets = np.zeros(len(lens) + 1, dtype=np.int64)
    np.cumsum(lens, out=offsets[1:])
    flat = toks.explode().drop_nulls()
    hashes = flat.hash(seed=seed).to_numpy().astype(np.uint64, copy=False)
    if len(hashes) != offsets[-1]:  # an empty-string token would be dropped with the nulls
        raise AssertionError("token count mismatch")
    return np.ascontiguousarray(hashes), offsets


def ngram_hashes(tok: np.ndarray, offsets: np.ndarray, ngram: int) -> tuple[np.ndarray, np.ndarray]:
    """(doc index, uint64 n-gram hash) for every window of `ngram` tokens (a shorter document is
    one n-gram). The same folding as the MinHash shingles, without the 32-bit reduction."""
    lens = np.diff(offsets)
    total = int(np.where(lens == 0, 0, np.maximum(lens - ngram + 1, 1)).sum())
    out_doc = np.empty(total, dtype=np.int64)
    out_hash = np.empty(total, dtype=np.uint64)
    p = _kernel("ngram_hashes")(tok, offsets, np.int64(ngram), out_doc, out_hash)
    assert p == total
    return out_doc, out_hash


# ------------------------------------------------------------------------------------------------
# signatures, LSH
# ------------------------------------------------------------------------------------------------


def permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.integers(1, 2**63, size=num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    b = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64) * np.uint64(2)
    return a, b


def signatures(
    texts: pl.Series | list[str], ngram: int = 5, num_perm: int = 128, seed: int = 0, shingle: str = "word"
) -> tuple[np.ndarray, np.ndarray]:
    """(uint32 signatures of shape (n_docs, num_perm), shingle count per document)."""
    if ngram < 1 or num_perm < 1:
        raise ValueError("ngram and num_perm must be >= 1")
    tok, offsets = token_hashes(texts, shingle, seed)
    a, b = permutations(num_perm, seed)
    n = len(offsets) - 1
    sig = np.empty((n, num_perm), dtype=np.uint32)
    counts = np.empty(n, dtype=np.int64)
    _kernel("minhash")(tok, offsets, np.int64(ngram), a, b, sig, counts)
    return sig, counts


@functools.lru_cache(maxsize=64)
def lsh_params(
    threshold: float, num_perm: int, fp_weight: float = 0.5, fn_weight: float = 0.5
) -> tuple[int, int]:
    """(bands, rows) with bands*rows <= num_perm minimizing fp_weight * P(false positive) +
    fn_weight * P(false negative) for the S-curve 1-(1-s^r)^b around `threshold`: the criterion
    of datasketch's MinHashLSH (which integrates with scipy's quad; here a 4001-point trapezoid
    over all (b, r) at once, accurate to ~1e-7, so both pick the same banding)."""
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be between 0 and 1 (got {threshold})")
    grid_lo = np.linspace(0.0, threshold, 4001)
    grid_hi = np.linspace(threshold, 1.0, 4001)
    best, best_err = (1, num_perm), float("inf")
    for b in range(1, num_perm + 1):
        r = np.arange(1, num_perm // b + 1, dtype=np.float64)[:, None]
        fp = np.trapezoid(1 - (1 - grid_lo[None, :] ** r) ** b, grid_lo, axis=1)
        fn = np.trapezoid((1 - grid_hi[None, :] ** r) ** b, grid_hi, axis=1)
        err = np.asarray(fp_weight * fp + fn_weight * fn)
        i = int(np.argmin(err))
        if err[i] < best_err:
            best, best_err = (b, i + 1), float(err[i])
    return best


def band_keys(sig: np.ndarray, bands: int, rows: int) -> np.ndarray:
    out = np.empty((sig.shape[0], bands), dtype=np.uint64)
    _kernel("band_keys")(np.ascontiguousarray(sig), np.int64(bands), np.int64(rows), out)
    return out


def candidate_pairs(sig: np.ndarray, bands: int, rows: int, active: np.ndarray | None = None) -> np.ndarray:
    """Unique (i, j) row pairs, i < j, that share at least one band bucket: shape (m, 2) int64.
    `active` (bool per row) excludes rows from bucketing (e.g. documents without shingles)."""
    n = sig.shape[0]
    idx = np.arange(n, dtype=np.int64) if active is None else np.flatnonzero(active).astype(np.int64)
    if len(idx) < 2:
        return np.empty((0, 2), dtype=np.int64)
    keys = band_keys(sig[idx], bands, rows)
    codes = []
    for bnd in range(bands):
        k = keys[:, bnd]
        order = np.argsort(k, kind="stable")  # stable: members of a bucket stay in row order
        ks = k[order]
        same = ks[1:] == ks[:-1]
        if not same.any():
            continue
        pos = np.arange(1, len(ks))
        # start position of the bucket run each element belongs to
        starts = np.zeros(len(ks), dtype=np.int64)
        brk = np.flatnonzero(~same) + 1
        starts[brk] = brk
        starts = np.maximum.accumulate(starts)
        member = pos[same]
        first = idx[order[starts[member]]]
        cur = idx[order[member]]
        prev = idx[order[member - 1]]
        for a_, b_ in ((first, cur), (prev, cur)):
            lo, hi = np.minimum(a_, b_), np.maximum(a_, b_)
            keep = lo != hi
            codes.append(lo[keep] * n + hi[keep])
    if not codes:
        return np.empty((0, 2), dtype=np.int64)
    u = np.unique(np.concatenate(codes))
    return np.stack([u // n, u % n], axis=1)


def estimated_jaccard(sig: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Share of equal signature slots for each (i, j) pair (unbiased estimate of Jaccard)."""
    out = np.empty(len(pairs), dtype=np.float64)
    if len(pairs):
        _kernel("pair_equal")(np.ascontiguousarray(sig), np.ascontiguousarray(pairs), out)
    return out


def components(n: int, pairs: np.ndarray) -> np.ndarray:
    """Cluster id per row = the lowest row index of its connected component."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if len(pairs) == 0:
        return np.arange(n, dtype=np.int64)
    g = coo_matrix((np.ones(len(pairs), dtype=np.int8), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    _, labels = connected_components(g, directed=False)
    rep = np.full(labels.max() + 1, n, dtype=np.int64)
    np.minimum.at(rep, labels, np.arange(n, dtype=np.int64))
    return rep[labels]


@dataclass
class NearDuplicates:
    """Result of `near_duplicates`: per row its cluster (lowest row index in the cluster) and
    whether it is kept (it is its cluster's lowest row); the verified pairs and their estimates."""

    cluster: np.ndarray
    kept: np.ndarray
    pairs: np.ndarray
    jaccard: np.ndarray
    candidates: int
    bands: int
    rows: int
    shingles: np.ndarray

    @property
    def removed(self) -> int:
        return int((~self.kept).sum())


def near_duplicates(
    texts: pl.Series | list[str],
    threshold: float = 0.8,
    ngram: int = 5,
    num_perm: int = 128,
    seed: int = 0,
    shingle: str = "word",
    bands: int | None = None,
    rows: int | None = None,
    verify: bool = True,
) -> NearDuplicates:
    """Near-duplicate clusters of `texts` by MinHash LSH (see the module docstring)."""
    sig, counts = signatures(texts, ngram, num_perm, seed, shingle)
    if bands is None or rows is None:
        # verification removes false positives, so the banding can lean towards recall
        bands, rows = lsh_params(threshold, num_perm, 0.3, 0.7) if verify else lsh_params(threshold, num_perm)
    if bands * rows > num_perm:
        raise ValueError(f"bands*rows = {bands * rows} exceeds num_perm = {num_perm}")
    n = sig.shape[0]
    pairs = candidate_pairs(sig, bands, rows, active=counts > 0)
    cand = len(pairs)
    est = estimated_jaccard(sig, pairs)
    if verify:
        ok = est >= threshold
        pairs, est = pairs[ok], est[ok]
    cluster = components(n, pairs)
    kept = cluster == np.arange(n)
    return NearDuplicates(cluster, kept, pairs, est, cand, bands, rows, counts)
