"""Training stages end to end on tiny local models (CPU): cpt -> sft -> dpo chained, every method of
the `method` key, stacking, QLoRA's CPU error, and caching."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from distill.config import load_pipeline
from distill.core import runner
from distill.errors import StageFailed
from tests.integration.test_train_support import (
    chat_rows,
    pair_rows,
    register_rows_kind,
    text_rows,
    write_jsonl,
)

COMMON = "max_steps: 3, batch_size: 4, max_length: 96, save_steps: 2"


def make_project(root: Path, model: Path, stages: str) -> Path:
    write_jsonl(root / "data/sft.jsonl", chat_rows(24))
    write_jsonl(root / "data/pairs.jsonl", pair_rows(16))
    write_jsonl(root / "data/text.jsonl", text_rows(16))
    p = root / "pipeline.yaml"
    p.write_text(
        f"""\
name: train-test
seed: 5
models:
  student: {{id: {model}}}
stages:
  sft_rows: {{kind: train_rows, path: data/sft.jsonl, layout: sft}}
  pair_rows: {{kind: train_rows, path: data/pairs.jsonl, layout: pairs}}
  text_rows: {{kind: train_rows, path: data/text.jsonl, layout: text}}
{stages}"""
    )
    return p


def run(p: Path, *sets: str, **kw):
    lp = load_pipeline(p, [], list(sets))
    plans = runner.plan(lp)
    ran = runner.run_pipeline(lp, plans, runner.select(lp, plans, **kw))
    return lp, runner.plan(lp), ran


def manifest(plans, name) -> dict:
    return json.loads((plans[name].path / "manifest.json").read_text())


def max_weight_change(
    base_dir: str | Path, adapter_dir: Path | None = None, full_dir: Path | None = None
) -> float:
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    ref = {k: v.clone() for k, v in base.state_dict().items()}
    if adapter_dir is not None:
        from peft import PeftModel

        trained = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    else:
        trained = AutoModelForCausalLM.from_pretrained(full_dir, dtype=torch.float32)
    return max(float((trained.state_dict()[k] - v).abs().max()) for k, v in ref.items())


@pytest.fixture
def rows_kind(monkeypatch):
    register_rows_kind(monkeypatch)


def test_cpt_sft_dpo_chain_trains_merges_and_caches(tmp_path, tiny_llama, rows_kind):
    p = make_project(
        tmp_path,
        tiny_llama,
        f"""\
  cpt: {{kind: cpt, inputs: [text_rows], base: student, learning_rate: 0.005, {COMMON}}}
  sft: {{kind: sft, inputs: [sft_rows], base: cpt, learning_rate: 0.005, eval_split: 4, {COMMON}}}
  dpo: {{kind: dpo, inputs: [pair_rows], base: sft, learning_rate: 0.005, {COMMON}}}
""",
    )
    lp, plans, ran = run(p)
    assert ran == ["sft_rows", "pair_rows", "text_rows", "cpt", "sft", "dpo"]
    merged = lp.workdir / ".merged"
    prev_base = str(Path(tiny_llama).resolve())
    for name in ("cpt", "sft", "dpo"):
        man = manifest(plans, name)
        info, metrics = man["model"], man["metrics"]
        model_dir = plans[name].path / "model"
        assert info["type"] == "adapter" and info["root_model"] == "student" and info["method"] == "lora"
        assert info["base_path"] == prev_base
        assert info["trainable_params"] > 0 and 0 < info["trainable_share"] < 1
        for f in (
            "adapter_config.json",
            "adapter_model.safetensors",
            "tokenizer.json",
            "chat_template.jinja",
            "distill_training.json",
        ):
            assert (model_dir / f).is_file(), f
        assert (
            json.loads((model_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
            == prev_base
        )
        training = json.loads((model_dir / "distill_training.json").read_text())
        assert training["resolved"]["effective_batch_size"] == 4 and training["metrics"]["steps"] == 3
        assert metrics["steps"] == 3 and metrics["tokens_per_s"] > 0 and metrics["loss_history"]
        assert not (plans[name].path / "scratch").exists()  # checkpoints are removed on success
        # training changed the weights
        assert max_weight_change(info["base_path"], adapter_dir=model_dir) > 1e-4
        # the next stage builds on this one merged into its base, cached by fingerprint
        prev_base = str(merged / man["fingerprint"][:16])
    assert manifest(plans, "sft")["metrics"]["eval_loss"] is not None
    assert manifest(plans, "dpo")["metrics"]["rewards_accuracies"] is not None

    # a rerun reuses everything
    _, plans2, ran2 = run(p)
    assert ran2 == [] and all(pl.state == "done" for pl in plans2.values())
    # a speed-only change (per-device batch split) keeps the cache; a semantic one does not
    _, plans3, _ = run(
        p, "stages.sft.batch_size=2", "stages.sft.gradient_accumulation_steps=2", only=["sft_rows"]
    )
    assert plans3["sft"].state == "done"
    assert runner.plan(load_pipeline(p, [], ["stages.sft.prompt_loss_weight=0.5"]))["sft"].state == "stale"


def _count(model, pred) -> int:
    seen, n = set(), 0
    for name, prm in model.named_parameters():
        if id(prm) not in seen and pred(name):
            seen.add(id(prm))
            n += prm.numel()
    return n


@pytest.mark.parametrize(
    "arch,method,extra",
    [
        ("llama", "full", ""),
        ("llama", "partial", ", partial: {last_n_layers: 1, train_head: false}"),
        ("qwen2", "bitfit", ""),
        ("llama", "ia3", ""),
        ("llama", "prompt_tuning", ", virtual_tokens: {num_virtual_tokens: 4}"),
        ("llama", "prefix_tuning", ", virtual_tokens: {num_virtual_tokens: 4}"),
        ("qwen2", "lora", ", lora: {r: 4, use_rslora: true, target_modules: [q_proj, v_proj]}"),
        ("llama", "lora", ", lora: {use_dora: true}, precision: bf16, gradient_checkpointing: true"),
    ],
)
def test_every_method_trains_and_reports_its_trainable_share(
    tmp_path, tiny_llama, tiny_qwen2, rows_kind, monkeypatch, arch, method, extra
):
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("DISTILL_INPROCESS", "1")  # same code path, without a process start per case
    model_path = tiny_llama if arch == "llama" else tiny_qwen2
    p = make_project(
        tmp_path,
        model_path,
        f"  s: {{kind: sft, inputs: [sft_rows], base: student, method: {method}, learning_rate: 0.01{extra}, {COMMON}}}\n",
    )
    _, plans, _ = run(p)
    man = manifest(plans, "s")
    info, metrics = man["model"], man["metrics"]
    assert metrics["steps"] == 3
    base = AutoModelForCausalLM.from_pretrained(model_path)
    total = base.num_parameters()
    hidden, vocab = base.config.hidden_size, base.config.vocab_size
    expected = {
        "full": total,
        "partial": _count(base, lambda n: n.startswith("model.layers.1.") or n == "model.norm.weight"),
        "bitfit": _count(base, lambda n: n.endswith(".bias")),
        "prompt_tuning": 4 * hidden,
        "lora": 2 * 4 * (hidden + hidden) * base.config.num_hidden_layers,  # q_proj and v_proj, rank 4
    }
    if method in expected and "use_dora" not in extra:
        assert info["trainable_params"] == expected[method]
    assert info["trainable_params"] > 0 and 0 < info["trainable_share"] <= 1
    model_dir = plans["s"].path / "model"
    if method in ("full", "partial", "bitfit"):
        assert info["type"] == "full"
        trained = AutoModelForCausalLM.from_pretrained(model_dir)
        sd, bd = trained.state_dict(), base.state_dict()
        changed = {k for k in bd if not torch.equal(sd[k], bd[k])}
        assert changed
        if method == "partial":
            assert all(k.startswith("model.layers.1.") or k == "model.norm.weight" for k in changed)
        if method == "bitfit":
            assert all(k.endswith(".bias") for k in changed)
    else:
        assert info["type"] == "adapter"
        cfg = json.loads((model_dir / "adapter_config.json").read_text())
        assert (
            cfg["peft_type"]
            == {
                "ia3": "IA3",
                "prompt_tuning": "PROMPT_TUNING",
                "prefix_tuning": "PREFIX_TUNING",
                "lora": "LORA",
            }[method]
        )
    del vocab


def test_qlora_on_cpu_fails_with_a_clear_error(tmp_path, tiny_llama, rows_kind, monkeypatch):
    monkeypatch.setenv("DISTILL_INPROCESS", "1")
    p = make_project(
        tmp_path,
        tiny_llama,
        f"  s: {{kind: sft, inputs: [sft_rows], base: student, method: qlora, {COMMON}}}\n",
    )
    with pytest.raises(StageFailed, match="qlora .*needs a CUDA GPU"):
        run(p)


def test_stack_continues_the_upstream_adapter_on_the_original_base(
    tmp_path, tiny_llama, rows_kind, monkeypatch
):
    from peft import PeftConfig

    monkeypatch.setenv("DISTILL_INPROCESS", "1")
    p = make_project(
        tmp_path,
        tiny_llama,
        f"""\
  sft: {{kind: sft, inputs: [sft_rows], base: student, learning_rate: 0.005, {COMMON}}}
  dpo: {{kind: dpo, inputs: [pair_rows], base: sft, chain: stack, learning_rate: 0.005, {COMMON}}}
""",
    )
    lp, plans, _ = run(p)
    info = manifest(plans, "dpo")["model"]
    assert info["base_path"] == str(Path(tiny_llama).resolve()) and info["type"] == "adapter"
    assert not (lp.workdir / ".merged").exists()
    dpo_dir = plans["dpo"].path / "model"
    assert not (dpo_dir / "ref").exists()  # TRL's frozen reference copy is not part of the result
    assert PeftConfig.from_pretrained(str(dpo_dir)).r == 16
    # the DPO adapter differs from the SFT adapter it started from
    from safetensors.torch import load_file

    a = load_file(plans["sft"].path / "model/adapter_model.safetensors")
    b = load_file(dpo_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)


def test_early_stopping_on_eval_loss(tmp_path, tiny_llama, rows_kind, monkeypatch):
    monkeypatch.setenv("DISTILL_INPROCESS", "1")
    # a threshold no eval gain can reach: the first eval sets the best loss, the next one stops training
    p = make_project(
        tmp_path,
        tiny_llama,
        "  s: {kind: sft, inputs: [sft_rows], base: student, max_steps: 20, batch_size: 4, max_length: 96,"
        " eval_split: 4, eval_steps: 2, early_stopping_patience: 1, early_stopping_threshold: 10.0}\n",
    )
    _, plans, _ = run(p)
    m = manifest(plans, "s")["metrics"]
    assert m["steps"] == 4 and m["max_steps"] == 20
    assert [s for s, _ in m["eval_history"]][:2] == [2, 4]
    assert m["best_checkpoint_step"] in (2, 4) and m["eval_loss"] is not None  # best = lowest eval loss


def test_packed_sft_is_fed_padding_free(tmp_path, tiny_llama, rows_kind, monkeypatch):
    monkeypatch.setenv("DISTILL_INPROCESS", "1")
    p = make_project(
        tmp_path,
        tiny_llama,
        f"  s: {{kind: sft, inputs: [sft_rows], base: student, packing: true, {COMMON}}}\n",
    )
    _, plans, _ = run(p)
    man = manifest(plans, "s")
    training = json.loads((plans["s"].path / "model/distill_training.json").read_text())
    assert training["resolved"]["padding_free"] is True  # positions restart per packed example
    assert man["metrics"]["data_examples"] == 24 and man["metrics"]["data_packed_rows"] < 24
    assert man["metrics"]["steps"] == 3
