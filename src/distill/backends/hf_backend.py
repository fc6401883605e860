"""`transformers` backend: batched `model.generate` with left padding.

The CPU fallback when vLLM is not available, and the cross-check for the other backends: prompts
go through the same `chat.render_chat`/`chat.encode_chat` as the vLLM backend, so for greedy
decoding in float32 both produce the same tokens.

Behaviour matched to vLLM so rows from either backend mean the same thing:
- generation stops at the template's end-of-turn/EOS tokens (`chat.stop_token_ids`); the stop
  token is counted in `tokens` but not included in `text`; stop strings are cut from the text;
- `finish_reason` is "stop" (stop token or stop string) or "length";
- the model's `generation_config.json` sampling defaults are not applied (vLLM does not apply them
  either when given explicit sampling parameters); `top_k` is off;
- `temperature == 0` means greedy; with `n > 1` greedy samples are identical copies;
- `logprobs` are the raw (pre-temperature) log-probabilities of the chosen tokens.
Sampling is seeded per batch (with the first request's seed): outputs depend on the batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from distill.backends import BackendBase, Completion, GenRequest, GenResponse, Sampling, SeedScope, error_text
from distill.backends.chat import encode_chat, load_tokenizer, render_chat, stop_token_ids
from distill.core.log import get_logger

if TYPE_CHECKING:
    from distill.core.context import ResolvedModel

log = get_logger("backend.transformers")


def _key(s: Sampling) -> Sampling:
    return dataclasses.replace(s, seed=None)


class HFBackend(BackendBase):
    name = "transformers"
    seed_scope: SeedScope = "batch"

    def __init__(
        self,
        model: ResolvedModel,
        *,
        seed: int = 0,
        chat_template: str | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
        max_inflight: int | None = None,
    ) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        spec = model.spec
        self.model_id = model.path
        self.revision = model.revision
        self.seed = seed
        self.batch_size = max(1, max_inflight or spec.batch_size)
        self.template_kwargs = dict(chat_template_kwargs or {})
        self.device = spec.device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype: Any = "auto" if spec.dtype == "auto" else getattr(torch, spec.dtype)
        log.info(
            f"loading {model.name} ({model.path}{' + adapter ' + str(model.adapter) if model.adapter else ''}) on {self.device}"
        )
        m: Any = AutoModelForCausalLM.from_pretrained(
            model.path, revision=model.revision, dtype=dtype, trust_remote_code=spec.trust_remote_code
        )
        if model.adapter is not None:
            from peft import PeftModel

            m = PeftModel.from_pretrained(m, str(model.adapter))
        self.model = m.to(self.device).eval()
        self.tok = load_tokenizer(model.path, model.revision, chat_template, spec.trust_remote_code)
        self.stop_ids = stop_token_ids(self.tok, model.path, model.revision)
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.stop_ids[0]
        self.max_len = int(getattr(m.config, "max_position_embeddings", 0) or 0) or None

    def prepare(self, req: GenRequest) -> tuple[str, list[int]]:
        text = render_chat(self.tok, req.messages, **self.template_kwargs)
        ids = encode_chat(self.tok, text)
        if self.max_len is not None and len(ids) >= self.max_len:
            raise ValueError(f"prompt has {len(ids)} tokens; the model's context is {self.max_len}")
        return text, ids

    def stream(self, requests: Iterable[GenRequest]) -> Iterator[GenResponse]:
        batch: list[tuple[GenRequest, str, list[int]]] = []
        for req in requests:
            try:
                text, ids = self.prepare(req)
            except Exception as e:  # this request only
                yield GenResponse(req.id, None, None, error=error_text(e))
                continue
            # requests batch together when they sample alike; their seeds differ (one seed per batch)
            if batch and (_key(batch[0][0].sampling) != _key(req.sampling) or len(batch) >= self.batch_size):
                yield from self._run(batch)
                batch = []
            batch.append((req, text, ids))
        if batch:
            yield from self._run(batch)

    def _run(self, batch: list[tuple[GenRequest, str, list[int]]]) -> Iterator[GenResponse]:
        import torch
        from transformers import GenerationConfig

        s: Sampling = batch[0][0].sampling
        greedy = s.temperature <= 0
        reps = 1 if greedy else s.n
        width = max(len(ids) for _, _, ids in batch)
        input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, (_, _, ids) in enumerate(batch):  # left padding: prompts end where generation starts
            input_ids[i, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            mask[i, width - len(ids) :] = 1
        # A complete GenerationConfig of our own: the model's generation_config.json defaults (top_k,
        # repetition_penalty, ...) would otherwise apply here but not in vLLM, which samples exactly
        # what it is told. HF's own implicit top_k=50 made stop tokens 10x rarer than in vLLM.
        gc = GenerationConfig(
            max_new_tokens=s.max_tokens,
            do_sample=not greedy,
            temperature=s.temperature if not greedy else None,
            top_p=s.top_p if not greedy else None,
            top_k=0 if not greedy else None,
            num_return_sequences=reps,
            eos_token_id=list(self.stop_ids),
            pad_token_id=self.pad_id,
            bos_token_id=self.tok.bos_token_id,
            return_dict_in_generate=True,
            output_logits=s.logprobs,
            stop_strings=list(s.stop) or None,
        )
        kw: dict[str, Any] = {"generation_config": gc}
        if s.stop:
            kw["tokenizer"] = self.tok
        torch.manual_seed(batch[0][0].sampling.seed if batch[0][0].sampling.seed is not None else self.seed)
        try:
            with torch.inference_mode():
                out = self.model.generate(
                    input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device), **kw
                )
        except Exception as e:
            if isinstance(e, torch.cuda.OutOfMemoryError | MemoryError):
                raise
            # a failure of the batch is recorded on each of its requests
            for req, text, ids in batch:
                yield GenResponse(req.id, text, len(ids), error=error_text(e))
            return
        seqs = out.sequences[:, width:].tolist()
        logps = None
        if s.logprobs and out.logits:
            logps = torch.stack(out.logits, dim=1).float().log_softmax(-1)
        for i, (req, text, ids) in enumerate(batch):
            comps = []
            for j in range(reps):
                row = i * reps + j
                comps.append(self._completion(seqs[row], s, logps[row] if logps is not None else None))
            if greedy and s.n > 1:  # greedy samples are all the same: decode once, copy
                c = comps[0]
                comps = [
                    Completion(c.text, c.finish_reason, c.tokens, c.logprobs, c.token_ids) for _ in range(s.n)
                ]
            yield GenResponse(req.id, text, len(ids), comps)

    def _completion(self, toks: list[int], s: Sampling, logp: Any) -> Completion:
        stops = set(self.stop_ids)
        end = next((k for k, t in enumerate(toks) if t in stops), None)
        if end is not None:
            kept, n_tok, finish = toks[:end], end + 1, "stop"
        else:
            kept, n_tok, finish = toks, len(toks), "length"
        text = self.tok.decode(kept, skip_special_tokens=True)
        if s.stop:
            cut = [text.find(x) for x in s.stop if x in text]
            if cut and end is None:
                # generation ended on the stop string; what follows it is padding
                while kept and kept[-1] == self.pad_id:
                    kept = kept[:-1]
                n_tok, finish = len(kept), "stop"
            if cut:
                text = text[: min(cut)]
        lps = None
        if logp is not None:
            lps = [float(logp[k, t]) for k, t in enumerate(toks[:n_tok])]
        return Completion(text, finish, n_tok, lps, toks[:n_tok])

    def close(self) -> None:
        if getattr(self, "model", None) is not None:
            del self.model
            import gc

            gc.collect()
