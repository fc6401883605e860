"""SQL verification throughput: candidates checked and executed per second with the worker pool.

Candidates are built from the flagship pipeline's gold SQL (pipelines/data/sql_dialect/seeds.jsonl,
six DuckDB schemas) and realistic mutations of it, each wrapped in a model-style answer: the gold
query, the query without ORDER BY, another literal, a misspelled keyword (parse error), an
unknown column (execution error), a DML/COPY statement (refused), plus a few runaway queries that
only the timeout stops. Each candidate goes through extraction, sqlglot parse and checks, DuckDB
execution, result normalization and hashing.

Measured in one run: the sandbox with 1..N worker processes, and as the baseline the same work
done serially in-process (`SqlExecutor`, no process pool, no protection) to show what the pool
costs and gains. Run from the repo root: `.venv/bin/python bench/verify_sql.py [--n 3000]`.
Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import re
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "pipelines" / "data" / "sql_dialect"


def mutations(sql: str, rng: random.Random) -> list[str]:
    out = [sql]
    out.append(re.sub(r"\s+ORDER BY[^;]*$", "", sql, flags=re.I | re.S))
    lit = re.search(r"'[^']*'|\b\d+\b", sql)
    if lit:
        out.append(sql[: lit.start()] + ("'zzz'" if lit.group().startswith("'") else "7") + sql[lit.end() :])
    out.append(re.sub(r"\bSELECT\b", "SELEC", sql, count=1))
    out.append(
        re.sub(r"\bFROM\s+(\w+)", r"FROM \1 WHERE no_such_column > 0 AND TRUE", sql, count=1)
        if "WHERE" not in sql.upper()
        else sql.replace("WHERE", "WHERE no_such_column = 1 AND", 1)
    )
    out.append(
        rng.choice(
            [
                "DELETE FROM customers",
                "COPY (SELECT 1) TO 'x.csv'",
                "INSERT INTO t VALUES (1)",
                "ATTACH 'x.db'",
            ]
        )
    )
    return out


def candidates(n: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    seeds = [json.loads(ln) for ln in (DATA / "seeds.jsonl").read_text().splitlines() if ln.strip()]
    pool: list[tuple[str, str]] = []
    for s in seeds:
        for m in mutations(s["sql"], rng):
            pool.append(
                (s["schema"], f"Here is the query:\n```sql\n{m}\n```\nIt returns the requested rows.")
            )
    out = [rng.choice(pool) for _ in range(n)]
    runaway = (
        "```sql\nWITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) SELECT count(*) FROM r\n```"
    )
    for i in range(0, n, 1000):  # one in a thousand never ends on its own
        out[i] = (out[i][0], runaway)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=3000, help="candidates")
    ap.add_argument("--workers", type=str, default="1,2", help="worker counts to measure")
    ap.add_argument("--timeout", type=float, default=1.0)
    args = ap.parse_args()

    from distill.tasks.sql import SqlExecutor, SqlSandbox, build_databases, extract_sql

    with tempfile.TemporaryDirectory() as td:
        t = time.perf_counter()
        dbs = build_databases(sorted((DATA / "schemas").glob("*.sql")), Path(td))
        build_s = time.perf_counter() - t
        items = [(schema, extract_sql(text)) for schema, text in candidates(args.n, 0)]
        per_workers: dict[str, float] = {}
        startup: dict[str, float] = {}
        types: collections.Counter[str] = collections.Counter()
        for w in [int(x) for x in args.workers.split(",")]:
            t = time.perf_counter()
            with SqlSandbox(dbs, timeout_s=args.timeout, workers=w) as sb:
                sb.run_many([(s, "SELECT 1") for s in list(dbs) * w])  # workers up, databases open
                startup[str(w)] = round(time.perf_counter() - t, 2)
                t = time.perf_counter()
                res = sb.run_many(items)
                dt = time.perf_counter() - t
            per_workers[str(w)] = round(len(items) / dt, 1)
            types = collections.Counter("pass" if r.ok else r.error_type for r in res)
            print(f"{w} worker(s): {len(items)} candidates in {dt:.2f}s", file=sys.stderr)
        # baseline: the same work in this process, serially, without the pool
        ex = SqlExecutor(
            {
                "db_files": {k: str(v) for k, v in dbs.items()},
                "dialect": "duckdb",
                "timeout_s": args.timeout,
                "max_rows": 10_000,
            }
        )
        for s in dbs:
            ex.run(s, "SELECT 1")
        t = time.perf_counter()
        for s, q in items:
            ex.run(s, q)
        serial_s = time.perf_counter() - t
        ex.close()
    serial = len(items) / serial_s
    best = max(per_workers, key=lambda k: per_workers[k])
    result = {
        "candidates": len(items),
        "candidates_per_s": per_workers,
        "inprocess_serial_per_s": round(serial, 1),
        f"speedup_{best}_workers_vs_serial": round(per_workers[best] / serial, 2),
        "pool_overhead_1_worker": round(serial / per_workers["1"], 2) if "1" in per_workers else None,
        "pool_startup_s": startup,
        "build_databases_s": round(build_s, 2),
        "verdicts": dict(types.most_common()),
        "cpus": os.cpu_count(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
