"""merge_adapter / ensure_merged: the merged model gives the adapter's logits; merges are cached."""

from __future__ import annotations

import json

import pytest
import torch

from distill.train.merge_lora import MERGED_MARKER, ensure_merged, merge_adapter


def _adapter(base_path, out, kind: str):
    from peft import IA3Config, LoraConfig, PromptTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    if kind == "lora":
        # init_lora_weights=False: random B, so the adapter really moves the logits
        cfg = LoraConfig(
            r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM"
        )
    elif kind == "dora":
        cfg = LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj"],
            use_dora=True,
            init_lora_weights=False,
            task_type="CAUSAL_LM",
        )
    elif kind == "ia3":
        cfg = IA3Config(task_type="CAUSAL_LM", init_ia3_weights=False)
    else:
        cfg = PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, cfg)
    peft_model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base_path).save_pretrained(out)
    return peft_model


@pytest.mark.parametrize("kind", ["lora", "dora", "ia3"])
def test_merged_model_gives_the_adapter_logits(tiny_llama, tmp_path, kind):
    from transformers import AutoModelForCausalLM

    peft_model = _adapter(tiny_llama, tmp_path / "adapter", kind)
    out = merge_adapter(tiny_llama, tmp_path / "adapter", tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    ids = torch.randint(5, 1000, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = peft_model.eval()(input_ids=ids).logits
        got = merged.eval()(input_ids=ids).logits
        plain = base.eval()(input_ids=ids).logits
    assert (want - plain).abs().max() > 1e-2  # the adapter matters
    assert (got - want).abs().max() < 1e-4
    assert not any("lora_" in n or "ia3_" in n for n, _ in merged.named_parameters())
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()


def test_prompt_tuning_cannot_be_merged(tiny_llama, tmp_path):
    _adapter(tiny_llama, tmp_path / "adapter", "prompt")
    with pytest.raises(ValueError, match="cannot be merged"):
        merge_adapter(tiny_llama, tmp_path / "adapter", tmp_path / "merged")


def test_ensure_merged_builds_once_and_rebuilds_from_provenance(tiny_llama, tmp_path):
    _adapter(tiny_llama, tmp_path / "a1", "lora")
    _adapter(tiny_llama, tmp_path / "a2", "lora")
    wd = tmp_path / "wd"
    m1 = ensure_merged(wd, "f" * 64, str(tiny_llama), tmp_path / "a1")
    assert (m1 / MERGED_MARKER).is_file() and json.loads((m1 / MERGED_MARKER).read_text())[
        "fingerprint"
    ] == "f" * 64
    stamp = (m1 / "model.safetensors").stat().st_mtime_ns
    assert ensure_merged(wd, "f" * 64, str(tiny_llama), tmp_path / "a1") == m1
    assert (m1 / "model.safetensors").stat().st_mtime_ns == stamp  # cached, not rebuilt
    assert not [p for p in (wd / ".merged").iterdir() if p.name.startswith(".tmp")]
    # a chain a2-on-(a1-merged): if the first merge disappears, the provenance rebuilds it
    prov = {"fingerprint": "f" * 64, "base_path": str(tiny_llama), "adapter": str(tmp_path / "a1")}
    import shutil

    shutil.rmtree(m1)
    m2 = ensure_merged(wd, "e" * 64, str(m1), tmp_path / "a2", merged_from=prov)
    assert (m1 / MERGED_MARKER).is_file() and (m2 / MERGED_MARKER).is_file()
