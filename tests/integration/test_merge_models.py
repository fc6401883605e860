"""Merging real (tiny) models: LoRA into base (logits equal adapter-on-base), multi-model merges
match their formula tensor by tensor and load/generate with transformers, passthrough stacking,
adapter concatenation, and refusal of mismatched inputs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from distill.errors import DistillError
from distill.merge import (
    combine_adapters,
    merge_adapter_into_base,
    open_model_ref,
    parse_merge_config,
    run_merge,
)
from distill.merge.methods import slerp


def _variant(base: Path, out: Path, seed: int, scale: float = 0.02) -> Path:
    """A 'fine-tune' of base: same tokenizer and config, perturbed weights."""
    shutil.copytree(base, out)
    sd = load_file(str(base / "model.safetensors"))
    g = torch.Generator().manual_seed(seed)
    sd = {k: v + scale * torch.randn(v.shape, generator=g) for k, v in sd.items()}
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def _lora(base: Path, out: Path, seed: int, r: int = 4, embed: bool = False) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    m = AutoModelForCausalLM.from_pretrained(str(base))
    cfg = LoraConfig(
        r=r,
        lora_alpha=2 * r,
        target_modules="all-linear",
        init_lora_weights=False,  # random A and B: a non-trivial delta, like a trained adapter
        modules_to_save=["embed_tokens"] if embed else None,
        ensure_weight_tying=embed,
        task_type="CAUSAL_LM",
    )
    p = get_peft_model(m, cfg)
    if embed:
        with torch.no_grad():
            emb = p.base_model.model.model.embed_tokens.modules_to_save["default"].weight
            emb.add_(0.05 * torch.randn_like(emb))
    p.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def family(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("family")
    return {
        "base": tiny_llama,
        "a": _variant(tiny_llama, d / "a", 1),
        "b": _variant(tiny_llama, d / "b", 2),
        "lora": _lora(tiny_llama, d / "lora", 3, embed=True),
        "lora2": _lora(tiny_llama, d / "lora2", 4, r=2),
        "lora3": _lora(tiny_llama, d / "lora3", 5, r=4),
    }


def _logits(model_or_path, ids):
    from transformers import AutoModelForCausalLM

    m = (
        model_or_path
        if not isinstance(model_or_path, str | Path)
        else AutoModelForCausalLM.from_pretrained(str(model_or_path))
    )
    with torch.no_grad():
        return m.eval()(ids).logits


def test_lora_into_base_logits_equal_adapter_on_base(family, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "merged"
    stats = merge_adapter_into_base(family["base"], family["lora"], out)
    assert stats["method"] == "lora" and stats["tensors"] == 20
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    ref = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(family["base"])), str(family["lora"])
    )
    a, b = _logits(ref, ids), _logits(out, ids)
    base_l = _logits(family["base"], ids)
    assert (a - base_l).abs().max() > 1e-2  # the adapter changes the model...
    assert (a - b).abs().max() < 1e-4  # ...and the merged model reproduces it
    # standalone: no adapter files, tokenizer with the chat template, loads and generates
    assert not (out / "adapter_config.json").exists()
    tok = AutoTokenizer.from_pretrained(str(out))
    text = tok.apply_chat_template(
        [{"role": "user", "content": "count the orders"}], tokenize=False, add_generation_prompt=True
    )
    assert text.rstrip().endswith("<|im_start|>assistant")
    m = AutoModelForCausalLM.from_pretrained(str(out))
    enc = tok(text, return_tensors="pt", add_special_tokens=False)
    gen = m.generate(**enc, max_new_tokens=5, do_sample=False)
    assert (
        gen.shape[1] == enc["input_ids"].shape[1] + 5 or gen[0, -1].item() in m.generation_config.eos_token_id
    )


@pytest.mark.parametrize(
    "method,params",
    [
        ("linear", None),
        ("task_arithmetic", None),
        ("ties", None),
        ("slerp", None),
    ],
)
def test_multi_model_merges_follow_their_formula(family, tmp_path, method, params):
    from transformers import AutoModelForCausalLM

    if method == "linear":
        d = {
            "merge_method": "linear",
            "models": [
                {"model": "a", "parameters": {"weight": 3}},
                {"model": "b", "parameters": {"weight": 1}},
            ],
        }
        expect = lambda k, B, A, Bb: (3 * A + Bb) / 4  # noqa: E731
    elif method == "task_arithmetic":
        d = {"merge_method": "task_arithmetic", "base_model": "base",
             "models": [{"model": "a", "parameters": {"weight": 0.5}}, {"model": "b", "parameters": {"weight": 0.25}}]}  # fmt: skip
        expect = lambda k, B, A, Bb: B + 0.5 * (A - B) + 0.25 * (Bb - B)  # noqa: E731
    elif method == "ties":
        d = {"merge_method": "ties", "base_model": "base",
             "models": [{"model": "a", "parameters": {"weight": 0.6, "density": 0.5}},
                        {"model": "b", "parameters": {"weight": 0.4, "density": 0.5}}]}  # fmt: skip

        def expect(k, B, A, Bb):
            ds = []
            for x, w in ((A, 0.6), (Bb, 0.4)):
                dd = x - B
                k_ = max(1, int(0.5 * dd.numel()))
                thr = dd.abs().flatten().sort(descending=True).values[k_ - 1]
                ds.append((w, dd * (dd.abs() >= thr)))
            st = torch.stack([w * dd for w, dd in ds])
            sign = torch.where(st.sum(0) >= 0, 1.0, -1.0)
            agree = (st.sign() == sign).float()
            div = (torch.tensor([0.6, 0.4]).view(-1, *[1] * B.dim()) * agree).sum(0)
            div[div == 0] = 1
            return B + (st * agree).sum(0) / div
    else:
        d = {"merge_method": "slerp", "base_model": "base", "models": [{"model": "base"}, {"model": "a"}],
             "parameters": {"t": [{"filter": "self_attn", "value": [0.0, 1.0]}, {"value": 0.3}]}}  # fmt: skip

        def expect(k, B, A, Bb):
            if "self_attn" in k:
                t = 0.0 if ".layers.0." in k else 1.0  # gradient over 2 layers: t = 0, 1
            else:
                t = 0.3
            return slerp(t, B, A)

    cfg = parse_merge_config(d, "test")
    srcs = {r: open_model_ref(str(family[r])) for r in cfg.referenced_models()}
    out = tmp_path / method
    stats = run_merge(cfg, srcs, out)
    assert stats["tensors"] == 20
    got = load_file(str(out / "model.safetensors"))
    B, A, Bb = (load_file(str(family[n] / "model.safetensors")) for n in ("base", "a", "b"))
    for k in B:
        assert torch.allclose(got[k], expect(k, B[k], A[k], Bb[k]), atol=1e-6), k
    # a merged model loads and generates
    m = AutoModelForCausalLM.from_pretrained(str(out))
    ids = torch.tensor([[4, 10, 11, 12]])
    assert m.generate(ids, max_new_tokens=3, do_sample=False).shape[1] >= 5


def test_merge_inputs_can_be_adapters_applied_on_the_fly(family, tmp_path):
    """`base+lora` in a merge equals merging the pre-merged model (nothing materialized)."""
    merged = tmp_path / "pre"
    merge_adapter_into_base(family["base"], family["lora2"], merged)
    cfg = parse_merge_config({"merge_method": "linear", "models": [
        {"model": "x", "parameters": {"weight": 1}}, {"model": "y", "parameters": {"weight": 1}}]}, "t")  # fmt: skip
    out1, out2 = tmp_path / "o1", tmp_path / "o2"
    run_merge(
        cfg,
        {"x": open_model_ref(str(family["a"])), "y": open_model_ref(f"{family['base']}+{family['lora2']}")},
        out1,
    )
    run_merge(cfg, {"x": open_model_ref(str(family["a"])), "y": open_model_ref(str(merged))}, out2)
    g1, g2 = load_file(str(out1 / "model.safetensors")), load_file(str(out2 / "model.safetensors"))
    assert all(torch.allclose(g1[k], g2[k], atol=1e-6) for k in g1)


def test_passthrough_stacks_layer_ranges(family, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = parse_merge_config({"merge_method": "passthrough", "slices": [
        {"sources": [{"model": "base", "layer_range": [0, 2]}]},
        {"sources": [{"model": "a", "layer_range": [1, 2]}]}]}, "t")  # fmt: skip
    out = tmp_path / "stack"
    stats = run_merge(
        cfg, {r: open_model_ref(str(family[r])) for r in ("base", "a")}, out, max_shard_size="1MB"
    )
    assert stats["layers"] == 3 and stats["shards"] > 1  # sharded output with an index
    assert (out / "model.safetensors.index.json").is_file()
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 3
    m = AutoModelForCausalLM.from_pretrained(str(out))
    A = load_file(str(family["a"] / "model.safetensors"))
    B = load_file(str(family["base"] / "model.safetensors"))
    sd = m.state_dict()
    assert torch.equal(sd["model.layers.2.mlp.up_proj.weight"], A["model.layers.1.mlp.up_proj.weight"])
    assert torch.equal(sd["model.layers.1.mlp.up_proj.weight"], B["model.layers.1.mlp.up_proj.weight"])
    assert torch.equal(sd["model.norm.weight"], A["model.norm.weight"])  # post weights: last slice
    assert m.generate(torch.tensor([[4, 5, 6]]), max_new_tokens=2, do_sample=False).shape[1] >= 4


def test_adapter_concatenation_is_exact(family, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "cat"
    stats = combine_adapters(family["base"], [(family["lora3"], 1.0), (family["lora2"], 0.5)], out, "cat")
    assert stats["rank"] == 4 + 2  # rank r1 + r2
    # the combined delta is exactly 1.0 * delta3 + 0.5 * delta2
    merged = {}
    for name, adapter in (("3", family["lora3"]), ("2", family["lora2"]), ("cat", out)):
        merge_adapter_into_base(family["base"], adapter, tmp_path / f"merged-{name}")
        merged[name] = load_file(str(tmp_path / f"merged-{name}" / "model.safetensors"))
    base = load_file(str(family["base"] / "model.safetensors"))
    for k in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        d3, d2, dc = (merged[n][k] - base[k] for n in ("3", "2", "cat"))
        assert d3.abs().max() > 1e-3
        assert torch.allclose(dc, d3 + 0.5 * d2, atol=1e-5)
    with pytest.raises(DistillError, match="trains whole modules"):
        combine_adapters(
            family["base"], [(family["lora"], 1.0), (family["lora2"], 1.0)], tmp_path / "x", "cat"
        )
    # and the combined adapter loads with PEFT
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(family["base"])), str(out))


def test_refuses_mismatched_vocabularies_and_architectures(family, tiny_qwen2, tmp_path_factory):
    from distill.tiny import build_tiny_model

    other_vocab = build_tiny_model(tmp_path_factory.mktemp("v") / "m", "llama", seed=5)  # own tokenizer
    cfg = parse_merge_config({"merge_method": "linear", "models": [
        {"model": "x", "parameters": {"weight": 1}}, {"model": "y", "parameters": {"weight": 1}}]}, "t")  # fmt: skip
    with pytest.raises(DistillError, match="vocabularies differ"):
        run_merge(
            cfg,
            {"x": open_model_ref(str(family["base"])), "y": open_model_ref(str(other_vocab))},
            tmp_path_factory.mktemp("o"),
        )
    with pytest.raises(DistillError, match="model_type is 'llama' vs 'qwen2'"):
        run_merge(
            cfg,
            {"x": open_model_ref(str(family["base"])), "y": open_model_ref(str(tiny_qwen2))},
            tmp_path_factory.mktemp("o"),
        )


def test_cli_merge_reads_mergekit_yaml(family, tmp_path):
    y = tmp_path / "ties.yaml"
    y.write_text(
        f"merge_method: ties\nbase_model: {family['base']}\nmodels:\n"
        f"  - model: {family['a']}\n    parameters: {{weight: 0.5, density: 0.5}}\n"
        f"  - model: {family['b']}\n    parameters: {{weight: 0.5, density: 0.5}}\ndtype: float32\n"
    )
    out = tmp_path / "out"
    r = subprocess.run(
        [sys.executable, "-m", "distill.cli", "merge", str(y), "--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["tensors"] == 20
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    bad = tmp_path / "bad.yaml"
    bad.write_text("merge_method: ties\nbase_model: x\nmodels: [{model: y}]\nmodules: {}\n")
    r = subprocess.run(
        [sys.executable, "-m", "distill.cli", "merge", str(bad), "--out", str(tmp_path / "o2")],
        capture_output=True,
        text=True,
    )
    assert (
        r.returncode == 2
        and "modules: unknown or unsupported key" in r.stderr
        and "Traceback" not in r.stderr
    )
