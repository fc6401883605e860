"""Validate the JSON-extraction task data: schema.json, seeds.jsonl and eval.jsonl.

Checks (exit status 1 with one line per problem when any fails):

* schema.json is a valid JSON Schema (draft 2020-12), closed (additionalProperties: false) and
  requires every property;
* every line of seeds.jsonl / eval.jsonl is {"id", "text", "record"} with a unique id, a non-empty
  text and a record that validates against the schema;
* records are consistent with their text: title, organizer and location occur verbatim in the text
  (case-insensitive), the date is a real calendar date whose year is written in the text, a
  positive price is written in the text, currency is null exactly when price is null or 0, and an
  event without a physical location is remote;
* no text appears twice, and no eval text shares a word 8-gram with any seed text;
* at least MIN_SEEDS seeds and MIN_EVAL eval rows, and every allowed tag is used by some seed.

Usage: ``python check_data.py`` (needs jsonschema).
"""

from __future__ import annotations

import datetime as dt
import json
import re
import sys
from pathlib import Path

import jsonschema

HERE = Path(__file__).resolve().parent
MIN_SEEDS, MIN_EVAL = 60, 25
NGRAM = 8


def words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def ngrams(text: str, n: int = NGRAM) -> set[tuple[str, ...]]:
    w = words(text)
    return {tuple(w[i : i + n]) for i in range(len(w) - n + 1)}


def main() -> int:
    problems: list[str] = []
    schema = json.loads((HERE / "schema.json").read_text(encoding="utf-8"))
    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as e:
        print(f"schema.json is not a valid JSON Schema: {e.message}", file=sys.stderr)
        return 1
    if schema.get("additionalProperties") is not False:
        problems.append("schema.json: additionalProperties must be false")
    if set(schema.get("required", [])) != set(schema["properties"]):
        problems.append("schema.json: every property must be required")
    validator = jsonschema.Draft202012Validator(schema)
    all_tags = set(schema["properties"]["tags"]["items"]["enum"])

    data: dict[str, list[dict]] = {}
    ids: set[str] = set()
    for name in ("seeds.jsonl", "eval.jsonl"):
        rows = data[name] = []
        path = HERE / name
        if not path.exists():
            problems.append(f"{name}: missing")
            continue
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            where = f"{name}:{n}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                problems.append(f"{where}: invalid JSON: {e}")
                continue
            if not isinstance(row, dict) or set(row) != {"id", "text", "record"}:
                problems.append(f"{where}: keys must be exactly id, text, record")
                continue
            where = f"{where} ({row['id']})"
            if row["id"] in ids:
                problems.append(f"{where}: duplicate id")
            ids.add(row["id"])
            text, rec = row["text"], row["record"]
            if not isinstance(text, str) or not text.strip():
                problems.append(f"{where}: empty text")
                continue
            errors = sorted(validator.iter_errors(rec), key=lambda e: list(e.path))
            for e in errors:
                problems.append(f"{where}: record invalid at {'/'.join(map(str, e.path)) or '(root)'}: {e.message}")
            if errors:
                continue
            low = text.lower()
            for field in ("title", "organizer", "location"):
                if rec[field] is not None and rec[field].lower() not in low:
                    problems.append(f"{where}: {field} {rec[field]!r} does not occur in the text")
            try:
                date = dt.date.fromisoformat(rec["date"])
                if str(date.year) not in text:
                    problems.append(f"{where}: year {date.year} is not written in the text")
            except ValueError:
                problems.append(f"{where}: date {rec['date']!r} is not a calendar date")
            price = rec["price"]
            if price not in (None, 0) and f"{price:g}" not in text.replace(",", ""):
                problems.append(f"{where}: price {price} is not written in the text")
            if (rec["currency"] is None) != (price in (None, 0)):
                problems.append(f"{where}: currency must be null exactly when price is null or 0")
            if rec["location"] is None and not rec["remote"]:
                problems.append(f"{where}: an event without a location must be remote")
            rows.append(row)

    seeds, evals = data.get("seeds.jsonl", []), data.get("eval.jsonl", [])
    seen: dict[str, str] = {}
    for r in seeds + evals:
        key = " ".join(words(r["text"]))
        if key in seen:
            problems.append(f"{r['id']}: same text as {seen[key]}")
        seen[key] = r["id"]
    seed_grams = {}
    for r in seeds:
        for g in ngrams(r["text"]):
            seed_grams.setdefault(g, r["id"])
    for r in evals:
        shared = sorted(g for g in ngrams(r["text"]) if g in seed_grams)
        if shared:
            problems.append(f"{r['id']}: text shares {NGRAM}-gram {' '.join(shared[0])!r} with {seed_grams[shared[0]]}")
    if len(seeds) < MIN_SEEDS:
        problems.append(f"seeds.jsonl: {len(seeds)} valid rows < {MIN_SEEDS}")
    if len(evals) < MIN_EVAL:
        problems.append(f"eval.jsonl: {len(evals)} valid rows < {MIN_EVAL}")
    unused = all_tags - {t for r in seeds for t in r["record"]["tags"]}
    if unused:
        problems.append(f"seeds.jsonl: tags never used: {sorted(unused)}")

    if problems:
        print(f"FAILED: {len(problems)} problem(s)", file=sys.stderr)
        for p in problems:
            print("  " + p, file=sys.stderr)
        return 1
    print(f"OK: schema valid, {len(seeds)} seeds and {len(evals)} eval records pass all checks")
    return 0


if __name__ == "__main__":
    sys.exit(main())
