"""Verifiable causal reward for the toy world: does the generated next scene follow the true one?

The true continuation is known exactly (`grpo.data.toyworld`), so no judge is needed: each ball is
found in every generated frame by its colour (hue), its trajectory is compared with the simulated
one, and the agreement is a score in [0, 1]. Registered as ``"toyworld_verifiable"``.

The truth comes from the dataset's ``world`` column (one entry per video, a dict or its JSON
text): the toy world's trajectory metadata, carried by in-memory samples and by NSP manifests
that the toy world exported. It holds, per object, ``rgb``, ``radius`` and, per segment
(``"context"``/``"next"``), ``positions`` (pixel x, y per frame); plus the frame ``height``/``width``.

How a video is scored (all per frame ``f`` and true ball ``k``):

* Detection: after a light 3x3 blur (so that pixel noise on the background does not read as
  colour), a pixel belongs to ball ``k`` when its chroma (max - min channel) is at least
  ``min_chroma`` and its hue is within ``hue_tolerance`` degrees of ``k``'s hue (nearest ball
  wins). Its weight is ``chroma / chroma_k``, the fraction of the pixel the ball covers on a grey
  background, so blur (VAE, codec) moves weight around but keeps the *sum* (area) and the
  *centroid*. The expected area and centroid come from rendering the true disc with the same
  anti-aliased coverage as the toy world (`policies.toy_geometry.disc_coverage`), which also handles
  balls partly out of the frame.
* ``tracking``: the mean over (f, k) of a cell score -- ``exp(-err^2 / (2 position_sigma^2))`` when
  the ball is detected (mass >= ``detect_fraction`` of its full area) where it should be seen, with
  ``err`` the centroid distance divided by ``max(H, W)``; 0 when a ball that should be seen
  (>= half visible) is missing (*vanished*) or one that should be out of view is detected; 1 when a
  ball correctly stays out of view.
* ``colour``: for detected balls, ``exp(-dhue^2 / (2 colour_sigma^2))`` of the weighted mean hue's
  offset from the ball's hue (identity/colour persistence), averaged; 1 when no ball is detected.
* ``spurious``: per frame ``exp(-extra / mean_ball_area)`` where ``extra`` is the coloured area
  explained by no ball plus each ball's mass beyond ``(1 + mass_tolerance)`` times its expected
  area plus a tenth of its full area (duplicates, smears, noise), averaged over frames.
* ``dense`` (for GRPO): the two thresholds become ramps, so a faint ball earns its share instead of
  0. A ball pixel's weight is multiplied by a chroma gate rising linearly from 0 at ``min_chroma / 4``
  to 1 at ``min_chroma``, and a ball that should be at least partly in view is detected to the degree
  ``p = min(1, mass / (detect_fraction * full area))``: its cell is ``p * position kernel + (1 - p) *
  (the cell of a missing ball)``. A ball that should be out of view keeps the ``detect_fraction`` cut
  (on the gated mass) and ``colour`` averages the detected balls only, so faint colour noise is
  neither penalised nor scored for hue. A sample's score then moves with every bit of colour kept at
  the right place, where the thresholded one is 0 for all samples that fade a ball (a group of them
  has no advantage). With ``p`` 0 or 1 and every pixel's chroma below ``min_chroma / 4`` or at least
  ``min_chroma``, it equals the thresholded score.
* ``seen_only`` (for GRPO where erasing pays): ``tracking`` averages only the cells of balls that
  should be seen, so a video that loses every ball earns nothing for the balls that did leave the
  view. A next-clip base that fades its balls is otherwise pulled towards the empty video, which
  scores as much as the fading ones on clips where balls leave (README, next-clip section).
* ``score = tracking * colour * spurious``. The metadata also reports ``presence`` (fraction of
  cells whose seen/unseen state is right) and ``position_error`` (mean normalised error of the
  detected balls; None when none is detected).

With ``per_clip=True`` the video and the truth are cut into clips of ``clip_frames`` frames
(default: the world's ``clip_frames``), each clip is scored the same way, the ``clip_scores``
column lists them and the score is their mean: dense credit for next-clip policies.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from policies.errors import InputError
from policies.toy_geometry import disc_coverage
from policies.video_io import as_video
from rewards.registry import register
from rewards.types import RewardOutput


@dataclass
class VerifiableRewardConfig:
    """Knobs of the toy-world verifiable reward; the defaults score the true future >= 0.98."""

    world_key: str = field(
        default="world", metadata={"help": "Metadata column holding the toy-world trajectories."}
    )
    segment: str = field(
        default="next",
        metadata={"help": "Trajectory segment the videos show: 'next' (generated) or 'context'."},
    )
    per_clip: bool = field(
        default=False, metadata={"help": "Score each clip of clip_frames frames separately."}
    )
    clip_frames: int | None = field(
        default=None, metadata={"help": "Clip length for per_clip (default: the world's clip_frames)."}
    )
    position_sigma: float = field(
        default=0.08, metadata={"help": "Position tolerance, a fraction of max(H, W) (Gaussian sigma)."}
    )
    hue_tolerance: float = field(
        default=30.0, metadata={"help": "Max hue distance (degrees) of a ball's pixels."}
    )
    colour_sigma: float = field(
        default=12.0, metadata={"help": "Hue drift (degrees) that costs ~40% of colour."}
    )
    min_chroma: float = field(
        default=0.1, metadata={"help": "Pixels below this chroma (0..1) count as background."}
    )
    smooth: bool = field(
        default=True,
        metadata={"help": "Blur frames with a 3x3 binomial kernel first (cuts pixel noise 2.7x)."},
    )
    detect_fraction: float = field(
        default=0.3, metadata={"help": "A ball is detected when its mass is >= this fraction of its area."}
    )
    mass_tolerance: float = field(
        default=0.5,
        metadata={"help": "Relative excess of a ball's mass over its expected area that is free."},
    )
    dense: bool = field(
        default=False,
        metadata={"help": "Ramps instead of chroma/detection cut-offs: faint balls earn partial credit."},
    )
    seen_only: bool = field(
        default=False,
        metadata={
            "help": "tracking over the cells of balls that should be seen only: no credit for an empty video "
            "where balls left the view (a clip with no such cell keeps the usual mean)."
        },
    )

    def __post_init__(self) -> None:
        if self.segment not in ("next", "context"):
            raise InputError(f"segment={self.segment!r}; use 'next' or 'context'")
        for name in ("position_sigma", "hue_tolerance", "colour_sigma", "min_chroma", "detect_fraction"):
            if not getattr(self, name) > 0:
                raise InputError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.mass_tolerance < 0:
            raise InputError(f"mass_tolerance must be >= 0, got {self.mass_tolerance}")
        if self.clip_frames is not None and self.clip_frames < 1:
            raise InputError(f"clip_frames must be >= 1, got {self.clip_frames}")


def _hue_chroma(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hue in degrees [0, 360) and chroma (max - min) of RGB values in [0, 1], last axis = channels."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    high, low = rgb.max(axis=-1), rgb.min(axis=-1)
    chroma = high - low
    safe = np.where(chroma > 0, chroma, 1.0)
    hue = np.where(
        high == r, ((g - b) / safe) % 6.0, np.where(high == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0)
    )
    return (hue * 60.0) % 360.0, chroma


def _binomial_blur(frames: np.ndarray) -> np.ndarray:
    """[1, 2, 1] / 4 along height and width, edges replicated: ``[F, H, W, C] -> same shape``."""
    for axis in (1, 2):
        padded = np.concatenate(
            [frames.take([0], axis=axis), frames, frames.take([-1], axis=axis)], axis=axis
        )
        n = frames.shape[axis]
        frames = (
            padded.take(range(0, n), axis=axis)
            + 2 * padded.take(range(1, n + 1), axis=axis)
            + padded.take(range(2, n + 2), axis=axis)
        ) / 4.0
    return frames


def _hue_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = np.abs(a - b) % 360.0
    return np.minimum(d, 360.0 - d)


@dataclass
class Detections:
    """Balls found by colour in each frame (``K`` = number of query colours)."""

    mass: np.ndarray  # [F, K] covered area in pixels
    centroid: np.ndarray  # [F, K, 2] (x, y) pixels; NaN where mass is 0
    hue_offset: (
        np.ndarray
    )  # [F, K] degrees between the weighted mean hue and the query hue; NaN where mass is 0
    unexplained: np.ndarray  # [F] coloured area matching no query colour, pixels


def detect_balls(
    video: torch.Tensor | np.ndarray,
    rgbs: Sequence[Sequence[float]],
    *,
    min_chroma: float = 0.1,
    hue_tolerance: float = 30.0,
    smooth: bool = True,
    soft_chroma: bool = False,
) -> Detections:
    """Find balls of the given colours (RGB 0..255) in every frame of ``video`` by hue.

    Each coloured pixel goes to the query colour of nearest hue (within ``hue_tolerance``) with
    weight ``chroma / chroma_of_that_colour`` (its coverage on a grey background); masses and
    centroids are weighted sums, so they survive blur. ``smooth`` first averages each pixel with its
    neighbours (binomial 3x3, which keeps masses and centroids) so that the pixel noise of a
    generated background does not read as colour. ``soft_chroma`` replaces the ``min_chroma`` cut by
    a gate rising linearly from 0 at ``min_chroma / 4`` to 1 at ``min_chroma`` for the balls' masses
    (a faint ball keeps a faint mass; ``unexplained`` keeps the cut). Accepts uint8 or float videos.
    """
    frames = as_video(video).detach().cpu().clamp(0.0, 1.0).numpy().astype(np.float64)
    if smooth:
        frames = _binomial_blur(frames)
    query = np.asarray(rgbs, dtype=np.float64).reshape(-1, 3) / 255.0
    query_hue, query_chroma = _hue_chroma(query)
    if np.any(query_chroma < 0.2):
        raise InputError(
            f"ball colours {np.asarray(rgbs).tolist()} include a grey one; detection needs saturated hues"
        )
    hue, chroma = _hue_chroma(frames)  # [F, H, W]
    coloured = chroma >= min_chroma
    # the gate of a ball's pixels; unexplained colour keeps the cut (faint noise is not penalised)
    gate = np.clip((chroma - min_chroma / 4) / (0.75 * min_chroma), 0.0, 1.0) if soft_chroma else coloured
    distance = _hue_distance(hue[..., None], query_hue)  # [F, H, W, K]
    nearest = distance.argmin(axis=-1)
    in_hue = np.take_along_axis(distance, nearest[..., None], axis=-1)[..., 0] <= hue_tolerance
    matched = gate * in_hue
    onehot = (nearest[..., None] == np.arange(len(query))) * matched[..., None]
    weight = np.clip(chroma[..., None] / query_chroma, 0.0, 1.0) * onehot  # [F, H, W, K]
    mass = weight.sum(axis=(1, 2))
    height, width = frames.shape[1:3]
    ys, xs = np.arange(height) + 0.5, np.arange(width) + 0.5
    with np.errstate(invalid="ignore", divide="ignore"):
        cx = (weight * xs[None, None, :, None]).sum(axis=(1, 2)) / mass
        cy = (weight * ys[None, :, None, None]).sum(axis=(1, 2)) / mass
        signed = (hue[..., None] - query_hue + 180.0) % 360.0 - 180.0
        hue_offset = np.abs((weight * signed).sum(axis=(1, 2)) / mass)
    unexplained = (np.clip(chroma / query_chroma.max(), 0.0, 1.0) * coloured * ~in_hue).sum(axis=(1, 2))
    return Detections(mass, np.stack([cx, cy], axis=-1), hue_offset, unexplained)


def world_metadata(world: Any, index: int, key: str) -> Any:
    """A sample's toy-world metadata as given to a reward: a dict, or its JSON text (manifests), parsed."""
    if isinstance(world, str | bytes):
        try:
            return json.loads(world)
        except json.JSONDecodeError as err:
            raise InputError(
                f"{key}[{index}] is not valid JSON ({err.msg}); pass the toy world's metadata"
            ) from None
    return world


def _as_world(world: Any, index: int, key: str) -> Mapping[str, Any] | None:
    if world is None:
        return None
    world = world_metadata(world, index, key)
    if not isinstance(world, Mapping) or not isinstance(world.get("objects"), list) or not world["objects"]:
        raise InputError(
            f"{key}[{index}] has no 'objects' list; expected toy-world metadata (grpo.data.toyworld)"
        )
    return world


class _Truth:
    """Expected per-frame area and centroid of each ball, rendered at the video's resolution."""

    def __init__(self, world: Mapping[str, Any], segment: str, height: int, width: int, index: int) -> None:
        try:
            objects = world["objects"]
            world_h, world_w = int(world["height"]), int(world["width"])
            self.rgbs = [obj["rgb"] for obj in objects]
            radii = np.array([float(obj["radius"]) for obj in objects])
            positions = np.array(
                [obj[segment]["positions"] for obj in objects], dtype=np.float64
            )  # [K, F, 2]
        except (KeyError, TypeError, ValueError) as err:
            raise InputError(f"world[{index}] lacks toy-world field {err} (segment {segment!r})") from None
        sx, sy = width / world_w, height / world_h
        if abs(sx - sy) > 0.01 * max(sx, sy):
            raise InputError(
                f"video {index} is {height}x{width}, its world {world_h}x{world_w}; keep the aspect ratio"
            )
        self.num_frames = positions.shape[1]
        centres = (positions * np.array([sx, sy])).transpose(1, 0, 2)  # [F, K, 2]
        self.radii = radii * sx
        coverage = disc_coverage(centres, self.radii[None, :], height, width)  # [F, K, H, W]
        self.mass = coverage.sum(axis=(2, 3))
        ys, xs = np.arange(height) + 0.5, np.arange(width) + 0.5
        with np.errstate(invalid="ignore", divide="ignore"):
            cx = (coverage * xs).sum(axis=(2, 3)) / self.mass
            cy = (coverage * ys[:, None]).sum(axis=(2, 3)) / self.mass
        self.centroid = np.stack([cx, cy], axis=-1)
        self.full_area = math.pi * self.radii**2


def _aggregate(
    found: Detections, truth: _Truth, cfg: VerifiableRewardConfig, size: int, frames: slice | np.ndarray
) -> dict[str, Any]:
    """Components over the frames in ``frames`` (a slice or an index array)."""
    mass, expected = found.mass[frames], truth.mass[frames]
    full = truth.full_area[None, :]
    visible_fraction = expected / full
    detected = mass >= cfg.detect_fraction * full
    must_see, must_not = visible_fraction >= 0.5, visible_fraction <= 0.05
    matched = detected & ~must_not
    error = np.linalg.norm(found.centroid[frames] - truth.centroid[frames], axis=-1) / size
    kernel = np.exp(-0.5 * (np.nan_to_num(error, nan=np.inf) / cfg.position_sigma) ** 2)
    missing = np.where(must_see, 0.0, 1.0)  # the cell of an undetected ball
    found_cell = np.where(must_not, 0.0, kernel)  # the cell of a detected one
    # dense: a ball that should be seen is detected to the degree p (module docstring); else p is 0 or 1
    p = detected.astype(float)
    if cfg.dense:
        p = np.where(must_not, p, np.clip(mass / (cfg.detect_fraction * full), 0.0, 1.0))
    cell = p * found_cell + (1.0 - p) * missing
    decided = must_see | must_not
    presence = float(((detected == must_see) & decided).sum() / decided.sum()) if decided.any() else 1.0
    hue_score = np.exp(-0.5 * (np.nan_to_num(found.hue_offset[frames], nan=180.0) / cfg.colour_sigma) ** 2)
    colour = float(hue_score[matched].mean()) if matched.any() else 1.0
    allowed = (1.0 + cfg.mass_tolerance) * expected + 0.1 * full
    extra = found.unexplained[frames] + np.clip(mass - allowed, 0.0, None).sum(axis=1)
    spurious = float(np.exp(-extra / truth.full_area.mean()).mean())
    tracking = float(cell[must_see].mean() if cfg.seen_only and must_see.any() else cell.mean())
    return {
        "score": tracking * colour * spurious,
        "tracking": tracking,
        "presence": presence,
        "position_error": float(error[matched].mean()) if matched.any() else None,
        "colour": colour,
        "spurious": spurious,
    }


@register("toyworld_verifiable")
class ToyWorldVerifiableReward:
    """Reward ``(videos, prompts, contexts, **metadata) -> RewardOutput`` against the toy world's truth.

    ``videos``: a list of ``[F, H, W, 3]`` tensors (float in [0, 1] or uint8) or one ``[B, F, H, W, 3]``
    tensor, showing the segment ``config.segment`` (the next scene by default) at any resolution of
    the world's aspect ratio. ``metadata[config.world_key]``: one toy-world dict (or JSON) per video;
    a ``None`` entry gives a ``None`` score. Prompts and contexts are not needed: the truth is exact.
    """

    __name__ = "toyworld_verifiable"  # instances are named like functions (TRL logs reward_func.__name__)

    def __init__(self, config: VerifiableRewardConfig | None = None, **overrides: Any) -> None:
        if config is not None and overrides:
            raise InputError("pass either a VerifiableRewardConfig or keyword overrides, not both")
        self.config = config or VerifiableRewardConfig(**overrides)

    def _detect(
        self, video: torch.Tensor | np.ndarray, world: Mapping[str, Any] | str, index: int
    ) -> tuple[Mapping[str, Any], _Truth, Detections, int]:
        """The parsed world, its truth at the video's resolution, the balls found and ``max(H, W)``."""
        cfg = self.config
        world = _as_world(world, index, cfg.world_key)
        if world is None:
            raise InputError(f"video {index} has no world metadata to score against")
        video = as_video(video, name=f"video {index}")
        height, width = video.shape[1:3]
        truth = _Truth(world, cfg.segment, height, width, index)
        if video.shape[0] != truth.num_frames:
            raise InputError(
                f"video {index} has {video.shape[0]} frames but its true {cfg.segment!r} segment has "
                f"{truth.num_frames}; generate exactly that many frames"
            )
        found = detect_balls(
            video,
            truth.rgbs,
            min_chroma=cfg.min_chroma,
            hue_tolerance=cfg.hue_tolerance,
            smooth=cfg.smooth,
            soft_chroma=cfg.dense,
        )
        return world, truth, found, max(height, width)

    def score_video(
        self, video: torch.Tensor | np.ndarray, world: Mapping[str, Any] | str, index: int = 0
    ) -> dict[str, Any]:
        """All components of one video's score; with ``per_clip`` also ``clip_scores`` (a float per clip)."""
        cfg = self.config
        world, truth, found, size = self._detect(video, world, index)
        if not cfg.per_clip:
            return _aggregate(found, truth, cfg, size, slice(None))
        clip = cfg.clip_frames or world.get("clip_frames")
        if not clip:
            raise InputError(
                "per_clip=True needs clip_frames (in the reward config or the world's 'clip_frames')"
            )
        if truth.num_frames % clip:
            raise InputError(f"video {index}: {truth.num_frames} frames do not split into clips of {clip}")
        clips = [
            _aggregate(found, truth, cfg, size, slice(s, s + clip)) for s in range(0, truth.num_frames, clip)
        ]
        whole = _aggregate(found, truth, cfg, size, slice(None))
        whole["score"] = float(np.mean([c["score"] for c in clips]))
        whole["clip_scores"] = [c["score"] for c in clips]
        return whole

    def score_frames(
        self,
        video: torch.Tensor | np.ndarray,
        world: Mapping[str, Any] | str,
        frames: Sequence[int],
        index: int = 0,
    ) -> float:
        """The score of the video's frames ``frames`` alone, aggregated as one set (``per_clip`` does not
        apply; over all frames it is ``score_video``'s score without it).

        A judge shown only some frames of a scene (`rewards.judge.prompts.shown_frames`) sees no more of
        it than this: a scene that goes wrong between the frames it sees looks right there. Ranking
        candidates by it is the reference a judge's AUROC is read against
        (`grpo.judge_training.verifier_ceiling`). A frame listed twice counts once.
        """
        world, truth, found, size = self._detect(video, world, index)
        picks = np.unique(np.asarray(frames, dtype=np.int64).reshape(-1))
        if picks.size == 0 or picks.min() < 0 or picks.max() >= truth.num_frames:
            raise InputError(
                f"video {index}: frames {list(frames)} must be a non-empty list of indices into its "
                f"{truth.num_frames} frames"
            )
        return float(_aggregate(found, truth, self.config, size, picks)["score"])

    def score_clips(
        self, video: torch.Tensor | np.ndarray, world: Mapping[str, Any] | str, clip_frames: int | None = None
    ) -> list[float]:
        """One score per clip of a clip-sequence video (for per-clip advantages)."""
        clip_reward = ToyWorldVerifiableReward(
            replace(self.config, per_clip=True, clip_frames=clip_frames or self.config.clip_frames)
        )
        return clip_reward.score_video(video, world)["clip_scores"]

    def __call__(
        self,
        videos: Sequence[torch.Tensor | np.ndarray] | torch.Tensor,
        prompts: Sequence[str] | None = None,
        contexts: Sequence[Any] | None = None,
        **metadata: Any,
    ) -> RewardOutput:
        key = self.config.world_key
        if key not in metadata:
            raise InputError(
                f"toyworld_verifiable needs the {key!r} metadata column (toy-world trajectories); "
                f"got columns {sorted(metadata) or 'none'}"
            )
        worlds = metadata[key]
        if len(worlds) != len(videos):
            raise InputError(f"{len(videos)} videos but {len(worlds)} entries in metadata column {key!r}")
        columns = ["tracking", "presence", "position_error", "colour", "spurious"]
        if self.config.per_clip:
            columns.append("clip_scores")
        scores: list[float | None] = []
        out: dict[str, list[Any]] = {c: [] for c in columns}
        for i, (video, world) in enumerate(zip(videos, worlds, strict=True)):
            if world is None:
                scores.append(None)
                for c in columns:
                    out[c].append(None)
                continue
            result = self.score_video(video, world, index=i)
            scores.append(result["score"])
            for c in columns:
                out[c].append(result[c])
        return RewardOutput(scores=scores, metadata=out)


@register("toyworld_verifiable_dense")
class ToyWorldDenseReward(ToyWorldVerifiableReward):
    """`ToyWorldVerifiableReward` with ``dense=True`` (module docstring), under its own name so that a
    recipe can train on it while logging and evaluating the thresholded score next to it."""

    __name__ = "toyworld_verifiable_dense"

    def __init__(self, config: VerifiableRewardConfig | None = None, **overrides: Any) -> None:
        if config is None:
            overrides.setdefault("dense", True)
        super().__init__(config, **overrides)
