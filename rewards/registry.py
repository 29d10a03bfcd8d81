"""Reward functions by name: a registry filled by a decorator, and dotted-path loading for recipes."""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable
from typing import Any

from policies.errors import InputError

RewardFunc = Callable[..., Any]
_REGISTRY: dict[str, RewardFunc] = {}


def register(name: str) -> Callable[[RewardFunc], RewardFunc]:
    """Register a reward function (or a class whose instances are reward functions) under ``name``."""

    def decorator(func: RewardFunc) -> RewardFunc:
        if name in _REGISTRY and _REGISTRY[name] is not func:
            raise ValueError(f"reward name {name!r} is already registered to {_REGISTRY[name]!r}")
        _REGISTRY[name] = func
        return func

    return decorator


def registered() -> list[str]:
    """Names of all registered rewards."""
    return sorted(_REGISTRY)


def resolve(spec: str) -> RewardFunc:
    """A registered name, or ``package.module:attribute`` for a user's own function."""
    if ":" in spec:
        module_name, _, attr = spec.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            raise InputError(f"reward {spec!r}: cannot import module {module_name!r} ({err})") from None
        if not hasattr(module, attr):
            raise InputError(f"reward {spec!r}: module {module_name!r} has no attribute {attr!r}")
        return getattr(module, attr)
    if spec not in _REGISTRY:
        close = difflib.get_close_matches(spec, _REGISTRY, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; registered: {', '.join(registered())}"
        raise InputError(f"unknown reward {spec!r}{hint} (or give 'module:function')")
    return _REGISTRY[spec]
