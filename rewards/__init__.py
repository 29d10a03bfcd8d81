"""Reward functions for next-scene video generation.

A reward is a plain callable ``(videos, prompts, contexts, **metadata) -> list[float | None]``
(see `rewards.types`). Register your own with ``@rewards.register("name")``; combine several with
`CompositeReward`.
"""

from rewards import colour, verifiable, verifiable_audio  # noqa: F401  (register redness, brightness, toyworld_*)
from rewards.builtin import next_scene_similarity, temporal_smoothness
from rewards.composite import CompositeOutput, CompositeReward, build_reward
from rewards.judge import CausalConsistencyJudge, InProcessJudge, JudgeConfig, JudgeUnavailableError
from rewards.registry import register, registered, resolve
from rewards.reward_model import LearnedReward, RewardModelArgs, VideoRewardModel  # registers 'reward_model'
from rewards.types import RewardOutput, RewardUnavailableError, as_reward_output

__all__ = [
    "CausalConsistencyJudge",
    "CompositeOutput",
    "CompositeReward",
    "InProcessJudge",
    "JudgeConfig",
    "JudgeUnavailableError",
    "LearnedReward",
    "RewardModelArgs",
    "RewardOutput",
    "RewardUnavailableError",
    "as_reward_output",
    "build_reward",
    "next_scene_similarity",
    "register",
    "registered",
    "resolve",
    "temporal_smoothness",
    "VideoRewardModel",
]
