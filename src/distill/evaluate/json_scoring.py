"""Scoring of structured-extraction predictions (JSON records) against gold records.

Eval set format (JSONL, one object per line):

    {"id": "eval-event-001",            # unique
     "text": "Surf & Yoga Retreat ...",   # the text to extract from (template variable `text`)
     "record": {"title": "...", ...},     # the gold record (a JSON object)
     "category": "price"}                 # optional, for the per-category breakdown

Other keys are kept and passed to prompt templates. A gold record that is not valid under the
task's JSON Schema is excluded from the record metrics, with its reason (`gold_invalid: ...`).

Per prediction (a model's raw completion; the JSON is extracted as the curate stage does: the last
```json block, else the whole text, else the first balanced {...} span):
- `valid_json`: the extracted text parses as JSON;
- `schema_valid`: it validates under the schema (`distill.tasks.json_task`);
- `exact_match`: the record equals the gold after canonicalization (below);
- `field_match`: for each top-level field of the schema (without a schema: of the gold record),
  whether the prediction's value equals the gold's; a missing field or a prediction that is not a
  JSON object counts as wrong.

Canonical form (what "equal" means): key order is ignored; a float with an integral value equals
the integer (18.0 == 18; booleans stay booleans); strings compare after Unicode NFC normalization,
otherwise exactly (case and whitespace count); arrays keep their order, except arrays the schema
declares `uniqueItems: true` (sets, like `tags`), which compare as sorted. The schema is followed
through `properties` and `items` only.

Verdicts: correct (exact match), wrong_record (valid under the schema, some field differs),
schema_error, invalid_json (no JSON or a parse error), missing (no completion), excluded.

Metrics (`aggregate`): `n` rows; `runnable` rows scored (gold valid); `exact_match` and
`field_accuracy` (mean share of fields right per row) over scored rows; `per_field` (share of
scored rows with that field right); `valid_json_rate` and `schema_valid_rate` over all n rows
(`schema_valid_rate` is null without a schema); `error_rate` = scored rows without a
schema-valid record; `excluded` and `error_types` counts; `per_category`.
"""

from __future__ import annotations

import json
import math
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distill.errors import DistillError

VERDICTS = ("correct", "wrong_record", "schema_error", "invalid_json", "missing", "excluded")

# the report's models x metrics table for this task: (metric key, column label)
METRIC_COLUMNS = [
    ("exact_match", "exact match"),
    ("field_accuracy", "field accuracy"),
    ("schema_valid_rate", "schema valid"),
    ("valid_json_rate", "valid JSON"),
]
PRIMARY_METRIC = "exact_match"


@dataclass
class JsonEvalRow:
    id: str
    text: str
    record: dict[str, Any]
    category: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    line: int = 0

    def template_vars(self) -> dict[str, Any]:
        v = dict(self.extra)
        v.update({"id": self.id, "text": self.text, "category": self.category})
        return v


def is_json_eval_set(path: str | Path) -> bool:
    """True when the first row of an eval set carries a gold `record` and no `sql` (used when the
    pipeline has no task to say which scoring applies)."""
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    obj = json.loads(line)
                    return isinstance(obj, dict) and "record" in obj and "sql" not in obj
    except (OSError, json.JSONDecodeError):
        return False
    return False


def load_json_eval_set(path: str | Path) -> list[JsonEvalRow]:
    """Read and check a JSON-extraction eval set; every problem is one line `file:line: what to do`."""
    from distill.evaluate.evalset import read_jsonl_objects

    p = Path(path)
    rows: list[JsonEvalRow] = []
    errors: list[str] = []
    seen: dict[str, int] = {}
    for i, obj in read_jsonl_objects(p, errors, " with id, text and record"):
        missing = [
            k
            for k in ("id", "text")
            if not isinstance(obj.get(k), str | int) or str(obj.get(k)).strip() == ""
        ]
        if missing:
            errors.append(f"{path}:{i}: missing or empty key(s) {', '.join(missing)}")
            continue
        if not isinstance(obj.get("record"), dict):
            errors.append(f"{path}:{i}: `record` (the gold record) must be a JSON object")
            continue
        rid = str(obj["id"])
        if rid in seen:
            errors.append(f"{path}:{i}: id {rid!r} already used on line {seen[rid]}; ids must be unique")
            continue
        seen[rid] = i
        cat = obj.get("category")
        extra = {k: v for k, v in obj.items() if k not in ("id", "text", "record", "category")}
        rows.append(
            JsonEvalRow(rid, str(obj["text"]), obj["record"], None if cat is None else str(cat), extra, i)
        )
    if errors:
        raise DistillError(*errors[:20], *([f"... and {len(errors) - 20} more"] if len(errors) > 20 else []))
    if not rows:
        raise DistillError(f"{path}: the eval set is empty")
    return rows


# ------------------------------------------------------------------------------------------------
# canonical form
# ------------------------------------------------------------------------------------------------


def canonical_value(value: Any, schema: Any = None) -> Any:
    """The value in the form equality is decided on (see the module docstring)."""
    sub: dict[str, Any] = schema if isinstance(schema, dict) else {}
    if isinstance(value, dict):
        props: dict[str, Any] = sub["properties"] if isinstance(sub.get("properties"), dict) else {}
        return {str(k): canonical_value(v, props.get(k)) for k, v in value.items()}
    if isinstance(value, list):
        items = [canonical_value(v, sub.get("items")) for v in value]
        if sub.get("uniqueItems") is True:
            items.sort(key=lambda x: json.dumps(x, sort_keys=True, ensure_ascii=False))
        return items
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        return unicodedata.normalize("NFC", value)
    return value


def canonical_json(value: Any, schema: Any = None) -> str:
    return json.dumps(
        canonical_value(value, schema), sort_keys=True, separators=(",", ":"), ensure_ascii=False
    )


def _same(a: Any, b: Any, schema: Any) -> bool:
    # compare serializations, not Python values: in Python True == 1 and 1 == 1.0
    return canonical_json(a, schema) == canonical_json(b, schema)


_ABSENT = object()


# ------------------------------------------------------------------------------------------------
# scoring
# ------------------------------------------------------------------------------------------------


class JsonScorer:
    """Score prediction sets against the gold records of one eval set, under one JSON Schema."""

    def __init__(self, rows: list[JsonEvalRow], schema: dict[str, Any] | None = None) -> None:
        from distill.tasks.json_task import make_validator

        self.rows = rows
        self.schema = schema
        self.validator = make_validator(schema) if schema is not None else None
        props = (schema or {}).get("properties")
        self.fields: list[str] | None = list(props) if isinstance(props, dict) and props else None
        self.gold_reason: dict[str, str | None] = {}
        for r in rows:
            self.gold_reason[r.id] = None
            if self.validator is not None:
                err = next(
                    iter(sorted(self.validator.iter_errors(r.record), key=lambda e: list(e.path))), None
                )
                if err is not None:
                    where = "/".join(str(p) for p in err.absolute_path) or "<root>"
                    self.gold_reason[r.id] = f"gold_invalid: {where}: {err.message}"[:300]

    def row_fields(self, row: JsonEvalRow) -> list[str]:
        return self.fields if self.fields is not None else list(row.record)

    def score(self, completions: dict[str, str | None]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Per-row results and aggregate metrics for one prediction set ({id: completion or None})."""
        from distill.tasks.json_task import check_json, extract_json

        out: list[dict[str, Any]] = []
        for r in self.rows:
            text = completions.get(r.id)
            fields = self.row_fields(r)
            gold_reason = self.gold_reason[r.id]
            res = check_json(text, self.validator) if text is not None else None
            parsed = res is not None and res.error_type not in ("no_json", "json_parse_error")
            value = res.value if parsed and res is not None else _ABSENT
            matches = {
                f: isinstance(value, dict)
                and f in value
                and f in r.record
                and _same(value[f], r.record[f], _prop(self.schema, f))
                for f in fields
            }
            exact = parsed and _same(value, r.record, self.schema)
            row: dict[str, Any] = {
                "id": r.id,
                "category": r.category,
                "text": r.text,
                "gold": canonical_json(r.record, self.schema),
                "prediction": (canonical_json(value, self.schema) if parsed else extract_json(text)),
                "completion": text,
                "valid_json": parsed,
                "schema_valid": bool(res is not None and res.ok) if self.validator is not None else None,
                "exact_match": exact,
                "fields_correct": sum(matches.values()),
                "fields_total": len(fields),
                "field_accuracy": (sum(matches.values()) / len(fields)) if fields else None,
                "field_match": json.dumps(matches, sort_keys=False),
                "excluded_reason": gold_reason,
                "error_type": None,
                "error": None,
            }
            if gold_reason is not None:
                row.update(verdict="excluded", correct=None)
            elif text is None:
                row.update(
                    verdict="missing", correct=False, error_type="missing", error="no completion for this id"
                )
            elif not parsed:
                assert res is not None
                row.update(verdict="invalid_json", correct=False, error_type=res.error_type, error=res.error)
            elif exact:
                row.update(verdict="correct", correct=True)
            elif res is not None and not res.ok:
                row.update(verdict="schema_error", correct=False, error_type=res.error_type, error=res.error)
            else:
                wrong = [f for f, ok in matches.items() if not ok]
                row.update(verdict="wrong_record", correct=False, error_type="wrong_fields",
                           error="fields differ from the gold: " + ", ".join(wrong))  # fmt: skip
            out.append(row)
        return out, aggregate(out)


def _prop(schema: dict[str, Any] | None, name: str) -> Any:
    props = (schema or {}).get("properties")
    return props.get(name) if isinstance(props, dict) else None


def aggregate(results: list[dict[str, Any]], by_category: bool = True) -> dict[str, Any]:
    """Metrics over per-row results (see the module docstring for definitions)."""
    n = len(results)
    scored = [r for r in results if r["verdict"] != "excluded"]
    k = len(scored)

    def rate(x: float, d: int) -> float | None:
        return round(x / d, 6) if d else None

    per_field_hits: Counter[str] = Counter()
    per_field_n: Counter[str] = Counter()
    for r in scored:
        for f, ok in json.loads(r.get("field_match") or "{}").items():
            per_field_n[f] += 1
            per_field_hits[f] += bool(ok)
    has_schema = any(r.get("schema_valid") is not None for r in results)
    fa = [float(r["field_accuracy"]) for r in scored if r.get("field_accuracy") is not None]
    m: dict[str, Any] = {
        "n": n,
        "runnable": k,
        "correct": sum(1 for r in scored if r["verdict"] == "correct"),
        "exact_match": rate(sum(1 for r in scored if r["exact_match"]), k),
        "field_accuracy": round(sum(fa) / len(fa), 6) if fa else None,
        "valid_json_rate": rate(sum(1 for r in results if r["valid_json"]), n),
        "schema_valid_rate": rate(sum(1 for r in results if r.get("schema_valid")), n)
        if has_schema
        else None,
        "error_rate": rate(
            sum(1 for r in scored if r["verdict"] in ("schema_error", "invalid_json", "missing")), k
        ),
        "per_field": {f: rate(per_field_hits[f], per_field_n[f]) for f in per_field_n},
        "excluded": dict(
            Counter(str(r["excluded_reason"]).split(":")[0] for r in results if r["verdict"] == "excluded")
        ),
        "error_types": dict(Counter(str(r["error_type"]) for r in scored if r["verdict"] != "correct")),
    }
    cats = sorted({r["category"] for r in results if r.get("category") is not None})
    if by_category and cats:
        m["per_category"] = {
            c: aggregate([r for r in results if r.get("category") == c], False) for c in cats
        }
    return m


def result_schema() -> dict[str, Any]:
    """Fixed column types of the per-row results, so shards of different models concatenate."""
    import polars as pl

    s, b, i = pl.String, pl.Boolean, pl.Int64
    return {
        "model": s, "id": s, "category": s, "text": s, "gold": s, "prediction": s, "completion": s,
        "verdict": s, "correct": b, "valid_json": b, "schema_valid": b, "exact_match": b,
        "fields_correct": i, "fields_total": i, "field_accuracy": pl.Float64, "field_match": s,
        "excluded_reason": s, "error_type": s, "error": s, "finish_reason": s, "completion_tokens": i,
        "gen_error": s,
    }  # fmt: skip
