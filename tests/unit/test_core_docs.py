"""Generated references (CLI, config) must match the code; shipped pipelines must validate."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_generated_docs_are_current():
    r = subprocess.run(
        [sys.executable, "-m", "distill.docgen", "--check"], capture_output=True, text=True, cwd=REPO
    )
    assert r.returncode == 0, r.stdout + r.stderr


PIPELINES = sorted((REPO / "pipelines").glob("*.yaml"))


@pytest.mark.parametrize("pipeline", PIPELINES, ids=[p.name for p in PIPELINES])
def test_shipped_pipelines_validate_with_every_profile(pipeline):
    from distill.validate import validate_pipeline

    names = validate_pipeline(pipeline, [], [], all_profiles=True)
    assert "no profile" in names
