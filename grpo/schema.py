"""The recipe schema: strict dataclasses from YAML mappings, what a stage's sections are checked
against, and the resolved recipe a run writes.

A recipe names a ``stage``; its `Stage` entry (the table is `grpo.recipe.STAGES`) gives the trainer
config its ``trainer`` section is built into, the spec class of each ``policy.type`` and ``data.type``
it accepts, whether it takes ``rewards`` (`RewardSpec`), and the function that runs it. A spec class is
a dataclass checked by `from_dict` (unknown keys with did-you-mean, wrong types, its own
``__post_init__``); it also carries what needs more than its own fields -- ``check(recipe)`` (files,
other sections; a data spec gets the policy spec too) -- and ``build(...)``, which makes the object it
describes (the stage's runner calls it). `section_spec` is that validation, `save_resolved` writes
``resolved_recipe.yaml`` with every default filled in. The stages use all of it, so it lives here,
below the stage modules and the table that names them.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from grpo.config import ConfigError, TrainerConfig, check_choice
from policies.errors import InputError
from rewards.composite import CompositeReward

if TYPE_CHECKING:
    from grpo.recipe import Recipe

RESOLVED_RECIPE_FILE = "resolved_recipe.yaml"

T = TypeVar("T")


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
    if origin is tuple:
        shown = [_describe_type(a) for a in args if a is not Ellipsis]
        return (
            f"list[{shown[0]}]" if args[-1:] == (Ellipsis,) else f"list of {len(args)} ({', '.join(shown)})"
        )
    if origin is dict:
        return f"dict[{_describe_type(args[0])}, {_describe_type(args[1])}]" if args else "mapping"
    if dataclasses.is_dataclass(hint):
        return f"mapping ({hint.__name__})"
    if hint is dict:
        return "mapping"
    return getattr(hint, "__name__", str(hint))


def describe_value(value: Any) -> str:
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
        raise ConfigError(path, f"expected {_describe_type(hint)}, got {describe_value(value)}")
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
            raise ConfigError(path, f"expected {_describe_type(hint)}, got {describe_value(value)}")
        return float(value) if hint is float else value
    if hint is list or origin is list:
        if not isinstance(value, list):
            raise ConfigError(path, f"expected {_describe_type(hint)}, got {describe_value(value)}")
        return [_check(v, args[0], _join(path, i)) for i, v in enumerate(value)] if args else value
    if origin is tuple:  # a YAML list, of any length (tuple[X, ...]) or of one length
        variadic = args[-1:] == (Ellipsis,)
        if not isinstance(value, list | tuple) or not (variadic or len(value) == len(args)):
            raise ConfigError(path, f"expected {_describe_type(hint)}, got {describe_value(value)}")
        kinds = [args[0]] * len(value) if variadic else args
        return tuple(_check(v, kind, _join(path, i)) for i, (v, kind) in enumerate(zip(value, kinds)))
    if hint is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(path, f"expected {_describe_type(hint)}, got {describe_value(value)}")
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
    Literal, Optional / unions, list[...], tuple[...] (given as a list), dict[...], nested dataclasses
    and Any.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(where, f"expected a mapping of keys to values, got {describe_value(data)}")
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


def from_nested_dict(cls: type[T], data: Mapping[str, Any], where: str) -> T:
    """`from_dict` for a mapping held in a field of a spec, called by the spec's ``__post_init__``
    (``where`` is its full path, ``policy.tiny_spec``): its errors are final, not prefixed again by
    the `from_dict` building the spec."""
    try:
        return from_dict(cls, data, where=where)
    except ConfigError as err:
        raise InputError(str(err)) from None


@dataclass
class RewardSpec:
    """One reward of a recipe (``rewards: [{name, weight, kwargs}]``)."""

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


def build_rewards(specs: list[RewardSpec]) -> CompositeReward:
    """The weighted rewards a recipe names (`rewards.CompositeReward`; names resolved in the registry)."""
    return CompositeReward.from_specs([dataclasses.asdict(spec) for spec in specs])


@dataclass(frozen=True)
class Stage:
    """One recipe stage: what its sections are checked against and built into, and what runs it."""

    config: type[TrainerConfig] = field(metadata={"help": "the config its trainer section is built into"})
    policies: dict[str, type] = field(metadata={"help": "policy.type -> spec class (check, build)"})
    data: dict[str, type] = field(metadata={"help": "data.type -> spec class (check, build)"})
    run: Callable[[Recipe, Any, Any], list[dict[str, Any]]] = field(
        metadata={"help": "(recipe, policy spec, data spec) -> the logged metrics"}
    )
    rewards: bool = field(default=False, metadata={"help": "the recipe names rewards (RewardSpec)"})


def section_spec(recipe: Recipe, section: Literal["policy", "data"], policy: Any = None) -> Any:
    """The validated spec of a recipe's ``policy`` or ``data`` section: its ``type`` looked up in the
    stage's `Stage` entry, its keys checked by `from_dict`, then the spec's own ``check`` (a data
    spec's with the validated ``policy`` spec); a one-line error naming the key otherwise."""
    kinds = recipe.schema.policies if section == "policy" else recipe.schema.data
    kind = getattr(recipe, section)["type"]
    if kind not in kinds:
        verb = "trains" if section == "policy" else "reads"
        choices = f"a {next(iter(kinds))!r}" if len(kinds) == 1 else f"one of {', '.join(kinds)}"
        raise InputError(f"{section}.type: stage {recipe.stage!r} {verb} {choices}, got {kind!r}")
    spec = from_dict(kinds[kind], getattr(recipe, section), where=section)
    if section == "policy":
        spec.check(recipe)
    else:
        spec.check(recipe, policy)
    return spec


def _resolved_section(section: dict[str, Any], specs: dict[str, type], where: str) -> dict[str, Any]:
    """A policy / data section with every default of its spec filled in; a section of a kind no spec
    knows is kept as given (validation rejects it before a run writes anything)."""
    spec = specs.get(section["type"])
    return dict(section) if spec is None else dataclasses.asdict(from_dict(spec, section, where=where))


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    """The fully resolved recipe as plain YAML-able data: the policy, data, rewards and trainer
    sections with every default of their specs filled in, so the run is reproduced from it even
    after a default changes."""
    return {
        "name": recipe.name,
        "stage": recipe.stage,
        "output_dir": recipe.output_dir,
        "policy": _resolved_section(recipe.policy, recipe.schema.policies, "policy"),
        "data": _resolved_section(recipe.data, recipe.schema.data, "data"),
        "rewards": [dataclasses.asdict(spec) for spec in recipe.rewards],
        "trainer": dataclasses.asdict(recipe.args),
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
