"""Execution-based scoring of SQL predictions against an eval set.

`Evaluator(rows, work_dir, dialect)` builds the databases, checks every gold query once
(`analyze_gold`), then scores any number of prediction sets (`score`) through the SQL sandbox of
`distill.tasks.sql` (read-only copies, no file/network access, timeouts, killable workers).

Gold checks. A row is excluded from accuracy, with its reason, when its gold query:
- does not run (`gold_error: <type>: <message>`), or its database could not be built;
- is not deterministic: it calls random()/uuid() or reads the clock, samples rows
  (USING SAMPLE / TABLESAMPLE), returns different results on two runs, or has a LIMIT that cuts
  through rows an ORDER BY leaves tied (or a LIMIT without ORDER BY over more rows than the limit).
  The LIMIT check runs the query twice more with every output column appended to its ORDER BY as
  a tie-breaker, ascending then descending: if the two kept sets differ, which rows come back
  depends on tie-breaking.

Comparison: result sets as multisets (column names ignored, column order kept); when the gold has
ORDER BY, the order counts too, except among rows the ORDER BY leaves tied (found with the same
two tie-breaker runs): there any order is accepted.

Metrics (see `aggregate`): `n` rows; `runnable` rows scored (gold ran and is deterministic);
`execution_accuracy` = correct / runnable; `error_rate` = predictions that failed to run / runnable
(so accuracy + wrong-result rate + error rate = 1); `exact_match` = canonical SQL equal to the gold's
/ runnable; `valid_sql_rate` = predictions that parse in the dialect / n.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from distill.evaluate.evalset import EvalRow, PreparedDb, prepare_databases

if TYPE_CHECKING:
    from distill.tasks.sql import ExecResult

VERDICTS = ("correct", "wrong_result", "error", "missing", "excluded")

_RANDOM_FUNCS = {
    "rand",
    "random",
    "randn",
    "uuid",
    "gen_random_uuid",
    "uuidv4",
    "uuidv7",
    "random_uuid",
    "setseed",
}
_CLOCK_FUNCS = {
    "now", "current_timestamp", "current_date", "current_time", "current_datetime", "get_current_timestamp",
    "get_current_time", "localtimestamp", "localtime", "today", "transaction_timestamp", "statement_timestamp",
    "clock_timestamp", "currenttimestamp", "currentdate", "currenttime", "currentdatetime",
}  # fmt: skip


@dataclass
class GoldInfo:
    ok: bool
    reason: str | None = None
    result: ExecResult | None = None
    groups: list[int] | None = None  # tie-group boundaries of an ordered result with ties


def nondeterminism(sql: str, dialect: str) -> str | None:
    """A reason when the query is nondeterministic by construction (random, clock, sampling)."""
    import sqlglot
    from sqlglot import exp

    try:
        expr = sqlglot.parse_one(sql, read=dialect)
    except Exception:  # unparsable by sqlglot: the engine decides later
        return None
    for node in expr.walk():
        if isinstance(node, exp.TableSample):
            return "nondeterministic: samples rows (USING SAMPLE / TABLESAMPLE)"
        if isinstance(node, exp.Func):
            names = {type(node).__name__.lower()}
            if isinstance(node, exp.Anonymous):
                names.add(str(node.name).lower())
            else:
                names.add(str(node.sql_name()).lower())
            if names & _RANDOM_FUNCS:
                return "nondeterministic: calls a random function"
            if names & _CLOCK_FUNCS:
                return "nondeterministic: depends on the current date/time"
    return None


def _outer(expr: Any) -> Any:
    from sqlglot import exp

    node = expr
    while isinstance(node, exp.Subquery):
        node = node.this
    return node


def tie_break_variants(sql: str, dialect: str, ncols: int) -> tuple[str, str, bool] | None:
    """(sql with every output column appended ASC to ORDER BY, the same DESC, has_limit), or None
    when the query has neither ORDER BY nor LIMIT at its outer level (or cannot be rewritten)."""
    import sqlglot
    from sqlglot import exp

    try:
        expr = sqlglot.parse_one(sql, read=dialect)
    except Exception:
        return None
    node = _outer(expr)
    if not isinstance(node, exp.Select | exp.SetOperation) or ncols < 1:
        return None
    order = node.args.get("order")
    has_limit = bool(node.args.get("limit") or node.args.get("offset") or node.args.get("fetch"))
    if order is None and not has_limit:
        return None
    out = []
    for desc in (False, True):
        e = expr.copy()
        n = _outer(e)
        o = n.args.get("order")
        o = o.copy() if o is not None else exp.Order(expressions=[])
        for i in range(1, ncols + 1):
            o.append("expressions", exp.Ordered(this=exp.Literal.number(i), desc=desc, nulls_first=not desc))
        n.set("order", o)
        out.append(e.sql(dialect=dialect))
    return out[0], out[1], has_limit


def tie_groups(asc_rows: Sequence[Any], desc_rows: Sequence[Any]) -> list[int]:
    """Boundaries [0, b1, ..., n] of the runs of rows an ORDER BY leaves tied.

    Within a tie group the ascending tie-breaker sorts rows one way and the descending one the
    other; at a true group boundary both prefixes hold exactly the same rows. So the boundaries are
    the positions where the two prefixes are equal as multisets.
    """
    keys_a = [json.dumps(r, sort_keys=True, default=str) for r in asc_rows]
    keys_d = [json.dumps(r, sort_keys=True, default=str) for r in desc_rows]
    bounds = [0]
    diff: Counter[str] = Counter()
    for i, (a, d) in enumerate(zip(keys_a, keys_d, strict=True), start=1):
        diff[a] += 1
        diff[d] -= 1
        if diff[a] == 0:
            del diff[a]
        if d in diff and diff[d] == 0:
            del diff[d]
        if not diff:
            bounds.append(i)
    if bounds[-1] != len(keys_a):
        bounds.append(len(keys_a))
    return bounds


def _same_by_groups(pred_rows: Sequence[Any], gold_rows: Sequence[Any], bounds: list[int]) -> bool:
    if len(pred_rows) != len(gold_rows):
        return False
    for a, b in zip(bounds, bounds[1:], strict=False):
        pa = sorted(json.dumps(r, sort_keys=True, default=str) for r in pred_rows[a:b])
        ga = sorted(json.dumps(r, sort_keys=True, default=str) for r in gold_rows[a:b])
        if pa != ga:
            return False
    return True


def _preview(res: ExecResult | None, n: int = 5) -> str | None:
    if res is None or not res.ok or not res.executed:
        return None
    return json.dumps({"columns": res.columns, "rows": res.rows[:n], "total": len(res.rows)}, default=str)


class Evaluator:
    """Databases + sandboxes for one eval set; score prediction sets against its gold queries."""

    def __init__(
        self,
        rows: list[EvalRow],
        work_dir: Path,
        dialect: str = "duckdb",
        timeout_s: float = 5.0,
        max_rows: int = 10_000,
        workers: int = 2,
        memory_limit: str = "512MB",
    ) -> None:
        self.rows = rows
        self.dialect = dialect
        self.timeout_s, self.max_rows, self.workers, self.memory_limit = (
            timeout_s,
            max_rows,
            workers,
            memory_limit,
        )
        self.dbs: dict[str, PreparedDb] = prepare_databases(rows, Path(work_dir) / "dbs", dialect)
        self._sandboxes: dict[str, Any] = {}
        self.gold: dict[str, GoldInfo] = {}

    def __enter__(self) -> Evaluator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for sb in self._sandboxes.values():
            sb.close()
        self._sandboxes.clear()

    def _sandbox(self, engine: str) -> Any:
        from distill.tasks.sql import SqlSandbox

        if engine not in self._sandboxes:
            files = {k: d.path for k, d in self.dbs.items() if d.path is not None and d.engine == engine}
            sb = SqlSandbox(
                files,  # type: ignore[arg-type]
                dialect=self.dialect,
                timeout_s=self.timeout_s,
                max_rows=self.max_rows,
                workers=self.workers,
                engine=engine,
                execute_via_duckdb=engine == "duckdb" and self.dialect != "duckdb",
                memory_limit=self.memory_limit,
            )
            sb.start()
            self._sandboxes[engine] = sb
        return self._sandboxes[engine]

    def run(self, items: Sequence[tuple[str, str | None]]) -> list[ExecResult]:
        """Run (db_key, sql) items, grouped by engine, results in input order."""
        from distill.tasks.sql import ExecResult

        out: list[ExecResult | None] = [None] * len(items)
        by_engine: dict[str, list[int]] = {}
        for i, (key, _) in enumerate(items):
            db = self.dbs.get(key)
            if db is None or db.path is None:
                out[i] = ExecResult(False, "unknown_schema", db.error if db else f"no database {key!r}")
                continue
            by_engine.setdefault(db.engine, []).append(i)
        for engine, idx in by_engine.items():
            res = self._sandbox(engine).run_many([items[i] for i in idx])
            for i, r in zip(idx, res, strict=True):
                out[i] = r
        return [r for r in out if r is not None]

    # -- gold ---------------------------------------------------------------------------------
    def analyze_gold(self) -> dict[str, GoldInfo]:
        """Run every gold query (twice, plus the tie-breaker variants) and decide which rows count."""
        todo: list[EvalRow] = []
        for r in self.rows:
            db = self.dbs[r.db_key]
            if db.path is None:
                self.gold[r.id] = GoldInfo(False, f"gold_error: {db.error}")
                continue
            why = nondeterminism(r.sql, self.dialect)
            if why:
                self.gold[r.id] = GoldInfo(False, why)
                continue
            todo.append(r)
        res = self.run([(r.db_key, r.sql) for r in todo] * 2)
        first, second = res[: len(todo)], res[len(todo) :]
        variants: list[tuple[EvalRow, str, str, bool]] = []
        for r, a, b in zip(todo, first, second, strict=True):
            if not a.ok:
                self.gold[r.id] = GoldInfo(False, f"gold_error: {a.error_type}: {a.error}", a)
                continue
            key_a = a.ordered_hash if a.ordered else a.result_hash
            key_b = b.ordered_hash if b.ordered else b.result_hash
            if not b.ok or key_a != key_b:
                self.gold[r.id] = GoldInfo(False, "nondeterministic: two runs of the gold query differ", a)
                continue
            self.gold[r.id] = GoldInfo(True, None, a)
            if a.executed:
                v = tie_break_variants(r.sql, self.dialect, len(a.columns))
                if v is not None:
                    variants.append((r, v[0], v[1], v[2]))
        if variants:
            vres = self.run(
                [(r.db_key, s) for r, s, _, _ in variants] + [(r.db_key, s) for r, _, s, _ in variants]
            )
            asc, desc = vres[: len(variants)], vres[len(variants) :]
            for (r, _, _, has_limit), ra, rd in zip(variants, asc, desc, strict=True):
                gi = self.gold[r.id]
                if not (ra.ok and rd.ok):
                    continue  # the rewrite did not run: keep the strict comparison
                if has_limit and ra.result_hash != rd.result_hash:
                    why = (
                        "nondeterministic: LIMIT cuts through rows tied in ORDER BY"
                        if gi.result is not None and gi.result.ordered
                        else "nondeterministic: LIMIT without ORDER BY picks arbitrary rows"
                    )
                    self.gold[r.id] = GoldInfo(False, why, gi.result)
                    continue
                if gi.result is not None and gi.result.ordered and ra.ordered_hash != rd.ordered_hash:
                    gi.groups = tie_groups(ra.rows, rd.rows)
        return self.gold

    # -- predictions ---------------------------------------------------------------------------
    def score(
        self, preds: dict[str, str | None], raws: dict[str, str | None] | None = None
    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Per-row results and aggregate metrics for one prediction set ({id: sql or None})."""
        from distill.tasks.sql import SqlRefused, canonical_sql, parse_sql, results_match

        if not self.gold:
            self.analyze_gold()
        have = [r for r in self.rows if preds.get(r.id) is not None]
        res = dict(zip([r.id for r in have], self.run([(r.db_key, preds[r.id]) for r in have]), strict=True))
        out: list[dict[str, Any]] = []
        for r in self.rows:
            gi = self.gold[r.id]
            sql = preds.get(r.id)
            pr = res.get(r.id)
            if sql is None:
                valid = False
            elif pr is not None and pr.error_type not in ("no_sql", "parse_error", "unknown_schema", "crash"):
                valid = True
            else:
                try:
                    parse_sql(sql, self.dialect)
                    valid = pr is None or pr.error_type != "parse_error"
                except SqlRefused:
                    valid = False
            row: dict[str, Any] = {
                "id": r.id,
                "category": r.category,
                "question": r.question,
                "gold_sql": r.sql,
                "prediction": sql,
                "completion": (raws or {}).get(r.id),
                "valid_sql": valid,
                "exact_match": bool(
                    sql is not None and canonical_sql(sql, self.dialect) == canonical_sql(r.sql, self.dialect)
                ),
                "excluded_reason": gi.reason,
                "error_type": None,
                "error": None,
                "gold_result": _preview(gi.result),
                "pred_result": _preview(pr),
                "elapsed_s": pr.elapsed_s if pr is not None else None,
            }
            if not gi.ok:
                row.update(verdict="excluded", correct=None)
            elif sql is None:
                row.update(
                    verdict="missing", correct=False, error_type="no_sql", error="no prediction for this id"
                )
            elif pr is None or not pr.ok:
                row.update(verdict="error", correct=False, error_type=pr.error_type if pr else "no_sql",
                           error=pr.error if pr else "no prediction")  # fmt: skip
            else:
                assert gi.result is not None
                if gi.groups is not None:
                    ok = pr.result_hash == gi.result.result_hash and _same_by_groups(
                        pr.rows, gi.result.rows, gi.groups
                    )
                else:
                    ok = results_match(pr, gi.result)
                row.update(verdict="correct" if ok else "wrong_result", correct=ok)
            out.append(row)
        return out, aggregate(out)


def aggregate(results: list[dict[str, Any]], by_category: bool = True) -> dict[str, Any]:
    """Metrics over per-row results (see the module docstring for definitions)."""
    n = len(results)
    scored = [r for r in results if r["verdict"] != "excluded"]
    k = len(scored)
    correct = sum(1 for r in scored if r["verdict"] == "correct")
    errors = sum(1 for r in scored if r["verdict"] in ("error", "missing"))
    wrong = sum(1 for r in scored if r["verdict"] == "wrong_result")

    def rate(x: int, d: int) -> float | None:
        return round(x / d, 6) if d else None

    m: dict[str, Any] = {
        "n": n,
        "runnable": k,
        "correct": correct,
        "execution_accuracy": rate(correct, k),
        "valid_sql_rate": rate(sum(1 for r in results if r["valid_sql"]), n),
        "error_rate": rate(errors, k),
        "wrong_result_rate": rate(wrong, k),
        "exact_match": rate(sum(1 for r in scored if r["exact_match"]), k),
        "excluded": dict(
            Counter(str(r["excluded_reason"]).split(":")[0] for r in results if r["verdict"] == "excluded")
        ),
        "error_types": dict(
            Counter(str(r["error_type"]) for r in scored if r["verdict"] in ("error", "missing"))
        ),
    }
    cats = sorted({r["category"] for r in results if r.get("category") is not None})
    if by_category and cats:
        m["per_category"] = {
            c: aggregate([r for r in results if r.get("category") == c], False) for c in cats
        }
    return m
