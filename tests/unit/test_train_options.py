"""Training stage configs: validation, defaults, and what the fingerprint covers (no torch)."""

from __future__ import annotations

import pytest

from distill.config import load_pipeline
from distill.errors import ConfigError

PIPE = """\
name: t
models:
  student: {{id: tiny:llama}}
stages:
  corpus: {{kind: corpus, paths: [docs/*.md]}}
  cpt: {{kind: cpt, inputs: [corpus], base: student{extra}}}
"""


def load(write_pipeline, extra: str = "", sets: list[str] | None = None):
    p = write_pipeline(PIPE.format(extra=extra), {"docs/a.md": "# doc\n" + "text " * 30})
    return load_pipeline(p, [], sets or [])


def semantic(write_pipeline, *sets: str):
    lp = load(write_pipeline, sets=list(sets))
    return lp.stages["cpt"].semantic()


def test_defaults_and_model_ref(write_pipeline):
    cfg = load(write_pipeline).stages["cpt"]
    assert cfg.method == "lora" and cfg.chain == "merge" and cfg.packing is True
    assert cfg.model_refs() == [("base", "student")]
    assert cfg.resolved_learning_rate() == 2e-4
    assert cfg.output_layout() == "model"


def test_effective_batch_is_fingerprinted_not_its_split(write_pipeline):
    a = semantic(write_pipeline, "stages.cpt.batch_size=8", "stages.cpt.gradient_accumulation_steps=2")
    b = semantic(write_pipeline, "stages.cpt.batch_size=4", "stages.cpt.gradient_accumulation_steps=4")
    c = semantic(
        write_pipeline,
        "stages.cpt.batch_size=4",
        "stages.cpt.gradient_accumulation_steps=2",
        "stages.cpt.launcher.num_processes=2",
    )
    d = semantic(write_pipeline, "stages.cpt.batch_size=4", "stages.cpt.gradient_accumulation_steps=2")
    assert a == b == c
    assert a["effective_batch_size"] == 16 and d["effective_batch_size"] == 8
    assert a != d
    for speed_key in (
        "batch_size",
        "gradient_accumulation_steps",
        "launcher",
        "save_steps",
        "report_to",
        "gradient_checkpointing",
        "padding_free",
        "logging_steps",
    ):
        assert speed_key not in a


def test_speed_fields_do_not_change_semantics(write_pipeline):
    base = semantic(write_pipeline)
    assert base == semantic(
        write_pipeline,
        "stages.cpt.save_steps=7",
        "stages.cpt.report_to=tensorboard",
        "stages.cpt.gradient_checkpointing=true",
        "stages.cpt.eval_steps=5",
    )
    assert base != semantic(write_pipeline, "stages.cpt.learning_rate=0.001")
    assert base != semantic(write_pipeline, "stages.cpt.lora.r=8")


def test_method_options_enter_only_for_their_method(write_pipeline):
    full = semantic(write_pipeline, "stages.cpt.method=full")
    assert "lora" not in full and "partial" not in full
    assert full == semantic(write_pipeline, "stages.cpt.method=full", "stages.cpt.lora.r=64")
    part = semantic(write_pipeline, "stages.cpt.method=partial")
    assert part["partial"]["last_n_layers"] == 2
    lora = semantic(write_pipeline)
    assert lora["lora"]["r"] == 16 and "partial" not in lora


def test_eval_steps_matter_with_early_stopping(write_pipeline):
    a = semantic(
        write_pipeline,
        "stages.cpt.eval_split=0.1",
        "stages.cpt.early_stopping_patience=2",
        "stages.cpt.eval_steps=5",
    )
    b = semantic(
        write_pipeline,
        "stages.cpt.eval_split=0.1",
        "stages.cpt.early_stopping_patience=2",
        "stages.cpt.eval_steps=10",
    )
    assert a != b


@pytest.mark.parametrize(
    "extra,needle",
    [
        (", method: lora2", "method"),
        (", lora: {rank: 8}", "lora.rank: unknown key"),
        (", early_stopping_patience: 2", "needs an eval split"),
        (", method: full, chain: stack", "chain: stack"),
        (", eval_split: 2.5", "eval_split"),
        (", precision: bf17", "precision"),
    ],
)
def test_bad_configs_name_the_key(write_pipeline, extra, needle):
    with pytest.raises(ConfigError) as e:
        load(write_pipeline, extra)
    msg = str(e.value)
    assert needle in msg and "pipeline.yaml:" in msg


def test_unknown_base_gets_a_hint(write_pipeline):
    with pytest.raises(ConfigError, match="did you mean 'student'"):
        load(write_pipeline, sets=["stages.cpt.base=studnet"])


def test_dpo_and_sft_defaults(write_pipeline):
    p = write_pipeline(
        """\
        name: t
        models: {student: {id: tiny:llama}}
        stages:
          sft: {kind: sft, base: student}
          dpo: {kind: dpo, base: sft}
          full: {kind: dpo, base: sft, method: full}
        """
    )
    lp = load_pipeline(p)
    sft, dpo = lp.stages["sft"], lp.stages["dpo"]
    assert sft.prompt_loss_weight == 0.1 and sft.packing is False
    assert dpo.sft_weight > 0 and dpo.beta == 0.1
    assert dpo.resolved_learning_rate() == 5e-5
    assert lp.stages["full"].resolved_learning_rate() == 5e-7
    assert dpo.model_refs() == [("base", "sft")]


def test_validate_reports_missing_accelerate_config(write_pipeline):
    from distill.validate import check_loaded

    lp = load(write_pipeline, ", launcher: {num_processes: 2, accelerate_config: acc/fsdp.yaml}")
    errs = check_loaded(lp)
    assert any("accelerate_config" in e and "fsdp.yaml" in e for e in errs)


def test_prompt_tuning_upstream_cannot_be_merged(write_pipeline):
    from distill.validate import check_loaded

    p = write_pipeline(
        """\
        name: t
        models: {student: {id: tiny:llama}}
        stages:
          a: {kind: sft, base: student, method: prompt_tuning}
          b: {kind: sft, base: a}
        """
    )
    errs = check_loaded(load_pipeline(p))
    assert any("cannot be merged" in e for e in errs)
