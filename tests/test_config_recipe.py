"""GRPOConfig / FlowMatchingConfig validation, the strict `from_dict`, YAML recipes and overrides."""

from __future__ import annotations

import dataclasses
import importlib.util
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import yaml

import rewards  # noqa: F401  imported up front: the timings below measure validation, not imports
from grpo.config import ConfigError, FlowMatchingConfig, GRPOConfig, TrainerConfig, VideoTrainerConfig
from grpo.recipe import (
    RESOLVED_RECIPE_FILE,
    Recipe,
    apply_overrides,
    from_dict,
    load_recipe,
    recipe_to_dict,
    save_resolved,
)
from policies.errors import InputError

GOOD_RECIPE = """\
name: tiny-grpo
stage: grpo
policy: {type: ltx, num_layers: 2}
data: {type: toy_world, num_prompts: 16}
rewards:
  - name: math:sqrt
    weight: 1
    kwargs: {scale: 2}
trainer:
  learning_rate: 1e-4
  num_generations: 4
  mixed_precision: no
  timestep_selection: window
  sde_window_size: 2
"""


def write(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(call, *args, **kwargs) -> str:
    with pytest.raises(InputError) as info:
        call(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message, f"error is not one line: {message!r}"
    return message


# --- config dataclasses ----------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [GRPOConfig, FlowMatchingConfig])
def test_every_field_has_a_one_line_help(cls):
    for f in dataclasses.fields(cls):
        help_text = f.metadata.get("help", "")
        assert help_text and "\n" not in help_text and len(help_text) <= 110, f.name


def test_shared_fields_live_once_in_the_base():
    base = {f.name for f in dataclasses.fields(VideoTrainerConfig)}
    grpo = {f.name for f in dataclasses.fields(GRPOConfig)}
    flow = {f.name for f in dataclasses.fields(FlowMatchingConfig)}
    assert grpo & flow == base
    assert base - {f.name for f in dataclasses.fields(TrainerConfig)} == {"frame_rate"}
    assert {"learning_rate", "save_steps", "resume_from_checkpoint", "report_to", "ema_decay"} <= base
    assert {
        "max_steps",
        "batch_size",
        "eval_batch_size",
        "timestep_sampling",
        "logit_mean",
        "logit_std",
    } <= flow - base


def test_trl_names_and_ours_exist():
    names = {f.name for f in dataclasses.fields(GRPOConfig)}
    trl = {
        "num_generations",
        "beta",
        "epsilon",
        "num_iterations",
        "scale_rewards",
        "reward_weights",
        "loss_type",
    }
    trl |= {
        "learning_rate",
        "lr_scheduler_type",
        "warmup_steps",
        "max_grad_norm",
        "gradient_accumulation_steps",
    }
    trl |= {"seed", "output_dir", "logging_steps", "save_steps", "save_total_limit", "resume_from_checkpoint"}
    trl |= {"report_to", "bf16", "gradient_checkpointing"}
    ours = {"num_prompts_per_iteration", "max_iterations", "adv_clip", "reward_aggregation", "sde_kind"}
    ours |= {"noise_level", "timestep_selection", "timestep_fraction", "sde_window_size", "sde_window_start"}
    ours |= {"sde_window_stride", "sde_window_shift_interval", "num_inference_steps", "guidance_scale"}
    ours |= {"cfg_in_training", "logprob_reduction", "ema_decay", "use_lora", "lora_rank", "lora_alpha"}
    ours |= {"lora_target_modules", "mixed_precision", "sample_every", "eval_every", "save_samples"}
    assert trl | ours <= names


@pytest.mark.parametrize(
    ("cls", "kwargs", "expected"),
    [
        (GRPOConfig, {"learning_rate": -1e-4}, "learning_rate: must be > 0"),
        (GRPOConfig, {"epsilon": 0.0}, "epsilon: must be > 0"),
        (GRPOConfig, {"epsilon_high": -0.1}, "epsilon_high: must be > 0 or null"),
        (GRPOConfig, {"num_generations": 1}, "num_generations: must be >= 2"),
        (GRPOConfig, {"timestep_fraction": 0.0}, "timestep_fraction: must be in (0, 1]"),
        (GRPOConfig, {"timestep_fraction": 1.5}, "timestep_fraction: must be in (0, 1]"),
        (
            GRPOConfig,
            {"scale_rewards": "grop"},
            "scale_rewards: must be one of 'group', 'batch', 'none', got 'grop'; did you mean 'group'?",
        ),
        (GRPOConfig, {"sde_kind": "ode"}, "sde_kind: must be one of 'sde', 'cps', 'dance'"),
        (GRPOConfig, {"reward_aggregation": "sum"}, "reward_aggregation: must be one of"),
        (GRPOConfig, {"report_to": ["neptune"]}, "report_to.0: must be one of 'tensorboard', 'wandb'"),
        (GRPOConfig, {"adv_clip": 0.0}, "adv_clip: must be > 0 or null"),
        (GRPOConfig, {"beta": -0.1}, "beta: must be >= 0"),
        (GRPOConfig, {"decode_batch_size": 0}, "decode_batch_size: must be >= 1, got 0"),
        (GRPOConfig, {"ema_decay": 1.0}, "ema_decay: must be in [0, 1)"),
        (GRPOConfig, {"save_total_limit": 0}, "save_total_limit: must be >= 1 or null"),
        (GRPOConfig, {"guidance_scale": 0.5}, "guidance_scale: must be >= 1"),
        (
            GRPOConfig,
            {"sde_kind": "cps", "noise_level": 1.5},
            "noise_level: must be in [0, 1] with sde_kind 'cps'",
        ),
        (GRPOConfig, {"reward_weights": []}, "reward_weights: must not be empty"),
        (GRPOConfig, {"warmup_steps": 10}, "lr_scheduler_type: 'constant' ignores warmup_steps"),
        (
            GRPOConfig,
            {
                "timestep_selection": "window",
                "num_inference_steps": 10,
                "sde_window_size": 4,
                "sde_window_start": 7,
            },
            "sde_window_start: must be in [0, 6]",
        ),
        (
            GRPOConfig,
            {"timestep_selection": "sliding_window", "sde_window_size": 11},
            "sde_window_size: must be in [1",
        ),
        (FlowMatchingConfig, {"timestep_sampling": "normal"}, "timestep_sampling: must be one of 'uniform'"),
        (FlowMatchingConfig, {"logit_std": 0.0}, "logit_std: must be > 0"),
        (FlowMatchingConfig, {"max_steps": 0}, "max_steps: must be >= 1"),
    ],
)
def test_impossible_values_raise_one_line_errors_naming_the_field(cls, kwargs, expected):
    assert error_of(cls, **kwargs).startswith(expected)


def test_window_fields_only_checked_when_a_window_is_used():
    GRPOConfig(num_inference_steps=2, sde_window_size=4)  # 'all': the window size is not used


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is not None, reason="tensorboard is installed")
def test_missing_tracker_package_is_named():
    message = error_of(GRPOConfig, report_to=["tensorboard"])
    assert message.startswith("report_to:") and "pip install tensorboard" in message


def test_bf16_is_an_alias_of_mixed_precision():
    assert GRPOConfig(bf16=True).mixed_precision == "bf16"
    assert GRPOConfig(mixed_precision="bf16").bf16 is True
    assert GRPOConfig().bf16 is False and GRPOConfig().mixed_precision == "no"


def test_sde_steps_for_windows_and_sliding_windows():
    assert GRPOConfig(num_inference_steps=5).sde_steps(7) == [0, 1, 2, 3, 4]
    window = GRPOConfig(
        timestep_selection="window", num_inference_steps=10, sde_window_size=3, sde_window_start=2
    )
    assert window.sde_steps(0) == window.sde_steps(99) == [2, 3, 4]
    # 10 steps, window 4 -> 7 valid starts; moves 3 steps every 2 iterations, wrapping modulo 7
    sliding = GRPOConfig(
        timestep_selection="sliding_window",
        num_inference_steps=10,
        sde_window_size=4,
        sde_window_stride=3,
        sde_window_shift_interval=2,
    )
    starts = [sliding.sde_steps(i)[0] for i in range(12)]
    assert starts == [0, 0, 3, 3, 6, 6, 2, 2, 5, 5, 1, 1]
    assert sliding.sde_steps(4) == [6, 7, 8, 9]
    # a start offset shrinks the range of starts: 10 - 4 - 1 + 1 = 6 positions from 1
    offset = dataclasses.replace(sliding, sde_window_start=1)
    assert [offset.sde_steps(i)[0] for i in range(0, 8, 2)] == [1, 4, 1, 4]


def test_trained_steps_with_a_fraction_are_a_seeded_random_subset():
    config = GRPOConfig(timestep_selection="fraction", num_inference_steps=10, timestep_fraction=0.35)
    draws = [config.trained_steps(0, random.Random(seed)) for seed in range(20)]
    assert all(len(d) == 3 and d == sorted(set(d)) and set(d) <= set(range(10)) for d in draws)
    assert len({tuple(d) for d in draws}) > 1
    assert config.trained_steps(0, random.Random(5)) == config.trained_steps(0, random.Random(5))
    tiny = GRPOConfig(timestep_selection="fraction", num_inference_steps=3, timestep_fraction=0.1)
    assert len(tiny.trained_steps(0, random.Random(0))) == 1
    assert GRPOConfig(num_inference_steps=4).trained_steps(0, random.Random(0)) == [0, 1, 2, 3]


# --- from_dict -------------------------------------------------------------------------------------


@dataclass
class Inner:
    color: str = "red"
    size: int = 1


@dataclass
class Outer:
    rate: float
    flag: bool = False
    mode: Literal["a", "b"] = "a"
    weights: list[float] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    maybe: int | None = None
    either: str | list[str] = "x"
    inner: Inner = field(default_factory=Inner)


def test_from_dict_builds_and_converts():
    built = from_dict(
        Outer,
        {
            "rate": 1,
            "weights": [1, 2.5],
            "counts": {"a": 3},
            "maybe": None,
            "either": ["p"],
            "inner": {"size": 4},
        },
        where="x",
    )
    assert built == Outer(rate=1.0, weights=[1.0, 2.5], counts={"a": 3}, either=["p"], inner=Inner(size=4))
    assert type(built.rate) is float and all(type(w) is float for w in built.weights)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"rate": 1, "rat": 2}, "x.rat: unknown key; did you mean 'x.rate'?"),
        ({"rate": 1, "zzz": 2}, "x.zzz: unknown key; valid keys: rate, flag, mode"),
        ({"rate": 1, "inner": {"colr": "blue"}}, "x.inner.colr: unknown key; did you mean 'x.inner.color'?"),
        ({"rate": "fast"}, "x.rate: expected float, got str 'fast'"),
        ({"rate": True}, "x.rate: expected float, got bool True"),
        ({"rate": 1, "flag": "yes"}, "x.flag: expected bool, got str 'yes'"),
        ({"rate": 1, "mode": "c"}, "x.mode: must be one of 'a', 'b', got 'c'"),
        ({"rate": 1, "weights": [1, "two"]}, "x.weights.1: expected float, got str 'two'"),
        ({"rate": 1, "weights": 3}, "x.weights: expected list[float], got int 3"),
        ({"rate": 1, "counts": {"a": 1.5}}, "x.counts.a: expected int, got float 1.5"),
        ({"rate": 1, "maybe": 2.5}, "x.maybe: expected int, got float 2.5"),
        ({"rate": 1, "either": 3}, "x.either: expected str or list[str], got int 3"),
        ({"rate": 1, "inner": [1]}, "x.inner: expected a mapping of keys to values, got list [1]"),
        ({"flag": True}, "x.rate: required key is missing"),
    ],
)
def test_from_dict_errors_name_the_full_path(data, expected):
    assert error_of(from_dict, Outer, data, where="x").startswith(expected)


def test_from_dict_prefixes_post_init_errors_with_the_path():
    with pytest.raises(ConfigError) as info:
        from_dict(GRPOConfig, {"epsilon": -1}, where="trainer")
    assert info.value.field == "trainer.epsilon"
    assert str(info.value) == "trainer.epsilon: must be > 0, got -1.0"


# --- recipes ---------------------------------------------------------------------------------------


def test_good_recipe_loads_into_a_grpo_config(tmp_path):
    recipe = load_recipe(write(tmp_path, GOOD_RECIPE))
    assert isinstance(recipe.args, GRPOConfig)
    assert recipe.args.learning_rate == 1e-4 and isinstance(recipe.args.learning_rate, float)
    assert recipe.args.mixed_precision == "no"  # YAML 1.1 would have read `no` as False
    assert recipe.args.num_generations == 4 and recipe.args.sde_steps(0) == [0, 1]
    assert recipe.args.reward_weights == [1.0]
    assert recipe.output_dir == recipe.args.output_dir == "runs/tiny-grpo"
    assert recipe.rewards[0].name == "math:sqrt" and recipe.rewards[0].kwargs == {"scale": 2}
    assert recipe.policy == {"type": "ltx", "num_layers": 2}


def test_supervised_stages_validate_against_flow_matching_config(tmp_path):
    text = "name: sft\nstage: sft\npolicy: {type: ltx}\ndata: {type: pairs}\ntrainer: {max_steps: 10}\n"
    recipe = load_recipe(write(tmp_path, text))
    assert isinstance(recipe.args, FlowMatchingConfig) and recipe.args.max_steps == 10
    message = error_of(load_recipe, write(tmp_path, text.replace("max_steps", "num_generations")))
    assert "trainer.num_generations: unknown key" in message


def test_reward_model_stage_checks_its_trainer_section(tmp_path):
    text = "name: rm\nstage: reward_model\npolicy: {type: x}\ndata: {type: y}\ntrainer: {anything: 1}\n"
    with pytest.raises(InputError, match="trainer.anything: unknown key"):
        load_recipe(write(tmp_path, text))


def test_overrides_parse_values_as_yaml(tmp_path):
    overrides = [
        "trainer.learning_rate=3e-5",
        "trainer.report_to=[]",
        "trainer.resume_from_checkpoint=auto",
        "trainer.save_total_limit=null",
        "rewards.0.weight=2.5",
        "policy.num_layers=4",
        "output_dir=/tmp/elsewhere",
    ]
    recipe = load_recipe(write(tmp_path, GOOD_RECIPE), overrides)
    assert recipe.args.learning_rate == 3e-5 and isinstance(recipe.args.learning_rate, float)
    assert recipe.args.resume_from_checkpoint == "auto" and recipe.args.save_total_limit is None
    assert recipe.args.reward_weights == [2.5] and recipe.policy["num_layers"] == 4
    assert recipe.output_dir == recipe.args.output_dir == "/tmp/elsewhere"


def test_override_of_an_unknown_key_fails_like_the_file(tmp_path):
    path = write(tmp_path, GOOD_RECIPE)
    from_override = error_of(load_recipe, path, ["trainer.lerning_rate=1e-4"])
    in_file = error_of(load_recipe, write(tmp_path, GOOD_RECIPE + "  lerning_rate: 1e-4\n", "typo.yaml"))
    expected = "trainer.lerning_rate: unknown key; did you mean 'trainer.learning_rate'?"
    assert from_override == f"{path}: {expected}"
    assert in_file == f"{tmp_path / 'typo.yaml'}: {expected}"


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("trainer.learning_rate", "expected key.sub=value"),
        ("=3", "expected key.sub=value"),
        ("trainer..x=3", "expected key.sub=value"),
        ("rewards.5.weight=1", "rewards is a list of 1 entries; '5' is not an index into it"),
        ("name.x=1", "name is a str, not a mapping; it has no key 'x'"),
        ("trainer.report_to=[a", "the value is not valid YAML"),
    ],
)
def test_malformed_overrides(override, expected):
    raw = {"name": "n", "rewards": [{"name": "r"}], "trainer": {}}
    assert expected in error_of(apply_overrides, raw, [override])


def test_apply_overrides_does_not_modify_its_input():
    raw = {"trainer": {"beta": 0.1}}
    assert apply_overrides(raw, ["trainer.beta=0.2", "trainer.new.deep=1"]) == {
        "trainer": {"beta": 0.2, "new": {"deep": 1}}
    }
    assert raw == {"trainer": {"beta": 0.1}}


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (("trainer:", "trainr:"), "trainr: unknown key; did you mean 'trainer'?"),
        (
            ("num_generations: 4", "num_generations: four"),
            "trainer.num_generations: expected int, got str 'four'",
        ),
        (("num_generations: 4", "num_generations: 1"), "trainer.num_generations: must be >= 2"),
        (("learning_rate: 1e-4", "learning_rate: -1e-4"), "trainer.learning_rate: must be > 0"),
        (("stage: grpo", "stage: rl"), "stage: must be one of 'pretrain', 'sft', 'grpo', 'reward_model'"),
        (("{type: ltx, num_layers: 2}", "{num_layers: 2}"), "policy.type: required key is missing"),
        (("name: tiny-grpo", "name: tiny grpo/x"), "name: 'tiny grpo/x' must be letters"),
        (
            ("name: math:sqrt", "name: math:no_such"),
            "rewards.0.name: reward 'math:no_such': module 'math' has no",
        ),
        (("name: math:sqrt", "name: brightnessss"), "rewards.0.name: unknown reward 'brightnessss'"),
        (("name: math:sqrt", "name: 'a b:c d'"), "rewards.0.name: 'a b:c d' is not a registry name"),
        (("weight: 1", "weight: heavy"), "rewards.0.weight: expected float, got str 'heavy'"),
        (("stage: grpo", "stage: sft"), "rewards: only stage 'grpo' uses rewards"),
        (("trainer:", "output_dir: a\ntrainer:\n  output_dir: b"), "trainer.output_dir: 'b' disagrees"),
        (("trainer:", "trainer:\n  reward_weights: [3]"), "trainer.reward_weights: [3] disagrees"),
    ],
)
def test_bad_recipes_fail_fast_with_one_line_errors(tmp_path, edit, expected):
    path = write(tmp_path, GOOD_RECIPE.replace(*edit, 1))
    start = time.perf_counter()
    message = error_of(load_recipe, path)
    assert time.perf_counter() - start < 0.5
    assert message.startswith(f"{path}: {expected}"), message


def test_grpo_recipe_needs_rewards(tmp_path):
    text = GOOD_RECIPE.split("rewards:")[0] + "trainer: {}\n"
    assert "rewards: stage 'grpo' needs at least one reward" in error_of(load_recipe, write(tmp_path, text))


def test_file_problems(tmp_path):
    assert "does not exist" in error_of(load_recipe, tmp_path / "nope.yaml")
    message = error_of(load_recipe, write(tmp_path, "name: [unclosed\nstage: grpo\n"))
    assert "invalid YAML at line" in message
    assert "a recipe is a mapping" in error_of(load_recipe, write(tmp_path, "- just\n- a list\n"))


def test_recipes_never_construct_python_objects(tmp_path):
    marker = tmp_path / "pwned"
    text = f"name: !!python/object/apply:os.system ['touch {marker}']\nstage: grpo\n"
    assert "invalid YAML" in error_of(load_recipe, write(tmp_path, text))
    assert not marker.exists()


def test_resolved_recipe_round_trips(tmp_path):
    text = GOOD_RECIPE.replace("{type: ltx, num_layers: 2}", "{type: ltx, tiny: true}")
    recipe = load_recipe(
        write(tmp_path, text.replace("num_prompts: 16", "num_train: 16")), ["trainer.beta=0.01"]
    )
    saved = save_resolved(recipe, tmp_path / "run")
    assert saved == tmp_path / "run" / RESOLVED_RECIPE_FILE
    text = saved.read_text()
    for f in dataclasses.fields(GRPOConfig):  # every default is written out
        assert f"\n  {f.name}:" in text
    again = load_recipe(saved)
    assert recipe_to_dict(again) == recipe_to_dict(recipe)
    assert again.args == recipe.args and again.args.beta == 0.01
    assert not list((tmp_path / "run").glob(".*tmp*"))


TOY_SFT = "name: sft\nstage: sft\npolicy: {type: ltx, tiny: true}\ndata: {type: toyworld}\n"


@pytest.mark.parametrize("stage", ["pretrain", "sft", "grpo"])
def test_the_frame_rate_of_every_stage_is_the_datas(tmp_path, stage):
    text = TOY_SFT.replace("stage: sft", f"stage: {stage}")
    text += "rewards: [{name: brightness}]\n" if stage == "grpo" else ""
    assert load_recipe(write(tmp_path, text)).args.frame_rate == 8.0  # the toy world's default
    assert load_recipe(write(tmp_path, text), ["data.fps=12"]).args.frame_rate == 12.0
    assert load_recipe(write(tmp_path, text), ["data.fps=12", "trainer.frame_rate=12"]).args.frame_rate == 12


def test_frame_rate_problems_are_one_line_errors(tmp_path):
    path = write(tmp_path, TOY_SFT)
    message = error_of(load_recipe, path, ["trainer.frame_rate=25"])
    assert "trainer.frame_rate: 25 disagrees with data.fps 8; set the frame rate once, in data.fps" in message
    assert "data.fps: must be a positive number, got 0" in error_of(load_recipe, path, ["data.fps=0"])
    manifest = ["data.type=nsp_manifest", f"data.path={path}"]
    assert "data.fps: required" in error_of(load_recipe, path, manifest)
    assert load_recipe(path, [*manifest, "data.fps=24"]).args.frame_rate == 24.0


def test_a_policy_trained_at_another_frame_rate_is_refused(tmp_path):
    from grpo.config import write_trained_frame_rate
    from grpo.train import validate
    from policies.tiny import build_tiny_ltx

    policy = build_tiny_ltx(tmp_path / "policy")
    write_trained_frame_rate(policy, 25.0)
    path = write(tmp_path, TOY_SFT)
    overrides = ["policy.tiny=false", f"policy.path={policy}"]
    message = error_of(validate, load_recipe(path, overrides))
    assert "was trained at 25 fps but data.fps is 8: set data.fps: 25" in message
    validate(load_recipe(path, [*overrides, "data.fps=25"]))


def test_resolved_recipe_fills_in_the_policy_and_data_defaults(tmp_path):
    """The policy and data sections are written with every default of their specs, so the run is
    reproduced from the file even after a default changes."""
    from grpo import train

    recipe = load_recipe(write(tmp_path, TOY_SFT), ["data.num_train=64"])
    resolved = yaml.safe_load(save_resolved(recipe, tmp_path / "run").read_text())
    assert resolved["policy"] == dataclasses.asdict(train.LTXPolicySpec(tiny=True))
    assert resolved["policy"]["torch_dtype"] == "float32" and "device" in resolved["policy"]
    assert resolved["data"] == dataclasses.asdict(train.ToyWorldDataSpec(num_train=64))
    assert resolved["data"]["num_eval"] == 32 and resolved["data"]["fps"] == 8.0
    again = load_recipe(tmp_path / "run" / RESOLVED_RECIPE_FILE)
    assert recipe_to_dict(again) == recipe_to_dict(recipe) and again.args == recipe.args


def test_recipe_dataclass_validates_when_built_directly():
    recipe = Recipe(
        name="r", stage="pretrain", policy={"type": "ltx"}, data={"type": "d"}, trainer={"max_steps": 5}
    )
    assert isinstance(recipe.args, FlowMatchingConfig) and recipe.args.output_dir == "runs/r"


def test_tuple_fields_are_read_from_yaml_lists():
    """Tuple fields (the judge's choices and aspects) come from YAML lists; a wrong length or element
    is a one-line error naming the key (they were a TypeError, so a resolved judge recipe could not
    load back)."""
    from rewards.judge.config import JudgeConfig

    config = from_dict(JudgeConfig, {"choices": ["good", "bad"], "aspects": ["physics"]}, where="judge")
    assert config.choices == ("good", "bad") and config.aspects == ("physics",)
    assert "judge.choices: expected list of 2 (str, str), got list ['a']" in error_of(
        from_dict, JudgeConfig, {"choices": ["a"]}, where="judge"
    )
    assert "judge.aspects.1: expected str, got int 3" in error_of(
        from_dict, JudgeConfig, {"aspects": ["physics", 3]}, where="judge"
    )


def test_a_tiny_models_sizes_are_checked_at_validation_under_their_full_path(tmp_path):
    """A misspelt ``policy.tiny_spec`` key of a reward model failed only when the model was built,
    after the run directory was written; now validation names it, with the did-you-mean path."""
    from grpo.train import validate

    recipe = load_recipe(
        "recipes/toy_reward_model.yaml", [f"output_dir={tmp_path / 'run'}", "policy.tiny_spec.hiden=3"]
    )
    assert error_of(validate, recipe) == (
        "policy.tiny_spec.hiden: unknown key; did you mean 'policy.tiny_spec.hidden_size'?"
    )
    assert not (tmp_path / "run").exists()
