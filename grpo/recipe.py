"""YAML recipes: one file describes a runnable job (stage, policy, data, rewards, trainer config).

::

    name: ltx-grpo-brightness
    stage: grpo                     # pretrain | sft | grpo | reward_model | judge_sft
    output_dir: runs/ltx-grpo       # default runs/<name>
    policy: {type: ltx, ...}        # checked by the policy's own code
    data: {type: toy_world, ...}    # checked by the dataset's own code
    rewards:                        # stage grpo only
      - {name: brightness, weight: 1.0, kwargs: {}}   # registry name or module:function
    trainer: {learning_rate: 1.0e-4, num_generations: 8}   # GRPOConfig / FlowMatchingConfig fields

`load_recipe` reads the file (``yaml.safe_load`` semantics with YAML 1.2 scalars: ``1e-4`` is a
number, not a string, and ``no`` / ``off`` are strings, not booleans), applies command-line
overrides ``key.sub=value`` (the value is parsed as YAML; list entries are addressed by index,
``rewards.0.weight=2``), and validates everything strictly: an unknown key names the closest valid
one, a wrong type names the field and the expected and given types, an impossible value names the
field and the fix. All of it happens before any model is loaded.

`STAGES` is the one table of the schema: each stage's trainer config, the spec class (with its check
and builder) of every policy and data ``type`` it accepts, whether it takes rewards, and its runner.
The strict checks themselves (`from_dict`, `section_spec`) and the resolved recipe a run writes
(`save_resolved`) live in `grpo.schema`, which the stages use too.
"""

from __future__ import annotations

import copy
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import yaml

import rewards
from grpo import judge_training, reward_modeling, train
from grpo.config import (
    ConfigError,
    FlowMatchingConfig,
    GRPOConfig,
    TrainerConfig,
    VideoTrainerConfig,
    check_choice,
)
from grpo.schema import (
    RESOLVED_RECIPE_FILE,
    RewardSpec,
    Stage,
    describe_value,
    from_dict,
    recipe_to_dict,
    save_resolved,
)
from policies.errors import InputError

__all__ = [
    "RESOLVED_RECIPE_FILE",
    "TRAINER_CONFIGS",
    "Recipe",
    "STAGES",
    "RewardSpec",
    "apply_overrides",
    "from_dict",
    "load_recipe",
    "recipe_to_dict",
    "save_resolved",
]

# ------------------------------------------------------------------------------------------- the stages

# policy and data kinds of the stages that train a video policy (pretrain and sft need target videos)
VIDEO_POLICIES: dict[str, type] = {
    "ltx": train.LTXPolicySpec,
    "ltx2": train.LTX2PolicySpec,
    "nsp": train.NSPPolicySpec,
    "nextclip": train.NextClipPolicySpec,
}
VIDEO_DATA: dict[str, type] = {
    "toyworld": train.ToyWorldDataSpec,
    "toyworld_clips": train.ToyWorldClipsDataSpec,
    "nsp_manifest": train.ManifestDataSpec,
}

# stage -> its Stage entry: a new stage, policy kind or data kind is one entry here (and its module)
STAGES: dict[str, Stage] = {
    "pretrain": Stage(FlowMatchingConfig, VIDEO_POLICIES, VIDEO_DATA, train.train_policy),
    "sft": Stage(FlowMatchingConfig, VIDEO_POLICIES, VIDEO_DATA, train.train_policy),
    "grpo": Stage(
        GRPOConfig,
        VIDEO_POLICIES,
        {"prompts": train.PromptDataSpec, **VIDEO_DATA},
        train.train_policy,
        rewards=True,
    ),
    "reward_model": Stage(
        reward_modeling.RewardModelConfig,
        {"video_reward_model": reward_modeling.RewardModelSpec},
        {
            "toyworld_preferences": reward_modeling.ToyPreferencesSpec,
            "preferences": reward_modeling.PreferencesSpec,
        },
        reward_modeling.run_recipe,
    ),
    "judge_sft": Stage(
        judge_training.JudgeSFTConfig,
        {"qwen_vl_judge": judge_training.JudgeModelSpec},
        {
            "toyworld_verdicts": judge_training.ToyVerdictsSpec,
            "verdict_manifest": judge_training.VerdictManifestSpec,
        },
        judge_training.run_recipe,
    ),
}
# stage -> config class its `trainer` section is validated against
TRAINER_CONFIGS: dict[str, type[TrainerConfig]] = {name: stage.config for name, stage in STAGES.items()}
StageName = Literal[tuple(STAGES)]


class _RecipeLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` (no object construction) with YAML 1.2 scalars: ``1e-4`` is a float and only
    true/false are booleans (``mixed_precision: no`` stays the string 'no')."""


_BOOL_TAG = "tag:yaml.org,2002:bool"
_RecipeLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _BOOL_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_RecipeLoader.add_implicit_resolver(
    _BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_RecipeLoader)  # noqa: S506 - a SafeLoader subclass


# --- the recipe schema -----------------------------------------------------------------------------


@dataclass
class Recipe:
    """A validated recipe. ``schema`` is its stage's entry of `STAGES`; ``args`` the trainer config built
    from ``trainer``."""

    name: str = field(metadata={"help": "name of the job; the default output_dir is runs/<name>"})
    stage: StageName = field(metadata={"help": f"which trainer runs: {' | '.join(STAGES)}"})
    policy: dict[str, Any] = field(
        metadata={"help": "the policy: a mapping with a 'type' key and its options"}
    )
    data: dict[str, Any] = field(
        metadata={"help": "the dataset: a mapping with a 'type' key and its options"}
    )
    rewards: list[RewardSpec] = field(default_factory=list, metadata={"help": "rewards (stage grpo only)"})
    trainer: dict[str, Any] = field(default_factory=dict, metadata={"help": "trainer config fields"})
    output_dir: str | None = field(default=None, metadata={"help": "run directory (default runs/<name>)"})
    args: TrainerConfig = field(init=False, metadata={"help": "validated trainer config"})
    schema: Stage = field(
        init=False,
        repr=False,
        compare=False,
        metadata={"help": "the stage's entry of STAGES: what the sections are checked against and run by"},
    )

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", self.name):
            raise ConfigError(
                "name", f"{self.name!r} must be letters, digits, '_', '.', '-' (it names the run)"
            )
        for section in ("policy", "data"):
            kind = getattr(self, section).get("type")
            if not isinstance(kind, str) or not kind:
                raise ConfigError(
                    f"{section}.type", f"required key is missing; name the {section} kind (a string)"
                )
        check_choice("stage", self.stage, tuple(STAGES))  # also when built directly, not by from_dict
        self.schema = STAGES[self.stage]
        if self.schema.rewards and not self.rewards:
            raise ConfigError(
                "rewards", f"stage {self.stage!r} needs at least one reward ({{name: ..., weight: ...}})"
            )
        if not self.schema.rewards and self.rewards:
            users = " / ".join(repr(name) for name, stage in STAGES.items() if stage.rewards)
            raise ConfigError(
                "rewards", f"only stage {users} uses rewards; remove them from this {self.stage!r} recipe"
            )
        trainer = dict(self.trainer)
        if (
            self.output_dir is not None
            and trainer.setdefault("output_dir", self.output_dir) != self.output_dir
        ):
            raise ConfigError(
                "trainer.output_dir",
                f"{trainer['output_dir']!r} disagrees with output_dir {self.output_dir!r}; set it once",
            )
        trainer.setdefault("output_dir", f"runs/{self.name}")
        if self.schema.rewards:
            weights = [reward.weight for reward in self.rewards]
            if trainer.setdefault("reward_weights", weights) != weights:
                raise ConfigError(
                    "trainer.reward_weights",
                    f"{trainer['reward_weights']} disagrees with the rewards' weights {weights}; "
                    "set each weight once, in rewards.N.weight",
                )
        if issubclass(self.schema.config, VideoTrainerConfig):
            fps = data_frame_rate(self.data, self.schema.data)
            if fps is not None and trainer.setdefault("frame_rate", fps) != fps:
                raise ConfigError(
                    "trainer.frame_rate",
                    f"{trainer['frame_rate']} disagrees with data.fps {fps:g}; set the frame rate once, "
                    "in data.fps",
                )
        self.args = from_dict(self.schema.config, trainer, where="trainer")
        self.output_dir = self.args.output_dir


def data_frame_rate(data: dict[str, Any], kinds: dict[str, type]) -> float | None:
    """The frame rate of a recipe's data section: its ``fps``, or the default of its kind (a spec of
    ``kinds``); None for a kind the stage does not read (`grpo.train.validate` names the problem).

    This is the recipe's one frame rate: `Recipe` copies it into ``trainer.frame_rate``, so
    pretraining, SFT, GRPO rollouts, evaluation and written videos all use the rate of the videos
    the policy learns from. A manifest's videos have their own native rates, so it must name one.
    """
    kind = kinds.get(data.get("type"))
    if kind is None:
        return None
    fps = data.get("fps", next(f.default for f in fields(kind) if f.name == "fps"))
    if fps is None:
        raise ConfigError(
            "data.fps",
            "required: the frame rate the videos are resampled to and the policy trains and generates "
            "at (e.g. 24)",
        )
    if isinstance(fps, bool) or not isinstance(fps, int | float) or not (fps > 0 and math.isfinite(fps)):
        raise ConfigError("data.fps", f"must be a positive number, got {fps!r}")
    return float(fps)


# --- loading, overrides, saving --------------------------------------------------------------------


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Set ``key.sub=value`` overrides in (a deep copy of) the raw recipe mapping.

    Values are parsed as YAML (``1e-4`` -> float, ``[a, b]`` -> list, ``null`` -> None, ``x`` -> str);
    missing mappings on the way are created (validation then reports unknown keys exactly as it does
    for the file); list entries are addressed by index.
    """
    data = copy.deepcopy(data)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise InputError(f"override {item!r}: expected key.sub=value, e.g. trainer.learning_rate=1e-4")
        try:
            value = _parse_yaml(text)
        except yaml.YAMLError as err:
            raise InputError(f"override {item!r}: the value is not valid YAML ({_one_line(err)})") from None
        *parents, last = key.split(".")
        node: Any = data
        for depth, part in enumerate(parents):
            if isinstance(node, dict):
                node = node.setdefault(part, {})
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                raise InputError(f"override {item!r}: {_describe_node(parents[:depth], node, part)}")
        if isinstance(node, dict):
            node[last] = value
        elif isinstance(node, list) and last.isdigit() and int(last) < len(node):
            node[int(last)] = value
        else:
            raise InputError(f"override {item!r}: {_describe_node(parents, node, last)}")
    return data


def _describe_node(path: list[str], node: Any, part: str) -> str:
    where = ".".join(path) or "the recipe"
    if isinstance(node, list):
        return f"{where} is a list of {len(node)} entries; {part!r} is not an index into it"
    return f"{where} is a {type(node).__name__}, not a mapping; it has no key {part!r}"


def _one_line(err: yaml.YAMLError) -> str:
    if isinstance(err, yaml.MarkedYAMLError) and err.problem_mark is not None:
        mark = err.problem_mark
        return f"line {mark.line + 1}, column {mark.column + 1}: {err.problem}"
    return " ".join(str(err).split())


def load_recipe(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> Recipe:
    """Read, override and validate a recipe; every problem is a one-line `InputError` naming the file.

    Reward names are looked up in the `rewards` registry (``module:function`` imports the module), so
    a misspelt reward fails here too, before any model is loaded.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(
            f"recipe {str(path)!r} does not exist; give the path of a YAML recipe (see recipes/)"
        )
    try:
        data = _parse_yaml(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise InputError(f"{path}: invalid YAML at {_one_line(err)}") from None
    if not isinstance(data, dict):
        raise InputError(
            f"{path}: a recipe is a mapping (name, stage, policy, data, ...), got {describe_value(data)}"
        )
    try:
        recipe = from_dict(Recipe, apply_overrides(data, overrides), where="")
        _check_reward_names(recipe)
    except InputError as err:
        raise InputError(f"{path}: {err}") from None
    return recipe


def _check_reward_names(recipe: Recipe) -> None:
    for i, spec in enumerate(recipe.rewards):
        try:
            rewards.resolve(spec.name)
        except InputError as err:
            raise ConfigError(f"rewards.{i}.name", str(err)) from None
