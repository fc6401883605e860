"""The SFT loss on a real batch: prompt-loss weights 0 / 0.1 / 1, the EOS label, packing without
cross-example attention, and normalization over an accumulated batch (tiny Llama, CPU)."""

from __future__ import annotations

import pytest
import torch

from distill.train import data as D

PLWS = (0.0, 0.1, 1.0)


def _examples(tok, plw: float, n: int = 4):
    from tests.integration.test_train_support import chat_rows

    recs = D.sft_records(chat_rows(n, seed=1))
    out, _ = D.tokenize_sft_dataset(recs, tok, 256, plw, D.stop_token_ids(tok))
    return out


@pytest.fixture(scope="module")
def trainer(tiny_llama, tmp_path_factory):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig

    from distill.train.trainers import WeightedSFTTrainer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    args = SFTConfig(
        output_dir=str(tmp_path_factory.mktemp("plw")),
        use_cpu=True,
        bf16=False,
        report_to="none",
        max_length=None,
        per_device_train_batch_size=4,
        gradient_checkpointing=False,
        disable_tqdm=True,
    )
    t = WeightedSFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(_examples(tok, 0.1)),
        processing_class=tok,
        prompt_loss_weight=0.1,
    )
    t.model.eval()  # no dropout: compare exact numbers
    return t, tok


def _manual(model, batch, plw: float) -> torch.Tensor:
    """-(sum_t w_t log p(y_t)) / sum_t w_t from full logits, w = 1 on completion, plw on prompt."""
    with torch.no_grad():
        logits = model(
            input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")
        ).logits.float()
    logp = torch.log_softmax(logits[:, :-1], -1)
    labels = batch["labels"][:, 1:]
    valid = labels != -100
    tok_lp = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    w = batch["loss_weights"][:, 1:] * valid
    return -(tok_lp * w).sum() / w.sum()


def _loss(trainer, batch, num_items=None):
    with torch.no_grad():
        return trainer.compute_loss(
            trainer.model,
            {k: v.clone() if torch.is_tensor(v) else v for k, v in batch.items()},
            num_items_in_batch=num_items,
        )


@pytest.mark.parametrize("plw", PLWS)
def test_prompt_loss_weight_gives_the_weights_it_claims(trainer, plw):
    t, tok = trainer
    t.data_collator.prompt_loss_weight = plw
    exs = _examples(tok, plw)
    batch = t.data_collator(exs)
    w = batch["loss_weights"]
    for i, ex in enumerate(exs):
        n = len(ex["input_ids"])
        expected = torch.tensor([1.0 if m else plw for m in ex["completion_mask"]])
        assert torch.equal(w[i, :n], expected)
        assert torch.all(w[i, n:] == 0)  # padding
    got = _loss(t, batch)
    assert torch.allclose(got, _manual(t.model, batch, plw), atol=1e-5)

    # the two ends agree with the plain losses they stand for
    with torch.no_grad():
        if plw == 0.0:  # completion-only loss (TRL's completion_only_loss=True)
            ref = t.model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
            ).loss
            assert torch.allclose(got, ref, atol=1e-5)
        if plw == 1.0:  # full-sequence loss
            full = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
            ref = t.model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=full
            ).loss
            assert torch.allclose(got, ref, atol=1e-5)


def test_weights_change_the_loss_between_settings(trainer):
    t, tok = trainer
    losses = []
    for plw in PLWS:
        t.data_collator.prompt_loss_weight = plw
        losses.append(float(_loss(t, t.data_collator(_examples(tok, plw)))))
    assert len({round(x, 6) for x in losses}) == 3


def test_eos_label_unmasked_in_the_batch(trainer):
    t, tok = trainer
    t.data_collator.prompt_loss_weight = 0.0
    exs = _examples(tok, 0.0)
    batch = t.data_collator(exs)
    for i, ex in enumerate(exs):
        n = len(ex["input_ids"])
        ids = batch["input_ids"][i, :n].tolist()
        pos = [j for j, x in enumerate(ids) if x == tok.eos_token_id]
        last = pos[-1]  # the assistant turn's end-of-turn token
        assert batch["labels"][i, last] == tok.eos_token_id and batch["loss_weights"][i, last] == 1.0


def test_packed_rows_do_not_attend_across_examples(trainer):
    from datasets import Dataset
    from trl import pack_dataset
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from distill.train.trainers import LossWeightCollator

    t, tok = trainer
    exs = _examples(tok, 0.1, n=6)
    padded = LossWeightCollator(DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id), 0.1)(exs)
    packed_ds = pack_dataset(Dataset.from_list(exs), 512, "bfd")
    assert len(packed_ds) == 1 and len(packed_ds[0]["seq_lengths"]) == 6
    flat = LossWeightCollator(
        DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id, padding_free=True), 0.1
    )([packed_ds[0]])
    assert flat["input_ids"].shape[0] == 1 and "attention_mask" not in flat
    # each packed example restarts its positions; with leakage its tokens would see the previous examples
    assert int((flat["position_ids"][0] == 0).sum()) == 6
    assert torch.allclose(_loss(t, flat), _loss(t, padded), atol=1e-5)
    # control: the same row with running positions is one long sequence, and the loss changes
    leaky = {k: v for k, v in flat.items() if not k.startswith(("cu_seq_lens", "max_length", "seq_idx"))}
    leaky["position_ids"] = torch.arange(flat["input_ids"].shape[1])[None]
    assert not torch.allclose(_loss(t, leaky), _loss(t, padded), atol=1e-3)


def test_accumulated_batches_are_normalized_by_total_weight(trainer):
    t, tok = trainer
    t.data_collator.prompt_loss_weight = 0.1
    exs = _examples(tok, 0.1, n=4)
    whole = t.data_collator(exs)
    halves = [t.data_collator(exs[:1]), t.data_collator(exs[1:])]
    n_items = t._get_num_items_in_batch(halves, torch.device("cpu"))
    expected_weight = sum(
        float((h["loss_weights"][:, 1:] * (h["labels"][:, 1:] != -100)).sum()) for h in halves
    )
    assert abs(float(n_items) - expected_weight) < 1e-4
    split = sum(_loss(t, h, n_items) for h in halves)
    assert torch.allclose(split, _loss(t, whole), atol=1e-5)
