"""Text-to-SQL: answer extraction, sqlglot checks, the execution sandbox, result comparison.

The API other stages use (curate, pairs, evaluate):

    sql = extract_sql(completion)                    # last ```sql fenced block, else the whole text
    canonical_sql(sql, "duckdb", parameterize_literals=True)   # for exact dedup / decontamination
    db = build_database(Path("schemas/retail.sql"), tmp / "retail.duckdb")   # DDL + rows, once per stage
    with SqlSandbox({"retail": db}, dialect="duckdb", timeout_s=5, max_rows=10_000, workers=2) as sb:
        results = sb.run_many([("retail", sql), ...])   # list[ExecResult], in input order
    results_match(candidate_result, reference_result)   # same rows (and order when the reference has ORDER BY)

`ExecResult` fields: `ok`, `error_type` (one of `ERROR_TYPES`, None when ok), `error` (one line),
`columns`, `rows` (normalized values, see `normalize_value`), `result_hash` (order-insensitive hash
of the normalized rows), `ordered` (the outermost query has ORDER BY), `ordered_hash` (hash of the
rows in returned order), `executed` (False for a static check), `exec_sql` (the SQL that ran,
after transpiling), `canonical` / `template` (canonical SQL with literals kept / replaced by `?`),
`elapsed_s`.

Execution modes (from the task config):
- dialect duckdb, engine duckdb: the SQL runs on DuckDB as written.
- another dialect, engine duckdb: parse + statement checks + a static check against the schema
  (tables and columns resolve, via sqlglot's qualify); with `execute_via_duckdb` the SQL is
  transpiled with sqlglot and executed on DuckDB.
- engine sqlite: the schema databases are SQLite files; SQL not in the sqlite dialect is
  transpiled to it first.

The sandbox is a security boundary, in layers:
1. sqlglot parse in the task dialect; exactly one statement; its kind must be in
   `allowed_statements` (select, with, values, pivot, describe, show, summarize, explain); no
   data-modifying or session node anywhere in the tree; no function that reads files or other
   databases (read_*, *_scan, glob, query, ...); no table named like a file path.
2. DuckDB's own parser (`extract_statements`) on the SQL that actually runs: one statement of an
   allowed type, so a parser differential between sqlglot and DuckDB cannot smuggle a second one.
3. The connection: database opened read-only, `enable_external_access=false` (no file, network,
   ATTACH, COPY, EXPORT), extension autoinstall/autoload off, `lock_configuration=true` (no SET,
   PRAGMA or RESET can undo any of this), `temp_directory=''` (nothing spills to disk),
   `memory_limit`, one thread. SQLite: `mode=ro` URI, `PRAGMA query_only`, an authorizer that
   denies ATTACH/PRAGMA/writes/file functions, `hard_heap_limit`, extensions disabled.
4. Time: the worker interrupts its own query at `timeout_s` (`con.interrupt()` from a watchdog
   thread; a SQLite progress handler); if a worker does not answer by a hard deadline the parent
   kills it and starts a fresh one, so one bad query cannot hang the stage.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import decimal
import hashlib
import json
import logging
import math
import multiprocessing as mp
import os
import re
import shutil
import sqlite3
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import sqlglot
from sqlglot import exp

ERROR_TYPES = (
    "no_sql",  # nothing that looks like SQL in the completion
    "parse_error",  # sqlglot (or the engine's parser) rejects it
    "disallowed",  # not a read-only statement of an allowed kind, or touches files/settings
    "unknown_schema",  # the row names a schema the pipeline has no database for
    "static_error",  # (not executed) a table or column does not resolve against the schema
    "exec_error",  # the engine raised (binder error, type error, out of memory, ...)
    "timeout",  # interrupted at timeout_s, or the worker was killed at the hard deadline
    "too_many_rows",  # more than max_rows rows
    "crash",  # the worker process died
)

STATEMENT_KINDS = ("select", "with", "values", "pivot", "describe", "show", "summarize", "explain")

log = logging.getLogger("distill.tasks.sql")

# ------------------------------------------------------------------------------------------------
# extraction
# ------------------------------------------------------------------------------------------------

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.S)
_SQL_TAGS = {"sql", "duckdb", "sqlite", "postgres", "postgresql", "mysql", "psql", "tsql", "plsql"}


def extract_sql(completion: str | None, pick: str = "last") -> str | None:
    """The SQL in a completion: a fenced block tagged sql (or a dialect name), else an untagged
    fenced block, else the whole text. `pick` chooses the first or last such block (models tend to
    put the final answer last). Trailing semicolons and whitespace are removed; None if empty."""
    if completion is None:
        return None
    blocks = _FENCE.findall(completion)
    chosen: str | None = None
    if blocks:
        tagged = [b for tag, b in blocks if tag.lower() in _SQL_TAGS]
        untagged = [b for tag, b in blocks if not tag]
        cands = tagged or untagged
        if cands:
            chosen = cands[-1] if pick == "last" else cands[0]
    if chosen is None:
        chosen = completion
    sql = chosen.strip()
    while sql.endswith(";"):
        sql = sql[:-1].rstrip()
    return sql or None


# ------------------------------------------------------------------------------------------------
# parse, statement checks, canonical forms
# ------------------------------------------------------------------------------------------------


class SqlRefused(Exception):
    """A statement failed a check; `error_type` is one of ERROR_TYPES."""

    def __init__(self, error_type: str, message: str) -> None:
        super().__init__(message)
        self.error_type = error_type


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _one_line(msg: object, limit: int = 300) -> str:
    s = " ".join(_ANSI.sub("", str(msg)).split())
    return s[:limit]


def parse_sql(sql: str, dialect: str = "duckdb") -> exp.Expression:
    """Parse exactly one statement with sqlglot (`read=dialect`); raise SqlRefused otherwise."""
    try:
        stmts = [s for s in sqlglot.parse(sql, read=dialect) if s is not None]
    except sqlglot.errors.ParseError as e:
        raise SqlRefused("parse_error", _one_line(e)) from None
    except (sqlglot.errors.TokenError, sqlglot.errors.SqlglotError, RecursionError, ValueError) as e:
        raise SqlRefused("parse_error", f"{type(e).__name__}: {_one_line(e)}") from None
    if not stmts:
        raise SqlRefused("no_sql", "empty statement")
    if len(stmts) > 1:
        raise SqlRefused("disallowed", f"{len(stmts)} statements; exactly one is allowed")
    return stmts[0]  # type: ignore[return-value]


def statement_kind(expr: exp.Expression) -> str:
    """The kind of a parsed statement: one of STATEMENT_KINDS, or the sqlglot class name lower-cased
    (insert, copy, set, pragma, attach, command, ...) for everything else."""
    node = expr
    while isinstance(node, exp.Subquery):
        node = node.this
    if isinstance(node, exp.Select | exp.SetOperation):
        return "with" if (node.args.get("with_") or node.args.get("with")) else "select"
    if isinstance(node, exp.Values):
        return "values"
    if isinstance(node, exp.Pivot):
        return "pivot"
    if isinstance(node, exp.Describe):
        return "describe"
    if isinstance(node, exp.Show):
        return "show"
    if type(node).__name__ == "Summarize":
        return "summarize"
    if isinstance(node, exp.Command) and str(node.this).upper() == "EXPLAIN":
        return "explain"
    return type(node).__name__.lower()


# Nodes that write, change the session or reach outside the database, wherever they appear.
_FORBIDDEN_NODES: tuple[type[exp.Expression], ...] = tuple(
    getattr(exp, n)
    for n in (
        "Insert", "Update", "Delete", "Merge", "Create", "Drop", "Alter", "Copy", "Set", "Pragma",
        "Use", "Attach", "Detach", "Install", "Command", "Transaction", "Commit", "Rollback",
        "Grant", "Revoke", "Analyze", "Cache", "Uncache", "Refresh", "TruncateTable", "LoadData",
        "Export", "Kill",
    )
    if hasattr(exp, n)
)  # fmt: skip

# Functions that read files, other databases, the environment, or run SQL from a string.
_FORBIDDEN_FUNC = re.compile(
    r"^(read_\w*|\w*_scan|\w*_scan_\w*|glob|query|query_table|sniff_csv|parquet_\w+|iceberg_\w+|delta_\w+|"
    r"getenv|load_extension|readfile|writefile|edit|fts3_tokenizer|sqlite_attach|postgres_\w+|mysql_\w+|"
    r"duckdb_secrets|which_secret|current_setting|set_config)$",
    re.I,
)
_FORBIDDEN_CALL = re.compile(
    r"\b(read_\w*|\w+_scan|glob|query|query_table|sniff_csv|parquet_\w+|iceberg_\w+|delta_\w+|getenv|"
    r"current_setting|set_config|which_secret|duckdb_secrets)\s*\(",
    re.I,
)
_FILE_LITERAL = re.compile(r"\bFROM\s+'[^']*'", re.I)
_FILEISH_TABLE = re.compile(
    r"[/\\:]|\.(csv|tsv|parquet|json|jsonl|ndjson|txt|db|duckdb|sqlite3?|gz|zst|arrow|xlsx?|avro)$", re.I
)


def _func_name(node: exp.Expression) -> str:
    if isinstance(node, exp.Anonymous):
        return str(node.name)
    if isinstance(node, exp.Func):
        return str(node.sql_name())
    return ""


def check_statement(expr: exp.Expression, allowed: Iterable[str] = ("select", "with")) -> str:
    """Raise SqlRefused("disallowed") unless the statement is read-only, of an allowed kind, and
    touches nothing outside the database. Returns its kind."""
    allowed = {a.lower() for a in allowed}
    kind = statement_kind(expr)
    if kind not in allowed:
        raise SqlRefused(
            "disallowed", f"{kind} statements are not allowed (allowed: {', '.join(sorted(allowed))})"
        )
    for node in expr.walk():
        if isinstance(node, _FORBIDDEN_NODES):
            raise SqlRefused("disallowed", f"{type(node).__name__.upper()} inside the query is not allowed")
        name = _func_name(node)  # type: ignore[arg-type]
        if name and _FORBIDDEN_FUNC.match(name):
            raise SqlRefused("disallowed", f"function {name.lower()}() is not allowed")
        if (
            isinstance(node, exp.Table)
            and isinstance(node.this, exp.Identifier)
            and _FILEISH_TABLE.search(node.name)
        ):
            raise SqlRefused("disallowed", f"table {node.name!r} looks like a file path")
    return kind


def is_ordered(expr: exp.Expression) -> bool:
    """True when the outermost query has ORDER BY (row order is then part of the answer)."""
    node = expr
    while isinstance(node, exp.Subquery):
        if node.args.get("order"):
            return True
        node = node.this
    return bool(node.args.get("order"))


def transpile(sql: str, read: str, write: str) -> str:
    """One statement transpiled from dialect `read` to `write` (raises SqlRefused on a parse error)."""
    return parse_sql(sql, read).sql(dialect=write)


def _parameterize(expr: exp.Expression, copy: bool = True) -> exp.Expression:
    def repl(node: exp.Expression) -> exp.Expression:
        # positional GROUP BY 1 / ORDER BY 2 are column references, not values
        if isinstance(node, exp.Literal) and not isinstance(node.parent, exp.Group | exp.Ordered):
            return exp.Placeholder()
        return node

    return expr.transform(repl, copy=copy)


def canonical_from_expr(expr: exp.Expression, dialect: str, parameterize_literals: bool = False) -> str:
    from sqlglot.optimizer.normalize_identifiers import normalize_identifiers

    e = expr.copy()
    if parameterize_literals:
        e = _parameterize(e, copy=False)
    e = normalize_identifiers(e, dialect=dialect)
    return e.sql(dialect=dialect, normalize=True, comments=False)


def canonical_pair_in_place(expr: exp.Expression, dialect: str) -> tuple[str, str]:
    """(canonical, template) of a parsed statement, rewriting `expr` in place (no deep copies:
    they cost more than the parse). Use only when `expr` is not needed afterwards."""
    from sqlglot.optimizer.normalize_identifiers import normalize_identifiers

    e = normalize_identifiers(expr, dialect=dialect)
    canonical = e.sql(dialect=dialect, normalize=True, comments=False)
    template = _parameterize(e, copy=False).sql(dialect=dialect, normalize=True, comments=False)
    return canonical, template


def canonical_sql(sql: str | None, dialect: str = "duckdb", parameterize_literals: bool = False) -> str:
    """A canonical text of one statement: parsed in `dialect` and regenerated with unquoted
    identifiers case-normalized, keywords and function names upper-cased, comments and layout
    dropped; with `parameterize_literals` every literal value becomes `?` (positional GROUP BY /
    ORDER BY numbers are kept). SQL that does not parse falls back to its lower-cased text with
    whitespace collapsed, so two spellings of the same broken SQL still match."""
    if sql is None:
        return ""
    try:
        return canonical_from_expr(parse_sql(sql, dialect), dialect, parameterize_literals)
    except SqlRefused:
        return " ".join(sql.lower().split())


# ------------------------------------------------------------------------------------------------
# static check against a schema (for dialects that are not executed)
# ------------------------------------------------------------------------------------------------


def static_check(expr: exp.Expression, dialect: str, schema: dict[str, dict[str, str]]) -> None:
    """Raise SqlRefused("static_error") if a table or column does not resolve against `schema`
    ({table: {column: type}}). CTE names and table functions are not tables."""
    from sqlglot.optimizer.qualify import qualify

    ctes = {c.alias_or_name.lower() for c in expr.find_all(exp.CTE)}
    known = {t.lower() for t in schema}
    for t in expr.find_all(exp.Table):
        if not isinstance(t.this, exp.Identifier):
            continue
        name = t.name.lower()
        if name not in ctes and name not in known:
            raise SqlRefused("static_error", f"table {t.name!r} does not exist")
    try:
        qualify(
            expr.copy(),
            schema=dict(schema),  # type: ignore[arg-type]
            dialect=dialect,
            validate_qualify_columns=True,
            quote_identifiers=False,
        )
    except sqlglot.errors.OptimizeError as e:
        raise SqlRefused("static_error", _one_line(e)) from None
    except (sqlglot.errors.SqlglotError, KeyError, ValueError, AttributeError) as e:
        # qualify cannot follow some valid constructs; that is not evidence of an error
        log.debug("static check skipped: %s", e)


# ------------------------------------------------------------------------------------------------
# databases
# ------------------------------------------------------------------------------------------------

_SQLITE_SUFFIXES = {".sqlite", ".sqlite3", ".db"}


def _is_sqlite_file(p: Path) -> bool:
    try:
        with open(p, "rb") as f:
            return f.read(16) == b"SQLite format 3\x00"
    except OSError:
        return False


def build_database(schema_sql_file: Path, out_path: Path, engine: str = "duckdb") -> Path:
    """Create the database a schema file describes, at `out_path`, and return it.

    `schema_sql_file` is DDL + INSERTs runnable by DuckDB (top to bottom), or — for the sqlite
    engine — an SQLite database file, which is copied. For the sqlite engine a DDL file is run in
    DuckDB and its tables are copied into SQLite (lists/structs as JSON text, dates as ISO text,
    decimals as REAL). Written to a temporary name and renamed, so a crash leaves no half file.
    Raises ValueError naming the file when the DDL fails.
    """
    import duckdb

    schema_sql_file = Path(schema_sql_file)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    if _is_sqlite_file(schema_sql_file):
        if engine != "sqlite":
            raise ValueError(
                f"{schema_sql_file}: an SQLite database; set the task's engine: sqlite to use it"
            )
        shutil.copyfile(schema_sql_file, tmp)
        os.replace(tmp, out_path)
        return out_path
    text = schema_sql_file.read_text(encoding="utf-8")
    try:
        if engine == "duckdb":
            con = duckdb.connect(str(tmp))
            try:
                con.execute(text)
                con.execute("CHECKPOINT")
            finally:
                con.close()
        elif engine == "sqlite":
            con = duckdb.connect()
            try:
                con.execute(text)
                _duckdb_to_sqlite(con, tmp)
            finally:
                con.close()
        else:
            raise ValueError(f"unknown engine {engine!r}; use duckdb or sqlite")
    except duckdb.Error as e:
        tmp.unlink(missing_ok=True)
        Path(str(tmp) + ".wal").unlink(missing_ok=True)
        raise ValueError(f"{schema_sql_file}: building the database failed: {_one_line(e)}") from None
    os.replace(tmp, out_path)
    return out_path


def _sqlite_type(duck_type: str) -> str:
    t = duck_type.upper()
    if any(k in t for k in ("[]", "STRUCT", "MAP", "UNION", "LIST")):
        return "TEXT"
    if any(k in t for k in ("INT",)) or t == "BOOLEAN":
        return "INTEGER"
    if any(k in t for k in ("DECIMAL", "DOUBLE", "FLOAT", "REAL", "NUMERIC")):
        return "REAL"
    if t == "BLOB":
        return "BLOB"
    return "TEXT"


def _sqlite_value(v: Any) -> Any:
    if v is None or isinstance(v, int | float | str | bytes):
        return v
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, decimal.Decimal):
        return float(v)
    if isinstance(v, _dt.datetime):
        return v.isoformat(sep=" ")
    if isinstance(v, _dt.date | _dt.time):
        return v.isoformat()
    if isinstance(v, list | tuple | dict):
        return json.dumps(v, default=str)
    return str(v)


def _duckdb_to_sqlite(con: Any, out: Path) -> None:
    tables = con.execute(
        "SELECT table_name FROM duckdb_tables() WHERE schema_name = 'main' AND NOT internal ORDER BY table_name"
    ).fetchall()
    lite = sqlite3.connect(str(out))
    try:
        for (table,) in tables:
            cols = con.execute(
                "SELECT column_name, data_type FROM duckdb_columns() WHERE table_name = ? AND schema_name = 'main' "
                "ORDER BY column_index",
                [table],
            ).fetchall()
            col_sql = ", ".join(f'"{c}" {_sqlite_type(t)}' for c, t in cols)
            lite.execute(f'CREATE TABLE "{table}" ({col_sql})')
            rows = con.execute(f'SELECT * FROM "{table}"').fetchall()
            marks = ", ".join("?" for _ in cols)
            lite.executemany(
                f'INSERT INTO "{table}" VALUES ({marks})', [tuple(map(_sqlite_value, r)) for r in rows]
            )
        lite.commit()
    finally:
        lite.close()


def schema_tables(db_file: Path, engine: str = "duckdb") -> dict[str, dict[str, str]]:
    """{table: {column: type}} of a built database (for `static_check`)."""
    out: dict[str, dict[str, str]] = {}
    if engine == "sqlite":
        con = sqlite3.connect(f"file:{db_file}?mode=ro", uri=True)
        try:
            for (t,) in con.execute(
                "SELECT name FROM sqlite_master WHERE type IN ('table','view')"
            ).fetchall():
                out[t] = {r[1]: (r[2] or "TEXT") for r in con.execute(f'PRAGMA table_info("{t}")').fetchall()}
        finally:
            con.close()
        return out
    import duckdb

    dcon = duckdb.connect(str(db_file), read_only=True)
    try:
        for t, c, ty in dcon.execute(
            "SELECT table_name, column_name, data_type FROM duckdb_columns() WHERE schema_name = 'main' "
            "AND NOT internal ORDER BY table_name, column_index"
        ).fetchall():
            out.setdefault(t, {})[c] = ty
    finally:
        dcon.close()
    return out


def build_databases(schema_files: Iterable[Path], out_dir: Path, engine: str = "duckdb") -> dict[str, Path]:
    """`build_database` for each file; keys are file stems (`schemas/retail.sql` -> "retail")."""
    out: dict[str, Path] = {}
    for f in schema_files:
        f = Path(f)
        if f.stem in out:
            raise ValueError(
                f"two schema files are named {f.stem!r}; schema names (file stems) must be unique"
            )
        suffix = ".sqlite" if engine == "sqlite" else ".duckdb"
        out[f.stem] = build_database(f, Path(out_dir) / f"{f.stem}{suffix}", engine)
    return out


# ------------------------------------------------------------------------------------------------
# results
# ------------------------------------------------------------------------------------------------


def normalize_value(v: Any) -> Any:
    """A JSON-able value that compares equal across equivalent query spellings: numbers that are
    whole become int (3 == 3.0 == Decimal('3.00')), other numbers are rounded to 10 significant
    digits (sum/avg in another order differ in the last bits), NaN/inf become strings, temporal
    values ISO text, intervals seconds, blobs hex, lists/structs/maps recursively."""
    if v is None or isinstance(v, bool | str):
        return v
    if isinstance(v, int):
        return v
    if isinstance(v, float | decimal.Decimal):
        f = float(v)
        if math.isnan(f):
            return "NaN"
        if math.isinf(f):
            return "inf" if f > 0 else "-inf"
        if f.is_integer() and abs(f) < 2**53:
            return int(f)
        return float(f"{f:.10g}")
    if isinstance(v, _dt.datetime | _dt.date | _dt.time):
        return v.isoformat()
    if isinstance(v, _dt.timedelta):
        return {"interval_s": normalize_value(v.total_seconds())}
    if isinstance(v, bytes | bytearray | memoryview):
        return bytes(v).hex()
    if isinstance(v, uuid.UUID):
        return str(v)
    if isinstance(v, list | tuple):
        return [normalize_value(x) for x in v]
    if isinstance(v, dict):
        return {str(k): normalize_value(x) for k, x in v.items()}
    return str(v)


def _row_key(row: Sequence[Any]) -> str:
    return json.dumps(row, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def hash_rows(ncols: int, rows: Sequence[Sequence[Any]], ordered: bool) -> str:
    """sha256 (first 16 hex) of normalized rows; unordered = as a multiset (sorted row texts)."""
    keys = [_row_key(r) for r in rows]
    if not ordered:
        keys.sort()
    h = hashlib.sha256(f"{ncols}|{len(keys)}".encode())
    for k in keys:
        h.update(b"\n")
        h.update(k.encode())
    return h.hexdigest()[:16]


@dataclass
class ExecResult:
    ok: bool
    error_type: str | None = None
    error: str | None = None
    columns: list[str] = field(default_factory=list)
    rows: list[list[Any]] = field(default_factory=list)
    result_hash: str | None = None
    ordered: bool = False
    ordered_hash: str | None = None
    executed: bool = False
    exec_sql: str | None = None
    canonical: str | None = None
    template: str | None = None
    kind: str | None = None
    parser: str = "sqlglot"  # "duckdb" when sqlglot could not parse it and DuckDB's parser decided
    elapsed_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def agreement_key(self) -> str | None:
        """What two passing candidates must share to agree: the result set when executed, else the
        canonical SQL (static checking only)."""
        if not self.ok:
            return None
        if self.executed:
            return self.result_hash
        return hashlib.sha256((self.canonical or "").encode()).hexdigest()[:16]


def results_match(candidate: ExecResult, reference: ExecResult) -> bool:
    """True when both ran and returned the same rows: as multisets, and also in the same order
    when the reference has ORDER BY. Column names are ignored (aliases differ), column order is not."""
    if not (candidate.ok and reference.ok):
        return False
    if candidate.executed != reference.executed:
        return False
    if candidate.agreement_key != reference.agreement_key:
        return False
    if reference.ordered and reference.executed:
        return candidate.ordered_hash == reference.ordered_hash
    return True


# ------------------------------------------------------------------------------------------------
# the worker (runs in a spawned process)
# ------------------------------------------------------------------------------------------------

_DUCK_TYPES = {
    "select": {"SELECT"},
    "with": {"SELECT"},
    "values": {"SELECT"},
    "describe": {"SELECT"},
    "show": {"SELECT"},
    "summarize": {"SELECT"},
    "pivot": {"SELECT", "MULTI"},
    "explain": {"EXPLAIN"},
}

# SQLite authorizer action codes that a read-only query needs; everything else is denied.
_SQLITE_OK_ACTIONS = {
    sqlite3.SQLITE_SELECT,
    sqlite3.SQLITE_READ,
    sqlite3.SQLITE_FUNCTION,
    getattr(sqlite3, "SQLITE_RECURSIVE", 33),
}
_SQLITE_BAD_FUNCS = {
    "load_extension",
    "readfile",
    "writefile",
    "edit",
    "fts3_tokenizer",
    "zipfile",
    "sqlar_compress",
}


class _Watchdog(threading.Thread):
    """One thread per worker that interrupts the running DuckDB query at its deadline."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.cv = threading.Condition()
        self.deadline: float | None = None
        self.target: Any = None
        self.fired = False

    def arm(self, target: Any, seconds: float) -> None:
        with self.cv:
            self.target, self.deadline, self.fired = target, time.monotonic() + seconds, False
            self.cv.notify()

    def disarm(self) -> bool:
        with self.cv:
            self.deadline, self.target = None, None
            return self.fired

    def run(self) -> None:
        with self.cv:
            while True:
                if self.deadline is None:
                    self.cv.wait()
                    continue
                rem = self.deadline - time.monotonic()
                if rem > 0:
                    self.cv.wait(rem)
                    continue
                self.fired, self.deadline = True, None
                with contextlib.suppress(Exception):
                    self.target.interrupt()


class SqlExecutor:
    """Checks and runs one statement at a time against read-only databases. Lives inside a
    sandbox worker process; usable in-process for tests and tools, but only the worker pool
    protects the caller from a query that will not stop."""

    def __init__(self, settings: dict[str, Any]) -> None:
        self.s = settings
        self.db_files: dict[str, str] = {k: str(v) for k, v in settings["db_files"].items()}
        self.dialect: str = settings.get("dialect", "duckdb")
        self.engine: str = settings.get("engine", "duckdb")
        self.timeout_s: float = float(settings.get("timeout_s", 5.0))
        self.max_rows: int = int(settings.get("max_rows", 10_000))
        self.allowed: tuple[str, ...] = tuple(settings.get("allowed_statements") or ("select", "with"))
        self.enforce: bool = bool(settings.get("enforce_allowlist", True))
        self.execute_via_duckdb: bool = bool(settings.get("execute_via_duckdb", False))
        self.memory_limit: str = str(settings.get("memory_limit", "512MB"))
        self.parser_fallback: bool = bool(settings.get("parser_fallback", True))
        self._cons: dict[str, Any] = {}
        self._schemas: dict[str, dict[str, dict[str, str]]] = {}
        self._dog: _Watchdog | None = None
        self._deadline = 0.0

    # -- where and how a statement runs
    @property
    def exec_dialect(self) -> str | None:
        if self.engine == "sqlite":
            return "sqlite"
        if self.dialect == "duckdb" or self.execute_via_duckdb:
            return "duckdb"
        return None  # static check only

    def _duck(self, schema: str) -> Any:
        con = self._cons.get(schema)
        if con is None:
            import duckdb

            cfg: dict[str, Any] = {
                "enable_external_access": "false",
                "autoinstall_known_extensions": "false",
                "autoload_known_extensions": "false",
                "allow_community_extensions": "false",
                "threads": "1",
                "memory_limit": self.memory_limit,
                "temp_directory": "",
                "lock_configuration": "true",
            }
            con = duckdb.connect(self.db_files[schema], read_only=True, config=cfg)
            self._cons[schema] = con
            if self._dog is None:
                self._dog = _Watchdog()
                self._dog.start()
        return con

    def _lite(self, schema: str) -> Any:
        con = self._cons.get(schema)
        if con is None:
            con = sqlite3.connect(f"file:{self.db_files[schema]}?mode=ro", uri=True, check_same_thread=False)
            con.execute("PRAGMA query_only = ON")
            with contextlib.suppress(sqlite3.Error):
                con.execute(f"PRAGMA hard_heap_limit = {_parse_bytes(self.memory_limit)}")
            if hasattr(con, "enable_load_extension"):
                con.enable_load_extension(False)

            def authorizer(action: int, arg1: Any, arg2: Any, dbname: Any, source: Any) -> int:
                if action not in _SQLITE_OK_ACTIONS:
                    return sqlite3.SQLITE_DENY
                if action == sqlite3.SQLITE_FUNCTION and str(arg2).lower() in _SQLITE_BAD_FUNCS:
                    return sqlite3.SQLITE_DENY
                return sqlite3.SQLITE_OK

            con.set_authorizer(authorizer)
            con.set_progress_handler(lambda: 1 if time.monotonic() > self._deadline else 0, 2000)
            self._cons[schema] = con
        return con

    def schema_of(self, schema: str) -> dict[str, dict[str, str]]:
        if schema not in self._schemas:
            self._schemas[schema] = schema_tables(Path(self.db_files[schema]), self.engine)
        return self._schemas[schema]

    # -- one statement
    def run(self, schema: str | None, sql: str | None, keep_rows: bool = True) -> dict[str, Any]:
        t0 = time.monotonic()
        try:
            res = self._run(schema, sql)
        except SqlRefused as e:
            res = ExecResult(False, e.error_type, str(e))
        except Exception as e:  # an engine bug must cost one row, not the stage
            res = ExecResult(False, "exec_error", f"{type(e).__name__}: {_one_line(e)}")
        res.elapsed_s = round(time.monotonic() - t0, 6)
        if not keep_rows:
            res.rows = []
        return res.to_dict()

    def _run(self, schema: str | None, sql: str | None) -> ExecResult:
        if sql is None or not sql.strip():
            raise SqlRefused("no_sql", "no SQL in the completion")
        try:
            expr = parse_sql(sql, self.dialect)
        except SqlRefused as e:
            if e.error_type == "parse_error" and self._duckdb_native() and schema in self.db_files:
                return self._run_duckdb_parsed(schema, sql, str(e))
            raise
        kind = check_statement(expr, self.allowed) if self.enforce else statement_kind(expr)
        ordered = is_ordered(expr)
        if schema is None or schema not in self.db_files:
            raise SqlRefused(
                "unknown_schema",
                f"no database for schema {schema!r} (known: {', '.join(sorted(self.db_files))})",
            )
        target = self.exec_dialect
        if target is None:
            static_check(expr, self.dialect, self.schema_of(schema))
            canonical, template = canonical_pair_in_place(expr, self.dialect)
            return ExecResult(
                True,
                executed=False,
                exec_sql=sql,
                canonical=canonical,
                template=template,
                ordered=ordered,
                kind=kind,
            )
        exec_sql = sql if target == self.dialect else expr.sql(dialect=target)
        if self.engine == "sqlite":
            cols, rows = self._exec_sqlite(schema, exec_sql)
        else:
            cols, rows = self._exec_duckdb(schema, exec_sql, kind)
        if len(rows) > self.max_rows:
            raise SqlRefused("too_many_rows", f"more than {self.max_rows} rows")
        norm = [[normalize_value(v) for v in r] for r in rows]
        canonical, template = canonical_pair_in_place(expr, self.dialect)  # last use of expr
        return ExecResult(
            True,
            columns=cols,
            rows=norm,
            result_hash=hash_rows(len(cols), norm, ordered=False),
            ordered_hash=hash_rows(len(cols), norm, ordered=True),
            executed=True,
            exec_sql=exec_sql,
            canonical=canonical,
            template=template,
            ordered=ordered,
            kind=kind,
        )

    def _duckdb_native(self) -> bool:
        return self.parser_fallback and self.engine == "duckdb" and self.dialect == "duckdb"

    def _run_duckdb_parsed(self, schema: str, sql: str, sqlglot_error: str) -> ExecResult:
        """DuckDB syntax that sqlglot does not know yet: DuckDB's own parser is the judge (the
        engine is the ground truth for its dialect). The same gates apply, on DuckDB's parse: one
        statement of an allowed type (checked again in `_exec_duckdb`), and no forbidden function
        or file-path table in the text."""
        import duckdb

        con = self._duck(schema)
        try:
            stmts = con.extract_statements(sql)
        except duckdb.Error as e:
            raise SqlRefused("parse_error", f"{sqlglot_error}; duckdb: {_one_line(e)}") from None
        if len(stmts) != 1:
            raise SqlRefused("disallowed", f"{len(stmts)} statements; exactly one is allowed")
        if self.enforce:
            m = _FORBIDDEN_CALL.search(sql)
            if m:
                raise SqlRefused("disallowed", f"function {m.group(1).lower()}() is not allowed")
            if _FILE_LITERAL.search(sql):
                raise SqlRefused("disallowed", "a quoted file path in FROM is not allowed")
        ordered = _duckdb_ordered(con, sql)
        text = " ".join(sql.split())
        kind = "pivot" if str(stmts[0].type).endswith("MULTI") else "select"
        cols, rows = self._exec_duckdb(schema, sql, kind)
        if len(rows) > self.max_rows:
            raise SqlRefused("too_many_rows", f"more than {self.max_rows} rows")
        norm = [[normalize_value(v) for v in r] for r in rows]
        return ExecResult(
            True,
            columns=cols,
            rows=norm,
            result_hash=hash_rows(len(cols), norm, ordered=False),
            ordered_hash=hash_rows(len(cols), norm, ordered=True),
            ordered=ordered,
            executed=True,
            exec_sql=sql,
            canonical=text,
            template=text,
            kind=kind,
            parser="duckdb",
        )

    def _exec_duckdb(self, schema: str, sql: str, kind: str) -> tuple[list[str], list[tuple[Any, ...]]]:
        import duckdb

        con = self._duck(schema)
        try:
            stmts = con.extract_statements(sql)
        except duckdb.Error as e:
            raise SqlRefused("parse_error", f"duckdb: {_one_line(e)}") from None
        if len(stmts) != 1:
            raise SqlRefused("disallowed", f"duckdb sees {len(stmts)} statements; exactly one is allowed")
        st_type = str(stmts[0].type).rsplit(".", 1)[-1]
        ok_types = set().union(*(_DUCK_TYPES.get(a, set()) for a in self.allowed)) if self.enforce else None
        if ok_types is not None and st_type not in ok_types:
            raise SqlRefused("disallowed", f"duckdb statement type {st_type} is not allowed")
        assert self._dog is not None
        self._dog.arm(con, self.timeout_s)
        try:
            cur = con.execute(sql)
            cols = [d[0] for d in (cur.description or [])]
            rows = cur.fetchmany(self.max_rows + 1)
        except duckdb.InterruptException:
            raise SqlRefused("timeout", f"interrupted after {self.timeout_s:g}s") from None
        except duckdb.ParserException as e:
            raise SqlRefused("parse_error", f"duckdb: {_one_line(e)}") from None
        except duckdb.PermissionException as e:
            raise SqlRefused("disallowed", f"duckdb: {_one_line(e)}") from None
        except duckdb.Error as e:
            if self._dog.fired:
                raise SqlRefused("timeout", f"interrupted after {self.timeout_s:g}s") from None
            raise SqlRefused("exec_error", f"{type(e).__name__}: {_one_line(e)}") from None
        finally:
            self._dog.disarm()
        return cols, rows

    def _exec_sqlite(self, schema: str, sql: str) -> tuple[list[str], list[tuple[Any, ...]]]:
        con = self._lite(schema)
        self._deadline = time.monotonic() + self.timeout_s
        try:
            cur = con.execute(sql)
            cols = [d[0] for d in (cur.description or [])]
            rows = cur.fetchmany(self.max_rows + 1)
        except sqlite3.OperationalError as e:
            if time.monotonic() > self._deadline or "interrupted" in str(e):
                raise SqlRefused("timeout", f"interrupted after {self.timeout_s:g}s") from None
            if "not authorized" in str(e) or "prohibited" in str(e):
                raise SqlRefused("disallowed", f"sqlite: {_one_line(e)}") from None
            raise SqlRefused("exec_error", f"sqlite: {_one_line(e)}") from None
        except (sqlite3.Warning, sqlite3.ProgrammingError) as e:
            raise SqlRefused("disallowed", f"sqlite: {_one_line(e)}") from None
        except sqlite3.Error as e:
            raise SqlRefused("exec_error", f"sqlite: {_one_line(e)}") from None
        return cols, rows

    def close(self) -> None:
        for con in self._cons.values():
            with contextlib.suppress(Exception):
                con.close()
        self._cons.clear()


def _duckdb_ordered(con: Any, sql: str) -> bool:
    """Whether the outermost query has ORDER BY, from DuckDB's serialized parse tree; for
    statements it cannot serialize (PIVOT, ...), an ORDER BY outside any parentheses."""
    try:
        ser = json.loads(con.execute("SELECT json_serialize_sql(?)", [sql]).fetchone()[0])
        if not ser.get("error"):
            node = (ser.get("statements") or [{}])[0].get("node") or {}
            return any(m.get("type") == "ORDER_MODIFIER" for m in node.get("modifiers") or [])
    except Exception:
        log.debug("json_serialize_sql failed", exc_info=True)
    depth, i, low = 0, 0, sql.lower()
    while i < len(low):
        c = low[i]
        if c == "'":
            j = low.find("'", i + 1)
            i = len(low) if j < 0 else j + 1
            continue
        if c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
        elif depth == 0 and re.match(r"order\s+by\b", low[i:]) and (i == 0 or not low[i - 1].isalnum()):
            return True
        i += 1
    return False


def _parse_bytes(s: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)\s*", s, re.I)
    if not m:
        return 512 * 2**20
    unit = m.group(2).upper().rstrip("B").rstrip("I")
    return int(float(m.group(1)) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[unit])


def _worker_main(conn: Connection, settings: dict[str, Any]) -> None:
    logging.getLogger("sqlglot").setLevel(logging.CRITICAL)
    ex = SqlExecutor(settings)
    try:
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                break
            if msg is None:
                break
            job_id, schema, sql, keep_rows = msg
            conn.send((job_id, ex.run(schema, sql, keep_rows)))
    finally:
        ex.close()


# ------------------------------------------------------------------------------------------------
# the sandbox: a pool of worker processes
# ------------------------------------------------------------------------------------------------


@dataclass
class _Worker:
    proc: Any
    conn: Connection
    job: int | None = None
    sent_at: float = 0.0


class SqlSandbox:
    """A pool of worker processes that check and execute model-written SQL.

    Hand-written rather than `concurrent.futures`: a pool there cannot kill one stuck worker and
    carry on (its executor breaks as a whole), and killing the stuck process is the whole point.
    Each worker runs one statement at a time; a job that has not answered `hard_timeout_s` after
    it was sent gets its worker killed and replaced, and comes back as `timeout`; a worker that
    dies comes back as `crash` for its job. Results come back in input order.
    """

    def __init__(
        self,
        db_files: dict[str, Path],
        dialect: str = "duckdb",
        timeout_s: float = 5.0,
        max_rows: int = 10_000,
        workers: int = 2,
        engine: str = "duckdb",
        execute_via_duckdb: bool = False,
        allowed_statements: Sequence[str] = ("select", "with"),
        memory_limit: str = "512MB",
        enforce_allowlist: bool = True,
        hard_timeout_s: float | None = None,
        parser_fallback: bool = True,
    ) -> None:
        bad = [a for a in allowed_statements if a.lower() not in STATEMENT_KINDS]
        if bad:
            raise ValueError(
                f"allowed_statements: unknown kind(s) {bad}; choose from {', '.join(STATEMENT_KINDS)}"
            )
        self.settings = dict(
            db_files={k: str(v) for k, v in db_files.items()},
            dialect=dialect,
            engine=engine,
            timeout_s=timeout_s,
            max_rows=max_rows,
            allowed_statements=[a.lower() for a in allowed_statements],
            enforce_allowlist=enforce_allowlist,
            parser_fallback=parser_fallback,
            execute_via_duckdb=execute_via_duckdb,
            memory_limit=memory_limit,
        )
        self.n_workers = max(1, int(workers))
        # parse + checks come before the query timer starts; leave them room before the hard kill
        self.hard_timeout_s = hard_timeout_s if hard_timeout_s is not None else timeout_s * 2 + 3.0
        self.workers: list[_Worker] = []
        self.respawns = 0
        self._ctx = mp.get_context("spawn")  # never fork a process that runs polars/duckdb threads

    # -- lifecycle
    def __enter__(self) -> SqlSandbox:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        while len(self.workers) < self.n_workers:
            self.workers.append(self._spawn())

    def _spawn(self) -> _Worker:
        parent, child = self._ctx.Pipe(duplex=True)
        proc = self._ctx.Process(
            target=_worker_main, args=(child, self.settings), daemon=True, name="distill-sql"
        )
        proc.start()
        child.close()
        return _Worker(proc, parent)

    def _replace(self, i: int) -> None:
        w = self.workers[i]
        with contextlib.suppress(Exception):
            w.proc.kill()
        w.proc.join(5)
        with contextlib.suppress(Exception):
            w.conn.close()
        self.workers[i] = self._spawn()
        self.respawns += 1

    def worker_pids(self) -> list[int]:
        return [w.proc.pid for w in self.workers]

    def close(self) -> None:
        for w in self.workers:
            with contextlib.suppress(Exception):
                w.conn.send(None)
        for w in self.workers:
            w.proc.join(2)
            if w.proc.is_alive():
                w.proc.kill()
                w.proc.join(2)
            with contextlib.suppress(Exception):
                w.conn.close()
        self.workers = []

    # -- work
    def run(self, schema: str | None, sql: str | None) -> ExecResult:
        return self.run_many([(schema, sql)])[0]

    def run_many(
        self,
        items: Sequence[tuple[str | None, str | None]],
        on_result: Callable[[int, ExecResult], None] | None = None,
        keep_rows: bool = True,
    ) -> list[ExecResult]:
        """Check and execute each (schema, sql); one ExecResult per item, in input order.
        With keep_rows=False the result rows are not sent back (hashes and columns are): what
        curation needs, at a fraction of the memory for large candidate sets."""
        if not self.workers:
            self.start()
        results: list[ExecResult | None] = [None] * len(items)
        pending = deque(range(len(items)))

        def finish(job: int, res: ExecResult) -> None:
            results[job] = res
            if on_result is not None:
                on_result(job, res)

        while pending or any(w.job is not None for w in self.workers):
            for w in self.workers:
                if w.job is None and pending:
                    job = pending.popleft()
                    schema, sql = items[job]
                    try:
                        w.conn.send((job, schema, sql, keep_rows))
                    except (OSError, ValueError):
                        pending.appendleft(job)
                        self._replace(self.workers.index(w))
                        continue
                    w.job, w.sent_at = job, time.monotonic()
            busy = [w for w in self.workers if w.job is not None]
            if not busy:
                continue
            now = time.monotonic()
            next_deadline = min(w.sent_at + self.hard_timeout_s for w in busy)
            ready = wait([w.conn for w in busy], timeout=max(0.0, next_deadline - now))
            for i, w in enumerate(list(self.workers)):
                if w.job is None:
                    continue
                if w.conn in ready:
                    try:
                        job_id, payload = w.conn.recv()
                    except (EOFError, OSError):
                        job = w.job
                        w.job = None
                        code = w.proc.exitcode
                        self._replace(i)
                        finish(job, ExecResult(False, "crash", f"the SQL worker died (exit code {code})"))
                        continue
                    w.job = None
                    finish(job_id, ExecResult(**payload))
                elif time.monotonic() > w.sent_at + self.hard_timeout_s:
                    job = w.job
                    w.job = None
                    self._replace(i)
                    finish(
                        job,
                        ExecResult(
                            False,
                            "timeout",
                            f"no answer after {self.hard_timeout_s:g}s; the worker was killed",
                        ),
                    )
        return [r for r in results if r is not None]
