"""Model merging: LoRA into base, multi-model merges (linear, task arithmetic, SLERP, TIES, DARE,
passthrough layer stacking) from mergekit-style configs, and adapter-level combinations.

Everything streams tensor by tensor from safetensors (see `io.py`); `methods.py` holds the
arithmetic, `config.py` the mergekit-compatible YAML, `engine.py` the planner/executor and
`lora.py` the adapter helpers.
"""

from __future__ import annotations

from distill.merge.config import MergeConfig, load_merge_yaml, parse_merge_config
from distill.merge.engine import open_model_ref, run_merge
from distill.merge.lora import combine_adapters, merge_adapter_into_base

__all__ = [
    "MergeConfig",
    "combine_adapters",
    "load_merge_yaml",
    "merge_adapter_into_base",
    "open_model_ref",
    "parse_merge_config",
    "run_merge",
]
