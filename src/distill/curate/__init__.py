"""Curation: what the student learns.

- `filters`: row filters as pure functions returning a `Check` (a Polars expression that is true
  for rows to drop, plus the reason recorded for them).
- `minhash`: MinHash signatures, LSH banding, near-duplicate clusters (numba + numpy + scipy).
- `dedup`: text normalization, exact dedup, near dedup on a column, and the `distill dedup` command.
- `decontam`: n-gram and SQL canonical-form overlap with evaluation sets.
- `pairs`: preference pairs (chosen / rejected) from verified samples.
- `formats`: import adapters from common Hub/API layouts to our `sft` and `pairs` layouts.
- `funnel`: bookkeeping of dropped rows and counts per reason.
"""
