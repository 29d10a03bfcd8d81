"""Colour rewards: simple targets a policy can reach, for smoke tests and sanity checks of a trainer."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from rewards.registry import register


@register("redness")
def redness(
    videos: Sequence[torch.Tensor], prompts: Any = None, contexts: Any = None, **metadata: Any
) -> list[float]:
    """Mean of ``R - (G + B) / 2`` over a video's pixels, in [-1, 1]."""
    return [float((v[..., 0] - 0.5 * (v[..., 1] + v[..., 2])).mean()) for v in videos]


@register("brightness")
def brightness(
    videos: Sequence[torch.Tensor], prompts: Any = None, contexts: Any = None, **metadata: Any
) -> list[float]:
    """Mean pixel value of a video, in [0, 1]."""
    return [float(v.float().mean()) for v in videos]
