"""CLI surface: --help without heavy imports, env, tiny-model determinism."""

from __future__ import annotations

import subprocess
import sys

from safetensors.numpy import load_file


def test_help_imports_no_heavy_library():
    code = (
        "import sys; from distill.cli import app; "
        "heavy = [m for m in ('torch', 'transformers', 'vllm', 'polars', 'duckdb', 'trl', 'datasets') if m in sys.modules]; "
        "print(','.join(heavy))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == ""
    r = subprocess.run([sys.executable, "-m", "distill.cli", "--help"], capture_output=True, text=True)
    assert r.returncode == 0
    for cmd in (
        "run",
        "status",
        "validate",
        "show",
        "gc",
        "env",
        "tiny-model",
        "generate",
        "curate",
        "train",
    ):
        assert cmd in r.stdout


def test_env_prints_versions():
    r = subprocess.run(
        [sys.executable, "-m", "distill.cli", "env"], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0
    for key in ("python:", "torch:", "transformers:", "trl:", "peft:", "datasets:", "polars:", "devices:"):
        assert key in r.stdout


def test_tiny_model_is_deterministic_and_loads(tmp_path, tiny_llama):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill.tiny import build_tiny_model

    again = build_tiny_model(tmp_path / "again", "llama", seed=0)
    a = load_file(str(tiny_llama / "model.safetensors"))
    b = load_file(str(again / "model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert (tiny_llama / "tokenizer.json").read_text() == (again / "tokenizer.json").read_text()
    other = build_tiny_model(tmp_path / "other", "llama", seed=1)
    c = load_file(str(other / "model.safetensors"))
    assert any((a[k] != c[k]).any() for k in a)

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    text = tok.apply_chat_template(
        [{"role": "user", "content": "count orders"}], tokenize=False, add_generation_prompt=True
    )
    assert text.startswith("<|begin_of_text|><|im_start|>user\n") and text.endswith("<|im_start|>assistant\n")
    # the trap our generation/training code must avoid: template BOS + tokenizer BOS
    assert tok(text).input_ids[:2] == [tok.bos_token_id, tok.bos_token_id]
    assert tok(text, add_special_tokens=False).input_ids[0] == tok.bos_token_id
    assert model.config.vocab_size == len(tok)
