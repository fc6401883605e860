"""Eval sets and prediction files, and the databases they run on.

Eval set format (JSONL, one object per line):

    {"id": "retail-001",                       # unique; predictions refer to it
     "question": "How many orders ...?",
     "sql": "SELECT count(*) FROM orders",     # the gold query
     "db": "schemas/retail.sql",               # .duckdb / .sqlite / a DDL+INSERT .sql file;
                                               #   absolute or relative to the eval file
     "setup_sql": "CREATE TABLE t AS ...",     # optional, run on (a copy of) db first; alone it
                                               #   builds a database from nothing
     "category": "aggregation"}                # optional, for the per-category breakdown

At least one of `db` / `setup_sql` is required. Other keys are kept and passed to prompt templates.

Predictions (JSONL): `{"id": ..., "sql": ...}`; a `completion` (raw model output) is accepted
instead of `sql`, and the SQL is extracted from it (last ```sql block).

Databases: every distinct (db, setup_sql) pair becomes one database file in a work folder: a copy
of the source file, or one built from the .sql file, with setup_sql applied. The sandbox opens
those copies read-only; the source files are only ever read.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distill.errors import DistillError

REQUIRED = ("id", "question", "sql")
_SQLITE_MAGIC = b"SQLite format 3\x00"


@dataclass
class EvalRow:
    id: str
    question: str
    sql: str
    db: Path | None = None
    setup_sql: str | None = None
    category: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    line: int = 0

    @property
    def db_key(self) -> str:
        """Rows that need the same database share one key."""
        h = hashlib.sha256()
        h.update(str(self.db.resolve() if self.db else "").encode())
        h.update(b"\0")
        h.update((self.setup_sql or "").encode())
        return ("db" if not self.db else self.db.stem.replace(".", "_")) + "-" + h.hexdigest()[:10]

    def template_vars(self) -> dict[str, Any]:
        v = dict(self.extra)
        v.update({"id": self.id, "question": self.question, "category": self.category})
        return v


def _is_sqlite(p: Path) -> bool:
    try:
        with open(p, "rb") as f:
            return f.read(16) == _SQLITE_MAGIC
    except OSError:
        return False


def engine_of(db: Path | None) -> str:
    """'sqlite' for an SQLite file, else 'duckdb' (DuckDB files and .sql schema files)."""
    return "sqlite" if db is not None and db.suffix.lower() != ".sql" and _is_sqlite(db) else "duckdb"


def read_jsonl_objects(
    path: str | Path, errors: list[str], what: str = ""
) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line of a JSONL file; bad lines go to `errors`
    as `file:line: ...` (shared by the SQL and JSON eval-set loaders)."""
    p = Path(path)
    if not p.is_file():
        raise DistillError(f"{path}: no such eval set file")
    out: list[tuple[int, dict[str, Any]]] = []
    for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            errors.append(f"{path}:{i}: not valid JSON ({e.msg})")
            continue
        if not isinstance(obj, dict):
            errors.append(f"{path}:{i}: each line must be a JSON object{what}")
            continue
        out.append((i, obj))
    return out


def load_eval_set(path: str | Path) -> list[EvalRow]:
    """Read and check an eval set; every problem is one line `file:line: what to do`."""
    p = Path(path)
    rows: list[EvalRow] = []
    errors: list[str] = []
    seen: dict[str, int] = {}
    for i, obj in read_jsonl_objects(p, errors):
        missing = [
            k for k in REQUIRED if not isinstance(obj.get(k), str | int) or str(obj.get(k)).strip() == ""
        ]
        if missing:
            errors.append(f"{path}:{i}: missing or empty key(s) {', '.join(missing)}")
            continue
        rid = str(obj["id"])
        if rid in seen:
            errors.append(f"{path}:{i}: id {rid!r} already used on line {seen[rid]}; ids must be unique")
            continue
        seen[rid] = i
        db = None
        if obj.get("db"):
            db = Path(str(obj["db"])).expanduser()
            if not db.is_absolute():
                db = p.parent / db
            if not db.is_file():
                errors.append(f"{path}:{i}: db {obj['db']!r} not found (looked at {db})")
                continue
        setup = obj.get("setup_sql")
        if db is None and not setup:
            errors.append(f"{path}:{i}: give `db` (a .duckdb/.sqlite/.sql file) and/or `setup_sql`")
            continue
        if setup is not None and not isinstance(setup, str):
            errors.append(f"{path}:{i}: setup_sql must be a string")
            continue
        cat = obj.get("category")
        extra = {
            k: v for k, v in obj.items() if k not in ("id", "question", "sql", "db", "setup_sql", "category")
        }
        rows.append(
            EvalRow(
                rid,
                str(obj["question"]),
                str(obj["sql"]),
                db,
                setup,
                None if cat is None else str(cat),
                extra,
                i,
            )
        )
    if errors:
        raise DistillError(*errors[:20], *([f"... and {len(errors) - 20} more"] if len(errors) > 20 else []))
    if not rows:
        raise DistillError(f"{path}: the eval set is empty")
    return rows


def load_predictions(path: str | Path) -> tuple[dict[str, str | None], dict[str, str | None]]:
    """{id: sql} and {id: raw completion or None} from a predictions JSONL file."""
    from distill.tasks.sql import extract_sql

    p = Path(path)
    if not p.is_file():
        raise DistillError(f"{path}: no such predictions file")
    sqls: dict[str, str | None] = {}
    raws: dict[str, str | None] = {}
    for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DistillError(f"{path}:{i}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict) or "id" not in obj:
            raise DistillError(f"{path}:{i}: each line must be an object with `id` and `sql`")
        rid = str(obj["id"])
        if rid in sqls:
            raise DistillError(f"{path}:{i}: a second prediction for id {rid!r}; keep one per id")
        if "sql" in obj:
            sqls[rid] = None if obj["sql"] is None else extract_sql(str(obj["sql"]))
            raws[rid] = None
        elif "completion" in obj:
            raws[rid] = None if obj["completion"] is None else str(obj["completion"])
            sqls[rid] = extract_sql(raws[rid])
        else:
            raise DistillError(f"{path}:{i}: no `sql` (or `completion`) key")
    return sqls, raws


# ------------------------------------------------------------------------------------------------
# databases
# ------------------------------------------------------------------------------------------------


@dataclass
class PreparedDb:
    key: str
    path: Path | None  # None when it could not be built
    engine: str
    error: str | None = None
    ddl: str = ""


def prepare_databases(rows: list[EvalRow], work_dir: Path, dialect: str = "duckdb") -> dict[str, PreparedDb]:
    """Build one database per distinct (db, setup_sql) under `work_dir`. A database that fails to
    build is recorded with its error (its rows are then reported, not fatal)."""
    from distill.tasks.sql import build_database

    work_dir.mkdir(parents=True, exist_ok=True)
    out: dict[str, PreparedDb] = {}
    for r in rows:
        key = r.db_key
        if key in out:
            continue
        engine = engine_of(r.db)
        if engine == "duckdb" and dialect == "sqlite" and (r.db is None or r.db.suffix.lower() == ".sql"):
            engine = "sqlite"  # a schema file evaluated in the sqlite dialect runs on SQLite
        target = work_dir / f"{key}.{'sqlite' if engine == 'sqlite' else 'duckdb'}"
        try:
            if target.exists():
                target.unlink()
            if r.db is not None and r.db.suffix.lower() == ".sql":
                build_database(r.db, target, engine)
            elif r.db is not None:
                shutil.copyfile(r.db, target)
            if r.setup_sql:
                _apply_setup(target, r.setup_sql, engine)
            out[key] = PreparedDb(key, target, engine, ddl=_ddl_of(r, target, engine))
        except Exception as e:  # a broken db costs its rows (reported), not the evaluation
            msg = " ".join(str(e).split())[:300]
            out[key] = PreparedDb(
                key, None, engine, f"database could not be prepared: {type(e).__name__}: {msg}"
            )
    return out


def _apply_setup(target: Path, setup_sql: str, engine: str) -> None:
    if engine == "sqlite":
        import sqlite3

        con = sqlite3.connect(str(target))
        try:
            con.executescript(setup_sql)
            con.commit()
        finally:
            con.close()
        return
    import duckdb

    con = duckdb.connect(str(target))
    try:
        con.execute(setup_sql)
        con.execute("CHECKPOINT")
    finally:
        con.close()


def _ddl_of(row: EvalRow, db: Path, engine: str) -> str:
    """The CREATE statements a prompt shows for this row's database."""
    if row.db is not None and row.db.suffix.lower() == ".sql" and not row.setup_sql:
        from distill.backends.sqlschema import ddl_only

        return ddl_only(row.db.read_text(encoding="utf-8"))
    if engine == "sqlite":
        import sqlite3

        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            stmts = [
                r[0]
                for r in con.execute(
                    "SELECT sql FROM sqlite_master WHERE sql IS NOT NULL ORDER BY rowid"
                ).fetchall()
            ]
        finally:
            con.close()
    else:
        import duckdb

        con = duckdb.connect(str(db), read_only=True)
        try:
            stmts = [r[0] for r in con.execute(
                "SELECT sql FROM duckdb_tables() WHERE schema_name = 'main' AND NOT internal ORDER BY table_name").fetchall()]  # fmt: skip
            stmts += [r[0] for r in con.execute(
                "SELECT sql FROM duckdb_views() WHERE schema_name = 'main' AND NOT internal ORDER BY view_name").fetchall()]  # fmt: skip
        finally:
            con.close()
    return "\n\n".join(s.strip().rstrip(";") + ";" for s in stmts if s) + "\n"


def file_digest(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
