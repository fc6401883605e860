"""Pipeline configuration: YAML with line numbers, profiles, --set overrides, pydantic validation.

Loading order: parse YAML (keeping the line of every key) -> deep-merge the chosen profiles ->
apply `--set key.path=value` overrides -> validate the top level -> validate each stage with its
kind's own `Config` model -> check the stage graph. Every error is one line naming the file, the
line and the key path; all errors are collected and raised together as one `ConfigError`.

Only pydantic and PyYAML are imported here: the CLI loads configs without torch or polars.
"""

from __future__ import annotations

import copy
import difflib
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from distill.errors import ConfigError

NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")

KeyPath = tuple[str | int, ...]


def speed(default: Any = None, **kw: Any) -> Any:
    """A field that changes only how fast a stage runs, never its result: not fingerprinted."""
    extra = dict(kw.pop("json_schema_extra", None) or {})
    extra["speed"] = True
    return Field(default, json_schema_extra=extra, **kw)


def is_speed_field(model: type[BaseModel], name: str) -> bool:
    info = model.model_fields.get(name)
    extra = info.json_schema_extra if info is not None else None
    return isinstance(extra, dict) and bool(extra.get("speed"))


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


class ModelSpec(Strict):
    """A model the pipeline names: a Hub id, a local folder, or `tiny:<arch>` (built offline)."""

    id: str = Field(description="Hub id (`org/name`), local path, or `tiny:llama` / `tiny:qwen2`.")
    revision: str | None = Field(None, description="Hub revision (commit sha or tag). Pin it.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    backend: Literal["vllm", "openai", "transformers"] = "transformers"
    chat_template: str | None = Field(
        None, description="Path to a Jinja chat template overriding the model's."
    )
    trust_remote_code: bool = False
    seed: int = Field(0, description="Seed for `tiny:` models.")
    # vLLM engine settings (speed/placement only)
    tensor_parallel_size: int = speed(1)
    data_parallel_size: int = speed(1)
    gpu_memory_utilization: float = speed(0.9)
    max_model_len: int | None = None
    enforce_eager: bool = speed(False)
    kv_cache_gb: float | None = speed(None, description="KV cache size in GiB (vLLM on CPU needs it).")
    enable_lora: bool = speed(False)
    max_lora_rank: int = speed(64)
    structured_outputs_backend: str | None = None
    # OpenAI-compatible server settings
    base_url: str | None = None
    model_name: str | None = Field(None, description="Model name the server expects (default: id).")
    api_key_env: str | None = Field(None, description="Name of the environment variable with the API key.")
    max_concurrency: int = speed(16)
    max_retries: int = speed(6)
    request_timeout_s: float = speed(120.0)
    # transformers settings
    batch_size: int = speed(16)
    device: str | None = speed(None)


# --------------------------------------------------------------------------------------------
# Tasks
# --------------------------------------------------------------------------------------------


class SqlTask(Strict):
    kind: Literal["sql"]
    dialect: str = "duckdb"
    schemas: str = Field(..., description="Glob of schema files (DDL + rows) relative to `root`.")
    engine: Literal["duckdb", "sqlite"] = "duckdb"
    execute_via_duckdb: bool = Field(
        False, description="For non-DuckDB dialects: transpile with sqlglot and execute on DuckDB."
    )
    allowed_statements: list[str] = Field(default_factory=lambda: ["select", "with"])
    timeout_s: float = 5.0
    max_rows: int = 10_000
    memory_limit: str = Field("512MB", description="Memory cap of each SQL worker (DuckDB memory_limit).")
    workers: int = speed(2)


class JsonTask(Strict):
    kind: Literal["json"]
    schema_file: str = Field(..., alias="schema", description="JSON Schema file the records must satisfy.")
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class TextTask(Strict):
    kind: Literal["text"]


TaskConfig = Annotated[SqlTask | JsonTask | TextTask, Field(discriminator="kind")]


# --------------------------------------------------------------------------------------------
# Pipeline
# --------------------------------------------------------------------------------------------


class Pipeline(Strict):
    name: str
    root: str = Field(
        ".", description="Folder that relative paths resolve against, relative to the pipeline file."
    )
    workdir: str | None = Field(None, description="Where artifacts live (default `runs/<name>` under root).")
    seed: int = 0
    description: str | None = None
    models: dict[str, ModelSpec] = Field(default_factory=dict)
    task: TaskConfig | None = None
    stages: dict[str, dict[str, Any]]
    profiles: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _names(self) -> Pipeline:
        for group, names in (("models", self.models), ("stages", self.stages)):
            for n in names:
                if not NAME_RE.match(n):
                    raise ValueError(
                        f"{group}.{n}: names use letters, digits, '_' and '-', starting with a letter"
                    )
        clash = set(self.models) & set(self.stages)
        if clash:
            raise ValueError(f"{sorted(clash)[0]!r} names both a model and a stage; rename one")
        return self


# --------------------------------------------------------------------------------------------
# YAML with line numbers
# --------------------------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    pass


def _compose_lines(text: str, file: str) -> tuple[Any, dict[KeyPath, int]]:
    """Parse YAML; return the data and a map from key path to 1-based line (keys and list items)."""
    try:
        node = yaml.compose(text, Loader=_Loader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{file}{line}: YAML syntax error: {problem}; fix the YAML at that line") from None
    lines: dict[KeyPath, int] = {}
    errors: list[str] = []

    def walk(n: Any, path: KeyPath) -> None:
        if isinstance(n, yaml.MappingNode):
            seen: set[str] = set()
            for k, v in n.value:
                key = str(k.value)
                if key in seen:
                    errors.append(
                        f"{file}:{k.start_mark.line + 1}: {_fmt(path + (key,))}: duplicate key; keep one"
                    )
                seen.add(key)
                lines[path + (key,)] = k.start_mark.line + 1
                walk(v, path + (key,))
        elif isinstance(n, yaml.SequenceNode):
            for i, v in enumerate(n.value):
                lines[path + (i,)] = v.start_mark.line + 1
                walk(v, path + (i,))

    if node is not None:
        lines[()] = node.start_mark.line + 1
        walk(node, ())
    if errors:
        raise ConfigError(*errors)
    data = yaml.load(text, Loader=_Loader)  # noqa: S506 - SafeLoader subclass
    return data, lines


def _fmt(path: Iterable[str | int]) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "<top>"


# --------------------------------------------------------------------------------------------
# Merging, overrides
# --------------------------------------------------------------------------------------------


def deep_merge(base: Any, over: Any) -> Any:
    """Mappings merge key by key; anything else (lists included) is replaced."""
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for k, v in over.items():
            out[k] = deep_merge(base[k], v) if k in base else copy.deepcopy(v)
        return out
    return copy.deepcopy(over)


def _leaf_paths(d: Any, path: KeyPath = ()) -> Iterable[KeyPath]:
    if isinstance(d, dict) and d:
        for k, v in d.items():
            yield path + (k,)
            yield from _leaf_paths(v, path + (k,))


def parse_set(expr: str) -> tuple[list[str], Any]:
    """`stages.answers.n=4` -> (["stages","answers","n"], 4). Values are read as YAML."""
    if "=" not in expr:
        raise ConfigError(f"--set {expr!r}: expected key.path=value (e.g. --set stages.answers.n=4)")
    key, _, raw = expr.partition("=")
    parts = [p for p in key.strip().split(".")]
    if not key.strip() or any(not p for p in parts):
        raise ConfigError(f"--set {expr!r}: the key path is empty or has an empty part; write key.path=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        raise ConfigError(f"--set {expr!r}: the value is not valid YAML; quote it") from None
    return parts, value


# --------------------------------------------------------------------------------------------
# Loaded pipeline
# --------------------------------------------------------------------------------------------


@dataclass
class LoadedPipeline:
    """A validated pipeline plus where it came from; `stages` holds each stage's typed config."""

    file: Path
    pipeline: Pipeline
    stages: dict[str, Any]  # name -> StageConfig (typed per kind)
    raw: dict[str, Any]
    profiles: list[str] = field(default_factory=list)
    overrides: list[str] = field(default_factory=list)

    @property
    def root(self) -> Path:
        return (self.file.parent / self.pipeline.root).resolve()

    @property
    def workdir(self) -> Path:
        wd = self.pipeline.workdir or f"runs/{self.pipeline.name}"
        return (self.root / wd).resolve()

    def path(self, rel: str | Path) -> Path:
        p = Path(rel).expanduser()
        return p if p.is_absolute() else (self.root / p)

    def rel(self, p: Path) -> str:
        try:
            return str(p.resolve().relative_to(self.root))
        except ValueError:
            return str(p)

    def kind_of(self, stage: str) -> str:
        return str(self.stages[stage].kind)


class _Locator:
    def __init__(self, file: str, lines: dict[KeyPath, int], origin: dict[KeyPath, str]) -> None:
        self.file, self.lines, self.origin = file, lines, origin

    def at(self, path: KeyPath) -> str:
        p = tuple(path)
        while p:
            if p in self.origin:
                return self.origin[p]
            if p in self.lines:
                return f"{self.file}:{self.lines[p]}"
            p = p[:-1]
        return f"{self.file}"


def _pydantic_errors(
    e: ValidationError,
    prefix: KeyPath,
    loc: _Locator,
    owner: Callable[[tuple[Any, ...]], type[BaseModel] | None],
) -> list[str]:
    """One line per pydantic error: `file:line: key.path: message`, with a did-you-mean for unknown keys."""
    out = []
    for err in e.errors():
        raw_loc = tuple(err["loc"])
        typ = err["type"]
        # discriminated unions put the tag (e.g. 'sql') into the loc; drop it from what we show
        shown = tuple(
            p for i, p in enumerate(raw_loc) if not (i > 0 and raw_loc[i - 1] == "task" and p in _TASK_TAGS)
        )
        path = prefix + shown
        if typ == "extra_forbidden":
            model = owner(raw_loc[:-1])
            allowed = list(model.model_fields) if model is not None else []
            hint = difflib.get_close_matches(str(path[-1]), allowed, n=1, cutoff=0.6)
            msg = "unknown key" + (f" (did you mean {hint[0]!r}?)" if hint else "")
            if allowed and not hint:
                msg += f"; allowed: {', '.join(sorted(allowed))}"
            out.append(f"{loc.at(path)}: {_fmt(path)}: {msg}")
        elif typ == "missing":
            out.append(f"{loc.at(path[:-1])}: {_fmt(path)}: required key is missing; add it")
        else:
            got = err.get("input")
            shown_val = f" (got {got!r})" if not isinstance(got, dict | list) and got is not None else ""
            msg = err["msg"].replace("Value error, ", "")
            out.append(f"{loc.at(path)}: {_fmt(path)}: {msg}{shown_val}")
    return out


_TASK_TAGS = ("sql", "json", "text")


def _pipeline_owner(data: dict[str, Any]) -> Callable[[tuple[Any, ...]], type[BaseModel] | None]:
    def owner(parent: tuple[Any, ...]) -> type[BaseModel] | None:
        if not parent:
            return Pipeline
        if parent[0] == "models" and len(parent) == 2:
            return ModelSpec
        if parent[0] == "task":
            tasks: dict[str, type[BaseModel]] = {"sql": SqlTask, "json": JsonTask, "text": TextTask}
            return tasks.get(str(parent[1]) if len(parent) > 1 else "")
        return None

    return owner


def load_pipeline(
    file: str | Path,
    profiles: Iterable[str] = (),
    overrides: Iterable[str] = (),
) -> LoadedPipeline:
    """Load, merge, override and validate a pipeline; raise ConfigError listing every problem."""
    from distill.stages import stage_config_class  # light: registry of pydantic configs only

    path = Path(file)
    shown = str(file)
    if not path.is_file():
        raise ConfigError(f"{shown}: no such pipeline file; check the path")
    data, lines = _compose_lines(path.read_text(encoding="utf-8"), shown)
    if not isinstance(data, dict):
        raise ConfigError(f"{shown}:1: the pipeline must be a YAML mapping with name, models, stages")
    origin: dict[KeyPath, str] = {}
    errors: list[str] = []

    profiles = list(profiles)
    avail = data.get("profiles") or {}
    for prof in profiles:
        if not isinstance(avail, dict) or prof not in avail:
            names = sorted(avail) if isinstance(avail, dict) else []
            hint = difflib.get_close_matches(prof, names, n=1)
            raise ConfigError(
                f"{shown}: --profile {prof}: no such profile"
                + (f" (did you mean {hint[0]!r}?)" if hint else "")
                + (f"; defined: {', '.join(names)}" if names else "; the file defines none")
            )
        over = avail[prof] or {}
        if not isinstance(over, dict):
            raise ConfigError(
                f"{shown}:{lines.get(('profiles', prof), 1)}: profiles.{prof}: must be a mapping"
            )
        for p in _leaf_paths(over):
            ln = lines.get(("profiles", prof) + p)
            origin[p] = f"{shown}:{ln} (profile {prof})" if ln else f"{shown} (profile {prof})"
        data = {k: v for k, v in deep_merge(data, over).items()}

    overrides = list(overrides)
    for expr in overrides:
        parts, value = parse_set(expr)
        cur: Any = data
        for i, part in enumerate(parts[:-1]):
            if isinstance(cur, dict):
                if part not in cur or cur[part] is None:
                    cur[part] = {}
                cur = cur[part]
            else:
                raise ConfigError(
                    f"--set {expr}: {'.'.join(parts[: i + 1])} is not a mapping; cannot set a key inside it"
                )
        if not isinstance(cur, dict):
            raise ConfigError(
                f"--set {expr}: {'.'.join(parts[:-1])} is not a mapping; cannot set a key inside it"
            )
        cur[parts[-1]] = value
        for j in range(1, len(parts) + 1):
            origin[tuple(parts[:j])] = f"--set {expr}"

    loc = _Locator(shown, lines, origin)
    try:
        pipe = Pipeline.model_validate(data)
    except ValidationError as e:
        raise ConfigError(*_pydantic_errors(e, (), loc, _pipeline_owner(data))) from None

    stages: dict[str, Any] = {}
    for name, raw in pipe.stages.items():
        spath: KeyPath = ("stages", name)
        if not isinstance(raw, dict):
            errors.append(f"{loc.at(spath)}: stages.{name}: must be a mapping with a `kind`")
            continue
        kind = raw.get("kind")
        if kind is None:
            errors.append(f"{loc.at(spath)}: stages.{name}.kind: required key is missing; add the stage kind")
            continue
        cls = stage_config_class(str(kind))
        if cls is None:
            from distill.stages import KINDS

            hint = difflib.get_close_matches(str(kind), list(KINDS), n=1)
            errors.append(
                f"{loc.at(spath + ('kind',))}: stages.{name}.kind: unknown stage kind {kind!r}"
                + (f" (did you mean {hint[0]!r}?)" if hint else f"; known: {', '.join(KINDS)}")
            )
            continue
        try:
            stages[name] = cls.model_validate(raw)
        except ValidationError as e:
            errors.extend(_pydantic_errors(e, spath, loc, partial(_submodel, cls)))

    loaded = LoadedPipeline(path, pipe, stages, data, profiles, overrides)
    if not errors:
        errors.extend(check_graph(loaded, loc))
    if errors:
        raise ConfigError(*errors)
    return loaded


def _submodel(cls: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel]:
    """The pydantic model that owns the key at `loc` inside `cls` (for the did-you-mean hint)."""
    cur: type[BaseModel] = cls
    for part in loc:
        info = cur.model_fields.get(str(part)) if isinstance(part, str) else None
        if info is None:
            continue
        ann = info.annotation
        for cand in getattr(ann, "__args__", ()) + (ann,):
            if isinstance(cand, type) and issubclass(cand, BaseModel):
                cur = cand
                break
    return cur


def check_graph(lp: LoadedPipeline, loc: _Locator | None = None) -> list[str]:
    """Inputs and model references exist, the graph has no cycle, and input layouts fit."""
    loc = loc or _Locator(str(lp.file), {}, {})
    errors: list[str] = []
    names = list(lp.stages)
    for name, cfg in lp.stages.items():
        for i, inp in enumerate(cfg.inputs):
            if inp not in lp.stages:
                hint = difflib.get_close_matches(inp, names, n=1)
                errors.append(
                    f"{loc.at(('stages', name, 'inputs', i))}: stages.{name}.inputs[{i}]: unknown stage {inp!r}"
                    + (f" (did you mean {hint[0]!r}?)" if hint else "")
                )
                continue
            src = lp.stages[inp]
            accepts = getattr(type(cfg), "ACCEPTS", None)
            layout = src.output_layout()
            if accepts is not None and layout not in accepts:
                errors.append(
                    f"{loc.at(('stages', name, 'inputs', i))}: stages.{name}.inputs[{i}]: stage {inp!r} "
                    f"({src.kind}) produces {layout!r} data, but a {cfg.kind} stage takes {', '.join(sorted(accepts))}"
                )
        for key, ref in cfg.model_refs():
            if ref not in lp.pipeline.models and ref not in lp.stages:
                hint = difflib.get_close_matches(ref, list(lp.pipeline.models) + names, n=1)
                errors.append(
                    f"{loc.at(('stages', name, key))}: stages.{name}.{key}: {ref!r} is neither a model nor a stage"
                    + (f" (did you mean {hint[0]!r}?)" if hint else "")
                )
            elif ref in lp.stages and lp.stages[ref].output_layout() != "model":
                errors.append(
                    f"{loc.at(('stages', name, key))}: stages.{name}.{key}: stage {ref!r} ({lp.stages[ref].kind}) "
                    "does not produce a model"
                )
    if errors:
        return errors
    # cycles
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> str | None:
        state[n] = 1
        stack.append(n)
        for d in dependencies(lp, n):
            if state.get(d) == 1:
                cyc = stack[stack.index(d) :] + [d]
                return " -> ".join(cyc)
            if state.get(d) is None:
                r = visit(d)
                if r:
                    return r
        stack.pop()
        state[n] = 2
        return None

    for n in names:
        if state.get(n) is None:
            cyc = visit(n)
            if cyc:
                first = cyc.split(" -> ")[0]
                errors.append(
                    f"{loc.at(('stages', first))}: stages.{first}: dependency cycle {cyc}; remove one edge"
                )
                break
    return errors


def dependencies(lp: LoadedPipeline, stage: str) -> list[str]:
    cfg = lp.stages[stage]
    deps = list(cfg.inputs)
    for _, ref in cfg.model_refs():
        if ref in lp.stages and ref not in deps:
            deps.append(ref)
    return deps


def topo_order(lp: LoadedPipeline) -> list[str]:
    """Stages in dependency order; ties keep file order."""
    order: list[str] = []
    done: set[str] = set()

    def visit(n: str) -> None:
        if n in done:
            return
        done.add(n)
        for d in dependencies(lp, n):
            visit(d)
        order.append(n)

    for n in lp.stages:
        visit(n)
    return order
