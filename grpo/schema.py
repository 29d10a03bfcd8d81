"""Strict dataclass construction from YAML mappings, and the resolved recipe a run writes.

`from_dict` is what every section of a recipe (`grpo.recipe`) is checked with: the trainer configs, and
the policy and data specs of each stage (`grpo.train`, `grpo.reward_modeling`, `grpo.judge_training`).
`save_resolved` writes ``resolved_recipe.yaml`` with every default of those specs filled in; the stages
call both, so they live here, below the recipe and the stages alike.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from grpo.config import ConfigError, check_choice

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
    Literal, Optional / unions, list[...], dict[...], nested dataclasses and Any.
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


def _resolved_section(section: dict[str, Any], specs: dict[str, type], where: str) -> dict[str, Any]:
    """A policy / data section with every default of its spec filled in; a section of a kind no spec
    knows is kept as given (validation rejects it before a run writes anything)."""
    spec = specs.get(section["type"])
    return dict(section) if spec is None else dataclasses.asdict(from_dict(spec, section, where=where))


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    """The fully resolved recipe as plain YAML-able data: the policy, data, rewards and trainer
    sections with every default of their specs filled in, so the run is reproduced from it even
    after a default changes."""
    policies, datas = recipe.section_specs
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
