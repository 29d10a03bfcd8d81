"""Reward functions for next-scene video generation.

A reward is a plain callable ``(videos, prompts, contexts, **metadata) -> list[float | None]``
(see `rewards.types`). Register your own with ``@rewards.register("name")``.
"""

from rewards import colour, verifiable  # noqa: F401  (register 'redness', 'brightness', 'toyworld_verifiable')
from rewards.registry import register, registered, resolve
from rewards.types import RewardOutput, as_reward_output

__all__ = ["RewardOutput", "as_reward_output", "register", "registered", "resolve"]
