"""SDPOConfig: the seed's fields and defaults, validation naming the field, YAML, presets, packaging."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest
from trl import GRPOConfig, TrlParser

from sdpo_core import PRESETS, SDPOConfig

SEED_DEFAULTS = {
    "enabled": True,
    "alpha": 0.5,
    "full_logit_distillation": True,
    "distillation_topk": 100,
    "distillation_add_tail": True,
    "is_clip": 2.0,
    "teacher_mode": "ema",
    "teacher_update_rate": 0.05,
    "apply_chat_template_kwargs": {},
    "success_reward_threshold": 1.0,
    "dont_reprompt_on_self_success": True,
    "remove_thinking_from_demonstration": True,
    "include_environment_feedback": True,
    "environment_feedback_only_without_solution": True,
    "max_reprompt_length": 10240,
    "reprompt_truncation": "right",
    "reprompt_template": "{prompt}{solution}{feedback}\n\nCorrectly solve the original question.\n",
    "solution_template": "\nCorrect solution:\n\n{successful_previous_attempt}\n\n",
    "feedback_template": "\nThe following is feedback from your unsuccessful earlier attempt:\n\n{feedback_raw}\n\n",
}


def test_seed_fields_and_defaults():
    config = SDPOConfig()
    for name, default in SEED_DEFAULTS.items():
        assert getattr(config, name) == default, name


def test_every_field_has_help_text_and_docs():
    for field in dataclasses.fields(SDPOConfig):
        assert field.metadata.get("help"), field.name
        assert f"{field.name} (`" in SDPOConfig.__doc__, field.name


def test_no_field_collides_with_grpo_config():
    grpo = {f.name for f in dataclasses.fields(GRPOConfig)}
    assert not grpo & {f.name for f in dataclasses.fields(SDPOConfig)}


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"alpha": 1.5}, "alpha"),
    ({"alpha": -0.1}, "alpha"),
    ({"full_logit_distillation": False, "alpha": 0.5}, "full_logit_distillation"),
    ({"distillation_topk": 0}, "distillation_topk"),
    ({"teacher_mode": "live"}, "teacher_mode"),
    ({"teacher_update_rate": 2.0}, "teacher_update_rate"),
    ({"reprompt_truncation": "middle"}, "reprompt_truncation"),
    ({"reprompt_template": "{prompt}{solution}"}, "reprompt_template"),
    ({"solution_template": "no placeholder"}, "solution_template"),
    ({"feedback_template": "{feedback}"}, "feedback_template"),
    ({"is_clip": 0.0}, "is_clip"),
    ({"max_reprompt_length": 0}, "max_reprompt_length"),
    ({"loss_aggregation": "sum"}, "loss_aggregation"),
    ({"demo_selection": "best"}, "demo_selection"),
    ({"apply_chat_template_kwargs": "{not json"}, "apply_chat_template_kwargs"),
])
def test_invalid_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SDPOConfig(**kwargs)


def test_token_level_mode_with_reverse_kl_is_valid():
    assert not SDPOConfig(full_logit_distillation=False, alpha=1.0).full_logit_distillation


def test_unknown_keys_are_rejected():
    """The reference's LCB script passes the stale key `ema_update_rate`: we refuse it."""
    with pytest.raises(TypeError, match="ema_update_rate"):
        SDPOConfig(ema_update_rate=0.01)


def test_presets_set_the_run_values():
    lcb = SDPOConfig.from_preset("reference_lcb")
    assert (lcb.alpha, lcb.distillation_topk, lcb.teacher_update_rate) == (1.0, 20, 0.01)
    assert lcb.reprompt_template.endswith("question.")
    generalization = SDPOConfig.from_preset("reference_generalization", alpha=0.3)
    assert not generalization.include_environment_feedback
    assert generalization.alpha == 0.3
    assert set(PRESETS) == {"reference_lcb", "reference_generalization", "guarded", "guarded_sharp", "paper"}
    assert SDPOConfig.from_preset("paper") == SDPOConfig()
    with pytest.raises(ValueError, match="unknown SDPO preset"):
        SDPOConfig.from_preset("nope")


def test_guards_are_off_by_default():
    config = SDPOConfig()
    assert (config.distillation_weight, config.route_by_success) == (1.0, False)
    assert (config.teacher_update_rate_schedule, config.teacher_update_rate_final) == ("constant", None)
    assert config.teacher_reset_every is None
    assert config.teacher_temperature == 1.0


def test_guarded_preset_loads_and_is_valid():
    guarded = SDPOConfig.from_preset("guarded")
    assert guarded.distillation_weight == 0.5
    assert guarded.teacher_update_rate == 0.01
    assert guarded.enabled
    assert guarded.teacher_mode == "ema"
    assert {k: v for k, v in guarded.to_dict().items() if k not in PRESETS["guarded"]} == {
        k: v for k, v in SDPOConfig().to_dict().items() if k not in PRESETS["guarded"]}  # the rest is the seed's
    assert SDPOConfig.from_preset("guarded", distillation_weight=0.8).distillation_weight == 0.8


def test_guarded_sharp_is_guarded_with_a_sharper_teacher():
    sharp = SDPOConfig.from_preset("guarded_sharp")
    assert sharp.teacher_temperature == 0.9
    assert sharp == SDPOConfig.from_preset("guarded", teacher_temperature=0.9)


@pytest.mark.parametrize(("kwargs", "fields"), [
    ({"distillation_weight": 1.5}, ["distillation_weight"]),
    ({"distillation_weight": -0.1}, ["distillation_weight"]),
    ({"enabled": False, "distillation_weight": 0.5}, ["enabled", "distillation_weight"]),
    ({"enabled": False, "route_by_success": True}, ["enabled", "route_by_success"]),
    ({"enabled": False, "teacher_reset_every": 4}, ["enabled", "teacher_reset_every"]),
    ({"route_by_success": True, "distillation_weight": 0.5}, ["route_by_success", "distillation_weight"]),
    ({"teacher_update_rate_schedule": "step"}, ["teacher_update_rate_schedule"]),
    ({"teacher_update_rate_schedule": "linear"}, ["teacher_update_rate_schedule", "teacher_update_rate_final"]),
    ({"teacher_update_rate_final": 0.01}, ["teacher_update_rate_final", "constant"]),
    ({"teacher_update_rate_schedule": "cosine", "teacher_update_rate_final": 1.5}, ["teacher_update_rate_final"]),
    ({"teacher_reset_every": 0}, ["teacher_reset_every"]),
    ({"teacher_reset_every": 2.5}, ["teacher_reset_every"]),
    ({"teacher_mode": "frozen", "teacher_reset_every": 4}, ["teacher_reset_every", "frozen"]),
    ({"teacher_mode": "frozen", "teacher_update_rate_schedule": "linear", "teacher_update_rate_final": 0.0},
     ["teacher_update_rate_schedule", "frozen"]),
    ({"teacher_mode": "trust_region", "teacher_update_rate_schedule": "linear", "teacher_update_rate_final": 0.0},
     ["teacher_update_rate_schedule", "trust_region"]),
    ({"teacher_update_rate": 0.0, "teacher_reset_every": 4}, ["teacher_reset_every", "teacher_update_rate"]),
    ({"teacher_temperature": 0.0}, ["teacher_temperature"]),
    ({"teacher_temperature": float("inf")}, ["teacher_temperature"]),
    ({"enabled": False, "teacher_temperature": 0.9}, ["enabled", "teacher_temperature"]),
])
def test_contradicting_guards_name_the_fields(kwargs, fields):
    with pytest.raises(ValueError, match=fields[0]) as error:
        SDPOConfig(**kwargs)
    for field in fields:
        assert field in str(error.value), (field, str(error.value))


def test_valid_guard_combinations():
    assert SDPOConfig(distillation_weight=0.0).distillation_weight == 0.0
    assert SDPOConfig(route_by_success=True, teacher_reset_every=8).route_by_success
    schedule = SDPOConfig(teacher_update_rate_schedule="cosine", teacher_update_rate_final=0.0,
                          teacher_mode="lora_ema")
    assert schedule.teacher_update_rate_final == 0.0
    rising = SDPOConfig(teacher_update_rate=0.0, teacher_update_rate_schedule="linear",
                        teacher_update_rate_final=0.05, teacher_reset_every=4)
    assert rising.teacher_reset_every == 4


def test_yaml_with_grpo_fields(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("output_dir: out\nuse_cpu: true\nnum_generations: 4\nalpha: 1.0\ndistillation_topk: 20\n"
                    "teacher_mode: frozen\napply_chat_template_kwargs:\n  enable_thinking: false\n")
    grpo, sdpo = TrlParser((GRPOConfig, SDPOConfig)).parse_args_and_config(["--config", str(path)])
    assert grpo.num_generations == 4
    assert (sdpo.alpha, sdpo.distillation_topk, sdpo.teacher_mode) == (1.0, 20, "frozen")
    assert sdpo.apply_chat_template_kwargs == {"enable_thinking": False}


def test_cli_flags_parse_into_config():
    _, sdpo = TrlParser((GRPOConfig, SDPOConfig)).parse_args_and_config(
        ["--output_dir", "o", "--use_cpu", "--alpha", "0.0", "--distillation_topk", "5", "--is_clip", "1.5",
         "--apply_chat_template_kwargs", '{"enable_thinking": true}']
    )
    assert (sdpo.alpha, sdpo.distillation_topk, sdpo.is_clip) == (0.0, 5, 1.5)
    assert sdpo.apply_chat_template_kwargs == {"enable_thinking": True}


def test_runtime_dependencies_are_minimal_and_pinned():
    """docs/peers.md SDPO-RL-12: test tools as runtime deps and an unbounded trl."""
    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    deps = project["dependencies"]
    assert "trl>=1.16,<1.17" in deps  # the trainer overrides private GRPOTrainer seams: a tested range only
    assert "torch>=2.13,<2.15" in deps  # a range, so the distribution installs beside vLLM's own torch pin
    assert not [d for d in deps if d.split(">")[0].split("=")[0] in {"pytest", "matplotlib", "ruff", "mypy"}]
