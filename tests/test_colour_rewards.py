import pytest
import torch

import rewards
from rewards.colour import brightness, redness


def test_colour_rewards_on_known_videos():
    red = torch.zeros(3, 4, 4, 3)
    red[..., 0] = 1.0
    grey = torch.full((3, 4, 4, 3), 0.25)
    assert redness([red, grey]) == [1.0, 0.0]
    assert brightness([red, grey]) == pytest.approx([1.0 / 3.0, 0.25])
    assert rewards.resolve("redness") is redness and rewards.resolve("brightness") is brightness


def test_public_imports():
    from grpo import FlowMatchingConfig, FlowMatchingTrainer, GRPOConfig, GRPOTrainer, load_recipe

    assert GRPOTrainer.__module__ == "grpo.trainer" and FlowMatchingTrainer.__module__ == "grpo.sft"
    assert GRPOConfig().num_generations >= 2 and FlowMatchingConfig().max_steps >= 1 and callable(load_recipe)
