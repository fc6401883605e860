"""Dataset and model cards: metadata huggingface_hub parses back, size categories, a folder that
`datasets` loads, and push errors that are one line without the token."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from distill import hub
from distill.errors import DistillError


def test_size_categories():
    assert hub.size_category(0) == "n<1K" and hub.size_category(999) == "n<1K"
    assert hub.size_category(1000) == "1K<n<10K" and hub.size_category(250_000) == "100K<n<1M"


def test_dataset_folder_and_card(tmp_path: Path):
    from datasets import load_dataset
    from huggingface_hub import DatasetCard

    src = tmp_path / "src"
    src.mkdir()
    pl.DataFrame(
        {"prompt": ["a", "b", "c"], "chosen": ["x", "y", "z"], "rejected": ["p", "q", "r"]}
    ).write_parquet(src / "p.parquet")
    pl.DataFrame({"id": ["d1"], "reason": ["exec_error"]}).write_parquet(src / "dropped.parquet")
    parts = [hub.DatasetPart("pairs", "pairs", [src / "p.parquet"], src / "dropped.parquet",
                             provenance={"teachers": [{"stage": "answers", "model": "Qwen/Qwen2.5-7B", "revision": "abc", "backend": "vllm"}],
                                         "curation": [{"stage": "verified", "kind": "curate", "rows_in": 10, "rows_out": 3,
                                                       "dropped": {"exec_error": 7}, "dedup": {"exact": True},
                                                       "decontaminate": ["eval"]}]})]  # fmt: skip
    out = tmp_path / "ds"
    written = hub.write_dataset_data(out, parts, include_dropped=True)
    assert [p.name for p in written] == ["pairs", "pairs_dropped"] and written[0].rows == 3
    card = hub.dataset_card(
        written, pretty_name="t", pipeline="p", task_desc="SQL", license="mit", repo_id="me/t"
    )
    hub.finish_dataset_dir(out, card, {"x": 1})
    parsed = DatasetCard.load(out / "README.md")
    assert parsed.data.license == "mit" and [c["config_name"] for c in parsed.data.configs] == [
        "pairs",
        "pairs_dropped",
    ]
    assert "`Qwen/Qwen2.5-7B` @ `abc`" in parsed.text and "exec_error: 7" in parsed.text
    assert "Decontaminated (`verified`) against: `eval`" in parsed.text
    assert load_dataset(str(out), "pairs")["train"].num_rows == 3
    assert load_dataset(str(out), "pairs_dropped")["train"]["reason"] == ["exec_error"]


def test_model_card_has_model_index():
    from huggingface_hub import ModelCard

    evals = [{"eval_set": "eval.jsonl", "dialect": "duckdb", "n": 10, "runnable": 9,
              "models": {"base": {"execution_accuracy": 0.2}, "ft": {"execution_accuracy": 0.7, "valid_sql_rate": 1.0}}}]  # fmt: skip
    text = hub.model_card(model_name="me/ft", pipeline="p", task_desc="SQL", is_adapter=True, base_id="Qwen/Qwen2.5-0.5B",
                          base_revision="r1", stages=[], evals=evals, this="ft", repo_id="me/ft", dataset_repo="me/data")  # fmt: skip
    card = ModelCard(text)
    assert card.data.base_model == "Qwen/Qwen2.5-0.5B" and card.data.library_name == "peft"
    assert card.data.datasets == ["me/data"]
    assert {(r.metric_type, r.metric_value) for r in card.data.eval_results} == {
        ("execution_accuracy", 0.7),
        ("valid_sql_rate", 1.0),
    }
    assert "AutoPeftModelForCausalLM" in text and "| **ft** (this model) | 70.0% |" in text


def test_push_error_is_one_line(tmp_path: Path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_secret_value_123")
    (tmp_path / "README.md").write_text("---\nlicense: mit\n---\n")
    with pytest.raises(DistillError) as e:  # nothing listens on this port
        hub.push_folder(tmp_path, "me/x", "dataset", endpoint="http://127.0.0.1:9")
    assert "push to dataset repo me/x failed" in str(e.value) and "hf_secret" not in str(e.value)
