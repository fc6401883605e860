"""SQL schema files for prompts and for constrained decoding.

A task's schema file (`<schema>.sql`) holds CREATE TABLE statements followed by INSERTs that load
sample rows. The teacher should see the DDL only (`ddl_only`), comments kept, since they often
say what a column holds. `tables` reads table and column names from the CREATE statements, and
`select_grammar` turns them into a grammar of simple SELECT queries over those real names, so
that even a tiny random teacher under structured decoding writes SQL that parses and executes
(the offline smoke pipeline relies on that).

sqlglot tokenizes (statement boundaries that respect strings and comments) and parses (table and
column names) in the task's dialect; the grammar itself is written here because no library turns
a schema into a query grammar.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Table:
    name: str
    columns: tuple[str, ...]


def _statements(sql: str, dialect: str | None) -> list[tuple[str, str]]:
    """(first keyword, statement text with its leading comments) for each statement."""
    import sqlglot
    from sqlglot.tokens import TokenType

    out: list[tuple[str, str]] = []
    start = 0
    first: str | None = None
    for tok in sqlglot.tokenize(sql, read=dialect):
        if tok.token_type == TokenType.SEMICOLON:
            out.append((first or "", sql[start : tok.end + 1]))
            start, first = tok.end + 1, None
        elif first is None:
            first = tok.text.upper()
    tail = sql[start:]
    if first is not None:
        out.append((first, tail))
    return out


def ddl_only(sql: str, dialect: str | None = None) -> str:
    """The schema file without its INSERT/COPY statements (CREATE statements and comments kept)."""
    keep = [
        text for kw, text in _statements(sql, dialect) if kw not in ("INSERT", "COPY", "UPDATE", "DELETE")
    ]
    text = "".join(keep).strip("\n")
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def tables(sql: str, dialect: str | None = None) -> list[Table]:
    """Tables and their columns, in file order, from the CREATE TABLE statements."""
    import sqlglot
    from sqlglot import exp

    out: list[Table] = []
    for kw, text in _statements(sql, dialect):
        if kw != "CREATE":
            continue
        node = sqlglot.parse_one(text, read=dialect)
        if not isinstance(node, exp.Create) or str(node.args.get("kind", "")).upper() != "TABLE":
            continue
        schema = node.this
        if not isinstance(schema, exp.Schema):  # CREATE TABLE ... AS SELECT: columns unknown
            continue
        name = schema.this.name
        cols = tuple(c.name for c in schema.expressions if isinstance(c, exp.ColumnDef))
        if name and cols:
            out.append(Table(name, cols))
    return out


_SIMPLE = re.compile(r"[a-z_][a-z0-9_]*")


def quote_ident(name: str, dialect: str | None = None) -> str:
    """`name` as SQL: bare when it is a plain lower-case identifier and no keyword, else quoted."""
    from sqlglot.dialects.dialect import Dialect

    keywords = Dialect.get_or_raise(dialect).tokenizer_class.KEYWORDS
    if _SIMPLE.fullmatch(name) and name.upper() not in keywords:
        return name
    return '"' + name.replace('"', '""') + '"'


def _lit(s: str) -> str:
    """A grammar string literal (same escaping in GBNF and Lark)."""
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def select_grammar(
    tbls: list[Table], dialect: str | None = None, syntax: str = "ebnf", loose: bool = False
) -> str:
    """A grammar of `SELECT COUNT(*) FROM t [WHERE c IS NOT NULL]` and
    `SELECT c1[, c2..c4] FROM t [WHERE c IS NOT NULL] [ORDER BY c [DESC]] [LIMIT k]` over `tbls`.

    `syntax` "ebnf" is the GBNF-style EBNF of xgrammar (vLLM's default structured-output backend),
    "lark" the Lark syntax of llguidance (`structured_outputs_backend: guidance`).
    With `loose`, a query may name a column of any table of the schema: queries still parse, but
    some fail to bind, so a verifier downstream sees execution errors as well as results.
    """
    if not tbls:
        raise ValueError("no CREATE TABLE statement with columns found; cannot build a SQL grammar")
    if syntax not in ("ebnf", "lark"):
        raise ValueError(f"grammar syntax {syntax!r}: use ebnf or lark")
    lark = syntax == "lark"
    all_cols = list(dict.fromkeys(c for t in tbls for c in t.columns))
    rule = (lambda name, body: f"{name}: {body}") if lark else (lambda name, body: f"{name} ::= {body}")
    lines = [rule("start" if lark else "root", " | ".join(f"q{i}" for i in range(len(tbls))))]
    for i, t in enumerate(tbls):
        col = f"c{i}"
        more = f"({_lit(', ')} {col})?"
        frm = _lit(" FROM " + quote_ident(t.name, dialect))
        lines += [
            # no ORDER BY after COUNT(*): ordering an aggregate by a plain column does not bind
            rule(
                f"q{i}",
                f"{_lit('SELECT COUNT(*)')} {frm} w{i}? | {_lit('SELECT ')} s{i} {frm} w{i}? o{i}? lim?",
            ),
            rule(f"s{i}", f"{col} {more} {more} {more}"),
            rule(col, " | ".join(_lit(quote_ident(c, dialect)) for c in (all_cols if loose else t.columns))),
            rule(f"w{i}", f"{_lit(' WHERE ')} {col} {_lit(' IS NOT NULL')}"),
            rule(f"o{i}", f"{_lit(' ORDER BY ')} {col} {_lit(' DESC')}?"),
        ]
    lines.append(rule("lim", f"{_lit(' LIMIT ')} " + ("/[1-9][0-9]?/" if lark else "[1-9] [0-9]?")))
    return "\n".join(lines) + "\n"


def schema_files(paths: list[Path]) -> dict[str, Path]:
    """Schema name (file stem) -> file; a name given twice is an error naming both files."""
    out: dict[str, Path] = {}
    for p in paths:
        if p.stem in out:
            raise ValueError(f"schema {p.stem!r} is defined twice: {out[p.stem]} and {p}; rename one")
        out[p.stem] = p
    return out
