"""Learning tests (slow): SFT from random init learns a templated text-to-SQL task (held-out
execution accuracy >= 0.3 with greedy decoding), and DPO with its defaults then raises the reward
margin on its training pairs and on held-out pairs while keeping execution accuracy (drop <= 0.05).

A ~4M-parameter Llama (hidden 256, 4 layers) built in the test, full fine-tuning for SFT (LoRA on a
random-init model barely learns), then DPO with the stage defaults (LoRA on the SFT model, so the
reference is the adapter-disabled model)."""

from __future__ import annotations

import json
import time

import pytest
import torch

from distill.config import load_pipeline
from distill.core import runner
from tests.integration.test_train_support import SqlToy, register_rows_kind, write_jsonl

pytestmark = pytest.mark.slow

SFT_STEPS = 250
DPO_STEPS = 60


def generate(model, tok, prompts: list[list[dict]], max_new_tokens: int = 48, batch: int = 50) -> list[str]:
    """Greedy decoding with the chat template, as at inference (no extra special tokens)."""
    outs = []
    tok.padding_side = "left"
    eos = model.generation_config.eos_token_id
    for i in range(0, len(prompts), batch):
        texts = [
            tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
            for p in prompts[i : i + batch]
        ]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            gen = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=tok.pad_token_id,
            )
        outs += tok.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return [o.strip() for o in outs]


def accuracy(toy: SqlToy, model, tok, test: list[dict]) -> tuple[float, float]:
    """(execution accuracy, exact match) of greedy predictions."""
    preds = generate(model, tok, [ex["prompt"] for ex in test])
    gold = [ex["completion"][0]["content"] for ex in test]
    ex_acc = sum(toy.correct(p, g) for p, g in zip(preds, gold, strict=True)) / len(test)
    em = sum(" ".join(p.split()) == " ".join(g.split()) for p, g in zip(preds, gold, strict=True)) / len(test)
    return ex_acc, em


def margins(model, tok, pairs: list[dict]) -> float:
    """Mean of log p(chosen) - log p(rejected) over the completion tokens (nats)."""
    from distill.train import data as D

    stops = D.stop_token_ids(tok)
    diffs = []
    for pr in pairs:
        lp = []
        for side in ("chosen", "rejected"):
            ex = D.tokenize_sft(tok, pr["prompt"], pr[side], stops)
            ids = torch.tensor([ex["input_ids"]])
            mask = torch.tensor(ex["completion_mask"][1:], dtype=torch.bool)
            with torch.no_grad():
                logits = model(input_ids=ids).logits[0, :-1].float()
            tok_lp = torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None])[:, 0]
            lp.append(float(tok_lp[mask].sum()))
        diffs.append(lp[0] - lp[1])
    return sum(diffs) / len(diffs)


def test_sft_learns_text_to_sql_and_dpo_keeps_it(tmp_path, monkeypatch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill.tiny import build_tiny_model

    register_rows_kind(monkeypatch)
    model_dir = build_tiny_model(
        tmp_path / "llama4m", "llama", seed=0, hidden=256, layers=4, heads=4, intermediate=768
    )
    toy = SqlToy(seed=0)
    train, test = toy.splits(6000, 200)
    dpo_train = toy.pairs(train[:2000])
    held_pairs = toy.pairs(test)
    write_jsonl(tmp_path / "data/sft.jsonl", train)
    write_jsonl(tmp_path / "data/pairs.jsonl", dpo_train)
    p = tmp_path / "pipeline.yaml"
    p.write_text(
        f"""\
name: learn
seed: 0
models:
  student: {{id: {model_dir}}}
stages:
  rows: {{kind: train_rows, path: data/sft.jsonl, layout: sft}}
  pair_rows: {{kind: train_rows, path: data/pairs.jsonl, layout: pairs}}
  sft: {{kind: sft, inputs: [rows], base: student, method: full, learning_rate: 0.002, max_steps: {SFT_STEPS},
         batch_size: 32, max_length: 128, warmup_ratio: 0.05, save_steps: 1000}}
  dpo: {{kind: dpo, inputs: [pair_rows], base: sft, max_steps: {DPO_STEPS}, batch_size: 16, max_length: 128, save_steps: 1000}}
"""
    )
    lp = load_pipeline(p)
    plans = runner.plan(lp)
    t0 = time.time()
    runner.run_pipeline(lp, plans, runner.select(lp, plans, until="sft"))
    sft_s = time.time() - t0
    plans = runner.plan(lp)
    sft_art = plans["sft"].path
    sft_metrics = json.loads((sft_art / "manifest.json").read_text())["metrics"]

    tok = AutoTokenizer.from_pretrained(sft_art / "model")
    untrained = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    sft_model = AutoModelForCausalLM.from_pretrained(sft_art / "model").eval()
    ex_untrained, _ = accuracy(toy, untrained, tok, test)
    ex_sft, em_sft = accuracy(toy, sft_model, tok, test)
    train_pairs = dpo_train[:100]
    m_train_before, m_held_before = (
        margins(sft_model, tok, train_pairs),
        margins(sft_model, tok, held_pairs[:100]),
    )

    t1 = time.time()
    runner.run_pipeline(lp, plans, runner.select(lp, plans, only=["dpo"], with_deps=True))
    dpo_s = time.time() - t1
    plans = runner.plan(lp)
    dpo_art = plans["dpo"].path
    dpo_man = json.loads((dpo_art / "manifest.json").read_text())
    assert dpo_man["model"]["type"] == "adapter" and dpo_man["model"]["base_path"] == str(
        (sft_art / "model").resolve()
    )
    dpo_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(sft_art / "model"), dpo_art / "model"
    )
    dpo_model = dpo_model.merge_and_unload().eval()
    ex_dpo, em_dpo = accuracy(toy, dpo_model, tok, test)
    m_train_after, m_held_after = (
        margins(dpo_model, tok, train_pairs),
        margins(dpo_model, tok, held_pairs[:100]),
    )

    report = {
        "sft_train_s": round(sft_s, 1),
        "sft_steps": sft_metrics["steps"],
        "sft_final_loss": sft_metrics["final_loss"],
        "ex_untrained": ex_untrained,
        "ex_sft": ex_sft,
        "ex_dpo": ex_dpo,
        "em_sft": em_sft,
        "em_dpo": em_dpo,
        "dpo_train_s": round(dpo_s, 1),
        "dpo_steps": dpo_man["metrics"]["steps"],
        "margin_train": [round(m_train_before, 3), round(m_train_after, 3)],
        "margin_heldout": [round(m_held_before, 3), round(m_held_after, 3)],
        "dpo_defaults": {k: dpo_man["config"][k] for k in ("method", "learning_rate", "beta", "sft_weight")},
        "dpo_lr_used": dpo_man["metrics"]["learning_rate"],
    }
    (tmp_path / "learning_report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report))
    assert ex_untrained < 0.05
    assert ex_sft >= 0.3, report
    assert m_train_after > m_train_before and m_held_after > m_held_before, report
    assert ex_dpo >= ex_sft - 0.05, report
