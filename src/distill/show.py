"""`distill show`: a readable peek at one stage's artifact."""

from __future__ import annotations

import json

from distill.config import LoadedPipeline
from distill.core.artifacts import Artifact
from distill.errors import UsageError


def show_artifact(lp: LoadedPipeline, stage: str, rows: int) -> None:
    from rich.console import Console
    from rich.table import Table

    from distill.core import runner

    if stage not in lp.stages:
        raise UsageError(f"{lp.file}: no stage named {stage!r}; stages: {', '.join(lp.stages)}")
    p = runner.plan(lp)[stage]
    con = Console(soft_wrap=True)
    if p.state != "done":
        raise UsageError(f"stage {stage!r} is {p.state} ({'; '.join(p.reasons)}); run it first")
    art = Artifact(p.path)
    man = art.manifest
    con.print(f"[bold]{stage}[/] ({man['kind']}, {man['layout']}) {art.path}")
    con.print(
        f"fingerprint {man['fingerprint'][:12]}  rows {man.get('rows')}  wall {man['timings']['wall_s']}s"
    )
    if man.get("metrics"):
        con.print("metrics: " + json.dumps(man["metrics"], default=str)[:2000])
    if man.get("model"):
        con.print("model: " + json.dumps(man["model"], default=str))
    files = art.data_files()
    if not files:
        con.print("files: " + ", ".join(man.get("files", [])[:20]))
        return
    df = art.read().head(rows)
    t = Table(show_lines=True)
    for c in df.columns:
        t.add_column(c, overflow="fold", max_width=60)
    for r in df.iter_rows():
        t.add_row(*[_cell(v) for v in r])
    con.print(t)


def _cell(v: object) -> str:
    s = json.dumps(v, default=str, ensure_ascii=False) if isinstance(v, list | dict) else str(v)
    return s if len(s) <= 400 else s[:400] + "…"
