"""Helpers for the training tests (no tests here).

- a `train_rows` stage kind that turns a JSONL file into a dataset artifact of a given layout, so that
  training stages can be fed sft/pairs/text rows without the generation stages;
- `register_rows_kind(monkeypatch)` and `ROWS_PLUGIN` (for `distill` subprocesses via DISTILL_PLUGINS);
- a small templated text-to-SQL task over DuckDB tables (`SqlToy`), for the learning tests.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, ClassVar, Literal

from distill.core.context import StageContext
from distill.stages.base import StageConfig

ROWS_KIND = "train_rows"
ROWS_PLUGIN = f"{ROWS_KIND}=tests.integration.test_train_support"
CODE_VERSION = "1"


class Config(StageConfig):
    kind: Literal["train_rows"]
    path: str
    layout: Literal["text", "sft", "pairs"] = "sft"

    ACCEPTS: ClassVar[frozenset[str] | None] = frozenset()
    USES_TASK: ClassVar[bool] = False

    def output_layout(self) -> str:
        return self.layout

    def files(self) -> list[str]:
        return [self.path]


def run(ctx: StageContext) -> dict[str, Any]:
    import polars as pl

    rows = [json.loads(x) for x in ctx.path(ctx.cfg.path).read_text().splitlines() if x.strip()]
    ctx.write_table(pl.DataFrame(rows))
    return {"rows": len(rows)}


def register_rows_kind(monkeypatch: Any) -> None:
    from distill.stages import KINDS

    monkeypatch.setitem(KINDS, ROWS_KIND, "tests.integration.test_train_support")


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def chat_rows(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """Short prompt/completion conversations with a learnable mapping (reverse a word list)."""
    rng = random.Random(seed)
    words = "select from where group order count sum avg table city name price year total".split()
    out = []
    for _ in range(n):
        ws = [rng.choice(words) for _ in range(rng.randint(2, 5))]
        out.append(
            {
                "prompt": [{"role": "user", "content": "reverse: " + " ".join(ws)}],
                "completion": [{"role": "assistant", "content": " ".join(reversed(ws))}],
            }
        )
    return out


def pair_rows(n: int, seed: int = 0) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    words = "select from where group order count sum avg table city name price year total".split()
    out = []
    for _ in range(n):
        ws = [rng.choice(words) for _ in range(rng.randint(2, 5))]
        out.append(
            {
                "prompt": [{"role": "user", "content": "reverse: " + " ".join(ws)}],
                "chosen": [{"role": "assistant", "content": " ".join(reversed(ws))}],
                "rejected": [{"role": "assistant", "content": " ".join(ws) + " ;"}],
            }
        )
    return out


def text_rows(n: int, seed: int = 0) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    words = "the table city has a name and a price per year with total count of orders".split()
    return [{"text": " ".join(rng.choice(words) for _ in range(rng.randint(20, 80)))} for _ in range(n)]


# ------------------------------------------------------------------------------------------------
# a small templated text-to-SQL task over DuckDB tables (for the learning tests)
# ------------------------------------------------------------------------------------------------

TABLES: dict[str, dict[str, Any]] = {
    "customers": {
        "text": {"city": ["paris", "berlin", "rome", "oslo", "lima"], "tier": ["gold", "silver", "basic"]},
        "num": ["age", "score"],
    },
    "orders": {
        "text": {"status": ["open", "closed", "late"], "channel": ["web", "shop", "phone"]},
        "num": ["amount", "quantity"],
    },
    "products": {
        "text": {"category": ["food", "tools", "books", "toys"], "color": ["red", "blue", "green"]},
        "num": ["price", "stock"],
    },
    "employees": {
        "text": {"department": ["sales", "legal", "it", "ops"], "site": ["north", "south"]},
        "num": ["salary", "years"],
    },
    "flights": {
        "text": {"origin": ["ams", "cdg", "jfk", "lax"], "carrier": ["kl", "af", "dl"]},
        "num": ["delay", "seats"],
    },
    "books": {
        "text": {"genre": ["poetry", "history", "science"], "language": ["english", "french", "dutch"]},
        "num": ["pages", "year"],
    },
}

TEMPLATES: list[tuple[str, str, str]] = [
    # (name, question, sql); {t} table, {c} text column, {v} value, {n} numeric column, {k} number
    ("count", "how many rows are in {t}?", "SELECT count(*) FROM {t}"),
    ("count_eq", "how many {t} have {c} {v}?", "SELECT count(*) FROM {t} WHERE {c} = '{v}'"),
    ("avg", "what is the average {n} of {t}?", "SELECT avg({n}) FROM {t}"),
    ("max", "what is the highest {n} in {t}?", "SELECT max({n}) FROM {t}"),
    ("min_eq", "what is the lowest {n} of {t} with {c} {v}?", "SELECT min({n}) FROM {t} WHERE {c} = '{v}'"),
    ("sum_eq", "what is the total {n} of {t} with {c} {v}?", "SELECT sum({n}) FROM {t} WHERE {c} = '{v}'"),
    ("group", "count {t} per {c}.", "SELECT {c}, count(*) FROM {t} GROUP BY {c}"),
    ("lookup", "what is the {n} of the {t} row with id {k}?", "SELECT {n} FROM {t} WHERE id = {k}"),
    ("count_gt", "how many {t} have {n} above {k}?", "SELECT count(*) FROM {t} WHERE {n} > {k}"),
    ("count_lt", "how many {t} have {n} below {k}?", "SELECT count(*) FROM {t} WHERE {n} < {k}"),
    ("list_gt", "list the {c} of {t} with {n} above {k}.", "SELECT {c} FROM {t} WHERE {n} > {k}"),
]
THRESHOLD_TEMPLATES = {"count_gt", "count_lt", "list_gt"}


class SqlToy:
    """Tables in an in-memory DuckDB, questions from templates, execution accuracy."""

    def __init__(self, seed: int = 0) -> None:
        import duckdb

        self.rng = random.Random(seed)
        self.con = duckdb.connect()
        for t, spec in TABLES.items():
            cols = (
                ["id INTEGER"]
                + [f"{c} VARCHAR" for c in spec["text"]]
                + [f"{n} INTEGER" for n in spec["num"]]
            )
            self.con.execute(f"CREATE TABLE {t} ({', '.join(cols)})")
            rows = []
            for i in range(200):
                rows.append(
                    [i]
                    + [self.rng.choice(v) for v in spec["text"].values()]
                    + [self.rng.randint(0, 99) for _ in spec["num"]]
                )
            self.con.executemany(f"INSERT INTO {t} VALUES ({', '.join('?' * len(cols))})", rows)

    @staticmethod
    def schema(t: str) -> str:
        spec = TABLES[t]
        return f"{t}(id, {', '.join(spec['text'])}, {', '.join(spec['num'])})"

    def example(
        self, rng: random.Random, template: tuple[str, str, str], table: str, k: int | None = None
    ) -> dict[str, Any]:
        spec = TABLES[table]
        c = rng.choice(list(spec["text"]))
        if k is None:
            # ids take every number, so every number token is seen (and copied) in training;
            # thresholds in training are multiples of 5 only
            k = rng.randint(0, 99) if template[0] == "lookup" else rng.randint(1, 19) * 5
        fill = {"t": table, "c": c, "v": rng.choice(spec["text"][c]), "n": rng.choice(spec["num"]), "k": k}
        q = template[1].format(**fill)
        return {
            "prompt": [{"role": "user", "content": f"schema: {self.schema(table)}\nquestion: {q}"}],
            "completion": [{"role": "assistant", "content": template[2].format(**fill)}],
            "template": template[0],
            "table": table,
        }

    def splits(
        self, n_train: int, n_test: int, seed: int = 1
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Train on most (template, table) combos, thresholds multiples of 5. Test (questions never seen
        in training): half from 8 held-out combos, half with new thresholds (not multiples of 5).
        Lookups by id use every number in training, so a new threshold is a seen number in a new place."""
        rng = random.Random(seed)
        combos = [(tp, t) for tp in TEMPLATES for t in TABLES]
        rng.shuffle(combos)
        held = [c for c in combos if c[0][0] != "lookup"][:8]
        seen_combos = [c for c in combos if c not in held]
        train = [self.example(rng, *rng.choice(seen_combos)) for _ in range(n_train)]
        seen = {ex["prompt"][0]["content"] for ex in train}
        threshold = [c for c in seen_combos if c[0][0] in THRESHOLD_TEMPLATES]
        test: list[dict[str, Any]] = []
        tries = 0
        while len(test) < n_test and tries < 100 * n_test:
            tries += 1
            if len(test) % 2 == 0:
                ex = self.example(rng, *rng.choice(held))
            else:
                k = rng.randint(1, 98)
                if k % 5 == 0:
                    continue
                ex = self.example(rng, *rng.choice(threshold), k)
            if ex["prompt"][0]["content"] not in seen:
                seen.add(ex["prompt"][0]["content"])
                test.append(ex)
        return train, test

    def result(self, sql: str) -> Any:
        try:
            rows = self.con.execute(sql).fetchall()
        except Exception:
            return None
        return sorted(repr(r) for r in rows)

    def correct(self, pred: str, gold: str) -> bool:
        got = self.result(pred)
        return got is not None and got == self.result(gold)

    def corrupt(self, rng: random.Random, ex: dict[str, Any]) -> str | None:
        """A wrong SQL for the same question (executes differently or fails), for DPO's rejected side."""
        gold = ex["completion"][0]["content"]
        spec = TABLES[ex["table"]]
        for _ in range(20):
            kind = rng.choice(["value", "column", "agg", "op", "table"])
            bad = gold
            if kind == "value":
                for vals in spec["text"].values():
                    for v in vals:
                        if f"'{v}'" in bad:
                            bad = bad.replace(f"'{v}'", f"'{rng.choice([x for x in vals if x != v])}'")
            elif kind == "column":
                a, b = spec["num"]
                bad = bad.replace(a, "\0").replace(b, a).replace("\0", b)
            elif kind == "agg":
                for x, y in (
                    ("max(", "min("),
                    ("min(", "max("),
                    ("avg(", "sum("),
                    ("sum(", "avg("),
                    ("count(*)", "count(id) + 1"),
                ):
                    if x in bad:
                        bad = bad.replace(x, y, 1)
                        break
            elif kind == "op":
                bad = bad.replace(" > ", " < ").replace(" = ", " != ")
            else:
                bad = bad.replace(
                    f"FROM {ex['table']}", f"FROM {rng.choice([t for t in TABLES if t != ex['table']])}"
                )
            if bad != gold and not self.correct(bad, gold):
                return bad
        return None

    def pairs(self, examples: list[dict[str, Any]], seed: int = 2) -> list[dict[str, Any]]:
        rng = random.Random(seed)
        out = []
        for ex in examples:
            bad = self.corrupt(rng, ex)
            if bad is not None:
                out.append(
                    {
                        "prompt": ex["prompt"],
                        "chosen": ex["completion"],
                        "rejected": [{"role": "assistant", "content": bad}],
                    }
                )
        return out
