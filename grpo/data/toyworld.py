"""The toy causal world: tiny videos of coloured balls whose future is exactly known.

Each sample is a short scene of 1-3 balls on a plain dark background, simulated with simple
deterministic physics -- constant velocity, bounces off the walls (drawn as a grey border when
they exist, so a model can see whether a ball will bounce or leave), optional gravity (side view,
the bottom wall is the floor), elastic collisions in which one ball strikes another and sets it
moving, balls entering and leaving the frame -- then split into a *context* clip and its true
*next* clip, each captioned from the simulated events ("the red ball rolls right and hits the
blue ball"). Everything follows from the seed, drawn with ``numpy.random.Generator(PCG64(seed))``;
the seed is the split's first seed plus the sample index, and the splits' seed ranges never meet.

Geometry: physics runs in units of the frame side (so a seed gives the same scene at 32 or 64
pixels); the metadata stores pixel units: ``x`` to the right, ``y`` down, pixel ``(row i, col j)``
covers ``[j, j + 1) x [i, i + 1)``, so its centre is ``(j + 0.5, i + 0.5)``. Balls are rendered with
analytic anti-aliasing (coverage ramps over one pixel at the rim), which keeps sub-pixel motion
visible and gives the verifiable reward (`rewards.verifiable`) a sub-pixel centroid to compare.
The six palette colours are fully saturated hues 60 degrees apart, so colour (hue) identifies a
ball even after VAE blur or video-codec loss; background and walls are grey (no hue).

Sound (``ToyWorldConfig(audio=True)``): every wall bounce rings a short tone at its ball's pitch
(`BOUNCE_PITCH`, one note of a pentatonic scale per colour) and every strike a lower one
(`STRIKE_PITCH`). A tone starts exactly at the first frame that shows its event, at sample
``round(frame * sample_rate / fps)``, and fades out within that frame, so each video frame's
stretch of audio holds exactly the tones of its own events: the sound is a frame-accurate,
verifiable signal (`rewards.verifiable_audio`). The waveform follows from the scene alone (no
random draw), so it is as reproducible as the frames; without ``audio`` nothing changes.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.random import PCG64, Generator
from tqdm.auto import tqdm

from grpo.data.nsp_dataset import DEFAULT_INSTRUCTION, write_manifest
from policies.errors import InputError
from policies.toy_geometry import disc_coverage
from policies.video_io import split_clips, write_video

# name -> RGB (0..255): HSV hues 0, 60, ..., 300 at saturation 0.85, value 0.9
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (230, 35, 35),
    "yellow": (230, 230, 35),
    "green": (35, 230, 35),
    "cyan": (35, 230, 230),
    "blue": (35, 35, 230),
    "magenta": (230, 35, 230),
}
BACKGROUND: tuple[int, int, int] = (24, 24, 24)
WALL_COLOUR: tuple[int, int, int] = (110, 110, 110)
WALL_THICKNESS = 1.0 / 32.0  # in frame sides: 1 px at 32 px, 2 px at 64 px

# first seed and number of seeds of each split; the ranges are disjoint
SPLITS: dict[str, tuple[int, int]] = {
    "train": (0, 9_000_000),
    "validation": (9_000_000, 1_000_000),
    "test": (10_000_000, 1_000_000),
}

METADATA_VERSION = 1

# sound: a bounce rings at its ball's pitch (C major pentatonic, C5..C6), a strike at C4 (Hz)
BOUNCE_PITCH: dict[str, float] = {
    "red": 523.25,
    "yellow": 587.33,
    "green": 659.26,
    "cyan": 783.99,
    "blue": 880.0,
    "magenta": 1046.5,
}
STRIKE_PITCH = 261.63
TONE_AMPLITUDE = 0.25  # peak of one tone; simultaneous tones add (and are clipped to [-1, 1])
TONE_SECONDS = 0.08  # longest tone; shorter when a frame lasts less (it ends within 0.9 frame)
_TONE_DECAY = 0.02  # exponential decay time constant, seconds
_TONE_RAMP = 0.002  # linear fade in and out, seconds (no click)

_SUBSTEPS = 8
_RADIUS = (0.08, 0.12)  # frame sides
_SPEED = (0.025, 0.045)  # frame sides per frame
_GRAVITY = (0.006, 0.010)  # frame sides per frame^2
_REST_SPEED = 1e-3
_MIN_NEXT_TRAVEL = 0.2  # some ball moves at least this far (frame sides) during the next clip
_MAX_ATTEMPTS = 1000


def seed_for(split: str, index: int) -> int:
    """The seed of sample ``index`` of ``split``: the split's first seed plus the index."""
    if split not in SPLITS:
        raise InputError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    first, count = SPLITS[split]
    if not 0 <= index < count:
        raise InputError(f"index {index} is outside split {split!r}, which has indices 0..{count - 1}")
    return first + index


def _is_ltx_length(frames: int) -> bool:
    return frames >= 1 and (frames - 1) % 8 == 0


@dataclass
class ToyWorldConfig:
    """How toy-world samples look. The same seed and config always give the same sample."""

    size: int = field(
        default=32, metadata={"help": "Frame height and width in pixels (32..128; 32 is cheap on CPU)."}
    )
    context_frames: int = field(
        default=9, metadata={"help": "Frames of the context clip (8k+1, or a multiple of clip_frames)."}
    )
    next_frames: int = field(
        default=9,
        metadata={"help": "Frames of the next clip to predict (8k+1, or a multiple of clip_frames)."},
    )
    clip_frames: int | None = field(
        default=None,
        metadata={"help": "Clip length (8k+1) for next-clip models; samples then also carry `clips`."},
    )
    next_overlap: int = field(
        default=0,
        metadata={
            "help": "Last context frames repeated at the start of `next` (1: the next scene starts at the "
            "last context frame, as image-conditioned generation does)."
        },
    )
    fps: float = field(
        default=8.0, metadata={"help": "Frame rate stored with the videos (physics is per frame)."}
    )
    min_objects: int = field(default=1, metadata={"help": "Fewest balls in a scene (>= 1)."})
    max_objects: int = field(default=3, metadata={"help": "Most balls in a scene (<= 3)."})
    wall_probability: float = field(
        default=0.6, metadata={"help": "Chance that a scene has (drawn) bouncing walls."}
    )
    gravity_probability: float = field(
        default=0.3, metadata={"help": "Chance that a scene has gravity (side view)."}
    )
    strike_probability: float = field(
        default=0.5,
        metadata={"help": "Chance that a scene of 2+ balls is set up so one strikes a resting one."},
    )
    enter_probability: float = field(
        default=0.4,
        metadata={"help": "Chance that a wall-less scene has a ball entering during the context."},
    )
    instruction: str = field(
        default=DEFAULT_INSTRUCTION, metadata={"help": "Instruction text of every sample."}
    )
    audio: bool = field(
        default=False,
        metadata={"help": "Add sound: a short tone at every wall bounce and strike, aligned to the frames."},
    )
    sample_rate: int = field(
        default=16000,
        metadata={"help": "Audio sample rate in Hz (16 kHz: what LTX-2's audio VAE takes in)."},
    )

    def __post_init__(self) -> None:
        if not 32 <= self.size <= 128:
            raise InputError(f"toy world size {self.size} is outside 32..128 pixels; pick e.g. 32 or 64")
        if self.clip_frames is None:
            for name in ("context_frames", "next_frames"):
                if not _is_ltx_length(getattr(self, name)):
                    raise InputError(
                        f"{name}={getattr(self, name)} is not 8k+1 (9, 17, 25...), which the LTX VAE needs"
                    )
        else:
            if not _is_ltx_length(self.clip_frames):
                raise InputError(f"clip_frames={self.clip_frames} is not 8k+1 (9, 17, 25...)")
            for name in ("context_frames", "next_frames"):
                value = getattr(self, name)
                if value < self.clip_frames or value % self.clip_frames:
                    raise InputError(
                        f"{name}={value} is not a positive multiple of clip_frames={self.clip_frames}"
                    )
        if self.next_overlap and self.clip_frames is not None:
            raise InputError("next_overlap applies to (context, next) pairs; set it to 0 with clip_frames")
        if not 0 <= self.next_overlap < self.context_frames:
            raise InputError(
                f"next_overlap={self.next_overlap} must be in [0, context_frames={self.context_frames})"
            )
        if not 1 <= self.min_objects <= self.max_objects <= 3:
            raise InputError(
                f"min_objects={self.min_objects}, max_objects={self.max_objects}: need 1 <= min <= max <= 3"
            )
        if not (self.fps > 0 and math.isfinite(self.fps)):
            raise InputError(f"fps must be a positive number, got {self.fps}")
        for name in ("wall_probability", "gravity_probability", "strike_probability", "enter_probability"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise InputError(f"{name}={getattr(self, name)} is not a probability in [0, 1]")
        if not (isinstance(self.sample_rate, int) and 8000 <= self.sample_rate <= 96000):
            raise InputError(f"sample_rate={self.sample_rate} Hz is not an int in 8000..96000; e.g. 16000")
        if self.audio and self.sample_rate / self.fps < 80:
            raise InputError(
                f"fps={self.fps} leaves {self.sample_rate / self.fps:.0f} audio samples per frame at "
                f"{self.sample_rate} Hz, too few for a tone; lower fps or raise sample_rate"
            )

    @classmethod
    def for_clips(
        cls, num_clips: int, clip_frames: int = 9, context_clips: int = 1, **kwargs: Any
    ) -> ToyWorldConfig:
        """Clip-sequence view for next-clip models: ``num_clips`` clips of ``clip_frames`` frames, the
        first ``context_clips`` of them the context."""
        if not 1 <= context_clips < num_clips:
            raise InputError(
                f"context_clips={context_clips}, num_clips={num_clips}: need 1 <= context_clips < num_clips"
            )
        return cls(
            context_frames=context_clips * clip_frames,
            next_frames=(num_clips - context_clips) * clip_frames,
            clip_frames=clip_frames,
            **kwargs,
        )


# ---------------------------------------------------------------------------------------------------
# physics
# ---------------------------------------------------------------------------------------------------


@dataclass
class _Event:
    frame: int  # absolute frame at which the event is first visible
    kind: str  # "hit", "wall", "enter", "leave"
    obj: int
    other: int | None = None  # struck ball for "hit"
    side: str | None = None  # "left", "right", "top", "bottom"
    velocity: tuple[float, float] | None = None  # of `other` after a hit


@dataclass
class _Scene:
    walls: bool
    gravity: float
    colours: list[str]
    radii: np.ndarray  # [n], frame sides
    positions: np.ndarray  # [T, n, 2], frame sides
    velocities: np.ndarray  # [T, n, 2], frame sides per frame
    events: list[_Event]


def _simulate(
    pos0: np.ndarray, vel0: np.ndarray, radii: np.ndarray, frames: int, walls: bool, gravity: float
) -> tuple[np.ndarray, np.ndarray, list[_Event]]:
    """Integrate ``frames - 1`` frame steps (semi-implicit Euler, `_SUBSTEPS` substeps per frame)."""
    pos, vel = pos0.astype(np.float64).copy(), vel0.astype(np.float64).copy()
    mass = radii**2
    n = len(radii)
    lo, hi = WALL_THICKNESS + radii, 1.0 - WALL_THICKNESS - radii
    positions, velocities, events = [pos.copy()], [vel.copy()], []
    dt = 1.0 / _SUBSTEPS
    for frame in range(1, frames):
        for _ in range(_SUBSTEPS):
            vel[:, 1] += gravity * dt
            pos += vel * dt
            if walls:
                for axis, (low_side, high_side) in enumerate((("left", "right"), ("top", "bottom"))):
                    for i in range(n):
                        if pos[i, axis] < lo[i] and vel[i, axis] < 0:
                            pos[i, axis] = 2 * lo[i] - pos[i, axis]
                            vel[i, axis] = -vel[i, axis]
                            events.append(_Event(frame, "wall", i, side=low_side))
                        elif pos[i, axis] > hi[i] and vel[i, axis] > 0:
                            pos[i, axis] = 2 * hi[i] - pos[i, axis]
                            vel[i, axis] = -vel[i, axis]
                            events.append(_Event(frame, "wall", i, side=high_side))
            for i in range(n):
                for j in range(i + 1, n):
                    delta = pos[j] - pos[i]
                    dist = float(np.hypot(*delta))
                    reach = radii[i] + radii[j]
                    if dist >= reach or dist == 0.0:
                        continue
                    normal = delta / dist
                    closing = float((vel[i] - vel[j]) @ normal)
                    if closing <= 0:
                        continue
                    striker, struck = (i, j) if float(vel[i] @ normal) >= float(-vel[j] @ normal) else (j, i)
                    total = mass[i] + mass[j]
                    vel[i] -= 2 * mass[j] / total * closing * normal
                    vel[j] += 2 * mass[i] / total * closing * normal
                    overlap = reach - dist
                    pos[i] -= normal * overlap * mass[j] / total
                    pos[j] += normal * overlap * mass[i] / total
                    events.append(_Event(frame, "hit", striker, other=struck, velocity=tuple(vel[struck])))
        positions.append(pos.copy())
        velocities.append(vel.copy())
    positions_arr, velocities_arr = np.stack(positions), np.stack(velocities)
    events.extend(_frame_crossings(positions_arr, radii))
    events.sort(key=lambda e: e.frame)
    return positions_arr, velocities_arr, events


def _visible(positions: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """Whether any part of each disc lies inside the frame: ``[T, n]`` bool."""
    nearest = np.clip(positions, 0.0, 1.0)
    return np.hypot(*(positions - nearest).transpose(2, 0, 1)) < radii


def _side(point: np.ndarray) -> str:
    x, y = point
    overshoot = {"left": -x, "right": x - 1.0, "top": -y, "bottom": y - 1.0}
    return max(overshoot, key=overshoot.get)


def _frame_crossings(positions: np.ndarray, radii: np.ndarray) -> list[_Event]:
    visible = _visible(positions, radii)
    events = []
    for t in range(1, len(positions)):
        for i in range(len(radii)):
            if visible[t, i] and not visible[t - 1, i]:
                events.append(_Event(t, "enter", i, side=_side(positions[t - 1, i])))
            elif visible[t - 1, i] and not visible[t, i]:
                events.append(_Event(t, "leave", i, side=_side(positions[t, i])))
    return events


def _unit(angle: float) -> np.ndarray:
    return np.array([math.cos(angle), math.sin(angle)])


@dataclass
class _Proposal:
    walls: bool
    gravity: float
    strike: bool
    colours: list[str]
    radii: np.ndarray
    pos: np.ndarray
    vel: np.ndarray


def _propose(rng: Generator, config: ToyWorldConfig) -> _Proposal:
    """Draw one candidate initial state; `_valid` decides whether it makes a usable scene."""
    n = int(rng.integers(config.min_objects, config.max_objects + 1))
    walls = bool(rng.random() < config.wall_probability)
    strike = n >= 2 and bool(rng.random() < config.strike_probability)
    gravity = 0.0 if strike or rng.random() >= config.gravity_probability else float(rng.uniform(*_GRAVITY))
    # the entering ball is the last one, which must not be the resting target of a strike
    enter = not walls and not (strike and n == 2) and bool(rng.random() < config.enter_probability)
    names = list(PALETTE)
    colours = [names[k] for k in rng.choice(len(names), size=n, replace=False)]
    radii = rng.uniform(*_RADIUS, size=n)
    pos = np.zeros((n, 2))
    for i in range(n):  # rejection-place inside the box, apart from the balls placed so far
        margin = WALL_THICKNESS + radii[i] + 0.01
        for _ in range(100):
            pos[i] = rng.uniform(margin, 1.0 - margin, size=2)
            if all(np.hypot(*(pos[i] - pos[j])) > radii[i] + radii[j] + 0.05 for j in range(i)):
                break
    vel = np.stack(
        [_unit(a) * s for a, s in zip(rng.uniform(0, 2 * math.pi, n), rng.uniform(*_SPEED, n), strict=True)]
    )
    if gravity:
        vel[:, 1] -= rng.uniform(0.0, 0.04, size=n)  # thrown upwards a little
    if strike:  # ball 0 is aimed at resting ball 1, contact late in the context or in the next clip
        vel[1] = 0.0
        contact_frame = rng.uniform(
            config.context_frames - 3, config.context_frames + config.next_frames * 0.6
        )
        direction = _unit(rng.uniform(0, 2 * math.pi))
        reach = radii[0] + radii[1]
        offset = rng.uniform(-0.5, 0.5) * reach
        contact = (
            pos[1]
            - direction * math.sqrt(reach**2 - offset**2)
            + np.array([-direction[1], direction[0]]) * offset
        )
        vel[0] = direction * rng.uniform(*_SPEED)
        pos[0] = contact - vel[0] * contact_frame
    if enter:  # the last ball starts outside and crosses the border during the context
        i = n - 1
        entry_frame = rng.uniform(1, max(1.5, config.context_frames - 3))
        side = int(rng.integers(4))
        along = rng.uniform(0.2, 0.8)
        # sides: from the left, right, top, bottom; the ball starts touching that edge from outside
        inward = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])[side]
        r = radii[i]
        entry = np.array([[-r, along], [1.0 + r, along], [along, -r], [along, 1.0 + r]])[side]
        angle = math.atan2(inward[1], inward[0]) + rng.uniform(-0.8, 0.8)
        vel[i] = _unit(angle) * rng.uniform(*_SPEED)
        pos[i] = entry - vel[i] * entry_frame
    return _Proposal(walls, gravity, strike, colours, radii, pos, vel)


def _valid(scene: _Scene, config: ToyWorldConfig, strike_wanted: bool) -> bool:
    pos, radii = scene.positions, scene.radii
    last_context = config.context_frames - 1
    n = len(radii)
    for i in range(n):
        for j in range(i + 1, n):
            if np.hypot(*(pos[0, i] - pos[0, j])) < radii[i] + radii[j] + 0.02:
                return False
    if scene.walls and np.any(
        (pos[0] < WALL_THICKNESS + radii[:, None]) | (pos[0] > 1 - WALL_THICKNESS - radii[:, None])
    ):
        return False
    if np.any((pos[last_context] < 0.0) | (pos[last_context] > 1.0)):  # every ball is in view before "next"
        return False
    travel = np.hypot(*(pos[last_context + 1 :] - pos[last_context]).transpose(2, 0, 1))
    if travel.max() < _MIN_NEXT_TRAVEL:
        return False
    hits = sum(e.kind == "hit" for e in scene.events)
    return hits == 1 if strike_wanted else hits <= 1  # one clear collision at most: a readable story


def _make_scene(seed: int, config: ToyWorldConfig) -> _Scene:
    rng = Generator(PCG64(seed))
    frames = config.context_frames + config.next_frames
    for _ in range(_MAX_ATTEMPTS):
        p = _propose(rng, config)
        positions, velocities, events = _simulate(p.pos, p.vel, p.radii, frames, p.walls, p.gravity)
        scene = _Scene(p.walls, p.gravity, p.colours, p.radii, positions, velocities, events)
        if _valid(scene, config, p.strike):
            return scene
    raise RuntimeError(f"toy world: no valid scene for seed {seed} in {_MAX_ATTEMPTS} attempts (a bug)")


# ---------------------------------------------------------------------------------------------------
# rendering
# ---------------------------------------------------------------------------------------------------


def render(
    positions: np.ndarray,
    radii: np.ndarray,
    colours: list[tuple[int, int, int]],
    size: int,
    walls: bool,
) -> torch.Tensor:
    """Render balls: ``positions [T, n, 2]`` and ``radii [n]`` in pixels, ``colours`` RGB 0..255.

    Returns the library's video tensor ``[T, size, size, 3]`` float32 in [0, 1]. Later balls are
    drawn over earlier ones (collisions keep them apart, so overlaps are sub-pixel).
    """
    frames = np.empty((len(positions), size, size, 3), dtype=np.float64)
    frames[:] = np.array(BACKGROUND) / 255.0
    if walls:
        border = max(1, round(WALL_THICKNESS * size))
        wall = np.array(WALL_COLOUR) / 255.0
        frames[:, :border], frames[:, -border:] = wall, wall
        frames[:, :, :border], frames[:, :, -border:] = wall, wall
    coverage = disc_coverage(positions, radii[None, :], size, size)  # [T, n, H, W]
    for i, colour in enumerate(colours):
        alpha = coverage[:, i, :, :, None]
        frames = frames * (1.0 - alpha) + (np.array(colour) / 255.0) * alpha
    return torch.from_numpy(frames.astype(np.float32))


# ---------------------------------------------------------------------------------------------------
# captions
# ---------------------------------------------------------------------------------------------------

_DIRECTIONS = ["right", "up and to the right", "up", "up and to the left",
               "left", "down and to the left", "down", "down and to the right"]  # fmt: skip


def _direction(velocity: np.ndarray) -> str:
    angle = math.degrees(math.atan2(-velocity[1], velocity[0])) % 360.0  # y points down
    return _DIRECTIONS[int(((angle + 22.5) % 360.0) // 45.0)]


def _motion(velocity: np.ndarray, gravity: float) -> str:
    vx, vy = float(velocity[0]), float(velocity[1])
    if not gravity:
        return f"rolls {_direction(velocity)}"
    if abs(vx) < 0.35 * math.hypot(vx, vy):
        return "falls" if vy > 0 else "flies up"
    return f"arcs to the {'right' if vx > 0 else 'left'}"


def _event_phrase(event: _Event, obj: int, scene: _Scene) -> str:
    name = f"the {scene.colours[event.other]} ball" if event.other is not None else ""
    if event.kind == "hit" and event.obj == obj:
        return f"hits {name}"
    if event.kind == "hit":
        return f"is hit and {_motion(np.array(event.velocity), scene.gravity)}"
    if event.kind == "wall":
        if scene.gravity and event.side == "bottom":
            return "bounces on the floor"
        if scene.gravity and event.side == "top":
            return "bounces off the ceiling"
        return f"bounces off the {event.side} wall"
    if event.kind == "enter":
        return f"enters from the {event.side}"
    where = f"to the {event.side}" if event.side in ("left", "right") else f"through the {event.side}"
    return f"leaves the frame {where}"


def _in_segment(event: _Event, start: int, stop: int) -> bool:
    """Whether an event belongs to frames ``[start, stop)``: an event at frame ``start`` happened
    between ``start - 1`` and ``start``, which is part of the segment unless it is the first one."""
    return start < event.frame < stop or (start > 0 and event.frame == start)


def _caption(scene: _Scene, start: int, stop: int) -> str:
    """Describe frames ``[start, stop)``: per ball, its motion as the segment begins, then its events."""
    visible = _visible(scene.positions[start:stop], scene.radii)
    events = [e for e in scene.events if _in_segment(e, start, stop)]
    clauses = []
    for i, colour in enumerate(scene.colours):
        mine = [e for e in events if e.obj == i or e.other == i]
        if not visible[:, i].any() and not mine:
            continue
        phrases = [_event_phrase(e, i, scene) for e in mine if e.kind == "enter"]
        velocity = scene.velocities[max(start - 1, 0), i]  # before the segment's first step
        if math.hypot(*velocity) >= _REST_SPEED:
            phrases.append(_motion(velocity, scene.gravity))
        for event in mine:
            phrase = _event_phrase(event, i, scene)
            if event.kind != "enter" and (not phrases or phrases[-1] != phrase):
                phrases.append(phrase)
        if not phrases:
            phrases = ["stays still"]
        body = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
        clauses.append(f"the {colour} ball {body}")
    return "; ".join(clauses)


def _segment_events(scene: _Scene, start: int, stop: int) -> list[dict[str, Any]]:
    out = []
    for e in scene.events:
        if not _in_segment(e, start, stop):
            continue
        record: dict[str, Any] = {"frame": e.frame - start, "type": e.kind, "object": scene.colours[e.obj]}
        if e.other is not None:
            record["other"] = scene.colours[e.other]
        if e.side is not None:
            record["side"] = e.side
        out.append(record)
    return out


# ---------------------------------------------------------------------------------------------------
# sound
# ---------------------------------------------------------------------------------------------------


def _pitch(event: _Event, scene: _Scene) -> float | None:
    """An event's tone in Hz: a bounce rings at its ball's pitch, a strike at `STRIKE_PITCH`; None
    for silent events (entering, leaving)."""
    if event.kind == "wall":
        return BOUNCE_PITCH[scene.colours[event.obj]]
    return STRIKE_PITCH if event.kind == "hit" else None


def _tone(frequency: float, sample_rate: int, seconds: float) -> np.ndarray:
    """One tone: a sine of ``frequency`` Hz, peak `TONE_AMPLITUDE`, decaying exponentially, with
    2 ms linear fades at both ends; ``round(seconds * sample_rate)`` samples (float64)."""
    t = np.arange(round(seconds * sample_rate)) / sample_rate
    fades = np.clip(t / _TONE_RAMP, 0.0, 1.0) * np.clip((seconds - t) / _TONE_RAMP, 0.0, 1.0)
    return TONE_AMPLITUDE * np.sin(2 * math.pi * frequency * t) * np.exp(-t / _TONE_DECAY) * fades


def _tone_seconds(config: ToyWorldConfig) -> float:
    return min(TONE_SECONDS, 0.9 / config.fps)


def _frame_sample(frame: int, config: ToyWorldConfig) -> int:
    """The first audio sample of a frame (frame ``f`` starts at time ``f / fps``)."""
    return round(frame * config.sample_rate / config.fps)


def _soundtrack(scene: _Scene, config: ToyWorldConfig) -> torch.Tensor:
    """The whole scene's sound, ``[1, N]`` float32 with ``N`` the samples of all its frames."""
    frames = len(scene.positions)
    track = np.zeros(_frame_sample(frames, config))
    seconds = _tone_seconds(config)
    for event in scene.events:
        pitch = _pitch(event, scene)
        if pitch is None:
            continue
        start = _frame_sample(event.frame, config)
        sound = _tone(pitch, config.sample_rate, seconds)[: len(track) - start]
        track[start : start + len(sound)] += sound
    return torch.from_numpy(np.clip(track, -1.0, 1.0).astype(np.float32))[None]


def _segment_onsets(scene: _Scene, start: int, stop: int, fps: float) -> list[dict[str, Any]]:
    """The tones of frames ``[start, stop)``: frame (in the segment), time (s), event type, ball, pitch."""
    out = []
    for e in scene.events:
        pitch = _pitch(e, scene)
        if pitch is None or not _in_segment(e, start, stop):
            continue
        frame = e.frame - start
        out.append(
            {
                "frame": frame,
                "time": round(frame / fps, 6),
                "type": e.kind,
                "object": scene.colours[e.obj],
                "pitch": pitch,
            }
        )
    return out


def _onsets(scene: _Scene, config: ToyWorldConfig) -> dict[str, list[dict[str, Any]]]:
    """The tones of the context and of the next segment (`_segment_onsets`)."""
    fc, start = config.context_frames, config.context_frames - config.next_overlap
    return {
        "context": _segment_onsets(scene, 0, fc, config.fps),
        "next": _segment_onsets(scene, start, start + config.next_frames, config.fps),
    }


# ---------------------------------------------------------------------------------------------------
# samples
# ---------------------------------------------------------------------------------------------------


def _track(positions: np.ndarray, radii: np.ndarray, size: int, i: int) -> dict[str, list]:
    return {
        "positions": [[round(float(x) * size, 4), round(float(y) * size, 4)] for x, y in positions[:, i]],
        "visible": [bool(v) for v in _visible(positions, radii)[:, i]],
    }


def generate_sample(
    seed: int, config: ToyWorldConfig | None = None, split: str | None = None, index: int | None = None
) -> dict[str, Any]:
    """Simulate and render the sample of ``seed``. Keys:

    * ``context`` ``[Fc, H, W, 3]`` and ``next`` ``[Fn, H, W, 3]``: float32 videos in [0, 1];
    * ``context_caption``, ``next_caption``, ``instruction``: text; ``fps``: float;
    * ``world``: JSON-serialisable truth -- per object colour, RGB, radius and per-frame positions
      (pixels) and visibility for ``context`` and ``next``, plus the events of each segment;
    * ``clips`` ``[num_clips, clip_frames, H, W, 3]`` (context then next) when ``config.clip_frames``
      is set;
    * with ``config.audio``: ``context_audio`` and ``next_audio`` (waveforms ``[1, N]`` float32 in
      [-1, 1], the samples of exactly those frames), ``sample_rate`` (Hz), and ``world["audio"]``:
      the sample rate, the tone length and per segment the ``onsets`` (frame within the segment,
      time in seconds, event type, ball colour, pitch in Hz).
    """
    config = config or ToyWorldConfig()
    scene = _make_scene(seed, config)
    size, fc = config.size, config.context_frames
    start, stop = fc - config.next_overlap, fc - config.next_overlap + config.next_frames
    colours = [PALETTE[c] for c in scene.colours]
    video = render(scene.positions * size, scene.radii * size, colours, size, scene.walls)
    world: dict[str, Any] = {
        "version": METADATA_VERSION,
        "seed": seed,
        "split": split,
        "index": index,
        "height": size,
        "width": size,
        "fps": config.fps,
        "context_frames": fc,
        "next_frames": config.next_frames,
        "next_overlap": config.next_overlap,
        "clip_frames": config.clip_frames,
        "background": list(BACKGROUND),
        "walls": scene.walls,
        "gravity": round(scene.gravity * size, 6),
        "objects": [
            {
                "name": f"{colour} ball",
                "colour": colour,
                "rgb": list(PALETTE[colour]),
                "radius": round(float(scene.radii[i]) * size, 4),
                "context": _track(scene.positions[:fc], scene.radii, size, i),
                "next": _track(scene.positions[start:stop], scene.radii, size, i),
            }
            for i, colour in enumerate(scene.colours)
        ],
        "events": {
            "context": _segment_events(scene, 0, fc),
            "next": _segment_events(scene, start, stop),
        },
    }
    sample: dict[str, Any] = {
        "context": video[:fc],
        "next": video[start:stop],
        "context_caption": _caption(scene, 0, fc),
        "next_caption": _caption(scene, start, stop),
        "instruction": config.instruction,
        "fps": config.fps,
        "world": world,
    }
    if config.clip_frames is not None:
        sample["clips"] = split_clips(video, config.clip_frames)
    if config.audio:
        track = _soundtrack(scene, config)
        sample["context_audio"] = track[:, : _frame_sample(fc, config)]
        sample["next_audio"] = track[:, _frame_sample(start, config) : _frame_sample(stop, config)]
        sample["sample_rate"] = config.sample_rate
        world["audio"] = {
            "sample_rate": config.sample_rate,
            "tone_seconds": _tone_seconds(config),
            "onsets": _onsets(scene, config),
        }
    return sample


class ToyWorld(torch.utils.data.Dataset):
    """In-memory toy-world dataset: sample ``i`` is generated on access from ``seed_for(split, start + i)``.

    Nothing is cached; generating a 32-px sample takes about a millisecond. Indices outside
    ``0..len - 1`` raise `InputError`.
    """

    def __init__(
        self,
        config: ToyWorldConfig | None = None,
        split: str = "train",
        num_samples: int | None = None,
        start: int = 0,
    ) -> None:
        self.config = config or ToyWorldConfig()
        if split not in SPLITS:
            raise InputError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
        count = SPLITS[split][1]
        num_samples = count - start if num_samples is None else num_samples
        if start < 0 or num_samples < 1 or start + num_samples > count:
            raise InputError(
                f"samples {start}..{start + num_samples - 1} do not fit split {split!r} (0..{count - 1})"
            )
        self.split, self.start, self.num_samples = split, start, num_samples

    def __len__(self) -> int:
        return self.num_samples

    def seed(self, index: int) -> int:
        """The seed of sample ``index``."""
        if not 0 <= index < self.num_samples:
            raise InputError(
                f"index {index} is out of range for this {self.split!r} toy world of {self.num_samples}"
            )
        return seed_for(self.split, self.start + index)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        return generate_sample(self.seed(index), self.config, self.split, self.start + index)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return (self[i] for i in range(len(self)))

    def onsets(self, index: int) -> dict[str, list[dict[str, Any]]]:
        """``self[index]["world"]["audio"]["onsets"]`` (per segment, its tones) from the simulated scene
        alone, without rendering the video or the sound: what a sampler needs to pick sounding clips."""
        config = self.config
        if not config.audio:
            raise InputError("onsets need a toy world with audio; set ToyWorldConfig(audio=True)")
        return _onsets(_make_scene(self.seed(int(index)), config), config)

    def reversed_next(self, index: int) -> torch.Tensor:
        """A wrong future for sample ``index``: from the last context frame every ball's velocity is
        negated and the same physics runs on. A hard negative for rewards and judges."""
        seed = self.seed(int(index))
        scene = _make_scene(seed, self.config)
        last = self.config.context_frames - 1
        positions, _, _ = _simulate(
            scene.positions[last],
            -scene.velocities[last],
            scene.radii,
            self.config.next_frames + 1,
            scene.walls,
            scene.gravity,
        )
        size = self.config.size
        return render(
            positions[1:] * size, scene.radii * size, [PALETTE[c] for c in scene.colours], size, scene.walls
        )


# MP4 settings of exported datasets: H.264 4:4:4 at crf 0, lossless up to RGB<->YUV rounding (<= 1/255
# measured), where the usual 4:2:0 smears a 3-pixel ball's colour by up to ~100/255.
EXPORT_MP4 = {"pix_fmt": "yuv444p", "crf": 0}


def export_toyworld(
    world: ToyWorld,
    out_dir: str | os.PathLike,
    *,
    video_format: str = "mp4",
    parquet: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Write ``world``'s samples as an NSP dataset: ``videos/*.{mp4,npz}``, ``manifest.jsonl`` (and
    ``manifest.parquet``), and ``toyworld.json`` (the config, to regenerate it). The manifest is
    written last and atomically, so an interrupted export never leaves one pointing at missing
    files. With ``world.config.audio`` each video file also holds its segment's sound (AAC in MP4)
    and each manifest row's ``world`` its onsets. Returns the manifest's path.
    """
    if video_format not in ("mp4", "npz"):
        raise InputError(f"video format {video_format!r} is not supported; use 'mp4' or 'npz'")
    out = Path(out_dir)
    manifest = out / "manifest.jsonl"
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file; give a folder")
    if manifest.exists() and not overwrite:
        raise InputError(f"{manifest} already exists; pass overwrite=True (--overwrite) or another folder")
    (out / "videos").mkdir(parents=True, exist_ok=True)
    options = EXPORT_MP4 if video_format == "mp4" else {}
    rows = []
    for i in tqdm(range(len(world)), desc=f"toyworld {world.split}", unit="sample", disable=not progress):
        sample = world[i]
        stem = f"videos/{world.split}-{world.start + i:07d}"
        for part in ("context", "next"):
            sound = (
                {"audio": sample[f"{part}_audio"], "sample_rate": sample["sample_rate"]}
                if world.config.audio
                else {}
            )
            write_video(
                out / f"{stem}-{part}.{video_format}", sample[part], sample["fps"], **options, **sound
            )
        rows.append(
            {
                "context_video": f"{stem}-context.{video_format}",
                "next_video": f"{stem}-next.{video_format}",
                "context_caption": sample["context_caption"],
                "next_caption": sample["next_caption"],
                "instruction": sample["instruction"],
                "world": json.dumps(sample["world"], separators=(",", ":")),
            }
        )
    info = {
        "config": asdict(world.config),
        "split": world.split,
        "start": world.start,
        "num_samples": len(world),
        "video_format": video_format,
        "mp4": options,
    }
    (out / "toyworld.json").write_text(json.dumps(info, indent=2) + "\n")
    if parquet:
        write_manifest(rows, out / "manifest.parquet")
    else:
        (out / "manifest.parquet").unlink(missing_ok=True)  # a stale one from an overwritten export
    return write_manifest(rows, manifest)
