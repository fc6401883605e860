"""Chat rendering shared by the backends, with guards against the known silent errors.

- Double BOS: a chat template that starts with `{{ bos_token }}` (Llama 3 and our `tiny:llama`)
  already puts BOS into the rendered text; tokenizing that text with the tokenizer's default
  `add_special_tokens=True` adds a second one, and the model silently sees `<bos><bos>`.
  `encode_chat` tokenizes rendered chats with `add_special_tokens=False`, exactly as
  `tokenizer.apply_chat_template(tokenize=True)` and vLLM's chat path do, and refuses a result that
  still starts with two BOS tokens.
- End of turn: a chat model ends its answer with the template's end-of-turn token (`<|im_end|>`,
  `<|eot_id|>`, `<end_of_turn>`, ...), which is not always the tokenizer's `eos_token`.
  `stop_token_ids` collects the tokenizer EOS, the `generation_config.json` EOS list and every
  known end-of-turn token that the chat template emits, so that generation stops where the
  template says a turn ends.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

# End-of-turn / end-of-text markers of the common chat formats. A token from this list counts as a
# stop token only if the chat template actually emits it and the tokenizer has it as one token.
END_OF_TURN_TOKENS = (
    "<|im_end|>",  # ChatML (Qwen, many others)
    "<|eot_id|>",  # Llama 3
    "<|eom_id|>",  # Llama 3 tool calls
    "<|end_of_text|>",
    "<end_of_turn>",  # Gemma
    "<|end|>",  # Phi-3
    "<|endoftext|>",
    "</s>",  # Llama 2 / Mistral
    "<|END_OF_TURN_TOKEN|>",  # Command-R
    "<|return|>",  # gpt-oss
)


class DoubleBosError(ValueError):
    pass


def load_tokenizer(
    path: str, revision: str | None = None, chat_template: str | None = None, trust_remote_code: bool = False
) -> Any:
    """The model's tokenizer, with `chat_template` (text) replacing its own if given."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    if chat_template:
        tok.chat_template = chat_template
    if not getattr(tok, "chat_template", None):
        raise ValueError(
            f"{path}: the tokenizer has no chat template; set `chat_template:` on the model in the pipeline"
        )
    return tok


def render_chat(tok: Any, messages: Sequence[dict[str, str]], **template_kwargs: Any) -> str:
    """The prompt text the model sees: template applied, assistant turn opened."""
    return str(
        tok.apply_chat_template(
            [dict(m) for m in messages], tokenize=False, add_generation_prompt=True, **template_kwargs
        )
    )


def encode_chat(tok: Any, text: str) -> list[int]:
    """Token ids of a rendered chat, with the template (not the tokenizer) owning special tokens."""
    ids: list[int] = list(tok(text, add_special_tokens=False)["input_ids"])
    check_single_bos(tok, ids)
    return ids


def check_single_bos(tok: Any, ids: Sequence[int]) -> None:
    bos = getattr(tok, "bos_token_id", None)
    if bos is not None and len(ids) >= 2 and ids[0] == bos and ids[1] == bos:
        raise DoubleBosError(
            "the prompt starts with two BOS tokens: the chat template already adds BOS, so the rendered "
            "text must be tokenized with add_special_tokens=False"
        )


def stop_token_ids(tok: Any, model_path: str | None = None, revision: str | None = None) -> list[int]:
    """EOS of the tokenizer and generation config, plus the template's end-of-turn tokens."""
    ids: list[int] = []

    def add(x: Any) -> None:
        if isinstance(x, int) and x >= 0 and x not in ids:
            ids.append(x)

    add(getattr(tok, "eos_token_id", None))
    if model_path is not None:
        for x in generation_config_eos(model_path, revision):
            add(x)
    template = getattr(tok, "chat_template", None) or ""
    if isinstance(template, dict):  # named templates
        template = " ".join(str(v) for v in template.values())
    vocab = tok.get_vocab()
    for t in END_OF_TURN_TOKENS:
        if t in template and t in vocab:
            add(vocab[t])
    return ids


def generation_config_eos(model_path: str, revision: str | None = None) -> list[int]:
    """`eos_token_id` of the model's generation_config.json (local folder or Hub cache); [] if none."""
    from transformers import GenerationConfig

    try:
        gc = GenerationConfig.from_pretrained(model_path, revision=revision or "main")
    except (OSError, ValueError):
        return []
    eos = gc.eos_token_id
    return [int(x) for x in (eos if isinstance(eos, list) else [eos]) if isinstance(x, int)]
