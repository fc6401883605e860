"""A LoRA merged into its base by distill loads in vLLM (CPU) and generates (slow: engine start)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from distill.merge import merge_adapter_into_base


@pytest.mark.slow
def test_merged_model_serves_in_vllm(tiny_llama: Path, tmp_path: Path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_pretrained(str(tiny_llama))
    cfg = LoraConfig(
        r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM"
    )
    get_peft_model(m, cfg).save_pretrained(str(tmp_path / "adapter"))
    out = tmp_path / "merged"
    merge_adapter_into_base(tiny_llama, tmp_path / "adapter", out)
    script = textwrap.dedent(
        f"""
        from vllm import LLM, SamplingParams
        llm = LLM({str(out)!r}, enforce_eager=True, seed=0, max_model_len=256)
        msgs = [{{"role": "user", "content": "How many orders are there?"}}]
        res = llm.chat(msgs, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
        print("TOKENS", len(res[0].outputs[0].token_ids))
        """
    )
    env = {
        **os.environ,
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "OMP_NUM_THREADS": "1",
        "VLLM_CPU_KVCACHE_SPACE": "1",
    }
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "TOKENS 8" in r.stdout
