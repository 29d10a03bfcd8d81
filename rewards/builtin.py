"""Built-in frame rewards that need no model: temporal smoothness and similarity to a true next scene.

Both are cheap, deterministic and differentiable-free checks that complement the judge: the judge
says whether the story follows, these say whether the pixels are stable (no flicker, no jump from
the last context frame) and, where the dataset has the real continuation, how close the prediction
is to it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from policies.errors import InputError
from rewards.registry import register
from rewards.types import RewardOutput


def _frames(video: Any, what: str, index: int) -> torch.Tensor:
    if not isinstance(video, torch.Tensor) or video.ndim != 4 or video.shape[-1] != 3 or video.shape[0] < 1:
        shape = tuple(video.shape) if isinstance(video, torch.Tensor) else type(video).__name__
        raise InputError(f"{what}[{index}] must be a tensor [F, H, W, 3] with F >= 1, got {shape}")
    return video.detach().float()


@register("temporal_smoothness")
def temporal_smoothness(
    videos: Sequence[torch.Tensor],
    prompts: Sequence[str] | None = None,
    contexts: Sequence[torch.Tensor] | None = None,
    *,
    tau: float = 0.05,
    **metadata: Any,
) -> RewardOutput:
    """``exp(-flicker / tau)`` in (0, 1], 1 = no flicker.

    Flicker is the mean absolute second temporal difference ``|x[t+1] - 2 x[t] + x[t-1]|``: zero for
    still frames and for steady fades, large when intensities jump back and forth. When a context
    is given its last frame is prepended, so a jump at the context -> prediction boundary counts too.
    A video with fewer than 3 frames (context frame included) scores ``None``. Metadata:
    ``flicker``, ``mean_abs_diff`` (first difference, i.e. amount of change) and ``reason``.
    """
    if tau <= 0:
        raise InputError(f"temporal_smoothness: tau={tau} must be > 0")
    if contexts is not None and len(contexts) != len(videos):
        raise InputError(f"temporal_smoothness: {len(contexts)} contexts for {len(videos)} videos")
    scores: list[float | None] = []
    flicker_col: list[float | None] = []
    diff_col: list[float | None] = []
    reasons: list[str | None] = []
    for i, video in enumerate(videos):
        frames = _frames(video, "videos", i)
        if contexts is not None and contexts[i] is not None:
            last = _frames(contexts[i], "contexts", i)[-1:]
            if last.shape[1:] == frames.shape[1:]:
                frames = torch.cat([last, frames])
        if frames.shape[0] < 3:
            scores.append(None)
            flicker_col.append(None)
            diff_col.append(None)
            reasons.append(f"needs >= 3 frames, got {frames.shape[0]}")
            continue
        flicker = (frames[2:] - 2 * frames[1:-1] + frames[:-2]).abs().mean().item()
        scores.append(math.exp(-flicker / tau))
        flicker_col.append(flicker)
        diff_col.append((frames[1:] - frames[:-1]).abs().mean().item())
        reasons.append(None)
    return RewardOutput(scores, {"flicker": flicker_col, "mean_abs_diff": diff_col, "reason": reasons})


def _match(reference: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``reference`` resampled to the frame count (nearest in time) and size (area/bilinear) of ``like``."""
    frames, height, width = like.shape[:3]
    if reference.shape[0] != frames:
        index = torch.linspace(0, reference.shape[0] - 1, frames).round().long()
        reference = reference[index]
    if reference.shape[1:3] != (height, width):
        x = reference.permute(0, 3, 1, 2)
        mode = "area" if x.shape[-2] >= height and x.shape[-1] >= width else "bilinear"
        kwargs = {} if mode == "area" else {"align_corners": False}
        reference = F.interpolate(x, size=(height, width), mode=mode, **kwargs).permute(0, 2, 3, 1)
    return reference


@register("next_scene_similarity")
def next_scene_similarity(
    videos: Sequence[torch.Tensor],
    prompts: Sequence[str] | None = None,
    contexts: Sequence[torch.Tensor] | None = None,
    *,
    next_video: Sequence[torch.Tensor | None] | None = None,
    max_psnr: float = 40.0,
    **metadata: Any,
) -> RewardOutput:
    """PSNR to the ground-truth next scene, divided by ``max_psnr`` and clipped to [0, 1].

    Reads the metadata column ``next_video`` (the dataset's true continuation, ``[F, H, W, 3]`` in
    [0, 1]); it is resampled to the prediction's frame count and size. A sample whose entry is
    ``None`` scores ``None``. Metadata: ``psnr`` (dB) and ``reason``.
    """
    if next_video is None:
        raise InputError(
            "next_scene_similarity needs a 'next_video' metadata column (the true next scene); "
            "use it only with datasets that have one"
        )
    if len(next_video) != len(videos):
        raise InputError(
            f"next_scene_similarity: {len(next_video)} next_video entries for {len(videos)} videos"
        )
    if max_psnr <= 0:
        raise InputError(f"next_scene_similarity: max_psnr={max_psnr} must be > 0")
    scores: list[float | None] = []
    psnrs: list[float | None] = []
    reasons: list[str | None] = []
    for i, (video, target) in enumerate(zip(videos, next_video)):
        prediction = _frames(video, "videos", i).clamp(0, 1)
        if target is None:
            scores.append(None)
            psnrs.append(None)
            reasons.append("no next_video for this sample")
            continue
        reference = _match(_frames(target, "next_video", i).clamp(0, 1), prediction)
        mse = (prediction - reference).pow(2).mean().item()
        psnr = max_psnr if mse == 0 else min(max_psnr, -10 * math.log10(mse))
        scores.append(max(0.0, psnr) / max_psnr)
        psnrs.append(psnr)
        reasons.append(None)
    return RewardOutput(scores, {"psnr": psnrs, "reason": reasons})
