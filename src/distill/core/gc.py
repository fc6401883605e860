"""`distill gc`: remove artifacts that no current fingerprint refers to."""

from __future__ import annotations

import shutil
from pathlib import Path

from distill.config import LoadedPipeline
from distill.core.artifacts import StageDir
from distill.core.lock import WorkdirLock


def _size(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def collect(lp: LoadedPipeline, dry_run: bool = False) -> tuple[list[Path], int]:
    from distill.core.runner import plan

    plans = plan(lp)
    victims: list[Path] = []
    wd = lp.workdir
    if not wd.is_dir():
        return [], 0
    for d in sorted(wd.iterdir()):
        if not d.is_dir() or d.name.startswith(".") or d.name == "logs":
            continue
        if d.name not in lp.stages:
            victims.append(d)
            continue
        fp12 = plans[d.name].fingerprint[:12]
        for a in StageDir(wd, d.name).all_artifacts():
            if a.name not in (fp12, f".tmp-{fp12}"):
                victims.append(a)
    freed = sum(_size(v) for v in victims)
    if not dry_run:
        with WorkdirLock(wd):
            for v in victims:
                shutil.rmtree(v)
    return victims, freed
