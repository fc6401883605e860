"""Regenerate the small test samples in tests/data/ from a copy of the shared data folder.

    .venv/bin/python tests/data/make_samples.py ../shared/data

Development tool only: tests and the package never read the shared folder. Each sample is a
deterministic subset (verbatim rows/records) of a source described in the SOURCE.md beside it.
"""

from __future__ import annotations

import collections
import gzip
import json
import random
import re
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _jsonl(p: Path) -> list[dict]:
    return [json.loads(ln) for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]


def _write_jsonl(p: Path, rows: list[dict]) -> None:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def sqlglot_fixtures(src: Path) -> None:
    out = HERE / "sqlglot_fixtures"
    out.mkdir(exist_ok=True)
    rng = random.Random(0)
    for name, n_identity, n_all in (
        ("duckdb", 200, 80),
        ("sqlite", 80, 30),
        ("postgres", 80, 30),
        ("mysql", 60, 20),
    ):
        rows = _jsonl(src / "sqlglot_fixtures" / "dialect_cases" / f"{name}.jsonl")
        ident = [r for r in rows if r["kind"] == "validate_identity" and not r.get("check_command_warning")]
        alls = [r for r in rows if r["kind"] == "validate_all"]
        pick = rng.sample(ident, min(n_identity, len(ident))) + rng.sample(alls, min(n_all, len(alls)))
        pick.sort(key=lambda r: r["line"])
        _write_jsonl(out / f"{name}.jsonl", pick)
    lines = (src / "sqlglot_fixtures" / "fixtures" / "identity.sql").read_text(encoding="utf-8").splitlines()
    (out / "identity_sample.sql").write_text("\n".join(lines[::4]) + "\n", encoding="utf-8")
    shutil.copyfile(
        src / "sqlglot_fixtures" / "fixtures" / "optimizer" / "qualify_columns__invalid.sql",
        out / "qualify_columns__invalid.sql",
    )


_WRITES = re.compile(r"^\s*(INSERT|UPDATE|DELETE|EXECUTE|PREPARE|CALL|COPY|MERGE)\b", re.I)
_SETTING = re.compile(r"^\s*(SET|PRAGMA|RESET|ATTACH|LOAD|INSTALL|CREATE\s+(TEMP|TEMPORARY|SECRET))\b", re.I)


def _builds(setup: list[str]) -> bool:
    """The setup statements run in a fresh DuckDB database (some files restart the database)."""
    import duckdb

    con = duckdb.connect()
    try:
        for stmt in setup:
            con.execute(stmt)
        return True
    except duckdb.Error:
        return False
    finally:
        con.close()


def sqllogictest(src: Path) -> None:
    """Self-contained files whose setup statements all come before their queries."""
    recs = _jsonl(src / "duckdb_sqllogictest" / "records.jsonl")
    byf: dict[str, list[dict]] = collections.defaultdict(list)
    for r in recs:
        byf[r["file"]].append(r)
    good = []
    for f, rs in sorted(byf.items()):
        if f.endswith("_slow") or any(
            r.get("requires")
            or r.get("in_loop")
            or "${" in r["sql"]
            or "data/" in r["sql"]
            or "__TEST_DIR__" in r["sql"]
            for r in rs
        ):
            continue
        kinds = [(r["kind"], r.get("expect")) for r in rs]
        first = next((i for i, k in enumerate(kinds) if k[0] == "query" or k[1] == "error"), None)
        if first is None or any(k[0] == "statement" and k[1] in ("ok", "maybe") for k in kinds[first:]):
            continue
        if any(_SETTING.match(r["sql"]) for r in rs[:first]):
            continue
        if any(r["kind"] == "query" and _WRITES.match(r["sql"]) for r in rs):
            continue  # a query that changes the database makes later expectations order-dependent
        size = sum(len(json.dumps(r)) for r in rs)
        if size > 6000 or not _builds([r["sql"] for r in rs[:first]]):
            continue
        good.append((f, rs))
    rng = random.Random(0)
    rng.shuffle(good)
    out, total = [], 0
    for _f, rs in good:
        sz = sum(len(json.dumps(r)) for r in rs)
        if total + sz > 230_000:
            continue
        out.extend(rs)
        total += sz
    out.sort(key=lambda r: (r["file"], r["line"]))
    _write_jsonl(HERE / "duckdb_sqllogictest" / "records_sample.jsonl", out)


def dedup_corpus(src: Path) -> None:
    rows = _jsonl(src / "dedup_corpus" / "duckdb_docs_versions.jsonl")
    by: dict[str, list[dict]] = collections.defaultdict(list)
    for r in rows:
        by[r["cluster_id"]].append(r)
    sizes = sorted((sum(len(r["text"]) for r in v), k) for k, v in by.items())
    keep, total = set(), 0
    for s, k in sizes:
        if total + s > 340_000:
            break
        keep.add(k)
        total += s
    _write_jsonl(
        HERE / "dedup_corpus" / "duckdb_docs_versions_sample.jsonl",
        [r for r in rows if r["cluster_id"] in keep],
    )
    adv = _jsonl(src / "dedup_corpus" / "advising" / "advising_questions.jsonl")
    clusters = sorted({r["cluster_id"] for r in adv})
    rng = random.Random(0)
    pick = set(rng.sample(clusters, 40))
    sample = [r for r in adv if r["cluster_id"] in pick]
    rng.shuffle(sample)
    sample = sorted(sample[:300], key=lambda r: r["id"])
    _write_jsonl(HERE / "dedup_corpus" / "advising_questions_sample.jsonl", sample)
    shutil.copyfile(
        src / "dedup_corpus" / "advising" / "advising-LICENSE.txt",
        HERE / "dedup_corpus" / "advising-LICENSE.txt",
    )


def pref_sft_formats(src: Path) -> None:
    base = src / "pref_sft_formats"
    out = HERE / "pref_sft_formats"
    out.mkdir(exist_ok=True)
    with gzip.open(base / "hh_rlhf_harmless_test" / "test.jsonl.gz", "rt", encoding="utf-8") as f:
        hh = [json.loads(ln) for ln in f if ln.strip()][:40]
    with gzip.open(out / "hh_rlhf_harmless_test_sample.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in hh)
    ms = base / "msft_foundry_samples"
    _write_jsonl(out / "openai_dpo_orca_sample.jsonl", _jsonl(ms / "dpo_orca_pairs_validation.jsonl")[:25])
    _write_jsonl(out / "openai_sft_gsm8k_sample.jsonl", _jsonl(ms / "sft_gsm8k_chat_validation.jsonl")[:25])
    _write_jsonl(out / "openai_sft_toolcall_sample.jsonl", _jsonl(ms / "sft_toolcall_validation.jsonl")[:5])
    lf = base / "llamafactory_demo"
    for name, n in (("dpo_en_demo.json", 12), ("kto_en_demo.json", 10), ("identity.json", 25)):
        data = json.loads((lf / name).read_text(encoding="utf-8"))[:n]
        (out / f"llamafactory_{name}").write_text(
            json.dumps(data, ensure_ascii=False, indent=1), encoding="utf-8"
        )
    _write_jsonl(out / "llamafactory_v1_dpo_demo.jsonl", _jsonl(lf / "v1_dpo_demo.jsonl")[:5])
    _write_jsonl(out / "llamafactory_v1_sft_demo.jsonl", _jsonl(lf / "v1_sft_demo.jsonl")[:25])
    shutil.copyfile(base / "hh_rlhf_harmless_test" / "LICENSE.txt", out / "LICENSE_hh_rlhf.txt")
    shutil.copyfile(ms / "LICENSE_repo.txt", out / "LICENSE_msft_foundry.txt")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: make_samples.py <shared data folder>")
    src = Path(sys.argv[1])
    sqlglot_fixtures(src)
    sqllogictest(src)
    dedup_corpus(src)
    pref_sft_formats(src)
    for p in sorted(HERE.rglob("*")):
        if p.is_file():
            print(f"{p.stat().st_size:>9,d}  {p.relative_to(HERE)}")
