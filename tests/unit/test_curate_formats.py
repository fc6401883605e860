"""Import adapters on real files in common formats (samples in tests/data/pref_sft_formats)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from distill.curate.formats import FormatError, convert, detect_format, parse_transcript, read_records

DATA = Path(__file__).resolve().parents[1] / "data" / "pref_sft_formats"


def load(name: str) -> list[dict]:
    return read_records(DATA / name)


def roles(msgs: list[dict]) -> list[str]:
    return [m["role"] for m in msgs]


@pytest.mark.parametrize(
    "name, fmt",
    [
        ("hh_rlhf_harmless_test_sample.jsonl.gz", "chosen_rejected"),
        ("openai_dpo_orca_sample.jsonl", "openai_dpo"),
        ("openai_sft_gsm8k_sample.jsonl", "messages"),
        ("openai_sft_toolcall_sample.jsonl", "messages"),
        ("llamafactory_dpo_en_demo.json", "sharegpt_pref"),
        ("llamafactory_identity.json", "alpaca"),
        ("llamafactory_kto_en_demo.json", "kto"),
        ("llamafactory_v1_dpo_demo.jsonl", "chosen_rejected_messages"),
        ("llamafactory_v1_sft_demo.jsonl", "messages"),
    ],
)
def test_detect_format(name: str, fmt: str) -> None:
    recs = load(name)
    assert {detect_format(r) for r in recs} == {fmt}


def test_hh_rlhf_transcripts_to_pairs() -> None:
    recs = load("hh_rlhf_harmless_test_sample.jsonl.gz")
    rows, problems = convert(recs, "auto", "pairs")
    assert len(rows) + len(problems) == len(recs) and len(rows) >= 38
    r0, src = rows[0], recs[0]
    # the prompt is the shared conversation up to the last "Assistant:" turn
    text = "".join(
        f"\n\n{'Human' if m['role'] == 'user' else 'Assistant'}: {m['content']}" for m in r0["prompt"]
    )
    assert src["chosen"].startswith(text) and src["rejected"].startswith(text)
    assert r0["chosen"][0]["role"] == r0["rejected"][0]["role"] == "assistant"
    assert src["chosen"].endswith(r0["chosen"][0]["content"]) and src["rejected"].endswith(
        r0["rejected"][0]["content"]
    )
    assert roles(r0["prompt"])[0] == "user" and roles(r0["prompt"])[-1] == "user"
    # to sft: the chosen conversation
    sft, _ = convert(recs, "auto", "sft")
    assert sft[0]["messages"][-1]["content"] == r0["chosen"][0]["content"]


def test_openai_dpo_to_pairs() -> None:
    recs = load("openai_dpo_orca_sample.jsonl")
    rows, problems = convert(recs, "openai_dpo", "pairs")
    assert not problems and len(rows) == len(recs)
    r, src = rows[3], recs[3]
    assert (
        roles(r["prompt"]) == ["system", "user"]
        and r["prompt"][1]["content"] == src["input"]["messages"][1]["content"]
    )
    assert r["chosen"][0]["content"] == src["preferred_output"][0]["content"]
    assert r["rejected"][0]["content"] == src["non_preferred_output"][0]["content"]


def test_sharegpt_pref_and_v1_messages() -> None:
    recs = load("llamafactory_dpo_en_demo.json")
    rows, problems = convert(recs, "auto", "pairs")
    assert not problems
    assert rows[0]["prompt"][0] == {
        "role": "user",
        "content": recs[0]["conversations"][0]["value"],
        "tool_calls": None,
    }
    assert rows[0]["chosen"][0]["content"] == recs[0]["chosen"]["value"]
    v1 = load("llamafactory_v1_dpo_demo.jsonl")
    rows, problems = convert(v1, "auto", "pairs")
    assert not problems and roles(rows[0]["prompt"]) == ["system", "user"]
    assert (
        rows[0]["chosen"][0]["content"] == v1[0]["chosen_messages"][-1]["content"][0]["value"]
    )  # parts joined


def test_sft_formats() -> None:
    gsm = load("openai_sft_gsm8k_sample.jsonl")
    rows, problems = convert(gsm, "auto", "sft")
    assert not problems and len(rows) == len(gsm)
    assert rows[0]["messages"] == rows[0]["prompt"] + rows[0]["completion"]
    assert rows[0]["completion"][0]["content"] == gsm[0]["messages"][-1]["content"]
    alp = load("llamafactory_identity.json")
    rows, _ = convert(alp, "auto", "sft", system="Be brief.")
    assert roles(rows[0]["messages"]) == ["system", "user", "assistant"]
    assert (
        rows[0]["messages"][1]["content"] == alp[0]["instruction"]
        and rows[0]["completion"][0]["content"] == alp[0]["output"]
    )
    v1 = load("llamafactory_v1_sft_demo.jsonl")
    rows, problems = convert(v1, "auto", "sft")
    assert not problems and rows[0]["messages"][0]["content"] == "hi"
    kto = load("llamafactory_kto_en_demo.json")
    rows, problems = convert(kto, "auto", "sft")
    assert len(rows) == sum(r["label"] for r in kto) and all("label is false" in p for _, p in problems)


def test_tool_calls_kept() -> None:
    recs = load("openai_sft_toolcall_sample.jsonl")
    rows, problems = convert(recs, "auto", "sft")
    assert not problems
    last = rows[0]["completion"][0]
    assert last["role"] == "assistant" and json.loads(last["tool_calls"])[0]["function"]["name"]
    assert json.loads(rows[0]["tools"])[0]["type"] == "function"


def test_sharegpt_roles_and_history(tmp_path: Path) -> None:
    recs = [
        {
            "conversations": [
                {"from": "human", "value": "hi"},
                {"from": "gpt", "value": "hello"},
                {"from": "human", "value": "2+2?"},
                {"from": "gpt", "value": "4"},
            ],
            "system": "math",
        },
        {"instruction": "Add", "input": "2 and 3", "output": "5", "history": [["hi", "hello"]]},
        {"conversations": [{"from": "human", "value": "no answer"}]},
        {"conversations": [{"from": "alien", "value": "?"}, {"from": "gpt", "value": "!"}]},
    ]
    rows, problems = convert(recs, "auto", "sft")
    assert roles(rows[0]["messages"]) == ["system", "user", "assistant", "user", "assistant"]
    assert rows[1]["messages"][2]["content"] == "Add\n\n2 and 3" and len(rows[1]["prompt"]) == 3
    assert [i for i, _ in problems] == [2, 3]
    assert "does not end with an assistant turn" in problems[0][1] and "unknown role" in problems[1][1]


def test_explicit_prompt_pairs_and_errors() -> None:
    recs = [
        {"prompt": "Q?", "chosen": "good", "rejected": "bad"},
        {
            "prompt": [{"role": "user", "content": "Q2"}],
            "chosen": [{"role": "assistant", "content": "a"}],
            "rejected": [{"role": "assistant", "content": "b"}],
        },
        {"prompt": "Q?", "chosen": "same", "rejected": "same"},
        {
            "chosen": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "a"}],
            "rejected": [{"role": "user", "content": "y"}, {"role": "assistant", "content": "b"}],
        },
    ]
    rows, problems = convert(recs, "auto", "pairs")
    assert [r["chosen"][0]["content"] for r in rows] == ["good", "a"]
    assert [i for i, _ in problems] == [2, 3]
    assert "identical" in problems[0][1] and "do not share" in problems[1][1]
    with pytest.raises(FormatError, match="not a Human"):
        parse_transcript("Human: no leading newlines")


def test_read_records_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"a": 1}\n{oops\n')
    with pytest.raises(FormatError, match=r"bad.jsonl:2: not valid JSON"):
        read_records(bad)
    gz = tmp_path / "x.jsonl.gz"
    with gzip.open(gz, "wt") as f:
        f.write('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n')
    assert detect_format(read_records(gz)[0]) == "messages"
    with pytest.raises(FormatError, match="cannot tell the format"):
        detect_format({"foo": 1})
