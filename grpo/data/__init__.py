"""The data layer of the trainers: the toy causal world, NSP video datasets and video I/O.

Exports resolve lazily (like `grpo`), so ``import grpo.data`` stays cheap and ``nextscene --help``
does not load torch; ``from grpo.data import ToyWorld`` works as usual.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    # toy world
    "PALETTE": "grpo.data.toyworld",
    "SPLITS": "grpo.data.toyworld",
    "ToyWorld": "grpo.data.toyworld",
    "ToyWorldConfig": "grpo.data.toyworld",
    "disc_coverage": "grpo.data.toyworld",
    "export_toyworld": "grpo.data.toyworld",
    "generate_sample": "grpo.data.toyworld",
    "render": "grpo.data.toyworld",
    "seed_for": "grpo.data.toyworld",
    # NSP manifests
    "NSPDataConfig": "grpo.data.nsp_dataset",
    "NSPVideoDataset": "grpo.data.nsp_dataset",
    "collate_nsp": "grpo.data.nsp_dataset",
    "load_manifest": "grpo.data.nsp_dataset",
    "select_frames": "grpo.data.nsp_dataset",
    "write_manifest": "grpo.data.nsp_dataset",
    # video tensors and files
    "VideoInfo": "policies.video_io",
    "as_video": "policies.video_io",
    "frame_grid": "policies.video_io",
    "from_uint8": "policies.video_io",
    "iter_frames": "policies.video_io",
    "probe_video": "policies.video_io",
    "read_video": "policies.video_io",
    "resize_frame": "policies.video_io",
    "side_by_side": "policies.video_io",
    "split_clips": "policies.video_io",
    "to_uint8": "policies.video_io",
    "write_video": "policies.video_io",
    "write_video_strip": "policies.video_io",
}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'grpo.data' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


__all__ = sorted(_EXPORTS)
