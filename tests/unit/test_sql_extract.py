"""SQL task helpers that need no database: extraction, statement checks, canonical forms, results."""

from __future__ import annotations

import datetime as dt
import decimal

import pytest

from distill.tasks.sql import (
    ExecResult,
    SqlRefused,
    canonical_sql,
    check_statement,
    extract_sql,
    hash_rows,
    is_ordered,
    normalize_value,
    parse_sql,
    results_match,
    statement_kind,
    transpile,
)


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("```sql\nSELECT 1;\n```", "SELECT 1"),
        ("Here:\n```sql\nSELECT 1\n```\nBetter:\n```sql\nSELECT 2;;\n```\nDone.", "SELECT 2"),
        ("```\nSELECT a FROM t\n```", "SELECT a FROM t"),
        ("```python\nprint(1)\n```\n```sql\nSELECT 3\n```", "SELECT 3"),
        ("  SELECT x FROM y ;  ", "SELECT x FROM y"),
        ("```duckdb\nFROM t\n```", "FROM t"),
        ("```sql\nSELECT a,\n  b FROM t", "SELECT a,\n  b FROM t"),  # truncated: the fence never closes
        ("", None),
        (None, None),
        ("```sql\n;\n```", None),
    ],
)
def test_extract_sql(completion: str | None, expected: str | None) -> None:
    assert extract_sql(completion) == expected


def test_extract_sql_first_block() -> None:
    assert extract_sql("```sql\nSELECT 1\n```\n```sql\nSELECT 2\n```", pick="first") == "SELECT 1"


@pytest.mark.parametrize(
    "sql, kind",
    [
        ("SELECT 1", "select"),
        ("WITH a AS (SELECT 1) SELECT * FROM a", "with"),
        ("SELECT 1 UNION ALL SELECT 2", "select"),
        ("(SELECT 1)", "select"),
        ("FROM t", "select"),
        ("VALUES (1), (2)", "values"),
        ("DESCRIBE t", "describe"),
        ("INSERT INTO t VALUES (1)", "insert"),
        ("COPY t TO 'x.csv'", "copy"),
        ("SET threads = 4", "set"),
        ("CHECKPOINT", "column"),  # sqlglot reads a bare word as a column: never a select
    ],
)
def test_statement_kind(sql: str, kind: str) -> None:
    assert statement_kind(parse_sql(sql, "duckdb")) == kind


@pytest.mark.parametrize(
    "sql, why",
    [
        ("INSERT INTO t VALUES (1)", "insert statements"),
        ("WITH x AS (DELETE FROM t RETURNING *) SELECT * FROM x", "DELETE inside"),
        ("SELECT * FROM read_csv('/etc/passwd')", "read_csv"),
        ("SELECT * FROM read_text('/etc/hostname')", "read_text"),
        ("SELECT * FROM '/etc/passwd'", "looks like a file"),
        ("SELECT * FROM 'data.parquet'", "looks like a file"),
        ("SELECT * FROM glob('/*')", "glob"),
        ("SELECT * FROM sqlite_scan('a.db', 't')", "sqlite_scan"),
        ("SELECT * FROM query('SELECT 1')", "query"),
        ("SELECT getenv('HOME')", "getenv"),
        ("SELECT current_setting('threads')", "current_setting"),
    ],
)
def test_check_statement_refuses(sql: str, why: str) -> None:
    with pytest.raises(SqlRefused) as e:
        check_statement(parse_sql(sql, "duckdb"), ("select", "with"))
    assert e.value.error_type == "disallowed"
    assert why in str(e.value)


def test_check_statement_allowlist() -> None:
    expr = parse_sql("WITH a AS (SELECT 1 AS x) SELECT x FROM a", "duckdb")
    assert check_statement(expr, ("select", "with")) == "with"
    with pytest.raises(SqlRefused, match="with statements are not allowed"):
        check_statement(expr, ("select",))
    with pytest.raises(SqlRefused) as e:
        parse_sql("SELECT 1; SELECT 2", "duckdb")
    assert e.value.error_type == "disallowed"
    with pytest.raises(SqlRefused) as e:
        parse_sql("SELEC 1 FROM", "duckdb")
    assert e.value.error_type == "parse_error"
    assert "\x1b" not in str(e.value)  # no terminal escapes in the recorded error


def test_is_ordered() -> None:
    assert is_ordered(parse_sql("SELECT a FROM t ORDER BY a", "duckdb"))
    assert is_ordered(parse_sql("SELECT a FROM t UNION SELECT b FROM u ORDER BY 1", "duckdb"))
    assert not is_ordered(parse_sql("SELECT a FROM (SELECT a FROM t ORDER BY a) s", "duckdb"))
    assert not is_ordered(parse_sql("SELECT count(*) FROM t", "duckdb"))


def test_canonical_sql() -> None:
    a = canonical_sql("select  Name from CUSTOMERS where city='Paris' -- hi", "duckdb")
    b = canonical_sql("SELECT name\nFROM customers\nWHERE city = 'Paris'", "duckdb")
    assert a == b == "SELECT name FROM customers WHERE city = 'Paris'"
    assert canonical_sql("SELECT name FROM customers WHERE city = 'Lyon'", "duckdb") != a
    ta = canonical_sql(
        "SELECT name FROM customers WHERE city = 'Paris' LIMIT 5", "duckdb", parameterize_literals=True
    )
    tb = canonical_sql(
        "SELECT name FROM customers WHERE city = 'Lyon' LIMIT 3", "duckdb", parameterize_literals=True
    )
    assert ta == tb == "SELECT name FROM customers WHERE city = ? LIMIT ?"
    # positional GROUP BY / ORDER BY are column references, not values
    g = canonical_sql("SELECT city, count(*) FROM customers GROUP BY 1 ORDER BY 2 DESC", "duckdb", True)
    assert "GROUP BY 1" in g and "ORDER BY 2 DESC" in g
    # identifier case follows the dialect: DuckDB folds even quoted names, Postgres keeps them;
    # unparsable SQL falls back to collapsed lower-case text
    assert canonical_sql('SELECT "Name" FROM t', "duckdb") == 'SELECT "name" FROM t'
    assert canonical_sql('SELECT "Name", Other FROM t', "postgres") == 'SELECT "Name", other FROM t'
    assert canonical_sql("SELEC  X FROM", "duckdb") == "selec x from"


def test_transpile() -> None:
    assert transpile("SELECT a::TEXT FROM t", "duckdb", "sqlite") == "SELECT CAST(a AS TEXT) FROM t"
    with pytest.raises(SqlRefused):
        transpile("SELECT FROM WHERE (", "duckdb", "postgres")


def test_normalize_value() -> None:
    assert normalize_value(3) == normalize_value(3.0) == normalize_value(decimal.Decimal("3.00")) == 3
    assert normalize_value(0.1 + 0.2) == normalize_value(0.3)
    assert normalize_value(float("nan")) == "NaN"
    assert normalize_value(dt.date(2024, 1, 2)) == "2024-01-02"
    assert normalize_value(dt.timedelta(hours=1)) == {"interval_s": 3600}
    assert normalize_value([1.0, None, {"a": decimal.Decimal("2.5")}]) == [1, None, {"a": 2.5}]
    assert normalize_value(b"\x01\xff") == "01ff"
    assert normalize_value(True) is True


def test_hash_rows_and_results_match() -> None:
    rows = [[1, "a"], [2, "b"]]
    assert hash_rows(2, rows, ordered=False) == hash_rows(2, rows[::-1], ordered=False)
    assert hash_rows(2, rows, ordered=True) != hash_rows(2, rows[::-1], ordered=True)
    assert hash_rows(1, [], ordered=False) != hash_rows(2, [], ordered=False)  # empty, different width

    def res(rows: list[list[object]], ordered: bool) -> ExecResult:
        return ExecResult(
            True,
            rows=rows,
            columns=["x", "y"],
            result_hash=hash_rows(2, rows, False),
            ordered_hash=hash_rows(2, rows, True),
            ordered=ordered,
            executed=True,
        )

    ref_unordered, ref_ordered = res(rows, False), res(rows, True)
    swapped = res(rows[::-1], False)
    assert results_match(swapped, ref_unordered)  # order-insensitive without ORDER BY
    assert not results_match(swapped, ref_ordered)  # ...and sensitive with it
    assert results_match(res(rows, False), ref_ordered)
    assert not results_match(res([[1, "a"]], False), ref_unordered)
    assert not results_match(ExecResult(False, "exec_error", "boom"), ref_unordered)
