"""Pipeline config: broken configs give one located line each, exit code 2, no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from distill.config import load_pipeline, parse_set
from distill.errors import ConfigError

GOOD = """\
name: toy
seed: 3
models:
  teacher: {id: tiny:llama}
stages:
  a: {kind: toy, count: 4}
  b:
    kind: toy
    inputs: [a]
    value: y
profiles:
  smoke:
    stages: {a: {count: 2}}
"""


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "distill.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=120
    )


def test_good_config_loads_with_profile_and_set(write_pipeline):
    p = write_pipeline(GOOD)
    lp = load_pipeline(p, ["smoke"], ["stages.b.value=zz", "seed=7"])
    assert lp.stages["a"].count == 2
    assert lp.stages["b"].value == "zz"
    assert lp.pipeline.seed == 7
    assert lp.workdir == (p.parent / "runs" / "toy").resolve()


def test_set_values_are_yaml_typed():
    assert parse_set("a.b=4") == (["a", "b"], 4)
    assert parse_set("a=[1, 2]") == (["a"], [1, 2])
    assert parse_set("a=true") == (["a"], True)
    assert parse_set("a=hello") == (["a"], "hello")


# (name, yaml text or None for GOOD, extra CLI args, substrings the error must contain)
BROKEN = [
    ("yaml_syntax", "name: toy\nstages:\n  a: {kind: toy\n", [], ["pipeline.yaml:", "YAML syntax error"]),
    (
        "yaml_tab_indent",
        "name: toy\nstages:\n\ta: {kind: toy}\n",
        [],
        ["pipeline.yaml:3", "YAML syntax error"],
    ),
    ("not_mapping", "- a\n- b\n", [], ["pipeline.yaml:1", "mapping"]),
    ("unknown_top_key", GOOD + "sead: 4\n", [], ["pipeline.yaml:14", "sead", "did you mean 'seed'"]),
    (
        "unknown_stage_key",
        GOOD.replace("value: y", "valeu: y"),
        [],
        ["pipeline.yaml:10", "stages.b.valeu", "did you mean 'value'"],
    ),
    (
        "unknown_model_key",
        GOOD.replace("{id: tiny:llama}", "{id: tiny:llama, revison: abc}"),
        [],
        ["pipeline.yaml:4", "models.teacher.revison", "did you mean 'revision'"],
    ),
    (
        "wrong_type",
        GOOD.replace("count: 4", "count: many"),
        [],
        ["pipeline.yaml:6", "stages.a.count", "integer"],
    ),
    ("wrong_type_seed", GOOD.replace("seed: 3", "seed: [1]"), [], ["pipeline.yaml:2", "seed"]),
    ("missing_name", GOOD.replace("name: toy\n", ""), [], ["name", "required"]),
    (
        "missing_kind",
        GOOD.replace("  a: {kind: toy, count: 4}", "  a: {count: 4}"),
        [],
        ["pipeline.yaml:6", "stages.a.kind", "missing"],
    ),
    (
        "unknown_kind",
        GOOD.replace("{kind: toy, count: 4}", "{kind: generatee}"),
        [],
        ["pipeline.yaml:6", "stages.a.kind", "did you mean 'generate'"],
    ),
    (
        "missing_file",
        GOOD.replace("count: 4}", "count: 4, template: prompts/nope.jinja}"),
        ["--validate"],
        ["stages.a", "prompts/nope.jinja", "not found"],
    ),
    (
        "unknown_input",
        GOOD.replace("inputs: [a]", "inputs: [aa]"),
        [],
        ["pipeline.yaml:9", "stages.b.inputs[0]", "unknown stage 'aa'"],
    ),
    (
        "cycle",
        GOOD.replace("  a: {kind: toy, count: 4}", "  a: {kind: toy, count: 4, inputs: [b]}"),
        [],
        ["stages.a", "cycle", "a -> b -> a"],
    ),
    ("unknown_profile", None, ["--profile", "smok"], ["no such profile", "did you mean 'smoke'"]),
    ("bad_set_syntax", None, ["--set", "stages.a.count"], ["--set", "key.path=value"]),
    ("bad_set_value", None, ["--set", "stages.a.count=[1"], ["--set", "not valid YAML"]),
    (
        "bad_set_type",
        None,
        ["--set", "stages.a.count=lots"],
        ["--set stages.a.count=lots", "stages.a.count", "integer"],
    ),
    ("set_into_scalar", None, ["--set", "seed.x=1"], ["--set seed.x=1", "not a mapping"]),
    (
        "profile_bad_key",
        GOOD.replace("stages: {a: {count: 2}}", "stages: {a: {cuont: 2}}"),
        ["--profile", "smoke"],
        ["pipeline.yaml:13", "profile smoke", "did you mean 'count'"],
    ),
    (
        "duplicate_key",
        GOOD.replace("  b:\n", "  a: {kind: toy}\n  b:\n"),
        [],
        ["pipeline.yaml:7", "duplicate key"],
    ),
    ("bad_stage_name", GOOD.replace("  b:\n", "  'b c':\n"), [], ["names use letters"]),
    ("name_clash", GOOD.replace("  b:\n", "  teacher:\n"), [], ["'teacher' names both a model and a stage"]),
    (
        "bad_dtype",
        GOOD.replace("{id: tiny:llama}", "{id: tiny:llama, dtype: fp8}"),
        [],
        ["pipeline.yaml:4", "models.teacher.dtype"],
    ),
    ("missing_pipeline_file", None, ["--file", "nope.yaml"], ["nope.yaml", "no such pipeline file"]),
]


@pytest.mark.parametrize("name,text,args,needles", BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_config_is_one_located_line(write_pipeline, name, text, args, needles):
    args = list(args)
    target = "pipeline.yaml"
    if "--file" in args:
        target = args[args.index("--file") + 1]
        args = []
    p = write_pipeline(text if text is not None else GOOD)
    args = [a for a in args if a != "--validate"]
    r = cli("validate", target, *args, cwd=p.parent)
    assert r.returncode == 2, (r.stdout, r.stderr)
    err = r.stderr
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, f"{needle!r} not in {err!r}"
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert 1 <= len(lines) <= 3, lines
    assert all(ln.startswith("error: ") for ln in lines)


def test_all_errors_reported_together(write_pipeline):
    text = GOOD.replace("value: y", "valeu: y").replace("count: 4", "count: many")
    p = write_pipeline(text)
    with pytest.raises(ConfigError) as ei:
        load_pipeline(p)
    assert len(ei.value.lines) == 2


def test_speed_fields_are_marked():
    from distill.config import ModelSpec, is_speed_field

    assert is_speed_field(ModelSpec, "gpu_memory_utilization")
    assert is_speed_field(ModelSpec, "tensor_parallel_size")
    assert not is_speed_field(ModelSpec, "revision")
