"""The toy world's verifiable causal reward: ranking of good and bad futures, robustness, numerics, API."""

from __future__ import annotations

import colorsys
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from grpo.data.toyworld import BACKGROUND, PALETTE, ToyWorld, ToyWorldConfig, disc_coverage, render
from policies.errors import InputError
from policies.video_io import read_video, write_video
from rewards.registry import resolve
from rewards.types import RewardOutput
from rewards.verifiable import ToyWorldVerifiableReward, VerifiableRewardConfig, detect_balls

REWARD = ToyWorldVerifiableReward()


@pytest.fixture(scope="module")
def test_world() -> ToyWorld:
    return ToyWorld(split="test", num_samples=100)


@pytest.fixture(scope="module")
def samples(test_world) -> list[dict]:
    return list(test_world)


def _scores(videos, worlds) -> np.ndarray:
    return np.array(REWARD(videos, None, None, world=worlds).scores)


def test_true_future_wins_over_100_samples(test_world, samples):
    worlds = [s["world"] for s in samples]
    noise = torch.Generator().manual_seed(0)
    candidates = {
        "true": [s["next"] for s in samples],
        "frozen": [s["context"][-1:].expand_as(s["next"]) for s in samples],
        "wrong_direction": [test_world.reversed_next(i) for i in range(len(samples))],
        "other_sample": [samples[(i + 1) % len(samples)]["next"] for i in range(len(samples))],
        "noise": [torch.rand(s["next"].shape, generator=noise) for s in samples],
    }
    scores = {name: _scores(videos, worlds) for name, videos in candidates.items()}
    print(
        "mean toyworld_verifiable over 100 test samples:",
        {k: round(float(v.mean()), 3) for k, v in scores.items()},
    )
    assert scores["true"].min() >= 0.95 and scores["true"].mean() >= 0.99
    assert scores["true"].mean() > scores["wrong_direction"].mean() > scores["noise"].mean()
    for name, ceiling in (("frozen", 0.5), ("wrong_direction", 0.5), ("other_sample", 0.3), ("noise", 0.05)):
        assert scores[name].mean() <= ceiling, name
    for name in ("frozen", "other_sample", "noise"):
        assert (scores["true"] > scores[name] + 0.2).all(), name  # per sample, not only on average


def _blur(video: torch.Tensor, sigma: float) -> torch.Tensor:
    taps = torch.arange(-3, 4, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
    kernel /= kernel.sum()
    x = video.permute(0, 3, 1, 2).reshape(-1, 1, *video.shape[1:3])
    x = F.conv2d(F.pad(x, (3, 3, 0, 0), mode="replicate"), kernel.view(1, 1, 1, 7))
    x = F.conv2d(F.pad(x, (0, 0, 3, 3), mode="replicate"), kernel.view(1, 1, 7, 1))
    return x.reshape(video.shape[0], 3, *video.shape[1:3]).permute(0, 2, 3, 1)


def test_robust_to_blur_codec_noise_and_resolution(tmp_path, samples):
    subset = samples[:30]
    worlds = [s["world"] for s in subset]
    blurred = [_blur(s["next"], 1.0) for s in subset]  # VAE-like softness
    assert _scores(blurred, worlds).mean() >= 0.97
    decoded = []
    for i, s in enumerate(subset):  # the usual lossy H.264 4:2:0 at crf 23
        decoded.append(
            read_video(write_video(tmp_path / f"{i}.mp4", s["next"], 8, pix_fmt="yuv420p", crf=23))[0]
        )
    assert _scores(decoded, worlds).mean() >= 0.95
    noise = torch.Generator().manual_seed(1)
    noisy = [(s["next"] + 0.03 * torch.randn(s["next"].shape, generator=noise)).clamp(0, 1) for s in subset]
    assert _scores(noisy, worlds).mean() >= 0.95
    large = ToyWorld(ToyWorldConfig(size=64), split="test", num_samples=30)  # same seeds, twice the pixels
    assert _scores([s["next"] for s in large], worlds).mean() >= 0.98


def _one_ball_world(positions, radius=3.5, colour="red", size=32) -> dict:
    return {
        "height": size,
        "width": size,
        "objects": [{"rgb": list(PALETTE[colour]), "radius": radius, "next": {"positions": positions}}],
    }


def _render_one(positions, radius=3.5, colour=(230, 35, 35), size=32) -> torch.Tensor:
    return render(
        np.array(positions, dtype=np.float64)[:, None, :], np.array([radius]), [colour], size, walls=False
    )


def test_detection_finds_a_ball_at_its_subpixel_centre():
    centre, radius = (13.3, 17.8), 3.5
    video = _render_one([centre], radius)
    found = detect_balls(video, [PALETTE["red"], PALETTE["blue"]])
    assert math.dist(found.centroid[0, 0], centre) < 0.05
    assert found.mass[0, 0] == pytest.approx(math.pi * radius**2, rel=0.05)  # faint rim pixels drop out
    # without smoothing or a chroma floor, a pixel's weight is exactly its coverage (grey background)
    exact = detect_balls(video, [PALETTE["red"]], min_chroma=1e-9, smooth=False)
    assert exact.mass[0, 0] == pytest.approx(disc_coverage(np.array(centre), radius, 32, 32).sum(), rel=1e-5)
    assert found.mass[0, 1] == 0 and np.isnan(found.centroid[0, 1]).all()
    assert found.hue_offset[0, 0] < 0.5 and found.unexplained[0] == 0
    blurred = detect_balls(_blur(video, 1.2), [PALETTE["red"]])  # blur moves pixels, not the centroid
    assert math.dist(blurred.centroid[0, 0], centre) < 0.1
    assert blurred.mass[0, 0] == pytest.approx(found.mass[0, 0], rel=0.1)


def test_position_error_matches_closed_form():
    truth = [[10.0 + t, 16.0] for t in range(9)]
    shifted = _render_one([[x + 2.0, y] for x, y in truth])
    out = REWARD([shifted], world=[_one_ball_world(truth)])
    expected = math.exp(-0.5 * ((2.0 / 32) / 0.08) ** 2)  # Gaussian of the normalised 2-px error
    assert out.metadata["position_error"][0] == pytest.approx(2.0 / 32, abs=2e-3)
    assert out.metadata["tracking"][0] == pytest.approx(expected, abs=0.01)
    assert out.scores[0] == pytest.approx(expected, abs=0.01)
    assert out.metadata["spurious"][0] > 0.99 and out.metadata["colour"][0] > 0.99


def test_colour_drift_costs_the_colour_component():
    truth = [[16.0, 10.0 + t] for t in range(9)]
    r, g, b = colorsys.hsv_to_rgb(25 / 360, 0.85, 0.9)  # red turned orange: 25 degrees of hue drift
    orange = _render_one(truth, colour=(round(r * 255), round(g * 255), round(b * 255)))
    out = REWARD([orange], world=[_one_ball_world(truth)])
    assert out.metadata["colour"][0] == pytest.approx(math.exp(-0.5 * (25 / 12) ** 2), abs=0.03)
    assert out.metadata["tracking"][0] > 0.99  # still found in the right place


def _two_ball_sample(samples) -> dict:
    for s in samples:
        objects = s["world"]["objects"]
        if len(objects) == 2 and all(all(o["next"]["visible"]) for o in objects):
            pos = np.array([o["next"]["positions"] for o in objects])
            r = max(o["radius"] for o in objects)
            if pos.min() > r + 1 and pos.max() < 32 - r - 1:
                return s
    raise AssertionError("no fully visible two-ball sample")


def test_vanished_and_spurious_balls(samples):
    sample = _two_ball_sample(samples)
    objects = sample["world"]["objects"]
    positions = np.array([o["next"]["positions"] for o in objects]).transpose(1, 0, 2)  # [F, 2, 2]
    radii = np.array([o["radius"] for o in objects])
    colours = [tuple(o["rgb"]) for o in objects]
    walls = sample["world"]["walls"]
    only_first = render(positions[:, :1], radii[:1], colours[:1], 32, walls)
    out = REWARD([only_first], world=[sample["world"]])
    assert out.metadata["presence"][0] == pytest.approx(0.5) and out.metadata["tracking"][0] == pytest.approx(
        0.5, abs=0.01
    )
    assert out.metadata["spurious"][0] > 0.99

    unused = next(c for c in PALETTE if c not in {o["colour"] for o in objects})
    corner = np.array([[[3.5, 3.5]]]).repeat(9, axis=0)
    far = np.min(np.linalg.norm(positions - corner, axis=-1)) > radii.max() + 4
    corner = corner if far else np.array([[[28.5, 28.5]]]).repeat(9, axis=0)
    extra = render(
        np.concatenate([positions, corner], axis=1),
        np.append(radii, 3.0),
        [*colours, PALETTE[unused]],
        32,
        walls,
    )
    out = REWARD([extra], world=[sample["world"]])
    expected = math.exp(
        -(math.pi * 3.0**2) / np.mean(math.pi * radii**2)
    )  # one extra ball's area, in ball areas
    assert out.metadata["spurious"][0] == pytest.approx(expected, abs=0.06)
    assert out.metadata["tracking"][0] > 0.99 and out.scores[0] < 0.6


def test_per_clip_scores_for_clip_sequences():
    world = ToyWorld(ToyWorldConfig.for_clips(num_clips=4, clip_frames=9), split="test", num_samples=3)
    reward = ToyWorldVerifiableReward(per_clip=True)
    for sample in world:
        out = reward([sample["next"]], world=[sample["world"]])
        assert len(out.metadata["clip_scores"][0]) == 3 and min(out.metadata["clip_scores"][0]) > 0.95
        broken = sample["next"].clone()
        broken[18:] = torch.rand(9, 32, 32, 3, generator=torch.Generator().manual_seed(0))  # last clip fails
        clips = reward.score_clips(broken, sample["world"])
        assert clips[0] > 0.95 and clips[1] > 0.95 and clips[2] < 0.05
        out = reward([broken], world=[json.dumps(sample["world"])])  # JSON text works too
        assert out.metadata["clip_scores"][0] == clips and out.scores[0] == pytest.approx(np.mean(clips))
        assert REWARD.score_clips(broken, sample["world"], clip_frames=9) == clips


def test_reward_function_contract(samples):
    assert resolve("toyworld_verifiable") is ToyWorldVerifiableReward
    a, b = samples[0], samples[1]
    batch = torch.stack([a["next"], b["next"]])
    as_uint8 = (batch * 255).round().to(torch.uint8)
    out = REWARD(as_uint8, ["p", "q"], [a["context"], b["context"]], world=[a["world"], None], other=[1, 2])
    assert isinstance(out, RewardOutput) and out.scores[0] > 0.98 and out.scores[1] is None
    assert set(out.metadata) == {"tracking", "presence", "position_error", "colour", "spurious"}
    assert all(len(column) == 2 and column[1] is None for column in out.metadata.values())
    with pytest.raises(InputError, match="needs the 'world' metadata column"):
        REWARD([a["next"]], None, None, trajectories=[a["world"]])
    with pytest.raises(InputError, match="1 videos but 2 entries"):
        REWARD([a["next"]], world=[a["world"], b["world"]])
    with pytest.raises(InputError, match="has 17 frames but its true 'next' segment has 9"):
        REWARD([torch.cat([a["context"], a["next"][:8]])], world=[a["world"]])
    with pytest.raises(InputError, match="keep the aspect ratio"):
        REWARD([torch.rand(9, 32, 48, 3)], world=[a["world"]])
    with pytest.raises(InputError, match="per_clip=True needs clip_frames"):
        ToyWorldVerifiableReward(per_clip=True)([a["next"]], world=[a["world"]])
    with pytest.raises(InputError, match="no 'objects' list"):
        REWARD([a["next"]], world=[{"height": 32}])
    with pytest.raises(InputError, match="segment"):
        VerifiableRewardConfig(segment="future")
    # the context segment can be scored too (a reconstruction check)
    assert ToyWorldVerifiableReward(segment="context")([a["context"]], world=[a["world"]]).scores[0] > 0.98


def _faded(video: torch.Tensor, strength: float) -> torch.Tensor:
    """The ball drawn at ``strength`` of its colour over the grey background (a fading ball)."""
    grey = torch.tensor(BACKGROUND, dtype=torch.float32) / 255.0
    return grey + strength * (video - grey)


def test_dense_credits_a_faint_ball_by_its_mass_where_the_cut_gives_nothing():
    centre, radius = (15.5, 16.5), 3.5
    truth = [list(centre)] * 9
    video = _render_one(truth, radius, colour=PALETTE["red"])
    world = _one_ball_world(truth, radius)
    hard = ToyWorldVerifiableReward(smooth=False)
    dense = ToyWorldVerifiableReward(smooth=False, dense=True)
    coverage = disc_coverage(np.array(centre), radius, 32, 32)
    chroma_red = (max(PALETTE["red"]) - min(PALETTE["red"])) / 255.0
    tracking = []
    for strength in (0.05, 0.1, 0.15, 0.2, 0.25):
        faded = _faded(video, strength)
        assert hard.score_video(faded, world)["tracking"] == 0.0  # below detect_fraction 0.3: vanished
        # by hand: each pixel's weight strength * coverage, gated linearly between chroma 0.025 and 0.1
        chroma = strength * coverage * chroma_red
        mass = (strength * coverage * np.clip((chroma - 0.025) / 0.075, 0, 1)).sum()
        expected = min(1.0, mass / (0.3 * math.pi * radius**2))  # centred: the position kernel is 1
        result = dense.score_video(faded, world)
        assert result["tracking"] == pytest.approx(expected, rel=1e-3)
        tracking.append(result["tracking"])
    assert all(b > a for a, b in zip(tracking, tracking[1:], strict=False)) and tracking[0] > 0


def test_dense_equals_the_thresholded_score_on_clear_videos(samples):
    dense = ToyWorldVerifiableReward(dense=True)
    for sample in samples[:10]:
        for video in (sample["next"], _blur(sample["next"], 1.0)):
            a, b = REWARD.score_video(video, sample["world"]), dense.score_video(video, sample["world"])
            assert b["score"] == pytest.approx(a["score"], abs=0.01) and b["score"] > 0.9


def test_the_dense_reward_is_registered_and_breaks_ties_of_fading_balls():
    dense_reward = resolve("toyworld_verifiable_dense")(per_clip=True, clip_frames=3)
    assert dense_reward.config.dense and dense_reward.__name__ == "toyworld_verifiable_dense"
    assert not resolve("toyworld_verifiable_dense")(VerifiableRewardConfig()).config.dense  # a config is kept
    truth = [[12.0 + t, 16.0] for t in range(9)]
    video = _render_one(truth, colour=PALETTE["red"])
    world = _one_ball_world(truth)
    group = [_faded(video, s) for s in (0.05, 0.1, 0.15, 0.2)]  # four samples, each fading the ball
    hard = ToyWorldVerifiableReward(per_clip=True, clip_frames=3)(group, world=[world] * 4)
    dense = dense_reward(group, world=[world] * 4)
    assert {s for clips in hard.metadata["clip_scores"] for s in clips} == {0.0}  # every cell tied at 0
    per_clip = np.array(dense.metadata["clip_scores"])  # [4 samples, 3 clips]
    assert (np.diff(per_clip, axis=0) > 0).all()  # the more colour kept, the higher, clip by clip


def test_seen_only_gives_an_empty_video_nothing_for_balls_that_left_the_view():
    truth = [[16.0 + 5 * t, 16.0] for t in range(9)]  # leaves the 32-px view to the right
    world = _one_ball_world(truth)
    video = _render_one(truth, colour=PALETTE["red"])
    empty = _faded(video, 0.0)  # the grey background only
    coverage = np.array([disc_coverage(np.array(c), 3.5, 32, 32).sum() for c in truth]) / (math.pi * 3.5**2)
    seen = coverage >= 0.5
    assert 0 < seen.sum() < 9  # some frames must show the ball, some must not
    for dense in (False, True):
        usual = ToyWorldVerifiableReward(dense=dense)
        seen_only = ToyWorldVerifiableReward(dense=dense, seen_only=True)
        # by hand: the empty video misses every ball that should be seen and is right everywhere else
        assert usual.score_video(empty, world)["tracking"] == pytest.approx(1 - seen.mean())
        assert seen_only.score_video(empty, world)["tracking"] == 0.0
        assert seen_only.score_video(video, world)["score"] > 0.95  # the truth still scores
    # a clip in which no ball should be seen keeps the usual mean: the empty video is right there
    gone = _one_ball_world([[60.0, 16.0]] * 9)
    assert ToyWorldVerifiableReward(seen_only=True).score_video(empty, gone)["tracking"] == 1.0


@pytest.mark.parametrize("dense", [False, True])
def test_score_frames_is_the_score_of_those_frames_alone(samples, dense):
    """``score_frames(video, world, S)`` scores only frames S: over all frames it is ``score_video``'s
    score, and over S it is the score of the sub-video ``video[S]`` against a world whose trajectories
    are cut to S (an independent path). A video right on S and wrong elsewhere scores ~1 on S."""
    import copy

    reward = ToyWorldVerifiableReward(dense=dense)
    noise = torch.rand(9, 32, 32, 3, generator=torch.Generator().manual_seed(0))
    for i, sample in enumerate(samples[:3]):
        true, other = sample["next"], samples[i + 1]["next"]
        spliced = other.clone()
        spliced[[1, 3, 5]] = true[[1, 3, 5]]  # right on frames 1, 3, 5 only
        world = sample["world"]
        for video in (true, other, spliced, sample["context"][-1:].expand_as(true), noise):
            whole = reward.score_video(video, world)["score"]
            assert reward.score_frames(video, world, range(9)) == pytest.approx(whole, abs=1e-12)
            for shown in ([1, 3, 5], [0, 4, 7, 8], [6]):
                cut = copy.deepcopy(world)
                for obj in cut["objects"]:
                    obj["next"]["positions"] = [obj["next"]["positions"][f] for f in shown]
                alone = reward.score_video(video[shown], cut)["score"]
                assert reward.score_frames(video, json.dumps(world), shown) == pytest.approx(alone, abs=1e-9)
        assert reward.score_video(spliced, world)["score"] < 0.5
        assert reward.score_frames(spliced, world, [1, 3, 5]) > 0.95
        # a frame listed twice counts once (clip mode's clamped grid repeats the last frame)
        twice = reward.score_frames(spliced, world, [5, 1, 1, 3, 5])
        assert twice == reward.score_frames(spliced, world, [1, 3, 5])
    with pytest.raises(InputError, match="non-empty list of indices into its 9 frames"):
        reward.score_frames(true, world, [])
    with pytest.raises(InputError, match="non-empty list of indices into its 9 frames"):
        reward.score_frames(true, world, [3, 9])
    with pytest.raises(InputError, match="non-empty list of indices into its 9 frames"):
        reward.score_frames(true, world, [-1, 3])
