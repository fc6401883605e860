"""The memory planner: parameter counts from configs, the breakdown's rules, and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from distill.train.memory import GB, Shape, estimate, load_config

LLAMA3_8B = {
    "model_type": "llama",
    "vocab_size": 128256,
    "hidden_size": 4096,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "intermediate_size": 14336,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
}
QWEN25_05B = {
    "model_type": "qwen2",
    "vocab_size": 151936,
    "hidden_size": 896,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "intermediate_size": 4864,
    "tie_word_embeddings": True,
    "hidden_act": "silu",
}


def test_parameter_counts_match_published_models():
    assert Shape(LLAMA3_8B).total_params() == 8_030_261_248  # Meta-Llama-3-8B
    assert Shape(QWEN25_05B).total_params() == 494_032_768  # Qwen2.5-0.5B


@pytest.mark.parametrize("which", ["llama", "qwen2"])
def test_parameter_and_lora_counts_match_the_real_model(which, tiny_llama, tiny_qwen2):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    path = tiny_llama if which == "llama" else tiny_qwen2
    model = AutoModelForCausalLM.from_pretrained(path)
    s = Shape(load_config(str(path)))
    assert s.total_params() == model.num_parameters()
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(model, LoraConfig(r=8, target_modules=targets))
    assert s.lora_params(8, targets) == sum(p.numel() for p in peft_model.parameters() if p.requires_grad)


def test_rules_of_thumb_and_component_ordering():
    kw = dict(batch_size=2, seq_len=512, precision="bf16", device="cuda")
    full = estimate(QWEN25_05B, method="full", **kw)
    lora = estimate(QWEN25_05B, method="lora", **kw)
    qlora = estimate(QWEN25_05B, method="qlora", **kw)
    P = full["params"]
    # inference ~ params x bytes x 1.2
    assert full["inference"]["rule_of_thumb_gb"] == pytest.approx(P * 2 * 1.2 / GB, rel=1e-3)
    # full fine-tuning with Adam: fp32 weights + grads + two moments = 16 bytes/param before activations
    c = full["components_bytes"]
    assert c["weights"] + c["gradients"] + c["optimizer_states"] == 16 * P
    assert full["total_gb"] > lora["total_gb"] > qlora["total_gb"]
    # LoRA dropout keeps a copy of each adapted projection's input for backward
    no_drop = estimate(QWEN25_05B, method="lora", lora_dropout=0.0, **kw)
    assert no_drop["components_bytes"]["activations"] < lora["components_bytes"]["activations"]
    assert lora["components_bytes"]["gradients"] == 4 * lora["lora_params"] < 0.05 * c["gradients"]
    assert qlora["components_bytes"]["weights"] < lora["components_bytes"]["weights"]
    gc = estimate(QWEN25_05B, method="full", gradient_checkpointing=True, **kw)
    assert gc["components_bytes"]["activations"] < full["components_bytes"]["activations"] / 4
    a8 = estimate(QWEN25_05B, method="full", optimizer="adamw8bit", **kw)
    sgd = estimate(QWEN25_05B, method="full", optimizer="sgd", **kw)
    assert (
        sgd["components_bytes"]["optimizer_states"] == 0 < a8["components_bytes"]["optimizer_states"] == 2 * P
    )
    # activations and the KV cache grow with tokens
    long = estimate(QWEN25_05B, method="lora", **{**kw, "seq_len": 4096})
    assert long["components_bytes"]["activations"] > 3 * lora["components_bytes"]["activations"]
    kv = 2 * 24 * 2 * 64 * 2  # layers x kv heads x head dim x bf16, keys and values
    assert lora["inference"]["kv_cache_bytes_per_token"] == kv


def test_dpo_counts_two_sequences_and_a_reference_copy():
    one = estimate(QWEN25_05B, method="full", precision="fp32", device="cpu")
    dpo = estimate(
        QWEN25_05B,
        method="full",
        precision="fp32",
        device="cpu",
        sequences_per_example=2,
        reference_copy=True,
    )
    assert dpo["components_bytes"]["reference_model"] == 4 * one["params"]
    assert dpo["components_bytes"]["activations"] > 1.9 * one["components_bytes"]["activations"]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "distill.cli", "estimate-memory", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_prints_a_breakdown_and_json(tiny_llama, tmp_path):
    r = cli(str(tiny_llama), "--method", "full", "--precision", "fp32", "--device", "cpu", "--seq-len", "128")
    assert r.returncode == 0, r.stderr
    for word in ("weights", "gradients", "optimizer states", "activations", "KV cache", "rules of thumb"):
        assert word in r.stdout
    r = cli(
        str(tiny_llama),
        "--method",
        "lora",
        "--lora-r",
        "8",
        "--batch-size",
        "2",
        "--gradient-checkpointing",
        "--json",
    )
    est = json.loads(r.stdout)
    assert est["lora_params"] == Shape(load_config(str(tiny_llama))).lora_params(8, None)
    assert est["gradient_checkpointing"] is True and est["batch_size"] == 2
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg/config.json").write_text(json.dumps(QWEN25_05B))
    est = json.loads(cli(str(tmp_path / "cfg"), "--json").stdout)
    assert est["params"] == 494_032_768


def test_cli_errors_are_one_line():
    r = cli("./no/such/model")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "no such model folder" in r.stderr
    r = cli("x", "--method", "lorax")
    assert r.returncode == 1 and "--method lorax" in r.stderr
