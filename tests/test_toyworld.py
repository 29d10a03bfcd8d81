"""The toy causal world: determinism, splits, physics, rendering and captions."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from grpo.data.toyworld import (
    BACKGROUND,
    PALETTE,
    SPLITS,
    WALL_THICKNESS,
    ToyWorld,
    ToyWorldConfig,
    generate_sample,
    seed_for,
)
from policies.errors import InputError
from rewards.verifiable import ToyWorldVerifiableReward


def _positions(sample: dict, obj: int) -> np.ndarray:
    """All frames' positions (px) of one object: context then next."""
    o = sample["world"]["objects"][obj]
    return np.array(o["context"]["positions"] + o["next"]["positions"])


def _find(config: ToyWorldConfig, predicate, limit: int = 300) -> dict:
    for i in range(limit):
        sample = ToyWorld(config, split="train", num_samples=limit)[i]
        if predicate(sample):
            return sample
    raise AssertionError("no sample satisfies the predicate")


def test_same_seed_same_sample_and_seeds_differ():
    a = ToyWorld(split="validation", num_samples=5)
    b = ToyWorld(split="validation", num_samples=5)
    for i in range(5):
        x, y = a[i], b[i]
        assert torch.equal(x["context"], y["context"]) and torch.equal(x["next"], y["next"])
        assert x["world"] == y["world"]
        assert (x["context_caption"], x["next_caption"]) == (y["context_caption"], y["next_caption"])
    assert not torch.equal(a[0]["next"], a[1]["next"])
    # the index of a dataset with an offset maps to the same seed
    assert ToyWorld(split="validation", num_samples=3, start=2)[0]["world"] == a[2]["world"]


def test_splits_never_share_a_seed_and_out_of_range_is_input_error():
    ranges = sorted((first, first + count) for first, count in SPLITS.values())
    for (_, stop), (start, _) in zip(ranges, ranges[1:], strict=False):
        assert stop <= start
    assert SPLITS["test"][0] == 10_000_000
    for split, (first, count) in SPLITS.items():
        assert seed_for(split, 0) == first
        assert seed_for(split, count - 1) == first + count - 1
        with pytest.raises(InputError, match="outside split"):
            seed_for(split, count)
        with pytest.raises(InputError, match="outside split"):
            seed_for(split, -1)
    world = ToyWorld(split="test", num_samples=4)
    assert world[3]["world"]["seed"] == 10_000_003 and world[3]["world"]["split"] == "test"
    with pytest.raises(InputError, match="out of range"):
        world[4]
    assert len(list(world)) == 4  # iteration stops at len, not at an error
    with pytest.raises(InputError, match="do not fit split"):
        ToyWorld(split="validation", num_samples=10, start=SPLITS["validation"][1] - 5)
    with pytest.raises(InputError, match="unknown split"):
        ToyWorld(split="val")


def test_sample_structure_and_metadata_are_json_serialisable():
    sample = ToyWorld(split="train", num_samples=1)[0]
    assert set(sample) == {
        "context",
        "next",
        "context_caption",
        "next_caption",
        "instruction",
        "fps",
        "world",
    }
    for key in ("context", "next"):
        video = sample[key]
        assert video.dtype == torch.float32 and video.shape == (9, 32, 32, 3)
        assert float(video.min()) >= 0.0 and float(video.max()) <= 1.0
    assert sample["instruction"] == "What happens next?" and sample["fps"] == 8.0
    assert sample["context_caption"].startswith("the ") and sample["next_caption"].startswith("the ")
    world = sample["world"]
    assert json.loads(json.dumps(world)) == world
    assert 1 <= len(world["objects"]) <= 3
    names = [o["colour"] for o in world["objects"]]
    assert len(set(names)) == len(names)  # distinct colours
    for o in world["objects"]:
        assert tuple(o["rgb"]) == PALETTE[o["colour"]] and o["name"] == f"{o['colour']} ball"
        assert 0.08 * 32 <= o["radius"] <= 0.12 * 32
        for segment, frames in (("context", 9), ("next", 9)):
            assert len(o[segment]["positions"]) == frames and len(o[segment]["visible"]) == frames
        assert o["context"]["visible"][-1]  # every ball is in view when the next scene starts


def test_rendered_balls_sit_where_the_metadata_says():
    """Independent check: the centroid of each ball's fully covered pixels (exact palette colour)
    lies at the metadata position for fully visible, isolated balls."""
    checked = 0
    for sample in ToyWorld(split="test", num_samples=15):
        video = torch.cat([sample["context"], sample["next"]]).numpy()
        objects = sample["world"]["objects"]
        for k, o in enumerate(objects):
            pos = _positions(sample, k)
            colour = np.array(o["rgb"]) / 255.0
            for t in range(len(video)):
                x, y = pos[t]
                r = o["radius"]
                if not (r + 1 < x < 32 - r - 1 and r + 1 < y < 32 - r - 1):
                    continue
                others = [_positions(sample, j)[t] for j in range(len(objects)) if j != k]
                if any(math.dist(p, (x, y)) < r + 6 for p in others):
                    continue
                rows, cols = np.nonzero(np.all(np.abs(video[t] - colour) < 1e-6, axis=-1))
                assert len(rows) >= 9
                assert abs(cols.mean() + 0.5 - x) < 0.35 and abs(rows.mean() + 0.5 - y) < 0.35
                checked += 1
    assert checked > 100


def test_constant_velocity_without_walls_or_gravity():
    config = ToyWorldConfig(
        max_objects=1, wall_probability=0.0, gravity_probability=0.0, enter_probability=0.0
    )
    for sample in ToyWorld(config, split="train", num_samples=10):
        pos = _positions(sample, 0)
        assert np.abs(np.diff(pos, n=2, axis=0)).max() < 2e-3  # rounded to 1e-4 px
        speed = np.linalg.norm(np.diff(pos, axis=0), axis=1)
        assert speed.min() > 0.025 * 32 * 0.99 and speed.max() < 0.045 * 32 * 1.01
        assert not sample["world"]["walls"] and sample["world"]["gravity"] == 0.0
        # no walls drawn: the pixel farthest from the ball is plain background
        x, y = pos[0]
        corner = (0 if y > 16 else 31, 0 if x > 16 else 31)
        assert torch.equal(sample["context"][0, corner[0], corner[1]], torch.tensor(BACKGROUND) / 255.0)


def test_gravity_accelerates_down_by_the_stored_constant():
    config = ToyWorldConfig(
        max_objects=1, wall_probability=0.0, gravity_probability=1.0, enter_probability=0.0
    )
    for sample in ToyWorld(config, split="train", num_samples=8):
        g = sample["world"]["gravity"]
        assert 0.006 * 32 * 0.999 <= g <= 0.010 * 32 * 1.001
        second = np.diff(_positions(sample, 0), n=2, axis=0)
        assert np.abs(second[:, 0]).max() < 2e-3
        assert np.allclose(second[:, 1], g, atol=2e-3)


def test_walls_keep_balls_inside_and_are_drawn():
    config = ToyWorldConfig(wall_probability=1.0, gravity_probability=0.0, strike_probability=0.0)
    bounces = 0
    for sample in ToyWorld(config, split="train", num_samples=30):
        world = sample["world"]
        assert world["walls"]
        border = WALL_THICKNESS * 32
        for k, o in enumerate(world["objects"]):
            pos = _positions(sample, k)
            assert pos.min() >= border + o["radius"] - 1e-3 and pos.max() <= 32 - border - o["radius"] + 1e-3
        frame = sample["context"][0]
        assert torch.allclose(frame[0, :], torch.tensor([110 / 255] * 3).expand(32, 3))  # grey top wall
        for event in world["events"]["context"] + world["events"]["next"]:
            if event["type"] == "wall":
                bounces += 1
                assert (
                    f"bounces off the {event['side']} wall"
                    in sample["context_caption"] + sample["next_caption"]
                )
    assert bounces > 5


def test_strike_sets_the_resting_ball_moving_and_is_captioned():
    config = ToyWorldConfig(min_objects=2, max_objects=2, strike_probability=1.0, wall_probability=0.0)
    for sample in ToyWorld(config, split="train", num_samples=10):
        world = sample["world"]
        hits = [(seg, e) for seg in ("context", "next") for e in world["events"][seg] if e["type"] == "hit"]
        assert len(hits) == 1
        segment, hit = hits[0]
        frame = hit["frame"] + (9 if segment == "next" else 0)
        struck = [o["colour"] for o in world["objects"]].index(hit["other"])
        pos = _positions(sample, struck)
        assert np.abs(np.diff(pos[:frame], axis=0)).max() < 1e-3  # at rest before the hit
        assert np.linalg.norm(pos[-1] - pos[frame - 1]) > 1.0  # moving after it
        caption = sample[f"{segment}_caption"]
        assert f"the {hit['object']} ball" in caption and f"hits the {hit['other']} ball" in caption
        assert f"the {hit['other']} ball is hit and rolls" in caption


def test_balls_enter_and_leave_the_frame():
    config = ToyWorldConfig(wall_probability=0.0, enter_probability=1.0, strike_probability=0.0)
    sample = _find(config, lambda s: any(e["type"] == "enter" for e in s["world"]["events"]["context"]))
    event = next(e for e in sample["world"]["events"]["context"] if e["type"] == "enter")
    obj = next(o for o in sample["world"]["objects"] if o["colour"] == event["object"])
    assert not obj["context"]["visible"][event["frame"] - 1] and obj["context"]["visible"][event["frame"]]
    assert f"the {event['object']} ball enters from the {event['side']}" in sample["context_caption"]

    sample = _find(config, lambda s: any(e["type"] == "leave" for e in s["world"]["events"]["next"]))
    event = next(e for e in sample["world"]["events"]["next"] if e["type"] == "leave")
    obj = next(o for o in sample["world"]["objects"] if o["colour"] == event["object"])
    assert obj["next"]["visible"][event["frame"] - 1] and not obj["next"]["visible"][event["frame"]]
    assert (
        f"the {event['object']} ball" in sample["next_caption"]
        and "leaves the frame" in sample["next_caption"]
    )


def test_every_next_scene_has_visible_motion():
    for sample in ToyWorld(split="validation", num_samples=50):
        travel = max(
            np.linalg.norm(np.array(o["next"]["positions"]) - o["context"]["positions"][-1], axis=1).max()
            for o in sample["world"]["objects"]
        )
        assert travel >= 0.2 * 32 - 1e-3
        assert not torch.equal(sample["next"][-1], sample["context"][-1])


def test_same_seed_is_the_same_scene_at_every_size():
    small = generate_sample(123, ToyWorldConfig(size=32))
    large = generate_sample(123, ToyWorldConfig(size=64))
    assert large["next"].shape == (9, 64, 64, 3) and small["next_caption"] == large["next_caption"]
    for a, b in zip(small["world"]["objects"], large["world"]["objects"], strict=True):
        assert np.allclose(np.array(b["next"]["positions"]), 2 * np.array(a["next"]["positions"]), atol=1e-3)
        assert b["radius"] == pytest.approx(2 * a["radius"], abs=1e-3)


def test_clip_sequence_view():
    config = ToyWorldConfig.for_clips(num_clips=4, clip_frames=9, context_clips=1)
    assert (config.context_frames, config.next_frames) == (9, 27)
    sample = ToyWorld(config, split="train", num_samples=1)[0]
    assert sample["clips"].shape == (4, 9, 32, 32, 3)
    assert torch.equal(sample["clips"].reshape(36, 32, 32, 3), torch.cat([sample["context"], sample["next"]]))
    assert (
        sample["world"]["clip_frames"] == 9 and len(sample["world"]["objects"][0]["next"]["positions"]) == 27
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"context_frames": 10}, "8k\\+1"),
        ({"next_frames": 0}, "8k\\+1"),
        ({"size": 16}, "32..128"),
        ({"max_objects": 4}, "<= 3"),
        ({"fps": 0.0}, "fps"),
        ({"clip_frames": 9, "next_frames": 17}, "multiple of clip_frames"),
        ({"wall_probability": 1.5}, "probability"),
    ],
)
def test_bad_config_is_one_line_input_error(kwargs, message):
    with pytest.raises(InputError, match=message) as info:
        ToyWorldConfig(**kwargs)
    assert "\n" not in str(info.value)


def test_reversed_next_moves_the_other_way():
    world = ToyWorld(split="test", num_samples=10)
    for i in range(10):
        sample = world[i]
        reversed_next = world.reversed_next(i)
        assert reversed_next.shape == sample["next"].shape
        assert not torch.allclose(reversed_next, sample["next"])


def test_next_overlap_starts_the_next_scene_at_the_last_context_frame():
    plain = generate_sample(123, ToyWorldConfig())
    shifted = generate_sample(123, ToyWorldConfig(next_overlap=1))
    assert torch.equal(shifted["next"][0], plain["context"][-1])
    assert torch.equal(shifted["next"][1:], plain["next"][:-1])
    first = shifted["world"]["objects"][0]
    assert first["next"]["positions"][0] == plain["world"]["objects"][0]["context"]["positions"][-1]
    reward = ToyWorldVerifiableReward()
    assert reward([shifted["next"]], world=[shifted["world"]]).scores[0] > 0.95
    with pytest.raises(InputError, match="next_overlap"):
        ToyWorldConfig(next_overlap=9)
