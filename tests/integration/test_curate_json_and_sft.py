"""curate on imported SFT data (no verifier) and on a JSON task (parse + schema + agreement)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import polars as pl

from distill.config import load_pipeline
from distill.core import runner
from distill.core.artifacts import Artifact

DATA = Path(__file__).resolve().parents[1] / "data" / "pref_sft_formats"


def run_all(root: Path) -> dict[str, runner.StagePlan]:
    lp = load_pipeline(root / "pipeline.yaml")
    plans = runner.plan(lp)
    runner.run_pipeline(lp, plans, list(lp.stages))
    return runner.plan(lp)


def test_curate_imported_sft(tmp_path: Path) -> None:
    """Imported chats (GSM8K in OpenAI format, plus a duplicated copy with re-spaced answers and a
    refusal) go through filters and exact dedup without a verifier; layout stays sft."""
    recs = [json.loads(ln) for ln in (DATA / "openai_sft_gsm8k_sample.jsonl").read_text().splitlines()]
    extra = []
    for r in recs[
        :5
    ]:  # the same conversations with the answer re-spaced: exact duplicates after normalization
        m = json.loads(json.dumps(r))
        m["messages"][-1]["content"] = "  " + "   ".join(m["messages"][-1]["content"].split(" ")) + "\n"
        extra.append(m)
    refusal = json.loads(json.dumps(recs[6]))
    refusal["messages"][-1]["content"] = "I'm sorry, but I can't help with that."
    (tmp_path / "chats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs + extra + [refusal]))
    (tmp_path / "pipeline.yaml").write_text(
        """
name: sft-curate
stages:
  chats: {kind: load, paths: [chats.jsonl]}
  clean:
    kind: curate
    inputs: [chats]
    keep_per_prompt: all
    filters: {min_chars: 20}
    dedup: {exact: true, normalize: [whitespace]}
"""
    )
    plans = run_all(tmp_path)
    art = Artifact(plans["clean"].path)
    out, dropped = art.read(), art.read("dropped")
    m = art.manifest["metrics"]
    assert m["rows_in"] == len(recs) + 6 and m["dropped"] == {"refusal": 1, "duplicate_exact": 5}
    assert out.height == len(recs) and art.manifest["layout"] == "sft"
    assert sorted(dropped.filter(pl.col("reason") == "duplicate_exact")["id"].to_list()) == sorted(
        f"chats-{i}" for i in range(len(recs), len(recs) + 5)
    )
    row = out.row(0, named=True)
    assert (
        row["messages"][-1] == row["completion"][0]
        and row["completion"][0]["content"] == recs[0]["messages"][-1]["content"].strip()
    )
    assert [m["role"] for m in row["prompt"]] == ["system", "user"]


SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "year": {"type": "integer"}},
    "required": ["name", "year"],
    "additionalProperties": False,
}


def test_curate_json_task(tmp_path: Path) -> None:
    (tmp_path / "schema.json").write_text(json.dumps(SCHEMA))
    answers = {
        "p1": [
            '{"name": "DuckDB", "year": 2019}',
            '```json\n{"year": 2019, "name": "DuckDB"}\n```',
            '{"name": "DuckDB", "year": 2018}',
        ],
        "p2": ['{"name": "SQLite"}', "{name: SQLite}", "Sure, it is SQLite, from 2000."],
        "p3": ['{"name": "Polars", "year": 2020}', '{"name": "Polars", "year": 2021}'],
    }
    rows = []
    for pid, comps in answers.items():
        for i, c in enumerate(comps):
            rows.append(
                {
                    "id": pid,
                    "sample": i,
                    "messages": [{"role": "user", "content": f"Extract {pid}"}],
                    "completion": c,
                }
            )
    (tmp_path / "gens.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "pipeline.yaml").write_text(
        """
name: json-curate
task: {kind: json, schema: schema.json}
stages:
  gens: {kind: load, paths: [gens.jsonl], output: generations}
  clean: {kind: curate, inputs: [gens]}
  prefs: {kind: pairs, inputs: [gens]}
"""
    )
    plans = run_all(tmp_path)
    art = Artifact(plans["clean"].path)
    out, dropped = art.read(), art.read("dropped")
    fate = {(r["id"], r["sample"]): r["reason"] for r in dropped.iter_rows(named=True)}
    assert fate == {
        ("p1", 1): "extra_sample",  # agrees with sample 0 (same JSON), but one per prompt is kept
        ("p1", 2): "disagrees_majority",
        ("p2", 0): "json_schema_error",
        ("p2", 1): "json_parse_error",
        ("p2", 2): "json_parse_error",  # prose without a JSON value
        ("p3", 0): "no_majority",
        ("p3", 1): "no_majority",
    }
    assert out["id"].to_list() == ["p1"] and out["votes"].to_list() == [2]
    assert out["completion"][0][0]["content"] == '{"name": "DuckDB", "year": 2019}'
    pairs = Artifact(plans["prefs"].path).read().sort("id")
    assert pairs["rejected_failure"].to_list() == ["disagrees_majority"]


def test_load_pairs_output(tmp_path: Path) -> None:
    for name in (
        "hh_rlhf_harmless_test_sample.jsonl.gz",
        "openai_dpo_orca_sample.jsonl",
        "llamafactory_identity.json",
    ):
        shutil.copy(DATA / name, tmp_path / name)
    (tmp_path / "pipeline.yaml").write_text(
        """
name: load-pairs
stages:
  hh: {kind: load, paths: [hh_rlhf_harmless_test_sample.jsonl.gz], output: pairs}
  orca: {kind: load, paths: [openai_dpo_orca_sample.jsonl], output: pairs, max_rows: 10}
  alpaca: {kind: load, paths: [llamafactory_identity.json], system_prompt: "You are helpful."}
"""
    )
    plans = run_all(tmp_path)
    hh = Artifact(plans["hh"].path)
    assert hh.manifest["layout"] == "pairs" and hh.read().columns[:4] == [
        "id",
        "prompt",
        "chosen",
        "rejected",
    ]
    assert Artifact(plans["orca"].path).read().height == 10
    alp = Artifact(plans["alpaca"].path).read()
    assert alp["messages"][0][0] == {"role": "system", "content": "You are helpful."}
