"""Training data: row layouts, the eval split, and SFT tokenization (chat template, BOS, EOS, masks)."""

from __future__ import annotations

import pytest

from distill.train import data as D


def test_messages_rows_split_before_last_assistant_turn():
    rows = [
        {
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "q1"},
                {"role": "assistant", "content": "a1"},
                {"role": "user", "content": "q2"},
                {"role": "assistant", "content": "a2"},
            ]
        },
        {"prompt": [{"role": "user", "content": "p"}], "completion": [{"role": "assistant", "content": "c"}]},
        {"prompt": "plain", "completion": "text"},
    ]
    recs = D.sft_records(rows)
    assert [m["content"] for m in recs[0]["prompt"]] == ["be brief", "q1", "a1", "q2"]
    assert recs[0]["completion"] == [{"role": "assistant", "content": "a2"}]
    assert recs[1]["completion"][0]["content"] == "c"
    assert recs[2] == {
        "prompt": [{"role": "user", "content": "plain"}],
        "completion": [{"role": "assistant", "content": "text"}],
    }


@pytest.mark.parametrize(
    "row,needle",
    [
        ({"messages": [{"role": "user", "content": "q"}]}, "no assistant turn"),
        (
            {
                "messages": [
                    {"role": "user", "content": "q"},
                    {"role": "assistant", "content": "a"},
                    {"role": "user", "content": "x"},
                ]
            },
            "must end with the assistant turn",
        ),
        (
            {"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "user", "content": "a"}]},
            "one assistant message",
        ),
        ({"text": "x"}, "needs `prompt` + `completion` or `messages`"),
        ({"prompt": [{"role": "user"}], "completion": "a"}, "{role, content}"),
    ],
)
def test_bad_sft_rows_name_the_row(row, needle):
    with pytest.raises(D.DataError) as e:
        D.sft_records(
            [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}, row],
            "answers",
        )
    assert "answers row 1" in str(e.value) and needle in str(e.value)


def test_pairs_and_text_rows():
    recs = D.pair_records([{"prompt": "q", "chosen": "good", "rejected": "bad"}])
    assert recs[0]["chosen"] == [{"role": "assistant", "content": "good"}]
    with pytest.raises(D.DataError, match="pairs row 0: `rejected` is missing"):
        D.pair_records([{"prompt": "q", "chosen": "good"}], "pairs")
    assert D.text_records([{"text": "a"}, {"text": "  "}]) == [{"text": "a"}]


def test_eval_split_is_deterministic_and_disjoint():
    recs = list(range(100))
    tr, ev = D.split_eval(recs, 0.1, seed=3)
    assert len(ev) == 10 and len(tr) == 90 and not set(tr) & set(ev)
    assert (tr, ev) == D.split_eval(recs, 0.1, seed=3)
    assert D.split_eval(recs, 0.1, seed=4)[1] != ev
    assert len(D.split_eval(recs, 7, seed=3)[1]) == 7
    with pytest.raises(D.DataError):
        D.split_eval(recs, 100, seed=3)


@pytest.fixture(scope="module")
def tok(tiny_llama):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama)


PROMPT = [{"role": "system", "content": "answer in SQL"}, {"role": "user", "content": "count the orders"}]
COMPLETION = [{"role": "assistant", "content": "SELECT count(*) FROM orders"}]


def test_no_double_bos_although_template_and_tokenizer_both_add_one(tok):
    # the trap this guards against: the rendered chat already starts with BOS and the tokenizer adds another
    rendered = tok.apply_chat_template(PROMPT + COMPLETION, tokenize=False)
    naive = tok(rendered)["input_ids"]
    assert naive[:2] == [tok.bos_token_id, tok.bos_token_id]
    ex = D.tokenize_sft(tok, PROMPT, COMPLETION, D.stop_token_ids(tok))
    ids = ex["input_ids"]
    assert ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id
    assert ids.count(tok.bos_token_id) == 1


def test_prompt_tokens_are_exactly_the_inference_prompt(tok):
    ex = D.tokenize_sft(tok, PROMPT, COMPLETION, D.stop_token_ids(tok))
    n_prompt = ex["completion_mask"].index(1)
    # what a server (vLLM, HF generate with the chat template) feeds the model
    at_inference = tok.apply_chat_template(
        PROMPT, add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    assert ex["input_ids"][:n_prompt] == list(at_inference)
    completion_text = tok.decode(ex["input_ids"][n_prompt:])
    assert completion_text.startswith("SELECT count(*) FROM orders<|im_end|>")


def test_eos_label_is_not_masked(tok):
    recs = [{"prompt": PROMPT, "completion": COMPLETION}]
    for plw in (0.0, 0.1):
        out, stats = D.tokenize_sft_dataset(recs, tok, 512, plw, D.stop_token_ids(tok))
        ex = out[0]
        eos_pos = ex["input_ids"].index(tok.eos_token_id, ex["completion_mask"].index(1))
        assert ex["labels"][eos_pos] == tok.eos_token_id
        assert ex["completion_mask"][eos_pos] == 1
        n_prompt = ex["completion_mask"].index(1)
        if plw == 0:
            assert set(ex["labels"][:n_prompt]) == {-100}
        else:
            assert ex["labels"][:n_prompt] == ex["input_ids"][:n_prompt]
        assert stats["examples"] == 1 and stats["completion_tokens"] == sum(ex["completion_mask"])


def test_missing_stop_token_gets_eos_appended(tok):
    tmpl = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
    ex = D.tokenize_sft(tok, PROMPT, COMPLETION, D.stop_token_ids(tok), chat_template=tmpl)
    assert ex["input_ids"][-1] == tok.eos_token_id and ex["completion_mask"][-1] == 1


def test_truncation_drops_examples_without_completion(tok):
    long_prompt = [{"role": "user", "content": "count the orders " * 50}]
    out, stats = D.tokenize_sft_dataset(
        [{"prompt": long_prompt, "completion": COMPLETION}, {"prompt": PROMPT, "completion": COMPLETION}],
        tok,
        40,
        0.1,
        D.stop_token_ids(tok),
    )
    assert stats["dropped_no_completion"] == 1 and len(out) == 1
    assert all(len(ex["input_ids"]) <= 40 for ex in out)
