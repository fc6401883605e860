"""Stage kinds. One module per kind; each defines `Config` (a `StageConfig`) and `run(ctx)`.

Stage modules import only light things at module level (pydantic, the core); heavy libraries
(torch, transformers, vllm, polars, duckdb) are imported inside `run`, so that loading and
validating a pipeline stays instant.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Any

# kind -> module. A kind whose module is absent is reported as unknown.
KINDS: dict[str, str] = {
    "corpus": "distill.stages.corpus",
    "load": "distill.stages.load",
    "generate": "distill.stages.generate",
    "curate": "distill.stages.curate",
    "pairs": "distill.stages.pairs",
    "cpt": "distill.stages.cpt",
    "sft": "distill.stages.sft",
    "dpo": "distill.stages.dpo",
    "merge": "distill.stages.merge",
    "evaluate": "distill.stages.evaluate",
    "export": "distill.stages.export",
}

# Extra stage kinds from outside the package: DISTILL_PLUGINS="mykind=my_pkg.my_stage,other=..."
for _item in filter(None, os.environ.get("DISTILL_PLUGINS", "").split(",")):
    _kind, _, _mod = _item.partition("=")
    if _kind.strip() and _mod.strip():
        KINDS.setdefault(_kind.strip(), _mod.strip())


def stage_module(kind: str) -> ModuleType | None:
    mod = KINDS.get(kind)
    if mod is None:
        return None
    try:
        return importlib.import_module(mod)
    except ModuleNotFoundError as e:
        if e.name == mod:
            return None
        raise


def stage_config_class(kind: str) -> Any:
    m = stage_module(kind)
    return getattr(m, "Config", None) if m is not None else None
