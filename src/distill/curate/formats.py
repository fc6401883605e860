"""Import adapters: common Hub / API data layouts -> our `sft`, `pairs` and `generations` layouts.

Recognized formats (`detect_format` picks one from a record's keys):

| format | record | becomes |
| --- | --- | --- |
| messages | {messages: [{role, content}]} (OpenAI chat fine-tuning, TRL conversational) | sft |
| prompt_completion | {prompt, completion} as strings or message lists (TRL) | sft |
| alpaca | {instruction, input?, output, system?, history?} | sft |
| sharegpt | {conversations: [{from, value}], system?} | sft |
| sharegpt_pref | {conversations, chosen: {from, value}, rejected: {...}} (LLaMA-Factory) | pairs |
| prompt_chosen_rejected | {prompt, chosen, rejected} strings or message lists (TRL explicit prompt) | pairs |
| chosen_rejected | {chosen, rejected} full conversations: message lists (TRL implicit prompt), or | pairs |
|  | "\\n\\nHuman: ... \\n\\nAssistant: ..." transcripts (Anthropic hh-rlhf) | |
| chosen_rejected_messages | {chosen_messages, rejected_messages} (LLaMA-Factory v1) | pairs |
| openai_dpo | {input: {messages}, preferred_output: [...], non_preferred_output: [...]} | pairs |
| kto | {messages or prompt/completion, label: bool} | sft (label true rows) |
| generations | {messages or prompt, completion, id?, sample?, ...} (samples made elsewhere) | generations |

Message content given as a list of parts ([{type: "text", text | value}]) is joined into one
string; ShareGPT roles map human->user, gpt/bot/model->assistant, observation/tool->tool,
function_call->assistant. Assistant `tool_calls` are kept as JSON text in a `tool_calls` field of
the message (null elsewhere) and a record's `tools` as JSON text. Every other field of a record is
kept as a column (nested values as JSON text).

`convert(records, fmt, layout)` returns (rows, problems): rows for the layout and
(index, reason) for each record that could not be converted (it is skipped, not guessed).
"""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

FORMATS = (
    "messages",
    "prompt_completion",
    "alpaca",
    "sharegpt",
    "sharegpt_pref",
    "prompt_chosen_rejected",
    "chosen_rejected",
    "chosen_rejected_messages",
    "openai_dpo",
    "kto",
    "generations",
)
PAIR_FORMATS = {
    "sharegpt_pref",
    "prompt_chosen_rejected",
    "chosen_rejected",
    "chosen_rejected_messages",
    "openai_dpo",
}

_ROLE = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "bot": "assistant",
    "model": "assistant",
    "chatgpt": "assistant",
    "system": "system",
    "observation": "tool",
    "tool": "tool",
    "function": "tool",
    "ipython": "tool",
    "function_call": "assistant",
    "developer": "system",
}


class FormatError(ValueError):
    pass


# ------------------------------------------------------------------------------------------------
# reading
# ------------------------------------------------------------------------------------------------


def read_records(path: Path) -> list[dict[str, Any]]:
    """Records of a JSON Lines (.jsonl/.ndjson, optionally .gz), JSON array (.json, or an object
    holding one list) or parquet file. Raises FormatError naming the file and line."""
    name = path.name.lower()
    if name.endswith(".parquet"):
        import polars as pl

        return pl.read_parquet(path).to_dicts()
    opener: Any = gzip.open if name.endswith(".gz") else open
    base = name[:-3] if name.endswith(".gz") else name
    with opener(path, "rt", encoding="utf-8") as f:
        if base.endswith((".jsonl", ".ndjson")):
            out = []
            for i, ln in enumerate(f, 1):
                if not ln.strip():
                    continue
                try:
                    rec = json.loads(ln)
                except json.JSONDecodeError as e:
                    raise FormatError(
                        f"{path}:{i}: not valid JSON ({e.msg}); fix or remove the line"
                    ) from None
                if not isinstance(rec, dict):
                    raise FormatError(f"{path}:{i}: expected a JSON object per line")
                out.append(rec)
            return out
        if base.endswith(".json"):
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise FormatError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
            if isinstance(data, dict):
                lists = [v for v in data.values() if isinstance(v, list)]
                if len(lists) != 1:
                    raise FormatError(
                        f"{path}: expected a JSON array of records (or an object holding one list)"
                    )
                data = lists[0]
            if not all(isinstance(r, dict) for r in data):
                raise FormatError(f"{path}: every record must be a JSON object")
            return list(data)
    raise FormatError(f"{path}: unknown file type; use .jsonl, .jsonl.gz, .json or .parquet")


def detect_format(rec: dict[str, Any]) -> str:
    keys = set(rec)
    if "input" in keys and "preferred_output" in keys and "non_preferred_output" in keys:
        return "openai_dpo"
    if "chosen_messages" in keys and "rejected_messages" in keys:
        return "chosen_rejected_messages"
    if "conversations" in keys and "chosen" in keys and "rejected" in keys:
        return "sharegpt_pref"
    if "prompt" in keys and "chosen" in keys and "rejected" in keys:
        return "prompt_chosen_rejected"
    if "chosen" in keys and "rejected" in keys:
        return "chosen_rejected"
    if (
        "label" in keys
        and isinstance(rec.get("label"), bool)
        and ("messages" in keys or "completion" in keys)
    ):
        return "kto"
    if "conversations" in keys:
        return "sharegpt"
    if "instruction" in keys and "output" in keys:
        return "alpaca"
    if "messages" in keys and "completion" in keys:
        return "generations"
    if "messages" in keys:
        return "messages"
    if "prompt" in keys and "completion" in keys:
        return "prompt_completion"
    raise FormatError(
        f"cannot tell the format from the keys {sorted(keys)}; set `format:` to one of {', '.join(FORMATS)}"
    )


# ------------------------------------------------------------------------------------------------
# messages
# ------------------------------------------------------------------------------------------------


def _content(c: Any) -> str:
    if c is None:
        return ""
    if isinstance(c, str):
        return c
    if isinstance(c, list):
        parts = []
        for p in c:
            if isinstance(p, str):
                parts.append(p)
            elif isinstance(p, dict):
                if p.get("type", "text") not in ("text", "input_text", "output_text"):
                    raise FormatError(f"content part of type {p.get('type')!r} is not text")
                parts.append(str(p.get("text", p.get("value", ""))))
        return "".join(parts)
    if isinstance(c, dict) and ("text" in c or "value" in c):
        return str(c.get("text", c.get("value")))
    raise FormatError(f"message content of type {type(c).__name__} is not text")


def message(m: Any) -> dict[str, Any]:
    """One message as {role, content, tool_calls} (tool_calls as JSON text or None)."""
    if not isinstance(m, dict):
        raise FormatError(f"a message must be an object, got {type(m).__name__}")
    role_raw = m.get("role", m.get("from"))
    if role_raw is None:
        raise FormatError(f"message without role/from: keys {sorted(m)}")
    role = _ROLE.get(str(role_raw).lower())
    if role is None:
        raise FormatError(f"unknown role {role_raw!r}")
    content = _content(m.get("content", m.get("value")))
    calls = m.get("tool_calls")
    return {
        "role": role,
        "content": content,
        "tool_calls": json.dumps(calls, ensure_ascii=False) if calls else None,
    }


def messages(ms: Any) -> list[dict[str, Any]]:
    if isinstance(ms, str):
        return [{"role": "user", "content": ms, "tool_calls": None}]
    if not isinstance(ms, list) or not ms:
        raise FormatError("expected a non-empty list of messages")
    return [message(m) for m in ms]


_TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")


def parse_transcript(text: str) -> list[dict[str, Any]]:
    """'\\n\\nHuman: ...\\n\\nAssistant: ...' (Anthropic hh-rlhf) -> messages."""
    parts = _TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        raise FormatError("not a Human:/Assistant: transcript")
    out = []
    for who, body in zip(parts[1::2], parts[2::2], strict=True):
        out.append({"role": "user" if who == "Human" else "assistant", "content": body, "tool_calls": None})
    return out


def _conv(v: Any) -> list[dict[str, Any]]:
    if isinstance(v, str):
        return (
            parse_transcript(v)
            if v.startswith("\n\nHuman:")
            else [{"role": "assistant", "content": v, "tool_calls": None}]
        )
    if isinstance(v, dict):
        return [message(v)]
    return messages(v)


def _split_last_assistant(conv: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    if not conv or conv[-1]["role"] != "assistant":
        raise FormatError("the conversation does not end with an assistant turn")
    return conv[:-1], conv[-1]


def _with_system(prompt: list[dict[str, Any]], system: str | None) -> list[dict[str, Any]]:
    if system and not (prompt and prompt[0]["role"] == "system"):
        return [{"role": "system", "content": system, "tool_calls": None}, *prompt]
    return prompt


# ------------------------------------------------------------------------------------------------
# conversion
# ------------------------------------------------------------------------------------------------

_USED = {
    "messages": {"messages"},
    "prompt_completion": {"prompt", "completion"},
    "alpaca": {"instruction", "input", "output", "system", "history"},
    "sharegpt": {"conversations", "system"},
    "sharegpt_pref": {"conversations", "chosen", "rejected", "system"},
    "prompt_chosen_rejected": {"prompt", "chosen", "rejected"},
    "chosen_rejected": {"chosen", "rejected"},
    "chosen_rejected_messages": {"chosen_messages", "rejected_messages"},
    "openai_dpo": {"input", "preferred_output", "non_preferred_output"},
    "kto": {"messages", "prompt", "completion", "label"},
    "generations": {"messages", "prompt", "completion"},
}


def _sft_conv(rec: dict[str, Any], fmt: str, system: str | None) -> list[dict[str, Any]]:
    if fmt == "messages":
        conv = messages(rec["messages"])
    elif fmt in ("prompt_completion", "kto") and "completion" in rec:
        p, c = rec["prompt"], rec["completion"]
        prompt = (
            messages(p) if not isinstance(p, str) else [{"role": "user", "content": p, "tool_calls": None}]
        )
        comp = (
            messages(c)
            if not isinstance(c, str)
            else [{"role": "assistant", "content": c, "tool_calls": None}]
        )
        conv = prompt + comp
    elif fmt == "kto":
        conv = messages(rec["messages"])
    elif fmt == "alpaca":
        inst, inp = _content(rec.get("instruction")), _content(rec.get("input"))
        user = f"{inst}\n\n{inp}" if inp.strip() else inst
        conv = []
        for turn in rec.get("history") or []:
            if not (isinstance(turn, list | tuple) and len(turn) == 2):
                raise FormatError("alpaca history must be a list of [user, assistant] pairs")
            conv += [
                {"role": "user", "content": _content(turn[0]), "tool_calls": None},
                {"role": "assistant", "content": _content(turn[1]), "tool_calls": None},
            ]
        conv += [
            {"role": "user", "content": user, "tool_calls": None},
            {"role": "assistant", "content": _content(rec.get("output")), "tool_calls": None},
        ]
        system = rec.get("system") or system
    elif fmt == "sharegpt":
        conv = messages(rec["conversations"])
        system = rec.get("system") or system
    else:
        raise FormatError(f"format {fmt} is not an sft format")
    prompt, last = _split_last_assistant(conv)
    if not last["content"].strip() and not last.get("tool_calls"):
        raise FormatError("the assistant turn is empty")
    return _with_system(prompt, system) + [last]


def _pair(
    rec: dict[str, Any], fmt: str, system: str | None
) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, Any]]:
    if fmt == "openai_dpo":
        inp = rec["input"]
        prompt = messages(inp["messages"] if isinstance(inp, dict) else inp)
        chosen = messages(rec["preferred_output"])
        rejected = messages(rec["non_preferred_output"])
        if len(chosen) != 1 or len(rejected) != 1:
            raise FormatError("preferred_output / non_preferred_output must hold one assistant message")
        return _with_system(prompt, system), chosen[0], rejected[0]
    if fmt == "sharegpt_pref":
        prompt = messages(rec["conversations"])
        return (
            _with_system(prompt, rec.get("system") or system),
            _conv(rec["chosen"])[-1],
            _conv(rec["rejected"])[-1],
        )
    if fmt == "prompt_chosen_rejected":
        p = rec["prompt"]
        prompt = [{"role": "user", "content": p, "tool_calls": None}] if isinstance(p, str) else messages(p)
        chs, rjs = _conv(rec["chosen"]), _conv(rec["rejected"])
        if len(chs) != 1 or len(rjs) != 1:
            raise FormatError("with an explicit prompt, chosen/rejected must be one assistant turn")
        return _with_system(prompt, system), chs[0], rjs[0]
    if fmt in ("chosen_rejected", "chosen_rejected_messages"):
        a, b = (
            ("chosen_messages", "rejected_messages")
            if fmt == "chosen_rejected_messages"
            else ("chosen", "rejected")
        )
        ch_prompt, ch = _split_last_assistant(_conv(rec[a]))
        rj_prompt, rj = _split_last_assistant(_conv(rec[b]))
        if [(m["role"], m["content"]) for m in ch_prompt] != [(m["role"], m["content"]) for m in rj_prompt]:
            raise FormatError(
                "chosen and rejected do not share the conversation before their last assistant turn"
            )
        if not ch_prompt:
            raise FormatError("no prompt before the last assistant turn")
        return _with_system(ch_prompt, system), ch, rj
    raise FormatError(f"format {fmt} is not a preference format")


def _extras(rec: dict[str, Any], fmt: str) -> dict[str, Any]:
    out = {}
    for k, v in rec.items():
        if k in _USED.get(fmt, set()):
            continue
        out[k] = json.dumps(v, ensure_ascii=False) if isinstance(v, dict | list) else v
    return out


def convert(
    records: Iterable[dict[str, Any]],
    fmt: str = "auto",
    layout: str = "sft",
    system: str | None = None,
    id_prefix: str = "row",
) -> tuple[list[dict[str, Any]], list[tuple[int, str]]]:
    """Rows in `layout` ("sft", "pairs" or "generations") and (index, problem) per skipped record."""
    rows: list[dict[str, Any]] = []
    problems: list[tuple[int, str]] = []
    for i, rec in enumerate(records):
        try:
            f = detect_format(rec) if fmt == "auto" else fmt
            if f not in FORMATS:
                raise FormatError(f"unknown format {f!r}")
            extras = _extras(rec, f)
            rid = str(extras.pop("id", None) or f"{id_prefix}-{i}")
            if layout == "pairs":
                if f not in PAIR_FORMATS:
                    raise FormatError(f"{f} records hold no chosen/rejected pair; use output: sft")
                prompt, ch, rj = _pair(rec, f, system)
                if (ch["content"], ch.get("tool_calls")) == (rj["content"], rj.get("tool_calls")):
                    raise FormatError("chosen and rejected are identical")
                rows.append({"id": rid, "prompt": prompt, "chosen": [ch], "rejected": [rj], **extras})
            elif layout == "sft":
                if f in PAIR_FORMATS:
                    prompt, ch, _ = _pair(rec, f, system)
                    conv = [*prompt, ch]
                else:
                    if f == "kto" and not rec.get("label"):
                        raise FormatError("kto label is false (an undesirable example)")
                    conv = _sft_conv(rec, "messages" if f == "generations" else f, system)
                rows.append(
                    {"id": rid, "messages": conv, "prompt": conv[:-1], "completion": [conv[-1]], **extras}
                )
            elif layout == "generations":
                if f != "generations" and "completion" not in rec:
                    raise FormatError("a generations record needs a `completion` (the sampled text)")
                c = rec["completion"]
                comp = _content(c) if not isinstance(c, list) else messages(c)[-1]["content"]
                if "messages" in rec:
                    prompt = messages(rec["messages"])
                elif "prompt" in rec:
                    prompt = (
                        messages(rec["prompt"])
                        if not isinstance(rec["prompt"], str)
                        else [{"role": "user", "content": rec["prompt"], "tool_calls": None}]
                    )
                else:
                    raise FormatError("a generations record needs `messages` or `prompt`")
                extras.pop("sample", None)
                rows.append(
                    {"id": rid, "sample": int(rec.get("sample") or 0), "messages": _with_system(prompt, system),
                     "completion": comp, **extras}
                )  # fmt: skip
            else:
                raise FormatError(f"unknown layout {layout!r}")
        except FormatError as e:
            problems.append((i, str(e)))
        except (KeyError, TypeError, AttributeError) as e:
            problems.append((i, f"malformed record ({type(e).__name__}: {e})"))
    return rows, problems
