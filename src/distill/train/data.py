"""Training data: from input artifacts (polars) to the rows TRL's trainers take.

- text (cpt): column `text`.
- sft: TRL conversational prompt/completion. Rows with `prompt` (list of messages) and `completion`
  (one assistant message), and/or `messages` (a whole conversation, split before its last assistant
  turn). Plain-string prompt/completion are wrapped as a user and an assistant message, so the chat
  template is always applied, as at inference.
- pairs (dpo): `prompt` (messages), `chosen`, `rejected` (one assistant message each).

SFT tokenization is done here rather than in TRL's dataset preparation because TRL has no fractional
prompt-loss weight: it keeps a per-token `completion_mask` only without packing, and turns it into
all-or-nothing labels. We tokenize exactly like TRL (and like vLLM at inference): render the chat
template to text, tokenize without adding special tokens, take the completion as what follows the
common prefix of prompt-with-generation-prompt and prompt+completion. We add two guards: a doubled
BOS (a template that renders `bos_token` for a tokenizer that also adds one) is collapsed, and a
completion that does not end in a stop token gets EOS appended, so the model learns to stop.
"""

from __future__ import annotations

import json
import random
from typing import Any

Message = dict[str, Any]


class DataError(ValueError):
    """Bad training rows; the message names the artifact, the row and what to do."""


def _clean_messages(v: Any, where: str, key: str) -> list[Message]:
    if v is None:
        raise DataError(f"{where}: `{key}` is empty")
    if isinstance(v, str):
        s = v.strip()
        if s.startswith("["):
            try:
                v = json.loads(s)
            except ValueError:
                raise DataError(f"{where}: `{key}` is a string that is not a JSON list of messages") from None
        else:
            raise DataError(f"{where}: `{key}` must be a list of {{role, content}} messages")
    if isinstance(v, dict):
        v = [v]
    out: list[Message] = []
    for i, m in enumerate(v):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"{where}: `{key}`[{i}] must be a {{role, content}} message")
        msg = {k: x for k, x in m.items() if x is not None}
        if not isinstance(msg.get("content"), str):
            raise DataError(f"{where}: `{key}`[{i}].content must be a string")
        out.append(msg)
    return out


def sft_records(rows: list[dict[str, Any]], source: str = "input") -> list[dict[str, list[Message]]]:
    """Rows of an `sft` artifact -> [{"prompt": [...], "completion": [one assistant message]}]."""
    out = []
    for i, row in enumerate(rows):
        where = f"{source} row {i}"
        prompt, completion = row.get("prompt"), row.get("completion")
        if prompt is not None and completion is not None:
            p = (
                [{"role": "user", "content": prompt}]
                if isinstance(prompt, str) and not prompt.lstrip().startswith("[")
                else _clean_messages(prompt, where, "prompt")
            )
            c = (
                [{"role": "assistant", "content": completion}]
                if isinstance(completion, str) and not completion.lstrip().startswith("[")
                else _clean_messages(completion, where, "completion")
            )
            if len(c) != 1 or c[0]["role"] != "assistant":
                raise DataError(f"{where}: `completion` must hold exactly one assistant message")
        elif row.get("messages") is not None:
            msgs = _clean_messages(row["messages"], where, "messages")
            last = max((j for j, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
            if last is None:
                raise DataError(f"{where}: `messages` has no assistant turn to train on")
            if last != len(msgs) - 1:
                raise DataError(
                    f"{where}: `messages` must end with the assistant turn to train on (it ends with {msgs[-1]['role']})"
                )
            p, c = msgs[:last], [msgs[last]]
            if not p:
                raise DataError(f"{where}: `messages` has no prompt before the assistant turn")
        else:
            raise DataError(
                f"{where}: needs `prompt` + `completion` or `messages`; got columns {sorted(row)}"
            )
        out.append({"prompt": p, "completion": c})
    return out


def pair_records(rows: list[dict[str, Any]], source: str = "input") -> list[dict[str, list[Message]]]:
    """Rows of a `pairs` artifact -> [{"prompt": [...], "chosen": [...], "rejected": [...]}]."""
    out = []
    for i, row in enumerate(rows):
        where = f"{source} row {i}"
        for k in ("prompt", "chosen", "rejected"):
            if row.get(k) is None:
                raise DataError(f"{where}: `{k}` is missing; a pairs row needs prompt, chosen and rejected")
        p = row["prompt"]
        prompt = (
            [{"role": "user", "content": p}]
            if isinstance(p, str) and not p.lstrip().startswith("[")
            else _clean_messages(p, where, "prompt")
        )
        rec = {"prompt": prompt}
        for k in ("chosen", "rejected"):
            v = row[k]
            msgs = (
                [{"role": "assistant", "content": v}]
                if isinstance(v, str) and not v.lstrip().startswith("[")
                else _clean_messages(v, where, k)
            )
            if len(msgs) != 1 or msgs[0]["role"] != "assistant":
                raise DataError(f"{where}: `{k}` must hold exactly one assistant message")
            rec[k] = msgs
        out.append(rec)
    return out


def text_records(
    rows: list[dict[str, Any]], field: str = "text", source: str = "input"
) -> list[dict[str, str]]:
    out = []
    for i, row in enumerate(rows):
        t = row.get(field)
        if t is None:
            raise DataError(f"{source} row {i}: column `{field}` is missing or null")
        if str(t).strip():
            out.append({"text": str(t)})
    return out


def split_eval(records: list[Any], eval_split: float, seed: int) -> tuple[list[Any], list[Any]]:
    """Deterministic held-out split: a share (<1) or a count (>=1) of the rows."""
    if not eval_split:
        return records, []
    n = len(records)
    k = int(eval_split) if eval_split >= 1 else max(1, round(n * eval_split))
    if k >= n:
        raise DataError(f"eval_split={eval_split} leaves no training rows out of {n}")
    idx = list(range(n))
    random.Random(f"{seed}:eval_split").shuffle(idx)
    held = set(idx[:k])
    return [r for i, r in enumerate(records) if i not in held], [
        r for i, r in enumerate(records) if i in held
    ]


# ------------------------------------------------------------------------------------------------
# SFT tokenization
# ------------------------------------------------------------------------------------------------


def stop_token_ids(tokenizer: Any, generation_eos: Any = None) -> set[int]:
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    if isinstance(generation_eos, int):
        ids.add(generation_eos)
    elif isinstance(generation_eos, list | tuple):
        ids.update(int(x) for x in generation_eos)
    return ids


def _encode(tokenizer: Any, text: str) -> list[int]:
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    bos = tokenizer.bos_token_id
    # collapse a doubled BOS (template renders bos_token and the text already began with one)
    while bos is not None and len(ids) >= 2 and ids[0] == bos and ids[1] == bos:
        ids.pop(0)
    return ids


def tokenize_sft(
    tokenizer: Any,
    prompt: list[Message],
    completion: list[Message],
    stops: set[int],
    chat_template: str | None = None,
) -> dict[str, list[int]]:
    """One example -> input_ids and completion_mask (1 on completion tokens, incl. the stop token)."""
    from trl.data_utils import common_prefix_length

    kw = {"chat_template": chat_template} if chat_template else {}
    prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True, **kw)
    full_text = tokenizer.apply_chat_template(prompt + completion, tokenize=False, **kw)
    prompt_ids = _encode(tokenizer, prompt_text)
    full_ids = _encode(tokenizer, full_text)
    n = common_prefix_length(prompt_ids, full_ids)
    mask = [0] * n + [1] * (len(full_ids) - n)
    if not any(t in stops for t in full_ids[n:]) and tokenizer.eos_token_id is not None:
        full_ids.append(int(tokenizer.eos_token_id))
        mask.append(1)
    return {"input_ids": full_ids, "completion_mask": mask}


def tokenize_sft_dataset(
    records: list[dict[str, Any]],
    tokenizer: Any,
    max_length: int,
    prompt_loss_weight: float,
    stops: set[int],
) -> tuple[list[dict[str, list[int]]], dict[str, int]]:
    """Tokenize, truncate (keep the start) and build labels. Labels are -100 only where the loss weight
    is 0 (the prompt when prompt_loss_weight == 0), so TRL's fused LM head skips those positions."""
    out = []
    stats = {"examples": 0, "truncated": 0, "dropped_no_completion": 0, "tokens": 0, "completion_tokens": 0}
    for rec in records:
        ex = tokenize_sft(tokenizer, rec["prompt"], rec["completion"], stops)
        ids, mask = ex["input_ids"], ex["completion_mask"]
        if len(ids) > max_length:
            stats["truncated"] += 1
            ids, mask = ids[:max_length], mask[:max_length]
        if 1 not in mask:
            stats["dropped_no_completion"] += 1
            continue
        labels = [t if (m or prompt_loss_weight > 0) else -100 for t, m in zip(ids, mask, strict=True)]
        out.append({"input_ids": ids, "labels": labels, "completion_mask": mask})
        stats["examples"] += 1
        stats["tokens"] += len(ids)
        stats["completion_tokens"] += sum(mask)
    return out, stats
