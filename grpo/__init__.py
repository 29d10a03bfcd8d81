"""Trainers for video diffusion policies: group-relative PPO and the supervised stages before it.

Exports are resolved lazily so that importing a submodule (``grpo.cli``, ``grpo.data``) does not pull in
the trainers and torch: ``nextscene --help`` and a bad recipe fail in milliseconds.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    "GRPOTrainer": "grpo.trainer",
    "GRPOConfig": "grpo.config",
    "FlowMatchingTrainer": "grpo.sft",
    "FlowMatchingConfig": "grpo.config",
    "TrainerConfig": "grpo.config",
    "Recipe": "grpo.recipe",
    "load_recipe": "grpo.recipe",
    "compute_advantages": "grpo.advantages",
    "grpo_loss": "grpo.loss",
    "MetricsLogger": "grpo.tracking",
    "read_metrics": "grpo.tracking",
}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'grpo' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


__all__ = sorted(_EXPORTS)
