"""`distill validate`: config, referenced files, templates and the stage graph."""

from __future__ import annotations

from pathlib import Path

from distill.config import LoadedPipeline, load_pipeline
from distill.core.fingerprint import expand_files
from distill.errors import ConfigError
from distill.stages import stage_module


def check_loaded(lp: LoadedPipeline) -> list[str]:
    """Checks beyond the schema: files exist, stage-specific checks (templates render, ...)."""
    errors: list[str] = []
    where = str(lp.file)
    for name, cfg in lp.stages.items():
        for pat in cfg.files():
            if not expand_files(lp, [pat]) or not all(p.exists() for p in expand_files(lp, [pat])):
                errors.append(f"{where}: stages.{name}: file {pat!r} not found under {lp.root}; fix the path")
        mod = stage_module(cfg.kind)
        check = getattr(mod, "check", None)
        if check is not None:
            errors.extend(f"{where}: stages.{name}: {msg}" for msg in check(cfg, lp))
    task = lp.pipeline.task
    if task is not None:
        pat = getattr(task, "schemas", None) or getattr(task, "schema_file", None)
        if pat and not expand_files(lp, [pat]):
            errors.append(f"{where}: task: no file matches {pat!r} under {lp.root}; fix the path")
    for mname, spec in lp.pipeline.models.items():
        if spec.chat_template and not lp.path(spec.chat_template).is_file():
            errors.append(f"{where}: models.{mname}.chat_template: file {spec.chat_template!r} not found")
    return errors


def validate_pipeline(
    file: Path, profiles: list[str], overrides: list[str], all_profiles: bool = False
) -> list[str]:
    """Validate with the given profiles (and, with all_profiles, each profile alone). Returns what passed."""
    combos: list[list[str]] = [profiles]
    if all_profiles:
        base = load_pipeline(file, [], overrides)
        combos += [[p] for p in base.pipeline.profiles if [p] != profiles]
    names = []
    errors: list[str] = []
    for combo in combos:
        try:
            lp = load_pipeline(file, combo, overrides)
        except ConfigError as e:
            errors.extend(e.lines)
            continue
        errs = check_loaded(lp)
        if errs:
            errors.extend(errs)
        else:
            names.append("+".join(combo) if combo else "no profile")
    if errors:
        raise ConfigError(*dict.fromkeys(errors))
    return names
