"""The artifact store.

Layout, for a stage `answers` whose fingerprint starts with `3f9c0a1b2c4d`:

    <workdir>/answers/3f9c0a1b2c4d/manifest.json     complete artifact (visible)
    <workdir>/answers/3f9c0a1b2c4d/data/*.parquet    a dataset artifact, or
    <workdir>/answers/3f9c0a1b2c4d/model/            a model artifact
    <workdir>/answers/.tmp-3f9c0a1b2c4d/             work in progress (shards, checkpoints)
    <workdir>/answers/.tmp-3f9c0a1b2c4d/FAILED.json  written when the stage raised

The temporary folder is keyed by the fingerprint, so a killed run finds its committed shards and
checkpoints again when restarted with the same config. It becomes visible by one atomic
`os.rename` after `manifest.json` has been written and fsynced inside it; a folder without a
complete manifest is never reused.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import polars as pl

MANIFEST = "manifest.json"
FAILED = "FAILED.json"


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=False, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


@dataclass
class Artifact:
    """A completed stage output, read-only."""

    path: Path

    @property
    def manifest(self) -> dict[str, Any]:
        return json.loads((self.path / MANIFEST).read_text())

    @property
    def fingerprint(self) -> str:
        return str(self.manifest["fingerprint"])

    @property
    def layout(self) -> str:
        return str(self.manifest.get("layout", "dataset"))

    @property
    def data_dir(self) -> Path:
        return self.path / "data"

    @property
    def model_dir(self) -> Path:
        return self.path / "model"

    def data_files(self, name: str = "") -> list[Path]:
        """Parquet files of the dataset (`data/*.parquet`), or of a named side table (`<name>.parquet`)."""
        if name:
            p = self.path / f"{name}.parquet"
            return [p] if p.is_file() else []
        return sorted(self.data_dir.glob("*.parquet"))

    def read(self, name: str = "") -> pl.DataFrame:
        import polars as pl

        files = self.data_files(name)
        if not files:
            return pl.DataFrame()
        return pl.concat([pl.read_parquet(f) for f in files], how="diagonal_relaxed")

    def scan(self) -> pl.LazyFrame:
        import polars as pl

        return pl.scan_parquet([str(f) for f in self.data_files()])


def count_rows(files: list[Path]) -> int:
    """Row count from parquet footers (no data read)."""
    if not files:
        return 0
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(f).metadata.num_rows for f in files)


class StageDir:
    """Everything under `<workdir>/<stage>/` for one stage name."""

    def __init__(self, workdir: Path, stage: str) -> None:
        self.root = workdir / stage

    def final(self, fp: str) -> Path:
        return self.root / fp[:12]

    def tmp(self, fp: str) -> Path:
        return self.root / f".tmp-{fp[:12]}"

    def done(self, fp: str) -> Artifact | None:
        p = self.final(fp)
        if (p / MANIFEST).is_file():
            try:
                if json.loads((p / MANIFEST).read_text()).get("fingerprint") == fp:
                    return Artifact(p)
            except (OSError, ValueError):
                return None
        return None

    def latest_other(self, fp: str) -> Artifact | None:
        """The most recently completed artifact of this stage with another fingerprint."""
        best: tuple[float, Path] | None = None
        if not self.root.is_dir():
            return None
        for d in self.root.iterdir():
            m = d / MANIFEST
            if d.name.startswith(".") or d.name == fp[:12] or not m.is_file():
                continue
            t = m.stat().st_mtime
            if best is None or t > best[0]:
                best = (t, d)
        return Artifact(best[1]) if best else None

    def all_artifacts(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(d for d in self.root.iterdir() if d.is_dir())

    def begin(self, fp: str) -> Path:
        """Create (or reopen, for resume) the temp folder; clear a previous failure marker."""
        t = self.tmp(fp)
        t.mkdir(parents=True, exist_ok=True)
        (t / FAILED).unlink(missing_ok=True)
        return t

    def commit(self, fp: str, manifest: dict[str, Any]) -> Artifact:
        t = self.tmp(fp)
        write_json_atomic(t / MANIFEST, manifest)
        final = self.final(fp)
        if final.exists():  # an incomplete leftover with the same name (never visible: no manifest)
            shutil.rmtree(final)
        os.rename(t, final)
        fsync_dir(self.root)
        return Artifact(final)


class ShardSet:
    """Numbered shards committed one at a time inside a stage's temp folder, for within-stage resume.

    A shard is `data/part-00007.parquet`; it is written to a hidden temp name, fsynced and renamed,
    so its presence is the commit marker. `committed()` tells a restarted stage which shards it can
    skip. Shards are the final data files: nothing is rewritten at the end, so committed bytes stay
    untouched across resumes.
    """

    def __init__(self, out: Path, subdir: str = "data", prefix: str = "part") -> None:
        self.dir = out / subdir
        self.prefix = prefix
        self.dir.mkdir(parents=True, exist_ok=True)
        for stray in self.dir.glob(".*.tmp"):
            stray.unlink()

    def path(self, i: int) -> Path:
        return self.dir / f"{self.prefix}-{i:05d}.parquet"

    def committed(self) -> set[int]:
        out = set()
        for p in self.dir.glob(f"{self.prefix}-*.parquet"):
            try:
                out.add(int(p.stem.rsplit("-", 1)[1]))
            except ValueError:
                continue
        return out

    def commit(self, i: int, df: pl.DataFrame) -> Path:
        final = self.path(i)
        tmp = self.dir / f".{final.name}.tmp"
        df.write_parquet(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
        fsync_dir(self.dir)
        return final

    def read(self, i: int) -> pl.DataFrame:
        import polars as pl

        return pl.read_parquet(self.path(i))
