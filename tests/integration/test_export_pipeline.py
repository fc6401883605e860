"""Export end to end on a small real pipeline (corpus, teacher generation with a tiny model, a
merge, an evaluation): `to_dir` loads with `datasets.load_dataset` with the right configs and
splits, both cards parse with huggingface_hub and carry the provenance, the exported model loads;
and a push to a Hub-API server on 127.0.0.1 is idempotent (no new commit when nothing changed)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from distill.config import load_pipeline
from distill.core import runner
from tests.helpers.mock_hub import MockHub


def _variant(base: Path, out: Path) -> Path:
    shutil.copytree(base, out)
    sd = load_file(str(base / "model.safetensors"))
    g = torch.Generator().manual_seed(9)
    save_file({k: v + 0.02 * torch.randn(v.shape, generator=g) for k, v in sd.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})  # fmt: skip
    return out


PIPE = """
name: exptest
seed: 1
models:
  student: {{id: "tiny:llama", backend: transformers}}
  teacher: {{id: "tiny:llama", backend: transformers, revision: null}}
  variant: {{id: "{variant}", backend: transformers}}
task: {{kind: sql, dialect: duckdb, schemas: schemas/*.sql}}
stages:
  docs: {{kind: corpus, paths: [docs/*.md], min_chars: 10}}
  answers: {{kind: generate, model: teacher, source: questions.jsonl, prompt: prompts/answer.jinja, n: 2,
            temperature: 0.8, max_tokens: 8}}
  soup: {{kind: merge, method: linear, models: [{{model: student, weight: 1}}, {{model: variant, weight: 1}}]}}
  eval: {{kind: evaluate, models: [student, soup], eval_set: eval.jsonl, prompt: prompts/answer.jinja, max_tokens: 8,
         isolate_models: false}}
  export: {{kind: export, inputs: [docs, answers, eval], model: soup, to_dir: out/ds, license: apache-2.0}}
"""

FILES = {
    "docs/a.md": "# SELECT\nThe SELECT statement retrieves rows from tables in DuckDB.\n",
    "docs/b.md": "# GROUP BY\nGROUP BY groups rows that share values; aggregates apply per group.\n",
    "schemas/emp.sql": "CREATE TABLE emp (id INTEGER, salary INTEGER);\nINSERT INTO emp VALUES (1, 10), (2, 20);\n",
    "questions.jsonl": '{"id": "q1", "question": "How many rows?", "schema": "emp"}\n'
    '{"id": "q2", "question": "Max salary?", "schema": "emp"}\n',
    "eval.jsonl": '{"id": "e1", "question": "How many rows?", "sql": "SELECT count(*) FROM emp", "db": "schemas/emp.sql"}\n',
    "prompts/answer.jinja": "{{ dialect }} question: {{ question }}",
}


@pytest.fixture(scope="module")
def exported(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory):
    import os

    root = tmp_path_factory.mktemp("exp")
    variant = _variant(tiny_llama, root / "variant")
    for rel, text in FILES.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    p = root / "pipeline.yaml"
    p.write_text(PIPE.format(variant=variant))
    old = os.environ.get("DISTILL_INPROCESS")
    os.environ["DISTILL_INPROCESS"] = "1"
    try:
        lp = load_pipeline(p)
        plans = runner.plan(lp)
        ran = runner.run_pipeline(lp, plans, runner.select(lp, plans))
    finally:
        if old is None:
            os.environ.pop("DISTILL_INPROCESS", None)
        else:
            os.environ["DISTILL_INPROCESS"] = old
    assert ran == ["docs", "answers", "soup", "eval", "export"]
    return p, root


def test_to_dir_loads_with_datasets_and_cards_parse(exported):
    from datasets import get_dataset_config_names, load_dataset
    from huggingface_hub import DatasetCard, ModelCard

    p, root = exported
    ds_dir = root / "out" / "ds"
    assert sorted(get_dataset_config_names(str(ds_dir))) == ["answers", "docs"]
    docs = load_dataset(str(ds_dir), "docs")
    assert list(docs) == ["train"] and docs["train"].num_rows == 2 and "text" in docs["train"].column_names
    answers = load_dataset(str(ds_dir), "answers")
    assert answers["train"].num_rows == 4  # 2 questions x n=2
    assert {"messages", "completion", "model"} <= set(answers["train"].column_names)

    card = DatasetCard.load(ds_dir / "README.md")
    assert card.data.license == "apache-2.0"
    assert card.data.size_categories == ["n<1K"] and "text-generation" in card.data.task_categories
    assert [c["config_name"] for c in card.data.configs] == ["docs", "answers"]
    text = card.text
    assert "tiny:llama" in text  # teacher
    assert "prompts/answer.jinja" in text and "temperature=0.8" in text and "n=2" in text
    prov = json.loads((ds_dir / "provenance.json").read_text())
    assert prov["configs"]["answers"]["generation"][0]["sampling"]["temperature"] == 0.8

    mdir = root / "out" / "ds-model"
    mcard = ModelCard.load(mdir / "README.md")
    assert mcard.data.library_name == "transformers"
    assert {r.metric_type for r in mcard.data.eval_results} >= {"execution_accuracy", "valid_sql_rate"}
    assert "| `soup` | merge | linear | models=student (weight 1.0), variant (weight 1.0) |" in mcard.text
    assert "**soup** (this model)" in mcard.text
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(str(mdir))
    assert AutoTokenizer.from_pretrained(str(mdir)).chat_template
    # cached rerun: nothing to do
    lp = load_pipeline(p)
    assert runner.select(lp, runner.plan(lp)) == []


def test_push_is_idempotent_and_never_leaks_the_token(exported, monkeypatch, tmp_path):
    from huggingface_hub import constants

    from distill import hub

    p, root = exported
    art = runner.plan(load_pipeline(p))["export"].path
    token = "hf_" + "x" * 30
    monkeypatch.setenv("HF_TOKEN", token)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # the mock speaks plain LFS
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # only 127.0.0.1 is reached
    with MockHub(tmp_path / "hub") as srv:
        r1 = hub.push_folder(
            art / "dataset", "me/data", "dataset", private=True, revision="v1", endpoint=srv.url
        )
        r2 = hub.push_folder(
            art / "dataset", "me/data", "dataset", private=True, revision="v1", endpoint=srv.url
        )
        m1 = hub.push_folder(art / "model", "me/model", "model", private=True, endpoint=srv.url)
        assert r1["committed"] and not r2["committed"] and r1["commit"] == r2["commit"]
        assert srv.commits("dataset", "me/data", "v1") == 1 and m1["committed"]
        assert srv.repos[("dataset", "me/data")]["private"] is True
        # a changed file makes exactly one new commit, and a file gone locally is deleted remotely
        changed = tmp_path / "changed"
        shutil.copytree(art / "dataset", changed)
        (changed / "provenance.json").write_text("{}\n")
        shutil.rmtree(changed / "data" / "docs")
        r3 = hub.push_folder(changed, "me/data", "dataset", revision="v1", endpoint=srv.url)
        assert r3["committed"] and srv.commits("dataset", "me/data", "v1") == 2
        assert any(f.startswith("data/docs/") for f in r3["deleted"])
        assert srv.files("dataset", "me/data", "v1")["provenance.json"] == b"{}\n"
        assert srv.auth_seen == {f"Bearer {token}"}
        assert any("configs" in c for c in srv.cards) and any("model-index" in c for c in srv.cards)
    for f in art.rglob("*"):
        if f.is_file() and f.suffix in (".json", ".md", ".log"):
            assert token not in f.read_text(errors="replace")


def test_cli_export_to_dir_override(exported, tmp_path):
    import os
    import subprocess
    import sys

    from datasets import load_dataset

    p, root = exported
    target = tmp_path / "elsewhere"
    r = subprocess.run([sys.executable, "-m", "distill.cli", "export", str(p), "--to-dir", str(target), "-m", "release: v1"],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "DISTILL_INPROCESS": "1"})  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert load_dataset(str(target), "answers")["train"].num_rows == 4
    assert (tmp_path / "elsewhere-model" / "model.safetensors").is_file()
