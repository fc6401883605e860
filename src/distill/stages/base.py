"""The stage contract.

A stage module defines:

- `Config(StageConfig)`: a pydantic model (extra keys rejected) of the stage's settings, with
  class variables `OUTPUT` (the layout it produces: "text", "generations", "sft", "pairs",
  "model", "eval", "export") and `ACCEPTS` (layouts its `inputs` may have, or None for any).
  Fields made with `distill.config.speed(...)` change only speed and are not fingerprinted.
  `files()` lists the files/globs (relative to the pipeline root) whose content the stage reads;
  `model_refs()` lists the (key, name) pairs naming a pipeline model or a model-producing stage.
- `run(ctx: StageContext) -> dict | None`: does the work, writing into `ctx.out` (parquet files
  under `ctx.data_dir`, or a model under `ctx.model_dir`); returns metrics for the manifest.
- optionally `check(cfg, lp) -> list[str]`: extra validation for `distill validate` (e.g. that a
  prompt template renders with the variables the stage provides); each string is one error line.
- optionally `CODE_VERSION` (bump it when a change alters results) and `SUBPROCESS = True` for
  stages that must run in their own process so that engine/trainer memory is returned after.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import Field

from distill.config import Strict, speed

__all__ = ["StageConfig", "speed"]


class StageConfig(Strict):
    kind: str
    inputs: list[str] = Field(
        default_factory=list, description="Names of the stages whose artifacts this one reads."
    )
    description: str | None = speed(None, description="Free text; not fingerprinted.")

    OUTPUT: ClassVar[str] = "dataset"
    ACCEPTS: ClassVar[frozenset[str] | None] = None
    USES_TASK: ClassVar[bool] = True  # False: the pipeline's task does not enter the fingerprint

    def output_layout(self) -> str:
        return self.OUTPUT

    def files(self) -> list[str]:
        return []

    def model_refs(self) -> list[tuple[str, str]]:
        return []

    def semantic(self) -> dict[str, Any]:
        """The config minus speed-only fields: what the fingerprint covers."""
        from distill.core.fingerprint import semantic_dump

        return semantic_dump(self)
