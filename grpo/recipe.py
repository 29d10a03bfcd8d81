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
field and the fix. All of it happens in milliseconds, before any model is loaded: neither this module
nor `grpo.config` imports torch.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import re
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

import rewards
from grpo import judge_training, reward_modeling
from grpo.config import (
    ConfigError,
    FlowMatchingConfig,
    GRPOConfig,
    TrainerConfig,
    VideoTrainerConfig,
    check_choice,
)
from policies.errors import InputError

RESOLVED_RECIPE_FILE = "resolved_recipe.yaml"

# stage -> config class its `trainer` section is validated against; a stage missing here (a trainer
# that validates its own section) keeps `trainer` as a plain dict and `Recipe.args` is None
TRAINER_CONFIGS: dict[str, type[TrainerConfig]] = {
    "pretrain": FlowMatchingConfig,
    "sft": FlowMatchingConfig,
    "grpo": GRPOConfig,
    "reward_model": reward_modeling.RewardModelConfig,
    "judge_sft": judge_training.JudgeSFTConfig,
}

T = TypeVar("T")


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


# --- generic strict dataclass construction ---------------------------------------------------------


def _join(where: str, key: Any) -> str:
    return f"{where}.{key}" if where else str(key)


def _describe_type(hint: Any) -> str:
    origin, args = get_origin(hint), get_args(hint)
    if hint is Any:
        return "any value"
    if hint is type(None):
        return "null"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe_type(a) for a in args)
    if origin is list:
        return f"list[{_describe_type(args[0])}]" if args else "list"
    if origin is dict:
        return f"dict[{_describe_type(args[0])}, {_describe_type(args[1])}]" if args else "mapping"
    if dataclasses.is_dataclass(hint):
        return f"mapping ({hint.__name__})"
    if hint is dict:
        return "mapping"
    return getattr(hint, "__name__", str(hint))


def _describe_value(value: Any) -> str:
    shown = repr(value)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return f"{type(value).__name__} {shown}"


def _check(value: Any, hint: Any, path: str) -> Any:
    """``value`` if it has type ``hint`` (ints are accepted and converted for floats, mappings are
    built into dataclasses); otherwise a `ConfigError` naming ``path``, the expected and given type."""
    origin, args = get_origin(hint), get_args(hint)
    if hint is Any:
        return value
    if origin is Literal:
        check_choice(path, value, args)
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        arms = [a for a in args if a is not type(None)]
        if len(arms) == 1:  # Optional[X]: X's own (more precise) error
            return _check(value, arms[0], path)
        for arm in arms:
            try:
                return _check(value, arm, path)
            except ConfigError:
                continue
        raise ConfigError(path, f"expected {_describe_type(hint)}, got {_describe_value(value)}")
    if dataclasses.is_dataclass(hint):
        return value if isinstance(value, hint) else from_dict(hint, value, where=path)
    expected_ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, int | float) and not isinstance(value, bool),
        str: isinstance(value, str),
    }
    if hint in expected_ok:
        if not expected_ok[hint]:
            raise ConfigError(path, f"expected {_describe_type(hint)}, got {_describe_value(value)}")
        return float(value) if hint is float else value
    if hint is list or origin is list:
        if not isinstance(value, list):
            raise ConfigError(path, f"expected {_describe_type(hint)}, got {_describe_value(value)}")
        return [_check(v, args[0], _join(path, i)) for i, v in enumerate(value)] if args else value
    if hint is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(path, f"expected {_describe_type(hint)}, got {_describe_value(value)}")
        if not args:
            return value
        return {
            _check(k, args[0], _join(path, k)): _check(v, args[1], _join(path, k)) for k, v in value.items()
        }
    raise TypeError(f"from_dict cannot check the type {hint!r} of {path}")


def from_dict(cls: type[T], data: Mapping[str, Any], where: str = "trainer") -> T:
    """Build the dataclass ``cls`` from ``data``, strictly.

    Unknown keys, missing required keys, wrong types and values its ``__post_init__`` rejects all
    raise a one-line `ConfigError` whose ``field`` is the full dotted path under ``where``
    (``trainer.learning_rate``). Supported field types: bool, int, float (ints accepted), str,
    Literal, Optional / unions, list[...], dict[...], nested dataclasses and Any.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(where, f"expected a mapping of keys to values, got {_describe_value(data)}")
    hints = get_type_hints(cls)
    init_fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        path = _join(where, key)
        if key not in init_fields:
            close = difflib.get_close_matches(str(key), list(init_fields), n=1)
            hint = (
                f"did you mean {_join(where, close[0])!r}?"
                if close
                else f"valid keys: {', '.join(init_fields)}"
            )
            raise ConfigError(path, f"unknown key; {hint}")
        kwargs[key] = _check(value, hints[key], path)
    for name, f in init_fields.items():
        if (
            name not in kwargs
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        ):
            help_text = f" ({f.metadata['help']})" if "help" in f.metadata else ""
            raise ConfigError(_join(where, name), f"required key is missing{help_text}")
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise ConfigError(_join(where, err.field), err.problem) from None


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
        config_cls = TRAINER_CONFIGS.get(self.stage)
        if config_cls is not None and issubclass(config_cls, VideoTrainerConfig):
            from grpo.train import data_frame_rate  # grpo.train imports this module

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
            f"{path}: a recipe is a mapping (name, stage, policy, data, ...), got {_describe_value(data)}"
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
    from grpo.train import DATA_SPECS, POLICY_SPECS  # grpo.train imports this module

    return POLICY_SPECS, DATA_SPECS


def _resolved_section(section: dict[str, Any], specs: dict[str, type], where: str) -> dict[str, Any]:
    """A policy / data section with every default of its spec filled in; a section of a kind no spec
    knows is kept as given (validation rejects it before a run writes anything)."""
    spec = specs.get(section["type"])
    return dict(section) if spec is None else dataclasses.asdict(from_dict(spec, section, where=where))


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    """The fully resolved recipe as plain YAML-able data: the policy, data, rewards and trainer
    sections with every default of their specs filled in, so the run is reproduced from it even
    after a default changes."""
    policies, datas = _section_specs(recipe.stage)
    return {
        "name": recipe.name,
        "stage": recipe.stage,
        "output_dir": recipe.output_dir,
        "policy": _resolved_section(recipe.policy, policies, "policy"),
        "data": _resolved_section(recipe.data, datas, "data"),
        "rewards": [dataclasses.asdict(spec) for spec in recipe.rewards],
        "trainer": dataclasses.asdict(recipe.args) if recipe.args is not None else recipe.trainer,
    }


def save_resolved(recipe: Recipe, run_dir: str | os.PathLike[str]) -> Path:
    """Write ``run_dir/resolved_recipe.yaml`` atomically; `load_recipe` reads it back to the same recipe."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    target = run_dir / RESOLVED_RECIPE_FILE
    staging = run_dir / f".{RESOLVED_RECIPE_FILE}.tmp-{os.getpid()}"
    staging.write_text(yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False), encoding="utf-8")
    os.replace(staging, target)
    return target
