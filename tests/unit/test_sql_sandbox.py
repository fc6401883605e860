"""The SQL sandbox: execution, normalization, limits, the worker pool's kill/respawn, engines."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from distill.tasks.sql import SqlExecutor, SqlSandbox, build_database, results_match, schema_tables

SHOP = """
CREATE TABLE customers (id INTEGER PRIMARY KEY, name VARCHAR, city VARCHAR, tags VARCHAR[]);
CREATE TABLE orders (id INTEGER PRIMARY KEY, customer_id INTEGER, amount DECIMAL(10,2), placed DATE);
INSERT INTO customers VALUES (1,'Ada','Paris',['vip']),(2,'Bo','Lyon',[]),(3,'Cy','Paris',NULL),(4,'Di','Rome',['new']);
INSERT INTO orders VALUES (1,1,10.50,'2024-01-02'),(2,1,20.00,'2024-02-03'),(3,2,5.25,'2024-02-10'),
  (4,3,99.99,'2024-03-01'),(5,4,1.00,'2024-03-05');
"""

RUNAWAY = "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) SELECT count(*) FROM r"


@pytest.fixture(scope="module")
def shop_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("shop")
    (d / "shop.sql").write_text(SHOP)
    return build_database(d / "shop.sql", d / "shop.duckdb")


@pytest.fixture(scope="module")
def sandbox(shop_db: Path):
    with SqlSandbox({"shop": shop_db}, timeout_s=1.0, workers=2, max_rows=100) as sb:
        yield sb


def test_build_database_and_schema(shop_db: Path, tmp_path: Path) -> None:
    tables = schema_tables(shop_db)
    assert set(tables) == {"customers", "orders"}
    assert list(tables["orders"]) == ["id", "customer_id", "amount", "placed"]
    bad = tmp_path / "bad.sql"
    bad.write_text("CREATE TABLE t (i INTEGER);\nINSERT INTO nope VALUES (1);\n")
    with pytest.raises(ValueError, match="bad.sql: building the database failed"):
        build_database(bad, tmp_path / "bad.duckdb")
    assert not (tmp_path / "bad.duckdb").exists()


def test_run_many_results(sandbox: SqlSandbox) -> None:
    items = [
        ("shop", "SELECT count(*) FROM customers"),
        ("shop", "SELECT city, count(*) AS n FROM customers GROUP BY city ORDER BY n DESC, city"),
        ("shop", "SELECT sum(amount) FROM orders"),
        ("shop", "SELECT name, tags FROM customers WHERE id = 1"),
        ("shop", "SELECT nope FROM customers"),
        ("shop", "SELEC 1"),
        ("nowhere", "SELECT 1"),
        ("shop", None),
        ("shop", "SELECT * FROM range(1000)"),
    ]
    r = sandbox.run_many(items)
    assert [x.ok for x in r] == [True, True, True, True, False, False, False, False, False]
    assert r[0].rows == [[4]] and r[0].columns == ["count_star()"] and not r[0].ordered
    assert r[1].rows == [["Paris", 2], ["Lyon", 1], ["Rome", 1]] and r[1].ordered
    assert r[2].rows == [[136.74]]  # DECIMAL normalized to a float
    assert r[3].rows == [["Ada", ["vip"]]]
    assert [x.error_type for x in r[4:]] == [
        "exec_error",
        "parse_error",
        "unknown_schema",
        "no_sql",
        "too_many_rows",
    ]
    assert "nope" in (r[4].error or "")


def test_equivalent_queries_agree(sandbox: SqlSandbox) -> None:
    ref, same, reordered, other = sandbox.run_many(
        [
            ("shop", "SELECT name FROM customers WHERE city = 'Paris'"),
            ("shop", "SELECT c.name FROM customers AS c WHERE c.city IN ('Paris') ORDER BY c.name DESC"),
            ("shop", "SELECT name FROM customers WHERE city = 'Paris' ORDER BY name DESC"),
            ("shop", "SELECT name FROM customers WHERE city = 'Lyon'"),
        ]
    )
    assert results_match(same, ref) and ref.result_hash == same.result_hash
    assert not results_match(other, ref)
    ordered_ref = sandbox.run("shop", "SELECT name FROM customers WHERE city = 'Paris' ORDER BY name")
    assert not results_match(reordered, ordered_ref)  # ORDER BY in the reference makes order count
    assert results_match(
        sandbox.run("shop", "SELECT name FROM customers WHERE city = 'Paris' ORDER BY 1"), ordered_ref
    )


def test_timeout_interrupts_without_killing(sandbox: SqlSandbox) -> None:
    pids = sandbox.worker_pids()
    t0 = time.monotonic()
    r = sandbox.run_many([("shop", RUNAWAY), ("shop", "SELECT 1")])
    assert r[0].error_type == "timeout" and r[1].ok
    assert time.monotonic() - t0 < 10
    assert sandbox.worker_pids() == pids and sandbox.respawns == 0


def test_hard_kill_and_respawn(shop_db: Path) -> None:
    # a hard deadline below the query timeout forces the parent to kill the worker
    with SqlSandbox({"shop": shop_db}, timeout_s=30, workers=1, hard_timeout_s=1.0) as sb:
        pid = sb.worker_pids()[0]
        r = sb.run_many([("shop", RUNAWAY), ("shop", "SELECT 42")])
        assert r[0].error_type == "timeout" and "killed" in (r[0].error or "")
        assert r[1].ok and r[1].rows == [[42]]
        assert sb.respawns == 1 and sb.worker_pids()[0] != pid


def test_worker_crash_is_one_row(shop_db: Path) -> None:
    with SqlSandbox({"shop": shop_db}, timeout_s=30, workers=1) as sb:
        sb.run("shop", "SELECT 1")  # the worker is up
        pid = sb.worker_pids()[0]
        threading.Timer(0.5, os.kill, (pid, signal.SIGKILL)).start()
        r = sb.run_many([("shop", RUNAWAY), ("shop", "SELECT 7")])
        assert r[0].error_type == "crash" and r[1].rows == [[7]]
        assert sb.respawns == 1


def test_sqlite_engine(tmp_path: Path) -> None:
    (tmp_path / "shop.sql").write_text(SHOP)
    db = build_database(tmp_path / "shop.sql", tmp_path / "shop.sqlite", engine="sqlite")
    assert set(schema_tables(db, "sqlite")) == {"customers", "orders"}
    secret = tmp_path / "secret.txt"
    secret.write_text("TOPSECRET")
    with SqlSandbox({"shop": db}, dialect="sqlite", engine="sqlite", timeout_s=1.0, workers=1) as sb:
        r = sb.run_many(
            [
                ("shop", "SELECT city, COUNT(*) FROM customers GROUP BY city ORDER BY city"),
                ("shop", "SELECT SUM(amount) FROM orders"),
                ("shop", RUNAWAY),
                ("shop", f"ATTACH DATABASE '{tmp_path}/x.db' AS x"),
                ("shop", "PRAGMA writable_schema = 1"),
                ("shop", "INSERT INTO customers (id) VALUES (9)"),
                ("shop", f"SELECT readfile('{secret}')"),
                ("shop", "SELECT load_extension('x')"),
            ]
        )
        assert r[0].rows == [["Lyon", 1], ["Paris", 2], ["Rome", 1]]
        assert r[1].rows == [[136.74]]
        assert r[2].error_type == "timeout"
        assert all(not x.ok for x in r[3:])
        assert "TOPSECRET" not in repr(r)
        # the same refusals hold below the allowlist, from SQLite's own authorizer
    with SqlSandbox(
        {"shop": db}, dialect="sqlite", engine="sqlite", timeout_s=1.0, workers=1, enforce_allowlist=False
    ) as sb:
        r = sb.run_many(
            [
                ("shop", f"ATTACH DATABASE '{tmp_path}/x.db' AS x"),
                ("shop", "PRAGMA query_only = 0"),
                ("shop", "DELETE FROM customers"),
                ("shop", "SELECT load_extension('x')"),
            ]
        )
        assert all(not x.ok for x in r), [x.error for x in r]
        assert sb.run("shop", "SELECT COUNT(*) FROM customers").rows == [[4]]
    assert not (tmp_path / "x.db").exists()


def test_other_dialect_static_and_transpiled(shop_db: Path) -> None:
    pg = "SELECT name || '!' AS n FROM customers WHERE city ILIKE 'paris' ORDER BY name"
    with SqlSandbox({"shop": shop_db}, dialect="postgres", timeout_s=2.0, workers=1) as sb:
        ok, bad_col, bad_table = sb.run_many(
            [("shop", pg), ("shop", "SELECT nope FROM customers"), ("shop", "SELECT 1 FROM missing_table")]
        )
        assert ok.ok and not ok.executed and ok.result_hash is None and ok.canonical
        assert bad_col.error_type == "static_error" and "nope" in (bad_col.error or "")
        assert bad_table.error_type == "static_error" and "missing_table" in (bad_table.error or "")
    with SqlSandbox(
        {"shop": shop_db}, dialect="postgres", execute_via_duckdb=True, timeout_s=2.0, workers=1
    ) as sb:
        r = sb.run("shop", pg)
        assert r.ok and r.executed and r.rows == [["Ada!"], ["Cy!"]]


def test_duckdb_syntax_sqlglot_cannot_parse(shop_db: Path) -> None:
    """DuckDB-only syntax sqlglot rejects is judged by DuckDB's own parser (the engine decides)."""
    ex = SqlExecutor(
        {"db_files": {"shop": str(shop_db)}, "dialect": "duckdb", "timeout_s": 2.0, "max_rows": 100}
    )
    try:
        got = ex.run("shop", "SELECT X'41'::VARCHAR AS a, octet_length(X'DEADBEEF') AS b ORDER BY a")
        assert got["ok"] and got["parser"] == "duckdb" and got["rows"] == [["A", 4]] and got["ordered"], got
        sneaky = ex.run("shop", "SELECT X'41'::VARCHAR, (SELECT count(*) FROM read_text('/etc/hostname'))")
        assert sneaky["error_type"] == "disallowed"
        bad = ex.run("shop", "SELECT X'41' FROM WHERE")
        assert bad["error_type"] == "parse_error" and "duckdb:" in bad["error"]
    finally:
        ex.close()


def test_keep_rows_false_keeps_hashes(sandbox: SqlSandbox) -> None:
    full, lean = (
        sandbox.run_many([("shop", "SELECT name FROM customers ORDER BY id")], keep_rows=k)[0]
        for k in (True, False)
    )
    assert full.rows and not lean.rows
    assert (full.result_hash, full.ordered_hash, full.columns) == (
        lean.result_hash,
        lean.ordered_hash,
        lean.columns,
    )
