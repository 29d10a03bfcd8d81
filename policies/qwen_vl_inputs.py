"""Qwen2-VL / Qwen2.5-VL vision inputs from frame tensors, in torch, without torchvision.

transformers' Qwen-VL *video* processor imports torchvision, which has no CPU build here, and its
image processor wants PIL images or numpy arrays. Policies and the in-process judge hold frames as
float tensors ``[F, H, W, 3]`` in [0, 1], so this module turns them into exactly what the model's
``forward`` takes: ``pixel_values`` + ``image_grid_thw`` for images, ``pixel_values_videos`` +
``video_grid_thw`` (+ ``second_per_grid_ts`` for Qwen2.5-VL) for videos. The steps are the ones
transformers' processors run: ``smart_resize`` to a multiple of ``patch_size * merge_size`` within a
pixel budget, bicubic resize, rescale to [0, 1], CLIP normalisation, then the patch layout
``(t, h-block, w-block, h-merge, w-merge) x (channel, temporal, patch_h, patch_w)`` that the vision
tower's patch merger expects. Frames are quantised to 8 bits first, as every decoded video and every
PNG sent to a vLLM server is, so both backends see the same pixels.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from policies.errors import InputError

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class QwenVLInputsConfig:
    """Pre-processing parameters of a Qwen2-VL / Qwen2.5-VL checkpoint (defaults = the released models)."""

    patch_size: int = field(default=14, metadata={"help": "Spatial patch size of the vision tower."})
    temporal_patch_size: int = field(default=2, metadata={"help": "Frames per temporal patch."})
    merge_size: int = field(default=2, metadata={"help": "Patches merged per side into one LLM token."})
    image_min_pixels: int = field(default=56 * 56, metadata={"help": "Smallest resized image area."})
    image_max_pixels: int = field(default=28 * 28 * 1280, metadata={"help": "Largest resized image area."})
    video_min_pixels: int = field(default=128 * 28 * 28, metadata={"help": "Smallest resized frame area."})
    video_max_pixels: int = field(default=28 * 28 * 768, metadata={"help": "Largest resized frame area."})
    image_mean: tuple[float, float, float] = field(
        default=OPENAI_CLIP_MEAN, metadata={"help": "Per-channel mean subtracted after rescaling to [0, 1]."}
    )
    image_std: tuple[float, float, float] = field(
        default=OPENAI_CLIP_STD, metadata={"help": "Per-channel std divided by after subtracting the mean."}
    )

    def __post_init__(self) -> None:
        for name in ("patch_size", "temporal_patch_size", "merge_size"):
            if getattr(self, name) < 1:
                raise InputError(f"{name}={getattr(self, name)} must be >= 1")

    @property
    def factor(self) -> int:
        """Side lengths are resized to multiples of this."""
        return self.patch_size * self.merge_size

    @classmethod
    def from_pretrained(cls, path: str | Path, **overrides) -> QwenVLInputsConfig:
        """Read a checkpoint's ``preprocessor_config.json`` (and ``video_preprocessor_config.json``)."""
        path = Path(path)
        image_file = path / "preprocessor_config.json"
        if not image_file.is_file():
            raise InputError(f"{image_file} not found: pass the directory of a Qwen-VL checkpoint")
        image_cfg = json.loads(image_file.read_text())
        video_file = path / "video_preprocessor_config.json"
        video_cfg = json.loads(video_file.read_text()) if video_file.is_file() else image_cfg
        defaults = cls()

        def pixels(cfg: dict, key: str, size_key: str, default: int) -> int:
            return int(cfg.get(key) or (cfg.get("size") or {}).get(size_key) or default)

        values = {
            "patch_size": int(image_cfg.get("patch_size", defaults.patch_size)),
            "temporal_patch_size": int(image_cfg.get("temporal_patch_size", defaults.temporal_patch_size)),
            "merge_size": int(image_cfg.get("merge_size", defaults.merge_size)),
            "image_min_pixels": pixels(image_cfg, "min_pixels", "shortest_edge", defaults.image_min_pixels),
            "image_max_pixels": pixels(image_cfg, "max_pixels", "longest_edge", defaults.image_max_pixels),
            "image_mean": tuple(image_cfg.get("image_mean", defaults.image_mean)),
            "image_std": tuple(image_cfg.get("image_std", defaults.image_std)),
        }
        if video_file.is_file():
            values["video_min_pixels"] = pixels(
                video_cfg, "min_pixels", "shortest_edge", defaults.video_min_pixels
            )
            values["video_max_pixels"] = pixels(
                video_cfg, "max_pixels", "longest_edge", defaults.video_max_pixels
            )
        values.update(overrides)
        return cls(**values)

    def save_pretrained(self, path: str | Path) -> None:
        """Write ``preprocessor_config.json`` and ``video_preprocessor_config.json`` as checkpoints do."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        common = {
            "image_processor_type": "Qwen2VLImageProcessor",
            "patch_size": self.patch_size,
            "temporal_patch_size": self.temporal_patch_size,
            "merge_size": self.merge_size,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
        }
        image = {**common, "min_pixels": self.image_min_pixels, "max_pixels": self.image_max_pixels}
        video = {**common, "min_pixels": self.video_min_pixels, "max_pixels": self.video_max_pixels}
        (path / "preprocessor_config.json").write_text(json.dumps(image, indent=2))
        (path / "video_preprocessor_config.json").write_text(json.dumps(video, indent=2))


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen-VL's target size: sides multiple of ``factor``, area in [min_pixels, max_pixels], aspect kept."""
    if min(height, width) < 1:
        raise InputError(f"frame of {height}x{width} pixels is empty; give frames of at least 1x1")
    if max(height, width) / min(height, width) > 200:
        raise InputError(f"frame of {height}x{width} has an aspect ratio above 200; crop it first")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def to_uint8(frames: torch.Tensor) -> torch.Tensor:
    """Float frames ``[..., H, W, 3]`` in [0, 1] -> uint8, rounding to the nearest level."""
    if not frames.is_floating_point():
        if frames.dtype != torch.uint8:
            raise InputError(
                f"frames of dtype {frames.dtype} are not supported; give float in [0, 1] or uint8"
            )
        return frames
    return (frames.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)


def _check_frames(frames: torch.Tensor, what: str) -> torch.Tensor:
    if not isinstance(frames, torch.Tensor) or frames.ndim != 4 or frames.shape[-1] != 3:
        shape = tuple(frames.shape) if isinstance(frames, torch.Tensor) else type(frames).__name__
        raise InputError(f"{what} must be a tensor [F, H, W, 3], got {shape}")
    if frames.shape[0] == 0:
        raise InputError(f"{what} has no frames; give at least one")
    return frames


def resize_frames(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bicubic resize of ``[N, H, W, 3]`` frames to ``[N, 3, height, width]`` 8-bit levels (float32, 0..255).

    PIL's bicubic on 8-bit images, as transformers' PIL processor and vLLM's image loading use: its
    separable passes round to 8 bits in between, which a one-shot torch interpolation does not
    reproduce (up to 15 levels apart on noisy frames), so parity needs PIL itself.
    """
    frames_u8 = to_uint8(_check_frames(frames, "frames"))
    if tuple(frames_u8.shape[1:3]) != (height, width):
        resized = [
            np.asarray(Image.fromarray(frame.cpu().numpy()).resize((width, height), Image.Resampling.BICUBIC))
            for frame in frames_u8
        ]
        frames_u8 = torch.from_numpy(np.stack(resized)).to(frames.device)
    return frames_u8.permute(0, 3, 1, 2).float()


def _normalise(levels: torch.Tensor, config: QwenVLInputsConfig) -> torch.Tensor:
    """0..255 levels ``[N, 3, H, W]`` -> CLIP-normalised float32, rounded as transformers does."""
    x = (levels.double() * (1 / 255)).float()
    mean = torch.tensor(config.image_mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(config.image_std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def _patchify(x: torch.Tensor, config: QwenVLInputsConfig) -> tuple[torch.Tensor, list[int]]:
    """``[T, 3, H, W]`` (T a multiple of temporal_patch_size) -> ``[t*h*w, 3*tp*p*p]`` and ``[t, h, w]``."""
    tp, p, m = config.temporal_patch_size, config.patch_size, config.merge_size
    frames, channels, height, width = x.shape
    grid_t, grid_h, grid_w = frames // tp, height // p, width // p
    patches = x.reshape(grid_t, tp, channels, grid_h // m, m, p, grid_w // m, m, p)
    patches = patches.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return patches.reshape(grid_t * grid_h * grid_w, channels * tp * p * p), [grid_t, grid_h, grid_w]


def image_inputs(
    images: torch.Tensor | list[torch.Tensor], config: QwenVLInputsConfig
) -> dict[str, torch.Tensor]:
    """Images ``[N, H, W, 3]`` (or a list of ``[H, W, 3]``) -> ``pixel_values``, ``image_grid_thw``.

    Each image is repeated ``temporal_patch_size`` times along time, as Qwen-VL does for stills.
    """
    if isinstance(images, torch.Tensor):
        images = list(_check_frames(images, "images"))
    if not images:
        raise InputError("no images given; give at least one [H, W, 3] tensor")
    all_patches, grids = [], []
    for image in images:
        frame = _check_frames(image.unsqueeze(0), "each image")
        height, width = smart_resize(
            frame.shape[1], frame.shape[2], config.factor, config.image_min_pixels, config.image_max_pixels
        )
        x = _normalise(resize_frames(frame, height, width), config)
        patches, grid = _patchify(x.expand(config.temporal_patch_size, -1, -1, -1), config)
        all_patches.append(patches)
        grids.append(grid)
    return {
        "pixel_values": torch.cat(all_patches),
        "image_grid_thw": torch.tensor(grids, dtype=torch.long, device=all_patches[0].device),
    }


def video_inputs(
    videos: torch.Tensor | list[torch.Tensor], config: QwenVLInputsConfig, fps: float | None = None
) -> dict[str, torch.Tensor]:
    """Videos ``[F, H, W, 3]`` (one tensor or a list) -> ``pixel_values_videos``, ``video_grid_thw``.

    Frames are taken as given (sample them beforehand); a count that is not a multiple of
    ``temporal_patch_size`` is padded by repeating the last frame. With ``fps`` (of the given frames)
    ``second_per_grid_ts`` is added, which Qwen2.5-VL uses for its temporal rotary positions.
    """
    if isinstance(videos, torch.Tensor):
        videos = [videos]
    if not videos:
        raise InputError("no videos given; give at least one [F, H, W, 3] tensor")
    all_patches, grids = [], []
    for video in videos:
        video = _check_frames(video, "each video")
        height, width = smart_resize(
            video.shape[1], video.shape[2], config.factor, config.video_min_pixels, config.video_max_pixels
        )
        x = _normalise(resize_frames(video, height, width), config)
        if pad := -x.shape[0] % config.temporal_patch_size:
            x = torch.cat([x, x[-1:].expand(pad, -1, -1, -1)])
        patches, grid = _patchify(x, config)
        all_patches.append(patches)
        grids.append(grid)
    out = {
        "pixel_values_videos": torch.cat(all_patches),
        "video_grid_thw": torch.tensor(grids, dtype=torch.long, device=all_patches[0].device),
    }
    if fps is not None:
        if fps <= 0:
            raise InputError(f"fps={fps} must be > 0")
        out["second_per_grid_ts"] = torch.full((len(videos),), config.temporal_patch_size / fps)
    return out


def num_vision_tokens(grid_thw: torch.Tensor, merge_size: int) -> list[int]:
    """LLM placeholder tokens each image/video takes: ``t * h * w / merge_size**2``."""
    return [int(t * h * w) // merge_size**2 for t, h, w in grid_thw.tolist()]


def expand_vision_placeholders(
    text: str,
    *,
    image_grid_thw: torch.Tensor | None = None,
    video_grid_thw: torch.Tensor | None = None,
    merge_size: int = 2,
    image_token: str = "<|image_pad|>",
    video_token: str = "<|video_pad|>",
) -> str:
    """Repeat each ``<|image_pad|>`` / ``<|video_pad|>`` of a chat-templated prompt by its token count.

    This is what the Qwen-VL processor does to the text, so that the model's placeholder positions
    line up with the vision features.
    """
    for token, grid in ((image_token, image_grid_thw), (video_token, video_grid_thw)):
        counts = [] if grid is None else num_vision_tokens(grid, merge_size)
        pieces = text.split(token)
        if len(pieces) - 1 != len(counts):
            raise InputError(
                f"prompt has {len(pieces) - 1} {token} placeholders for {len(counts)} inputs; "
                "give one placeholder per image/video"
            )
        text = pieces[0] + "".join(token * n + rest for n, rest in zip(counts, pieces[1:]))
    return text
