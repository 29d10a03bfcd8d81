"""The reward API: registry, dotted loading, the concurrent weighted composite, the built-in frame rewards."""

from __future__ import annotations

import asyncio
import math
import time

import pytest
import torch

import rewards
from policies.errors import InputError
from rewards import CompositeReward, RewardOutput, next_scene_similarity, temporal_smoothness

pytestmark = pytest.mark.timeout(60)


def videos(n: int = 3, frames: int = 4) -> list[torch.Tensor]:
    return [torch.full((frames, 8, 8, 3), 0.1 * (i + 1)) for i in range(n)]


@rewards.register("test_brightness")
def brightness(videos, prompts, contexts, **metadata):
    return [float(v.mean()) for v in videos]


async def async_length(videos, prompts, contexts, **metadata):
    await asyncio.sleep(0.01)
    return RewardOutput([float(len(p)) for p in prompts], {"chars": [len(p) for p in prompts]})


def picky(videos, prompts, contexts, *, keep: int = 1, **metadata):
    return [1.0 if i == keep else None for i in range(len(videos))]


class Scaled:
    """A class reward: instantiated from a recipe with kwargs."""

    def __init__(self, factor: float = 1.0):
        self.factor = factor

    def __call__(self, videos, prompts, contexts, **metadata):
        return [self.factor * i for i in range(len(videos))]


# ------------------------------------------------------------------------------------------ registry
def test_registry_resolves_names_and_dotted_paths():
    assert rewards.resolve("test_brightness") is brightness
    assert rewards.resolve(f"{__name__}:picky") is picky
    assert {"causal_consistency", "temporal_smoothness", "next_scene_similarity"} <= set(rewards.registered())
    with pytest.raises(InputError, match="did you mean 'test_brightness'"):
        rewards.resolve("test_brightnes")
    with pytest.raises(InputError, match="has no attribute 'nope'"):
        rewards.resolve(f"{__name__}:nope")


# ----------------------------------------------------------------------------------------- composite
def test_composite_columns_weights_metadata_and_none():
    composite = CompositeReward([brightness, async_length, "test_brightness"], weights=[2.0, 0.5, 0.0],
                                names=["bright", "length", "logged_only"])  # fmt: skip
    out = composite(videos(), ["a", "bbb", "cc"], None)
    assert out.columns["bright"] == pytest.approx([0.1, 0.2, 0.3])
    assert out.columns["length"] == [1.0, 3.0, 2.0]
    assert out.weights == {"bright": 2.0, "length": 0.5, "logged_only": 0.0}
    assert out.metadata == {"length/chars": [1, 3, 2]}
    assert out.weighted_sum() == pytest.approx([0.2 + 0.5, 0.4 + 1.5, 0.6 + 1.0])
    assert set(out.timings) == {"bright", "length", "logged_only", "total"}
    with_none = CompositeReward([brightness, picky])(videos(), ["a", "b", "c"], None)
    assert with_none.columns["picky"] == [None, 1.0, None]
    assert with_none.weighted_sum()[0] is None and with_none.weighted_sum()[1] == pytest.approx(1.2)
    tensor = with_none.to_tensor()
    assert tensor.shape == (3, 2) and math.isnan(tensor[0, 1]) and tensor[1, 1] == 1.0


def test_composite_runs_rewards_concurrently():
    def slow_sync(videos, prompts, contexts, **metadata):
        time.sleep(0.4)
        return [0.0] * len(videos)

    async def slow_async(videos, prompts, contexts, **metadata):
        await asyncio.sleep(0.4)
        return [1.0] * len(videos)

    composite = CompositeReward([slow_sync, slow_sync, slow_async], names=["a", "b", "c"])
    start = time.perf_counter()
    out = composite(videos(2), None, None)
    elapsed = time.perf_counter() - start
    assert elapsed < 0.75, elapsed  # three 0.4 s rewards overlap
    assert all(out.timings[name] >= 0.39 for name in "abc")


def test_composite_from_recipe_specs():
    specs = [
        {"name": f"{__name__}:Scaled", "weight": 0.5, "kwargs": {"factor": 3.0}, "column": "scaled"},
        {"name": f"{__name__}:picky", "kwargs": {"keep": 0}},
        "temporal_smoothness",
    ]
    out = CompositeReward.from_specs(specs)(videos(), None, None)
    assert out.columns["scaled"] == [0.0, 3.0, 6.0] and out.weights["scaled"] == 0.5
    assert out.columns[f"{__name__}:picky"] == [1.0, None, None]
    assert out.columns["temporal_smoothness"] == [1.0, 1.0, 1.0]  # still frames: no flicker
    with pytest.raises(InputError, match="unknown keys: \\['weights'\\]"):
        CompositeReward.from_specs([{"name": "temporal_smoothness", "weights": 1}])


def test_composite_works_from_inside_an_event_loop():
    async def caller():
        return CompositeReward([brightness])(videos(1), None, None)

    assert asyncio.run(caller()).columns["brightness"] == pytest.approx([0.1])


def test_composite_rejects_bad_rewards_with_one_line_errors():
    def short(videos, prompts, contexts, **metadata):
        return [1.0]

    def nan(videos, prompts, contexts, **metadata):
        return [math.nan] * len(videos)

    def broken(videos, prompts, contexts, **metadata):
        raise RuntimeError("boom")

    with pytest.raises(InputError, match="reward 'short' returned 1 scores for 3 videos"):
        CompositeReward([short])(videos(), None, None)
    with pytest.raises(InputError, match="reward 'nan' returned nan for video 0"):
        CompositeReward([nan])(videos(), None, None)
    with pytest.raises(RuntimeError, match="boom") as info:
        CompositeReward([broken])(videos(), None, None)
    assert "raised by reward 'broken'" in info.value.__notes__
    with pytest.raises(InputError, match="2 reward weights for 1 rewards"):
        CompositeReward([brightness], weights=[1.0, 2.0])
    with pytest.raises(InputError, match="must be unique"):
        CompositeReward([brightness, brightness])
    with pytest.raises(InputError, match="metadata column 'caption' has 2 entries for 3 videos"):
        CompositeReward([brightness])(videos(), None, None, caption=["a", "b"])


# ------------------------------------------------------------------------------------------ built-ins
def test_temporal_smoothness_penalises_flicker_not_steady_change():
    still = torch.full((6, 8, 8, 3), 0.5)
    fade = torch.linspace(0, 1, 6).view(6, 1, 1, 1).expand(6, 8, 8, 3)
    flicker = torch.tensor([0.2, 0.8] * 3).view(6, 1, 1, 1).expand(6, 8, 8, 3)
    out = temporal_smoothness([still, fade, flicker], None, None)
    assert out.scores[0] == pytest.approx(1.0) and out.scores[1] == pytest.approx(1.0, abs=1e-6)
    assert out.scores[2] < 1e-6 and out.metadata["flicker"][2] == pytest.approx(1.2)
    assert out.metadata["mean_abs_diff"][1] == pytest.approx(0.2)
    jump = temporal_smoothness([still], None, [torch.zeros(3, 8, 8, 3)])  # context ends black: a cut
    assert jump.scores[0] == pytest.approx(
        math.exp(-0.5 / 5 / 0.05)
    )  # one 0.5 jump over 5 second differences
    short = temporal_smoothness([still[:2]], None, None)
    assert short.scores == [None] and "needs >= 3 frames" in short.metadata["reason"][0]


def test_next_scene_similarity_against_the_true_continuation():
    truth = torch.rand(8, 16, 16, 3, generator=torch.Generator().manual_seed(0))
    noisy = (truth + 0.1 * torch.randn(8, 16, 16, 3, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    noisier = (truth + 0.3 * torch.randn(8, 16, 16, 3, generator=torch.Generator().manual_seed(2))).clamp(
        0, 1
    )
    # 4 frames at half size: the truth is resampled to match (frames 0, 2, 5, 7; 2x2 area average)
    smaller = torch.nn.functional.avg_pool2d(truth[[0, 2, 5, 7]].permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1)
    out = next_scene_similarity([truth, noisy, noisier, smaller, truth], None, None,
                                next_video=[truth, truth, truth, truth, None])  # fmt: skip
    assert out.scores[0] == 1.0 and 1.0 > out.scores[1] > out.scores[2] > 0
    assert out.metadata["psnr"][1] == pytest.approx(20.0, abs=1.0)  # noise std 0.1 -> ~20 dB
    assert out.scores[3] == pytest.approx(1.0)
    assert out.scores[4] is None and out.metadata["reason"][4] == "no next_video for this sample"
    with pytest.raises(InputError, match="needs a 'next_video' metadata column"):
        next_scene_similarity([truth], None, None)
