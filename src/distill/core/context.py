"""What a stage sees while it runs (`StageContext`) and how it names models (`ResolvedModel`)."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from distill.core.artifacts import Artifact, ShardSet
from distill.core.log import Progress, get_logger

if TYPE_CHECKING:
    import logging

    from distill.config import LoadedPipeline, ModelSpec


@dataclass
class ResolvedModel:
    """A model ready to load.

    `path` is what `from_pretrained`/vLLM take (a Hub id or a local folder); `adapter` is a PEFT
    adapter folder to apply on top, if any. `spec` carries dtype/backend/engine settings: for a
    model produced by a stage it is the spec of the pipeline model at the root of its chain.
    """

    name: str
    path: str
    spec: ModelSpec
    revision: str | None = None
    adapter: Path | None = None
    stage: str | None = None
    identity: str = ""

    @property
    def is_local(self) -> bool:
        return Path(self.path).exists()


@dataclass
class StageContext:
    lp: LoadedPipeline
    name: str
    fingerprint: str
    out: Path
    input_paths: dict[str, Path]
    logfile: Path | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    manifest_extra: dict[str, Any] = field(default_factory=dict)

    # -- what the stage reads -----------------------------------------------------------------
    @property
    def cfg(self) -> Any:
        return self.lp.stages[self.name]

    @property
    def kind(self) -> str:
        return str(self.cfg.kind)

    @property
    def pipeline(self) -> Any:
        return self.lp.pipeline

    @property
    def task(self) -> Any:
        return self.lp.pipeline.task

    @property
    def root(self) -> Path:
        return self.lp.root

    @property
    def workdir(self) -> Path:
        return self.lp.workdir

    @property
    def seed(self) -> int:
        return int(self.lp.pipeline.seed)

    @property
    def inputs(self) -> dict[str, Artifact]:
        return {k: Artifact(v) for k, v in self.input_paths.items()}

    def input(self, name: str | None = None) -> Artifact:
        """The single input (or the named one)."""
        if name is None:
            if len(self.input_paths) != 1:
                raise ValueError(
                    f"stage {self.name} has {len(self.input_paths)} inputs; name the one to read"
                )
            name = next(iter(self.input_paths))
        return Artifact(self.input_paths[name])

    def path(self, rel: str | Path) -> Path:
        """A path from the config, resolved against the pipeline root."""
        return self.lp.path(rel)

    def files(self, pattern: str) -> list[Path]:
        from distill.core.fingerprint import expand_files

        return expand_files(self.lp, [pattern])

    @property
    def log(self) -> logging.Logger:
        return get_logger(f"stage.{self.name}")

    def rng(self, salt: str = "") -> random.Random:
        return random.Random(f"{self.seed}:{self.name}:{salt}")

    # -- where the stage writes ------------------------------------------------------------------
    @property
    def data_dir(self) -> Path:
        d = self.out / "data"
        d.mkdir(parents=True, exist_ok=True)
        return d

    @property
    def model_dir(self) -> Path:
        d = self.out / "model"
        d.mkdir(parents=True, exist_ok=True)
        return d

    @property
    def scratch_dir(self) -> Path:
        """Kept across restarts of the same fingerprint (checkpoints live here); removed on success."""
        d = self.out / "scratch"
        d.mkdir(parents=True, exist_ok=True)
        return d

    def shards(self, subdir: str = "data", prefix: str = "part") -> ShardSet:
        return ShardSet(self.out, subdir, prefix)

    def write_table(self, df: Any, name: str = "data") -> Path:
        """Write a whole (small) table: `data/part-00000.parquet`, or `<name>.parquet` beside data/."""
        if name == "data":
            p = self.data_dir / "part-00000.parquet"
        else:
            p = self.out / f"{name}.parquet"
        df.write_parquet(p)
        return p

    def progress(self, total: int | None, desc: str | None = None, unit: str = "items") -> Progress:
        return Progress(total, desc or self.name, unit)

    # -- models -----------------------------------------------------------------------------------
    def model(self, ref: str) -> ResolvedModel:
        """Resolve a model name (pipeline `models`) or a model-producing stage name."""
        lp = self.lp
        if ref in lp.pipeline.models:
            spec = lp.pipeline.models[ref]
            if spec.id.startswith("tiny:"):
                from distill.tiny import ensure_tiny_model

                path = ensure_tiny_model(self.workdir / ".models", spec.id.split(":", 1)[1], seed=spec.seed)
                return ResolvedModel(ref, str(path), spec, identity=spec.id)
            local = lp.path(spec.id)
            if local.exists():
                return ResolvedModel(ref, str(local.resolve()), spec, identity=str(local))
            return ResolvedModel(
                ref, spec.id, spec, revision=spec.revision, identity=f"{spec.id}@{spec.revision}"
            )
        if ref in self.input_paths or ref in lp.stages:
            art_path = self.input_paths.get(ref)
            if art_path is None:
                raise ValueError(
                    f"stage {self.name} names model {ref!r} but it is not among its dependencies"
                )
            return model_from_artifact(self.lp, ref, Artifact(art_path))
        raise ValueError(f"unknown model {ref!r}")


def model_from_artifact(lp: LoadedPipeline, stage: str, art: Artifact) -> ResolvedModel:
    """A model artifact's manifest says what it is: {"model": {"type": "full"|"adapter", "base": ...}}."""
    man = art.manifest
    info = man.get("model") or {"type": "full"}
    root_name = info.get("root_model")
    spec = lp.pipeline.models.get(root_name) if root_name else None
    if spec is None:
        from distill.config import ModelSpec

        spec = ModelSpec(id=str(art.model_dir))
    if info.get("type") == "adapter":
        return ResolvedModel(
            stage,
            str(info["base_path"]),
            spec,
            revision=info.get("base_revision"),
            adapter=art.model_dir,
            stage=stage,
            identity=man["fingerprint"],
        )
    return ResolvedModel(stage, str(art.model_dir), spec, stage=stage, identity=man["fingerprint"])


def read_json(p: Path) -> Any:
    return json.loads(p.read_text())
