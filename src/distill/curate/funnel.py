"""Bookkeeping of a curation run: every dropped row with its reason, counts per reason, in order."""

from __future__ import annotations

from typing import Any

import polars as pl

ROW = "__row"


class Funnel:
    """Holds the surviving rows of a table and everything dropped on the way.

    Each step names the rows it drops (a boolean mask/expression, or a per-row reason column);
    dropped rows keep all their columns plus `reason` and `detail` and go to `dropped()`.
    `metrics()` is the manifest's funnel: rows_in, rows_out, dropped {reason: count} in step order,
    and `steps` [{step, dropped, rows}].
    """

    def __init__(self, df: pl.DataFrame) -> None:
        self.df = df.with_row_index(ROW) if ROW not in df.columns else df
        self.rows_in = df.height
        self._dropped: list[pl.DataFrame] = []
        self.counts: dict[str, int] = {}
        self.steps: list[dict[str, Any]] = []

    def drop(
        self, step: str, mask: pl.Expr | pl.Series, reason: str | pl.Expr, detail: pl.Expr | None = None
    ) -> int:
        """Drop rows where `mask` is true (null counts as false). `reason` is a fixed string or an
        expression giving a per-row reason; `detail` an optional per-row explanation."""
        if isinstance(mask, pl.Series):
            flags = mask.fill_null(False)
        else:
            flags = self.df.select(mask.fill_null(False).alias("__m"))["__m"]
        n = int(flags.sum())
        if n:
            rexpr = pl.lit(reason) if isinstance(reason, str) else reason
            # reason/detail are evaluated on the whole table, then filtered: they may hold
            # literal Series aligned with the current rows
            gone = self.df.with_columns(
                rexpr.cast(pl.String).alias("reason"),
                (detail.cast(pl.String) if detail is not None else pl.lit(None, dtype=pl.String)).alias(
                    "detail"
                ),
                pl.lit(step).alias("step"),
            ).filter(flags)
            self._dropped.append(gone)
            for r, c in gone.group_by("reason", maintain_order=True).len().iter_rows():
                self.counts[r] = self.counts.get(r, 0) + int(c)
            self.df = self.df.filter(~flags)
        self.steps.append({"step": step, "dropped": n, "rows": self.df.height})
        return n

    def dropped(self) -> pl.DataFrame:
        if not self._dropped:
            cols: dict[str, Any] = {c: self.df.schema[c] for c in self.df.columns}
            cols.update({"reason": pl.String, "detail": pl.String, "step": pl.String})
            return pl.DataFrame(schema=cols)
        return pl.concat(self._dropped, how="diagonal_relaxed").sort(ROW)

    def metrics(self) -> dict[str, Any]:
        return {
            "rows_in": self.rows_in,
            "rows_out": self.df.height,
            "dropped": dict(self.counts),
            "steps": list(self.steps),
        }
