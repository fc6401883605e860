"""Structured-output task: JSON extraction, parse, JSON-schema validity, agreement.

    validator = make_validator(schema_dict)          # checks the schema itself first
    r = check_json(completion, validator)           # JsonResult
    r.ok, r.error_type ("no_json" | "json_parse_error" | "json_schema_error"), r.error,
    r.value, r.canonical (compact, sorted keys), r.value_hash (hash of canonical: the agreement key)

Extraction takes the last fenced ```json block (or untagged block), else the whole text, else the
first balanced {...} / [...] span in the text.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.S)


def extract_json(text: str | None) -> str | None:
    if text is None:
        return None
    blocks = _FENCE.findall(text)
    tagged = [b for tag, b in blocks if tag.lower() in ("json", "jsonc", "json5")]
    untagged = [b for tag, b in blocks if not tag]
    if tagged or untagged:
        return (tagged or untagged)[-1].strip() or None
    t = text.strip()
    if not t:
        return None
    if t[0] in "{[":
        return t
    span = _balanced_span(t)
    return span if span is not None else t


def _balanced_span(t: str) -> str | None:
    """The first {...} or [...] span with balanced brackets outside strings (JSON embedded in prose)."""
    start = next((i for i, c in enumerate(t) if c in "{["), None)
    if start is None:
        return None
    depth, in_str, esc = 0, False, False
    for i in range(start, len(t)):
        c = t[i]
        if in_str:
            if esc:
                esc = False
            elif c == "\\":
                esc = True
            elif c == '"':
                in_str = False
        elif c == '"':
            in_str = True
        elif c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
            if depth == 0:
                return t[start : i + 1]
    return None


def load_schema(path: Path) -> dict[str, Any]:
    try:
        schema = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); fix the schema file") from None
    make_validator(schema, where=str(path))
    return schema


def make_validator(schema: dict[str, Any], where: str = "schema") -> Any:
    """A jsonschema validator for the schema's declared draft (default: the latest); raises
    ValueError if the schema itself is invalid."""
    import jsonschema

    cls = jsonschema.validators.validator_for(schema)
    try:
        cls.check_schema(schema)
    except jsonschema.SchemaError as e:
        raise ValueError(f"{where}: invalid JSON schema: {e.message}") from None
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


@dataclass
class JsonResult:
    ok: bool
    error_type: str | None = None
    error: str | None = None
    value: Any = None
    canonical: str | None = None
    value_hash: str | None = None


def check_json(text: str | None, validator: Any = None) -> JsonResult:
    raw = extract_json(text)
    if raw is None:
        return JsonResult(False, "no_json", "no JSON in the completion")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as e:
        return JsonResult(False, "json_parse_error", f"line {e.lineno} col {e.colno}: {e.msg}")
    canonical = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    h = hashlib.sha256(canonical.encode()).hexdigest()[:16]
    if validator is not None:
        err = next(iter(sorted(validator.iter_errors(value), key=lambda e: list(e.path))), None)
        if err is not None:
            path = "/".join(str(p) for p in err.absolute_path) or "<root>"
            return JsonResult(False, "json_schema_error", f"{path}: {err.message}"[:300], value, canonical, h)
    return JsonResult(True, None, None, value, canonical, h)
