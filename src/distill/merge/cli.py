"""`distill merge CONFIG.yaml --out DIR`: a mergekit YAML run outside any pipeline."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from distill.errors import UsageError


def merge_from_yaml(
    config: Path, out: Path, max_shard_size: str = "5GB", seed: int | None = None
) -> dict[str, Any]:
    """Read the YAML, open every model it names (relative to the YAML's folder), merge into `out`.

    The result is written to `<out>.tmp-merge` and renamed, so `out` never holds a half model.
    """
    from distill.merge.config import load_merge_yaml
    from distill.merge.engine import open_model_ref, run_merge

    cfg = load_merge_yaml(config)
    if seed is not None:
        cfg.seed = seed
    root = Path(config).resolve().parent
    if out.exists() and any(out.iterdir()):
        raise UsageError(f"--out {out}: folder exists and is not empty; pick another or remove it")
    sources = {ref: open_model_ref(ref, root) for ref in cfg.referenced_models()}
    tmp = out.parent / f".{out.name}.tmp-merge"
    shutil.rmtree(tmp, ignore_errors=True)
    stats = run_merge(cfg, sources, tmp, max_shard_size)
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    stats["out"] = str(out)
    return stats
