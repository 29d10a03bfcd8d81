"""The toy world's geometry shared by its renderer (`grpo.data.toyworld`) and its verifiable reward
(`rewards.verifiable`): both draw balls with `disc_coverage`, so expected and rendered balls agree exactly.
"""

from __future__ import annotations

import numpy as np


def disc_coverage(centres: np.ndarray, radii: np.ndarray, height: int, width: int) -> np.ndarray:
    """Anti-aliased coverage of discs on a pixel grid.

    ``centres [..., 2]`` (x, y) and ``radii [...]`` in pixels; returns ``[..., height, width]`` in
    [0, 1]: ``clip(radius + 0.5 - distance_to_pixel_centre, 0, 1)``. The renderer and the
    verifiable reward share this function, so expected and rendered balls agree exactly.
    """
    centres = np.asarray(centres, dtype=np.float64)
    radii = np.broadcast_to(np.asarray(radii, dtype=np.float64), centres.shape[:-1])
    ys = np.arange(height, dtype=np.float64) + 0.5
    xs = np.arange(width, dtype=np.float64) + 0.5
    dx = xs - centres[..., 0, None]
    dy = ys - centres[..., 1, None]
    dist = np.sqrt(dy[..., :, None] ** 2 + dx[..., None, :] ** 2)
    return np.clip(radii[..., None, None] + 0.5 - dist, 0.0, 1.0)
