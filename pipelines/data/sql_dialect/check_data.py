"""Validate the DuckDB SQL task data: schemas, seed questions and the held-out eval set.

Checks (exit status 1 with one line per problem when any fails):

* ``schemas/*.sql`` are exactly what ``make_schemas.py`` generates, run top to bottom in a
  fresh in-memory DuckDB and give every table between MIN_ROWS and MAX_ROWS rows;
* every line of ``seeds.jsonl`` / ``eval.jsonl`` is a JSON object with exactly the expected
  keys, unique ids, a known schema and category;
* every gold SQL is one statement that ``sqlglot.parse_one(sql, read="duckdb")`` accepts, uses
  no time- or randomness-dependent function, and (whenever it returns more than one row or has
  a LIMIT) ends with an ORDER BY;
* every gold SQL runs on a read-only copy of its database, returns at least one row with a
  non-NULL value, and returns the same columns and rows (in the same order) when run twice,
  with one thread, and on copies of the database whose rows were inserted in reversed and in
  shuffled order (this catches ties under ORDER BY ... LIMIT, ROW_NUMBER over non-unique keys,
  ``list()``/``string_agg`` without ORDER BY, and the like);
* no eval question shares a word 5-gram with any seed question, no eval gold SQL equals a seed
  gold SQL after whitespace/case normalisation, and no question is duplicated;
* minimum counts overall, per schema and per category, and coverage of DuckDB-specific syntax.

Usage: ``python check_data.py [-v]`` (needs duckdb and sqlglot only).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import random
import re
import shutil
import sys
import tempfile
from collections import Counter
from decimal import Decimal
from pathlib import Path

import duckdb
import sqlglot
from sqlglot import exp

HERE = Path(__file__).resolve().parent
SCHEMA_DIR = HERE / "schemas"
SEEDS = HERE / "seeds.jsonl"
EVAL = HERE / "eval.jsonl"

CATEGORIES = ("join", "aggregate", "window", "cte", "date", "list_struct", "duckdb_specific", "filter", "subquery", "set_op")
SEED_KEYS = {"id", "schema", "question", "sql", "category"}
EVAL_KEYS = {"id", "question", "sql", "db", "category"}

MIN_SEEDS, MIN_EVAL = 160, 60
MIN_SEEDS_PER_CATEGORY, MIN_EVAL_PER_CATEGORY = 8, 3
MIN_SEEDS_PER_SCHEMA, MIN_EVAL_PER_SCHEMA = 20, 8
MIN_ROWS, MAX_ROWS = 10, 60
NGRAM = 5

# Time- or randomness-dependent SQL makes the gold answer change between runs.
FORBIDDEN = re.compile(
    r"\b(random|setseed|uuid|gen_random_uuid|now|today|current_date|current_time|current_timestamp|"
    r"get_current_time|get_current_timestamp|localtime|localtimestamp|epoch_ms\s*\(\s*\))\b|"
    r"\busing\s+sample\b|\btablesample\b",
    re.IGNORECASE,
)

# DuckDB-specific syntax the seeds must demonstrate at least once each.
FEATURES = {
    "QUALIFY": r"\bQUALIFY\b",
    "SELECT * EXCLUDE": r"\*\s*EXCLUDE\s*\(",
    "SELECT * REPLACE": r"\*\s*(EXCLUDE\s*\([^)]*\)\s*)?REPLACE\s*\(",
    "GROUP BY ALL": r"\bGROUP\s+BY\s+ALL\b",
    "ORDER BY ALL": r"\bORDER\s+BY\s+ALL\b",
    "PIVOT": r"\bPIVOT\b",
    "UNPIVOT": r"\bUNPIVOT\b",
    "list comprehension": r"\[[^\[\]]*\bFOR\b[^\[\]]*\bIN\b[^\[\]]*\]",
    "lambda": r"\blambda\s+\w+",
    "string slicing": r"\w\)?\[\s*-?\d*\s*:\s*-?\d*\s*\]",
    "FROM-first": r"^\s*(WITH\b.*?\)\s*)?FROM\b",
    "date_trunc": r"\bdate_trunc\s*\(",
    "strftime": r"\bstrftime\s*\(",
    "ASOF JOIN": r"\bASOF\b",
    "COLUMNS(...)": r"\bCOLUMNS\s*\(",
    "UNION BY NAME": r"\bUNION\s+(ALL\s+)?BY\s+NAME\b",
    "struct field access": r"\b\w+\.\w+\.\w+\b|\b\w+\['\w+'\]",
    "unnest": r"\bunnest\s*\(",
    "arg_max/arg_min": r"\barg_(max|min)\s*\(",
    "FILTER clause": r"\bFILTER\s*\(\s*WHERE\b",
}


class Problems(list):
    def add(self, where: str, msg: str) -> None:
        self.append(f"{where}: {msg}")


# --------------------------------------------------------------------------- schemas
def load_make_schemas():
    spec = importlib.util.spec_from_file_location("make_schemas", HERE / "make_schemas.py")
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    return mod


ROW_LINE = re.compile(r"^  \(.*\)[,;]$")


def permute_inserts(sql_text: str, mode: str) -> str:
    """Reorder the row lines inside every multi-row INSERT (our generated layout: one row per line)."""
    out, block = [], []

    def flush():
        if not block:
            return
        rows = [line.rstrip(",;") for line in block]
        if mode == "reverse":
            rows.reverse()
        else:
            random.Random(1234).shuffle(rows)
        out.extend(r + ("," if i < len(rows) - 1 else ";") for i, r in enumerate(rows))
        block.clear()

    for line in sql_text.splitlines():
        if ROW_LINE.match(line):
            block.append(line)
            if line.endswith(";"):
                flush()
        else:
            flush()
            out.append(line)
    flush()
    return "\n".join(out) + "\n"


def variants_path(tmp: Path, stem: str, variant: str = "base") -> Path:
    return tmp / f"{stem}.{variant}.duckdb"


def build_db(sql_text: str, path: Path) -> None:
    con = duckdb.connect(str(path))
    try:
        con.execute(sql_text)
    finally:
        con.close()


def check_schemas(problems: Problems, tmp: Path) -> dict[str, dict[str, duckdb.DuckDBPyConnection]]:
    """Return {schema: {variant: read-only connection}} for the schemas that load.

    Variants: "base" (the file as written), "single_thread" (same file, SET threads = 1),
    "reverse" and "shuffle" (rows of every INSERT reordered).
    """
    mod = load_make_schemas()
    files = sorted(SCHEMA_DIR.glob("*.sql"))
    expected = set(mod.SCHEMAS)
    found = {f.stem for f in files}
    if found != expected:
        problems.add("schemas", f"files {sorted(found)} != generator schemas {sorted(expected)}")
    for name, fn in mod.SCHEMAS.items():
        path = SCHEMA_DIR / f"{name}.sql"
        if path.exists() and path.read_text(encoding="utf-8") != fn():
            problems.add(f"schemas/{name}.sql", "differs from make_schemas.py output (re-run the generator)")
    if not 5 <= len(files) <= 8:
        problems.add("schemas", f"expected 5-8 schema files, found {len(files)}")

    dbs: dict[str, dict[str, duckdb.DuckDBPyConnection]] = {}
    for f in files:
        text = f.read_text(encoding="utf-8")
        where = f"schemas/{f.name}"
        try:
            con = duckdb.connect()
            con.execute(text)
        except duckdb.Error as e:
            problems.add(where, f"does not run in a fresh DuckDB: {e}")
            continue
        tables = [r[0] for r in con.execute("SELECT table_name FROM information_schema.tables ORDER BY table_name").fetchall()]
        if len(tables) < 3:
            problems.add(where, f"only {len(tables)} tables")
        for t in tables:
            n = con.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0]
            if not MIN_ROWS <= n <= MAX_ROWS:
                problems.add(where, f"table {t} has {n} rows (want {MIN_ROWS}-{MAX_ROWS})")
        con.close()
        variants = {}
        for variant in ("base", "reverse", "shuffle"):
            db_path = variants_path(tmp, f.stem, variant)
            body = text if variant == "base" else permute_inserts(text, variant)
            try:
                build_db(body, db_path)
            except duckdb.Error as e:
                problems.add(where, f"{variant} copy failed to load: {e}")
                break
            variants[variant] = duckdb.connect(str(db_path), read_only=True)
        else:
            # A separate file, hence a separate database instance: `threads` is an instance-wide setting.
            single = variants_path(tmp, f.stem, "single_thread")
            shutil.copyfile(variants_path(tmp, f.stem), single)
            variants["single_thread"] = duckdb.connect(str(single), read_only=True)
            variants["single_thread"].execute("SET threads = 1")
            dbs[f.stem] = variants
    return dbs


# --------------------------------------------------------------------------- rows
def read_jsonl(path: Path, keys: set[str], problems: Problems) -> list[dict]:
    rows = []
    if not path.exists():
        problems.add(path.name, "missing")
        return rows
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        where = f"{path.name}:{n}"
        if not line.strip():
            problems.add(where, "blank line")
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            problems.add(where, f"invalid JSON: {e}")
            continue
        if not isinstance(row, dict) or set(row) != keys:
            problems.add(where, f"keys {sorted(row) if isinstance(row, dict) else type(row).__name__} != {sorted(keys)}")
            continue
        if not all(isinstance(row[k], str) and row[k].strip() for k in keys):
            problems.add(where, "every field must be a non-empty string")
            continue
        row["_where"] = f"{path.name}:{n} ({row['id']})"
        rows.append(row)
    return rows


def norm_value(v):
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return repr(v)
        return float(f"{v:.9g}")
    if isinstance(v, Decimal):
        return v.normalize()
    if isinstance(v, (list, tuple)):
        return type(v)(norm_value(x) for x in v)
    if isinstance(v, dict):
        return {k: norm_value(x) for k, x in v.items()}
    return v


def run(con: duckdb.DuckDBPyConnection, sql: str):
    cur = con.execute(sql)
    cols = [d[0] for d in cur.description]
    rows = [tuple(norm_value(v) for v in r) for r in cur.fetchall()]
    return cols, rows


def has_value(rows) -> bool:
    return any(v is not None for r in rows for v in r)


def top_level_order(tree: exp.Expression) -> bool:
    node = tree
    while isinstance(node, exp.Subquery):
        if node.args.get("order"):
            return True
        node = node.this
    return bool(node.args.get("order"))


def limit_without_order(tree: exp.Expression) -> bool:
    for node in tree.walk():
        if isinstance(node, (exp.Select, exp.Union, exp.Subquery)) and node.args.get("limit") and not node.args.get("order"):
            return True
    return False


def check_sql(row: dict, dbs: dict[str, duckdb.DuckDBPyConnection] | None, problems: Problems) -> None:
    where, sql = row["_where"], row["sql"]
    try:
        tree = sqlglot.parse_one(sql, read="duckdb")
    except Exception as e:  # sqlglot raises several error types
        problems.add(where, f"sqlglot cannot parse: {str(e).splitlines()[0]}")
        return
    if isinstance(tree, exp.Block) or len(sqlglot.parse(sql, read="duckdb")) != 1:
        problems.add(where, "gold SQL must be exactly one statement")
        return
    if any(isinstance(n, exp.Placeholder) for n in tree.walk()):
        # sqlglot reads DuckDB's open-start slice `s[:n]` as a bind parameter `:n`; write `s[1:n]`.
        problems.add(where, "sqlglot sees a bind parameter (use s[1:n] instead of s[:n])")
    if FORBIDDEN.search(sql):
        problems.add(where, f"non-deterministic function/clause: {FORBIDDEN.search(sql).group(0)!r}")
    if limit_without_order(tree):
        problems.add(where, "LIMIT without ORDER BY")
    if dbs is None:
        return
    results = {}
    try:
        results["first run"] = run(dbs["base"], sql)
        results["second run"] = run(dbs["base"], sql)
        results["threads=1"] = run(dbs["single_thread"], sql)
        results["reversed rows"] = run(dbs["reverse"], sql)
        results["shuffled rows"] = run(dbs["shuffle"], sql)
    except duckdb.Error as e:
        problems.add(where, f"DuckDB error: {str(e).splitlines()[0]}")
        return
    cols, rows = results["first run"]
    if not rows or not has_value(rows):
        problems.add(where, "empty result (no rows or only NULLs)")
    if len(rows) > 1 and not top_level_order(tree):
        problems.add(where, f"returns {len(rows)} rows but has no top-level ORDER BY")
    for label, other in results.items():
        if other != results["first run"]:
            problems.add(where, f"result differs between first run and {label}")
            break


# --------------------------------------------------------------------------- overlap
def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def ngrams(text: str, n: int = NGRAM) -> set[tuple[str, ...]]:
    w = words(text)
    return {tuple(w[i : i + n]) for i in range(len(w) - n + 1)}


def norm_sql(sql: str) -> str:
    return " ".join(sql.lower().split()).rstrip(";").strip()


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Validate pipelines/data/sql_dialect.")
    ap.add_argument("-v", "--verbose", action="store_true", help="print counts per category and schema")
    args = ap.parse_args(argv)
    problems = Problems()

    with tempfile.TemporaryDirectory() as tmpdir:
        dbs = check_schemas(problems, Path(tmpdir))
        schema_names = {f.stem for f in SCHEMA_DIR.glob("*.sql")}

        seeds = read_jsonl(SEEDS, SEED_KEYS, problems)
        evals = read_jsonl(EVAL, EVAL_KEYS, problems)

        ids = Counter(r["id"] for r in seeds + evals)
        for i, c in ids.items():
            if c > 1:
                problems.add("ids", f"{i!r} used {c} times")

        for r in seeds:
            w = r["_where"]
            if r["schema"] not in schema_names:
                problems.add(w, f"unknown schema {r['schema']!r}")
                continue
            if not re.fullmatch(rf"{re.escape(r['schema'])}-\d{{3}}", r["id"]):
                problems.add(w, "id must look like '<schema>-NNN'")
            if r["category"] not in CATEGORIES:
                problems.add(w, f"unknown category {r['category']!r}")
            check_sql(r, dbs.get(r["schema"]), problems)

        for r in evals:
            w = r["_where"]
            m = re.fullmatch(r"schemas/(\w+)\.sql", r["db"])
            if not m or not (EVAL.parent / r["db"]).exists():
                problems.add(w, f"db {r['db']!r} is not a schema file relative to eval.jsonl")
                continue
            r["schema"] = m.group(1)
            if not re.fullmatch(rf"eval-{re.escape(r['schema'])}-\d{{3}}", r["id"]):
                problems.add(w, "id must look like 'eval-<schema>-NNN' matching db")
            if r["category"] not in CATEGORIES:
                problems.add(w, f"unknown category {r['category']!r}")
            check_sql(r, dbs.get(r["schema"]), problems)

        for variants in dbs.values():
            for con in variants.values():
                con.close()

    # duplicates and overlap
    for rows, label in ((seeds, "seeds"), (evals, "eval")):
        seen: dict[str, str] = {}
        for r in rows:
            key = " ".join(words(r["question"]))
            if key in seen:
                problems.add(r["_where"], f"duplicate question in {label} (same as {seen[key]})")
            seen[key] = r["_where"]
    seed_grams: dict[tuple[str, ...], str] = {}
    for r in seeds:
        for g in ngrams(r["question"]):
            seed_grams.setdefault(g, r["id"])
    seed_sql = {norm_sql(r["sql"]): r["id"] for r in seeds}
    for r in evals:
        shared = sorted(g for g in ngrams(r["question"]) if g in seed_grams)
        if shared:
            problems.add(r["_where"], f"question shares 5-gram {' '.join(shared[0])!r} with seed {seed_grams[shared[0]]}")
        if norm_sql(r["sql"]) in seed_sql:
            problems.add(r["_where"], f"gold SQL equals seed {seed_sql[norm_sql(r['sql'])]}")

    # counts and coverage
    if len(seeds) < MIN_SEEDS:
        problems.add("seeds.jsonl", f"{len(seeds)} rows < {MIN_SEEDS}")
    if len(evals) < MIN_EVAL:
        problems.add("eval.jsonl", f"{len(evals)} rows < {MIN_EVAL}")
    seed_cat, eval_cat = Counter(r["category"] for r in seeds), Counter(r["category"] for r in evals)
    seed_sch, eval_sch = Counter(r["schema"] for r in seeds), Counter(r.get("schema") for r in evals)
    for c in CATEGORIES:
        if seed_cat[c] < MIN_SEEDS_PER_CATEGORY:
            problems.add("seeds.jsonl", f"category {c}: {seed_cat[c]} < {MIN_SEEDS_PER_CATEGORY}")
        if eval_cat[c] < MIN_EVAL_PER_CATEGORY:
            problems.add("eval.jsonl", f"category {c}: {eval_cat[c]} < {MIN_EVAL_PER_CATEGORY}")
    for s in sorted(schema_names):
        if seed_sch[s] < MIN_SEEDS_PER_SCHEMA:
            problems.add("seeds.jsonl", f"schema {s}: {seed_sch[s]} < {MIN_SEEDS_PER_SCHEMA}")
        if eval_sch[s] < MIN_EVAL_PER_SCHEMA:
            problems.add("eval.jsonl", f"schema {s}: {eval_sch[s]} < {MIN_EVAL_PER_SCHEMA}")
    for name, pattern in FEATURES.items():
        if not any(re.search(pattern, r["sql"], re.IGNORECASE | re.DOTALL) for r in seeds):
            problems.add("seeds.jsonl", f"no seed demonstrates {name}")

    if args.verbose or problems:
        print(f"seeds: {len(seeds)}  eval: {len(evals)}")
        print("category         seeds  eval")
        for c in CATEGORIES:
            print(f"  {c:<15}{seed_cat[c]:>5}{eval_cat[c]:>6}")
        print("schema           seeds  eval")
        for s in sorted(schema_names):
            print(f"  {s:<15}{seed_sch[s]:>5}{eval_sch[s]:>6}")
    if problems:
        print(f"\nFAILED: {len(problems)} problem(s)", file=sys.stderr)
        for p in problems:
            print("  " + p, file=sys.stderr)
        return 1
    print("OK: schemas, seeds and eval pass all checks")
    return 0


if __name__ == "__main__":
    sys.exit(main())
