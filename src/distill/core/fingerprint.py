"""Fingerprints: what decides whether an artifact can be reused.

fingerprint(stage) = sha256 over its *parts*:
  kind, code version, semantic config (speed-only fields dropped), the fingerprints of the stages it
  depends on, the content hash of every file it reads, the identity of every pipeline model it
  names (Hub id@revision + dtype + backend + chat template, or a content hash of a local folder),
  and the pipeline seed and task.

The parts are stored in the manifest so `distill status` can say *what* changed.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from distill.config import is_speed_field

if TYPE_CHECKING:
    from distill.config import LoadedPipeline, ModelSpec


def semantic_dump(model: BaseModel) -> dict[str, Any]:
    """`model_dump` without speed-only fields, recursively."""
    out: dict[str, Any] = {}
    for name in type(model).model_fields:
        if is_speed_field(type(model), name):
            continue
        out[name] = _semantic_value(getattr(model, name))
    return out


def _semantic_value(v: Any) -> Any:
    if isinstance(v, BaseModel):
        return semantic_dump(v)
    if isinstance(v, dict):
        return {str(k): _semantic_value(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_semantic_value(x) for x in v]
    return v


def canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def sha256_text(s: str) -> str:
    return hashlib.sha256(s.encode()).hexdigest()


class FileHasher:
    """Content hashes of files, cached by (path, size, mtime_ns) in a JSON file under the workdir.

    Hashing a multi-GB local model on every `distill status` would make cached runs slow; the cache
    keeps them instant while any change to a file's size or mtime forces a re-hash.
    """

    def __init__(self, cache_file: Path | None = None) -> None:
        self.cache_file = cache_file
        self.cache: dict[str, list[Any]] = {}
        self.dirty = False
        if cache_file is not None and cache_file.is_file():
            try:
                self.cache = json.loads(cache_file.read_text())
            except (OSError, ValueError):
                self.cache = {}

    def file(self, path: Path) -> str:
        st = path.stat()
        key = str(path.resolve())
        hit = self.cache.get(key)
        if hit and hit[0] == st.st_size and hit[1] == st.st_mtime_ns:
            return str(hit[2])
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        digest = h.hexdigest()
        self.cache[key] = [st.st_size, st.st_mtime_ns, digest]
        self.dirty = True
        return digest

    def folder(self, path: Path) -> str:
        h = hashlib.sha256()
        for root, dirs, files in os.walk(path):
            dirs.sort()
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            for fn in sorted(files):
                if fn.startswith("."):
                    continue
                p = Path(root) / fn
                h.update(str(p.relative_to(path)).encode())
                h.update(self.file(p).encode())
        return h.hexdigest()

    def save(self) -> None:
        if self.dirty and self.cache_file is not None:
            self.cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.cache_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.cache))
            os.replace(tmp, self.cache_file)
            self.dirty = False


def expand_files(lp: LoadedPipeline, patterns: list[str]) -> list[Path]:
    out: list[Path] = []
    for pat in patterns:
        p = lp.path(pat)
        if any(c in pat for c in "*?["):
            out.extend(Path(x) for x in sorted(glob.glob(str(p), recursive=True)) if Path(x).is_file())
        elif p.is_dir():
            out.extend(sorted(x for x in p.rglob("*") if x.is_file() and not x.name.startswith(".")))
        else:
            out.append(p)
    return out


def model_identity(lp: LoadedPipeline, spec: ModelSpec, hasher: FileHasher) -> dict[str, Any]:
    """What makes a model this model: Hub id@revision, or the content of a local folder."""
    ident: dict[str, Any] = {"dtype": spec.dtype, "backend": spec.backend}
    if spec.id.startswith("tiny:"):
        from distill.tiny import BUILDER_VERSION

        ident["id"] = f"{spec.id}@seed{spec.seed}+builder{BUILDER_VERSION}"
    else:
        local = lp.path(spec.id)
        if local.exists():
            ident["id"] = f"local:{hasher.folder(local) if local.is_dir() else hasher.file(local)}"
        else:
            ident["id"] = f"{spec.id}@{spec.revision or 'unpinned'}"
    if spec.chat_template:
        ident["chat_template"] = hasher.file(lp.path(spec.chat_template))
    if spec.max_model_len:
        ident["max_model_len"] = spec.max_model_len
    return ident


def stage_parts(
    lp: LoadedPipeline, name: str, input_fps: dict[str, str], hasher: FileHasher
) -> dict[str, Any]:
    """Every ingredient of a stage's fingerprint, as a flat-ish dict (stored in the manifest)."""
    from distill.stages import stage_module

    cfg = lp.stages[name]
    mod = stage_module(cfg.kind)
    files: dict[str, str] = {}
    for p in expand_files(lp, cfg.files()):
        files[lp.rel(p)] = hasher.file(p) if p.is_file() else "missing"
    models: dict[str, Any] = {}
    for _, ref in cfg.model_refs():
        if ref in lp.pipeline.models:
            models[ref] = model_identity(lp, lp.pipeline.models[ref], hasher)
    task = semantic_dump(lp.pipeline.task) if lp.pipeline.task is not None else None
    if lp.pipeline.task is not None and getattr(cfg, "USES_TASK", True):
        task_files = getattr(lp.pipeline.task, "schemas", None) or getattr(
            lp.pipeline.task, "schema_file", None
        )
        if task_files:
            for p in expand_files(lp, [task_files]):
                files[lp.rel(p)] = hasher.file(p)
    return {
        "kind": cfg.kind,
        "code_version": str(getattr(mod, "CODE_VERSION", "1")),
        "config": {k: v for k, v in cfg.semantic().items() if k != "inputs"},
        "inputs": dict(input_fps),
        "files": files,
        "models": models,
        "task": task if getattr(cfg, "USES_TASK", True) else None,
        "seed": lp.pipeline.seed,
    }


def fingerprint_of(parts: dict[str, Any]) -> str:
    return sha256_text(canonical(parts))


def explain_change(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Human reasons why `new` parts differ from `old` (e.g. 'prompts/sql/answer.jinja changed')."""
    reasons: list[str] = []
    if old.get("kind") != new.get("kind"):
        reasons.append(f"kind changed ({old.get('kind')} -> {new.get('kind')})")
    if old.get("code_version") != new.get("code_version"):
        reasons.append("stage code version changed")
    for k in sorted(set(old.get("inputs", {})) | set(new.get("inputs", {}))):
        if old.get("inputs", {}).get(k) != new.get("inputs", {}).get(k):
            reasons.append(f"input {k} changed")
    for k in sorted(set(old.get("files", {})) | set(new.get("files", {}))):
        a, b = old.get("files", {}).get(k), new.get("files", {}).get(k)
        if a != b:
            reasons.append(f"{k} {'added' if a is None else 'removed' if b is None else 'changed'}")
    for m in sorted(set(old.get("models", {})) | set(new.get("models", {}))):
        a, b = old.get("models", {}).get(m, {}), new.get("models", {}).get(m, {})
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                reasons.append(f"models.{m}.{key} changed")
    for key in _diff_keys(old.get("config", {}), new.get("config", {})):
        reasons.append(f"config {key} changed")
    if old.get("task") != new.get("task"):
        for key in _diff_keys(old.get("task") or {}, new.get("task") or {}):
            reasons.append(f"task.{key} changed")
    if old.get("seed") != new.get("seed"):
        reasons.append("seed changed")
    return reasons or ["fingerprint changed"]


def _diff_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for k in sorted(set(a) | set(b)):
            out.extend(_diff_keys(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else str(k)))
        return out
    return [prefix or "<value>"] if a != b else []
