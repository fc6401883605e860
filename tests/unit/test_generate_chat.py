"""Chat rendering guards: single BOS when the template adds one, end-of-turn tokens as stop tokens."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from distill.backends import GenRequest, Sampling, Structured
from distill.backends.chat import (
    DoubleBosError,
    check_single_bos,
    encode_chat,
    load_tokenizer,
    render_chat,
    stop_token_ids,
)

MSGS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "How many orders?"}]


def test_llama_template_adds_bos_once(tiny_llama):
    tok = load_tokenizer(str(tiny_llama))
    bos = tok.bos_token_id
    text = render_chat(tok, MSGS)
    assert text.startswith("<|begin_of_text|><|im_start|>system\n") and text.endswith(
        "<|im_start|>assistant\n"
    )
    # the trap: the tokenizer's default adds a second BOS in front of the template's
    naive = tok(text)["input_ids"]
    assert naive[:2] == [bos, bos]
    ids = encode_chat(tok, text)
    assert ids[0] == bos and ids[1] != bos and ids == naive[1:]
    # what transformers itself does for chat templates
    assert ids == list(tok.apply_chat_template(MSGS, add_generation_prompt=True, return_dict=False))
    with pytest.raises(DoubleBosError, match="two BOS"):
        check_single_bos(tok, naive)


def test_qwen2_template_has_no_bos(tiny_qwen2):
    tok = load_tokenizer(str(tiny_qwen2))
    assert tok.bos_token_id is None
    ids = encode_chat(tok, render_chat(tok, MSGS))
    assert ids == tok(render_chat(tok, MSGS))["input_ids"]


def test_stop_tokens_include_the_templates_end_of_turn(tiny_llama, tmp_path):
    tok = load_tokenizer(str(tiny_llama))
    im_end, eot = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    assert set(stop_token_ids(tok, str(tiny_llama))) == {im_end, eot}
    # a model whose EOS is not the end-of-turn token (as Llama 3 base vs <|eot_id|>): the template says
    # that <|im_end|> ends a turn, so it still stops generation
    tok2 = AutoTokenizer.from_pretrained(tiny_llama)
    tok2.eos_token = "<|endoftext|>"
    tok2.save_pretrained(tmp_path)
    t2 = load_tokenizer(str(tmp_path))
    assert t2.eos_token_id == eot
    assert im_end in stop_token_ids(t2, str(tmp_path))  # no generation_config.json there
    t2.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    assert stop_token_ids(t2, str(tmp_path)) == [eot]  # a template without <|im_end|> does not use it


def test_chat_template_override_and_missing_template(tiny_llama, tmp_path):
    tok = load_tokenizer(
        str(tiny_llama),
        chat_template="{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}",
    )
    assert render_chat(tok, MSGS[1:]) == "[user] How many orders?\n"
    bare = AutoTokenizer.from_pretrained(tiny_llama)
    bare.chat_template = None
    bare.save_pretrained(tmp_path)
    (tmp_path / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(ValueError, match="no chat template"):
        load_tokenizer(str(tmp_path))


def test_request_types_validate():
    with pytest.raises(ValueError, match="exactly one"):
        Structured(regex="a", grammar="b")
    assert Structured(choice=("A", "B")).kind == "choice"
    s = Sampling(n=2, stop=("x",), seed=3)
    assert '"stop": ["x"]' in s.to_json()
    r = GenRequest("1", tuple(MSGS), s)
    assert r.sampling.n == 2 and r.structured is None
