"""SFT with 2 processes (DDP on CPU, gloo backend, launched with torchrun): completes, and the result
is a valid adapter that changes the model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.integration.test_train_stages import make_project, max_weight_change, run
from tests.integration.test_train_support import register_rows_kind

pytestmark = pytest.mark.slow


def test_sft_on_two_processes_gives_a_valid_adapter(tmp_path, tiny_llama, monkeypatch):
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM

    register_rows_kind(monkeypatch)
    monkeypatch.setenv(
        "PYTHONPATH", str(Path(__file__).resolve().parents[2])
    )  # launched ranks import the tests' stage
    p = make_project(
        tmp_path,
        tiny_llama,
        "  sft: {kind: sft, inputs: [sft_rows], base: student, learning_rate: 0.005, max_steps: 4, batch_size: 2,"
        " max_length: 96, launcher: {num_processes: 2, backend: gloo}}\n",
    )
    _, plans, ran = run(p)
    assert "sft" in ran
    art = plans["sft"].path
    man = json.loads((art / "manifest.json").read_text())
    m = man["metrics"]
    assert m["num_processes"] == 2 and m["effective_batch_size"] == 4 and m["steps"] == 4
    model_dir = art / "model"
    cfg = PeftConfig.from_pretrained(str(model_dir))
    assert cfg.peft_type == "LORA" and cfg.base_model_name_or_path == str(Path(tiny_llama).resolve())
    base = AutoModelForCausalLM.from_pretrained(cfg.base_model_name_or_path)
    peft_model = PeftModel.from_pretrained(base, str(model_dir))
    ids = torch.tensor([[4, 100, 200, 300]])
    with torch.no_grad():
        assert torch.isfinite(peft_model(input_ids=ids).logits).all()
    assert max_weight_change(tiny_llama, adapter_dir=model_dir) > 1e-4
    assert (art / "manifest.json").is_file() and not (art / "scratch").exists()
