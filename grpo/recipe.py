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
field and the fix. All of it happens before any model is loaded. The strict checks themselves
(`from_dict`) and the resolved recipe a run writes (`save_resolved`) live in `grpo.schema`, which the
stages use too.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

import rewards
from grpo import judge_training, reward_modeling
from grpo.config import (
    ConfigError,
    FlowMatchingConfig,
    GRPOConfig,
    TrainerConfig,
    VideoTrainerConfig,
)
from grpo.schema import RESOLVED_RECIPE_FILE, describe_value, from_dict, recipe_to_dict, save_resolved
from grpo.train import DATA_SPECS, POLICY_SPECS, data_frame_rate
from policies.errors import InputError

__all__ = [
    "RESOLVED_RECIPE_FILE",
    "TRAINER_CONFIGS",
    "Recipe",
    "RewardSpec",
    "apply_overrides",
    "from_dict",
    "load_recipe",
    "recipe_to_dict",
    "save_resolved",
]

# stage -> config class its `trainer` section is validated against; a stage missing here (a trainer
# that validates its own section) keeps `trainer` as a plain dict and `Recipe.args` is None
TRAINER_CONFIGS: dict[str, type[TrainerConfig]] = {
    "pretrain": FlowMatchingConfig,
    "sft": FlowMatchingConfig,
    "grpo": GRPOConfig,
    "reward_model": reward_modeling.RewardModelConfig,
    "judge_sft": judge_training.JudgeSFTConfig,
}


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
class RewardSpec:
    """One reward of a GRPO recipe."""

    name: str = field(metadata={"help": "registered reward name, or module:function"})
    weight: float = field(default=1.0, metadata={"help": "weight of this reward in the advantage"})
    kwargs: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "keyword arguments for the reward"}
    )

    def __post_init__(self) -> None:
        if ":" in self.name:
            module, _, attr = self.name.partition(":")
            if not (re.fullmatch(r"[A-Za-z_][\w.]*", module) and attr.isidentifier()):
                raise ConfigError("name", f"{self.name!r} is not a registry name or module.path:function")
        elif not self.name:
            raise ConfigError("name", "must not be empty; give a registered reward name or module:function")


@dataclass
class Recipe:
    """A validated recipe. ``args`` is the trainer config built from ``trainer`` (see `TRAINER_CONFIGS`)."""

    name: str = field(metadata={"help": "name of the job; the default output_dir is runs/<name>"})
    stage: Literal["pretrain", "sft", "grpo", "reward_model", "judge_sft"] = field(
        metadata={"help": "which trainer runs: pretrain | sft | grpo | reward_model | judge_sft"}
    )
    policy: dict[str, Any] = field(
        metadata={"help": "the policy: a mapping with a 'type' key and its options"}
    )
    data: dict[str, Any] = field(
        metadata={"help": "the dataset: a mapping with a 'type' key and its options"}
    )
    rewards: list[RewardSpec] = field(default_factory=list, metadata={"help": "rewards (stage grpo only)"})
    trainer: dict[str, Any] = field(default_factory=dict, metadata={"help": "trainer config fields"})
    output_dir: str | None = field(default=None, metadata={"help": "run directory (default runs/<name>)"})
    args: TrainerConfig | None = field(
        default=None, init=False, metadata={"help": "validated trainer config"}
    )
    section_specs: tuple[dict[str, type], dict[str, type]] = field(
        default=({}, {}),
        init=False,
        repr=False,
        compare=False,
        metadata={"help": "the stage's policy and data spec classes by type (`save_resolved` fills them in)"},
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
        if self.stage == "grpo" and not self.rewards:
            raise ConfigError("rewards", "stage 'grpo' needs at least one reward ({name: ..., weight: ...})")
        if self.stage != "grpo" and self.rewards:
            raise ConfigError(
                "rewards", f"only stage 'grpo' uses rewards; remove them from this {self.stage!r} recipe"
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
        if self.stage == "grpo":
            weights = [reward.weight for reward in self.rewards]
            if trainer.setdefault("reward_weights", weights) != weights:
                raise ConfigError(
                    "trainer.reward_weights",
                    f"{trainer['reward_weights']} disagrees with the rewards' weights {weights}; "
                    "set each weight once, in rewards.N.weight",
                )
        self.section_specs = _section_specs(self.stage)
        config_cls = TRAINER_CONFIGS.get(self.stage)
        if config_cls is not None and issubclass(config_cls, VideoTrainerConfig):
            fps = data_frame_rate(self.data)
            if fps is not None and trainer.setdefault("frame_rate", fps) != fps:
                raise ConfigError(
                    "trainer.frame_rate",
                    f"{trainer['frame_rate']} disagrees with data.fps {fps:g}; set the frame rate once, "
                    "in data.fps",
                )
        if config_cls is not None:
            self.args = from_dict(config_cls, trainer, where="trainer")
            self.output_dir = self.args.output_dir
        else:
            self.output_dir = str(trainer["output_dir"])


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


def _section_specs(stage: str) -> tuple[dict[str, type], dict[str, type]]:
    """The policy and data spec classes of a stage, by ``type``."""
    if stage == "reward_model":
        return {"video_reward_model": reward_modeling.RewardModelSpec}, reward_modeling.DATA_SPECS
    if stage == "judge_sft":
        return {"qwen_vl_judge": judge_training.JudgeModelSpec}, judge_training.DATA_SPECS
    return POLICY_SPECS, DATA_SPECS
