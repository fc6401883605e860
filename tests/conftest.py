"""Shared fixtures: tiny local models built once per test session, and pipeline helpers."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import textwrap
from pathlib import Path

import pytest

from distill.stages import KINDS

# A test-only stage kind for exercising the core (tests/helpers/toy_stage.py); the env var makes
# it visible to CLI subprocesses too (the plugin mechanism users have for their own kinds).
REPO = Path(__file__).resolve().parent.parent
os.environ["DISTILL_PLUGINS"] = "toy=tests.helpers.toy_stage"
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")]))
KINDS.setdefault("toy", "tests.helpers.toy_stage")

# Two cores: never let one test's OpenMP pool fight another process for both.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("DISTILL_PLAIN", "1")
# A fresh datasets cache per session: `load_dataset(DIR, config)` keys its cache by folder name and
# config, not content, so a cache left by an earlier run would answer for a new export of the same
# name and hide what the test meant to check.
os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="distill-test-hf-datasets-")
atexit.register(shutil.rmtree, os.environ["HF_DATASETS_CACHE"], True)


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_llama(models_dir: Path) -> Path:
    """A ~0.5M-parameter random Llama with a trained BPE tokenizer and a ChatML template (BOS-adding)."""
    from distill.tiny import ensure_tiny_model

    return ensure_tiny_model(models_dir, "llama", seed=0)


@pytest.fixture(scope="session")
def tiny_qwen2(models_dir: Path) -> Path:
    from distill.tiny import ensure_tiny_model

    return ensure_tiny_model(models_dir, "qwen2", seed=0)


@pytest.fixture
def write_pipeline(tmp_path: Path):
    """write_pipeline(yaml_text, **files) -> path of pipeline.yaml in a fresh project folder.

    `files` maps relative paths to contents, written beside the pipeline (e.g. prompts).
    """

    def _write(text: str, files: dict[str, str] | None = None, name: str = "pipeline.yaml") -> Path:
        for rel, content in (files or {}).items():
            p = tmp_path / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(content)
        p = tmp_path / name
        p.write_text(textwrap.dedent(text))
        return p

    return _write
