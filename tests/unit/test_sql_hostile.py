"""Hostile SQL: every statement is refused or stopped, no file is created or read, the worker lives.

Each statement runs twice: through the full sandbox (statement allowlist + DuckDB controls), and
with the allowlist switched off, to show that DuckDB's own configuration (read-only database,
external access disabled, locked configuration, no extension loading, memory limit, interrupt)
stops it by itself.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from distill.tasks.sql import SqlSandbox, build_database

SHOP = """
CREATE TABLE customers (id INTEGER PRIMARY KEY, name VARCHAR, city VARCHAR);
INSERT INTO customers VALUES (1,'Ada','Paris'),(2,'Bo','Lyon'),(3,'Cy','Paris');
"""
TOKEN = "S3CR3T-TOKEN-7f1c"

# (statement, harmless): harmless statements may succeed without the allowlist because they
# neither read nor write anything outside the read-only database.
HOSTILE: list[tuple[str, bool]] = [
    ("COPY customers TO '{tmp}/out.csv'", False),
    ("COPY customers FROM '{secret}'", False),
    ("SELECT * FROM read_csv('{secret}')", False),
    ("SELECT * FROM read_csv_auto('{secret}', header = false)", False),
    ("SELECT content FROM read_text('{secret}')", False),
    ("SELECT * FROM read_blob('{secret}')", False),
    ("SELECT * FROM '{secret}'", False),
    ("SELECT * FROM glob('{tmp}/*')", False),
    ("SELECT * FROM read_parquet('https://example.com/x.parquet')", False),
    ("ATTACH '{tmp}/other.duckdb' AS other", False),
    ("ATTACH ':memory:' AS scratch", False),
    ("INSTALL httpfs", False),
    ("LOAD httpfs", False),
    ("SET enable_external_access = true", False),
    ("SET memory_limit = '64GB'", False),
    ("PRAGMA threads = 16", False),
    ("RESET lock_configuration", False),
    ("EXPORT DATABASE '{tmp}/exported'", False),
    ("CREATE TABLE evil AS SELECT 1 AS x", False),
    ("DROP TABLE customers", False),
    ("INSERT INTO customers VALUES (9, 'Eve', 'Oslo')", False),
    ("UPDATE customers SET city = 'Oslo'", False),
    ("SELECT 1; DROP TABLE customers", False),
    ("WITH gone AS (DELETE FROM customers RETURNING *) SELECT count(*) FROM gone", False),
    ("SELECT * FROM query('SELECT 42')", True),
    ("CHECKPOINT", True),
    ("CALL pragma_version()", True),
    ("WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) SELECT count(*) FROM r", False),
    ("SELECT sum(a.range * b.range) FROM range(100000) a, range(100000) b", False),
    ("SELECT string_agg(repeat('x', 1000), ',') FROM range(10000000)", False),
    ("SELECT list(range) FROM range(2000000000)", False),
]
RUNAWAY_MARKERS = ("WITH RECURSIVE", "range(100000) a", "repeat('x'", "range(2000000000)")


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    tmp = tmp_path_factory.mktemp("hostile")
    (tmp / "schema.sql").write_text(SHOP)
    db = build_database(tmp / "schema.sql", tmp / "db" / "shop.duckdb")
    secret = tmp / "secret.csv"
    secret.write_text(f"token\n{TOKEN}\n")
    other = tmp / "other.duckdb"
    import duckdb

    duckdb.connect(str(other)).close()
    return tmp, db, secret


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def _statements(tmp: Path, secret: Path) -> list[tuple[str, bool]]:
    return [(s.format(tmp=tmp, secret=secret), harmless) for s, harmless in HOSTILE]


@pytest.mark.parametrize("enforce", [True, False], ids=["allowlist", "duckdb-only"])
def test_hostile_statements(
    setup: tuple[Path, Path, Path], enforce: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    tmp, db, secret = setup
    assert len(HOSTILE) >= 20
    monkeypatch.chdir(tmp)  # relative paths, if any were honoured, would land here
    before = _snapshot(tmp)
    stmts = _statements(tmp, secret)
    with SqlSandbox(
        {"shop": db}, timeout_s=1.0, workers=1, memory_limit="256MB", enforce_allowlist=enforce
    ) as sb:
        pid = sb.worker_pids()
        results = sb.run_many([("shop", s) for s, _ in stmts])
        for (sql, harmless), r in zip(stmts, results, strict=True):
            if enforce or not harmless:
                assert not r.ok, f"not stopped: {sql} -> {r.rows[:3]}"
                assert r.error_type in ("disallowed", "parse_error", "exec_error", "timeout"), (
                    sql,
                    r.error_type,
                )
            if enforce and not any(m in sql for m in RUNAWAY_MARKERS):
                # refused before execution: by the statement check, not by luck at run time
                assert r.error_type in ("disallowed", "parse_error"), (sql, r.error_type, r.error)
            if any(m in sql for m in RUNAWAY_MARKERS):
                assert r.error_type in ("timeout", "exec_error"), (sql, r.error_type, r.error)
            assert TOKEN not in repr(r), f"secret leaked by {sql}"
        # the same worker served every statement and still answers correctly
        assert sb.worker_pids() == pid and sb.respawns == 0
        assert sb.run("shop", "SELECT count(*) FROM customers").rows == [[3]]
    after = _snapshot(tmp)
    assert after == before, f"files changed: {set(after.items()) ^ set(before.items())}"
