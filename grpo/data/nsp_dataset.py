"""Next-scene-prediction (NSP) datasets on disk: the manifest format, its loader and batching.

A manifest is a table, one row per example, as JSON Lines (``manifest.jsonl``) or Parquet
(``manifest.parquet``); both load with ``datasets.load_dataset("json" | "parquet", ...)``.

======================  ========  =====================================================================
column                  required  meaning
======================  ========  =====================================================================
``context_video``       yes       video file of what happened so far (path relative to the manifest)
``next_video``          yes       video file of what happens next (the target)
``context_caption``     no        text describing the context (null/absent -> ``""``)
``next_caption``        no        text describing the next scene (null/absent -> ``""``)
``instruction``         no        the question put to the model (null/absent -> "What happens next?")
``world`` (JSON text)   no        toy-world trajectories (`grpo.data.toyworld`), read by the
                                  verifiable reward; any other JSON column: ``json_columns``
======================  ========  =====================================================================

Any other column is an error (a typo such as ``next_vidoe`` must not pass silently) unless it is
declared in ``extra_columns`` (passed through as is) or ``json_columns`` (decoded from JSON).

`NSPVideoDataset` decodes both videos, takes ``context_frames`` frames *ending* at the context's
last frame and ``next_frames`` frames *starting* at the next video's first frame -- consecutive
frames, or sampled at ``fps`` (nearest frame by timestamp) -- resizes them to ``height x width``
and returns the same sample dict as the in-memory `grpo.data.toyworld.ToyWorld`; `collate_nsp`
batches such dicts.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from policies.errors import InputError
from policies.video_io import from_uint8, iter_frames, probe_video, split_clips

DEFAULT_INSTRUCTION = "What happens next?"
VIDEO_COLUMNS = ("context_video", "next_video")
TEXT_COLUMNS = ("context_caption", "next_caption", "instruction")
MANIFEST_NAMES = ("manifest.jsonl", "manifest.parquet")


def load_manifest(path: str | os.PathLike) -> tuple[list[dict[str, Any]], Path]:
    """Read a manifest file (``.jsonl``/``.json`` lines or ``.parquet``), or the ``manifest.jsonl`` /
    ``manifest.parquet`` inside a folder. Returns ``(rows, path_of_the_file)``."""
    path = Path(path)
    if path.is_dir():
        found = [path / name for name in MANIFEST_NAMES if (path / name).is_file()]
        if not found:
            raise InputError(
                f"{path} has no {' or '.join(MANIFEST_NAMES)}; point to the manifest file itself"
            )
        path = found[0]
    if not path.is_file():
        raise InputError(f"manifest not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow as pa  # a dependency of `datasets`
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pylist(), path
        except (pa.ArrowException, OSError, ValueError) as err:
            raise InputError(f"cannot read Parquet manifest {path}: {' '.join(str(err).split())}") from None
    if suffix not in (".jsonl", ".json"):
        raise InputError(f"manifest {path} must be .jsonl (JSON Lines) or .parquet")
    rows = []
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise InputError(f"{path} line {line_number} is not valid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise InputError(
                    f"{path} line {line_number} is a JSON {type(row).__name__}, not an object (row)"
                )
            rows.append(row)
    return rows, path


def write_manifest(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """Write rows as JSON Lines (``.jsonl``) or Parquet (``.parquet``), atomically (temp file + rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if path.suffix.lower() == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist([dict(r) for r in rows]), tmp)
    elif path.suffix.lower() == ".jsonl":
        with open(tmp, "w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    else:
        raise InputError(f"manifest {path} must end in .jsonl or .parquet")
    os.replace(tmp, path)
    return path


@dataclass
class NSPDataConfig:
    """How `NSPVideoDataset` turns manifest rows into training samples."""

    context_frames: int = field(
        default=9, metadata={"help": "Context frames, ending at the context video's end."}
    )
    next_frames: int = field(default=9, metadata={"help": "Next-scene frames, from the next video's start."})
    fps: float | None = field(
        default=None,
        metadata={"help": "Sample frames at this rate (nearest frame); None = consecutive frames."},
    )
    height: int = field(default=32, metadata={"help": "Output frame height in pixels."})
    width: int = field(default=32, metadata={"help": "Output frame width in pixels."})
    resize_mode: str = field(
        default="crop",
        metadata={"help": "'crop': scale to cover then centre-crop; 'stretch': scale each axis."},
    )
    clip_frames: int | None = field(
        default=None, metadata={"help": "If set, samples also carry `clips` [N, clip_frames, H, W, 3]."}
    )
    on_error: str = field(
        default="raise",
        metadata={"help": "'raise' (one-line InputError) or 'skip' (drop bad rows, warn once)."},
    )
    probe: bool = field(
        default=True, metadata={"help": "Open every video's header when the dataset is built (fails early)."}
    )
    extra_columns: tuple[str, ...] = field(
        default=(), metadata={"help": "Other columns passed through as is."}
    )
    json_columns: tuple[str, ...] = field(
        default=("world",), metadata={"help": "Columns holding JSON text to decode."}
    )
    default_instruction: str = field(
        default=DEFAULT_INSTRUCTION, metadata={"help": "Instruction for rows without one."}
    )

    def __post_init__(self) -> None:
        for name in ("context_frames", "next_frames", "height", "width"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.fps is not None and not (self.fps > 0 and math.isfinite(self.fps)):
            raise InputError(f"fps must be a positive number or None, got {self.fps}")
        if self.resize_mode not in ("crop", "stretch"):
            raise InputError(f"resize_mode={self.resize_mode!r}; use 'crop' or 'stretch'")
        if self.on_error not in ("raise", "skip"):
            raise InputError(f"on_error={self.on_error!r}; use 'raise' or 'skip'")
        if self.clip_frames is not None and (
            self.clip_frames < 1 or (self.context_frames + self.next_frames) % self.clip_frames
        ):
            raise InputError(
                f"clip_frames={self.clip_frames} must divide context_frames + next_frames "
                f"= {self.context_frames + self.next_frames}"
            )
        self.extra_columns, self.json_columns = tuple(self.extra_columns), tuple(self.json_columns)
        reserved = set(VIDEO_COLUMNS) | set(TEXT_COLUMNS) | {"context", "next", "fps", "clips"}
        clash = reserved & (set(self.extra_columns) | set(self.json_columns))
        if clash:
            raise InputError(
                f"extra/json columns {sorted(clash)} clash with the sample's own keys; rename them"
            )


def select_frames(times: Sequence[float], count: int, fps: float | None, anchor: str) -> np.ndarray | None:
    """Indices of ``count`` frames taken from the ``start`` or the ``end`` of a clip with frame
    timestamps ``times`` (seconds): consecutive frames when ``fps`` is None, else the nearest frame
    to each tick of a ``fps`` clock. None when the clip is too short."""
    times = np.asarray(times, dtype=np.float64)
    n = len(times)
    if fps is None:
        if n < count:
            return None
        return np.arange(count) if anchor == "start" else np.arange(n - count, n)
    if n == 0:
        return None
    span = (count - 1) / fps
    step = float(np.median(np.diff(times))) if n > 1 else 0.0
    if span > times[-1] - times[0] + 0.5 * step + 1e-6:
        return None
    ticks = (
        times[0] + np.arange(count) / fps if anchor == "start" else times[-1] - span + np.arange(count) / fps
    )
    right = np.clip(np.searchsorted(times, ticks), 0, n - 1)
    left = np.clip(right - 1, 0, n - 1)
    return np.where(np.abs(times[left] - ticks) <= np.abs(times[right] - ticks), left, right)


class NSPVideoDataset(torch.utils.data.Dataset):
    """Map-style dataset over an NSP manifest (path to ``.jsonl``/``.parquet``, its folder, or rows).

    Rows are checked when the dataset is built -- columns, value types, that the files exist and,
    with ``probe``, that each video opens and is long enough -- so bad data fails before training
    starts, with a one-line `InputError` naming the row (0-based) and the file. With
    ``on_error="skip"`` such rows are dropped instead and one warning gives the count
    (``skipped_rows`` lists them). A file that only fails while decoding (damaged data behind a good
    header) makes ``__getitem__`` raise, or in skip mode return None, which `collate_nsp` drops
    (``num_decode_skips`` counts them, in each worker).
    """

    def __init__(
        self,
        manifest: str | os.PathLike | Sequence[Mapping[str, Any]],
        config: NSPDataConfig | None = None,
        *,
        root: str | os.PathLike | None = None,
    ) -> None:
        self.config = config or NSPDataConfig()
        if isinstance(manifest, str | os.PathLike):
            rows, manifest_path = load_manifest(manifest)
            self.root = Path(root) if root is not None else manifest_path.parent
            self.name = str(manifest_path)
        else:
            rows, self.root, self.name = list(manifest), Path(root or "."), "manifest"
        if not rows:
            raise InputError(f"{self.name} has no rows")
        # declared extra/JSON columns that the manifest has become sample keys (None where a row lacks one)
        present = set().union(*(row for row in rows if isinstance(row, Mapping)))
        self.extra_keys = [c for c in (*self.config.json_columns, *self.config.extra_columns) if c in present]
        self.rows: list[dict[str, Any]] = []
        self.row_numbers: list[int] = []
        self.skipped_rows: list[tuple[int, str]] = []
        self.num_decode_skips = 0
        for number, row in enumerate(rows):
            try:
                self.rows.append(self._check_row(number, row))
                self.row_numbers.append(number)
            except InputError as err:
                if self.config.on_error == "raise":
                    raise
                self.skipped_rows.append((number, str(err)))
        if self.skipped_rows:
            warnings.warn(
                f"NSPVideoDataset: skipped {len(self.skipped_rows)} of {len(rows)} rows of {self.name} "
                f"(first: {self.skipped_rows[0][1]})",
                stacklevel=2,
            )
        if not self.rows:
            raise InputError(f"{self.name}: every row was skipped (first: {self.skipped_rows[0][1]})")

    def __len__(self) -> int:
        return len(self.rows)

    def _where(self, number: int) -> str:
        return f"{self.name} row {number}"

    def _check_row(self, number: int, row: Any) -> dict[str, Any]:
        cfg = self.config
        if not isinstance(row, Mapping):
            raise InputError(f"{self._where(number)} is a {type(row).__name__}, not a mapping of columns")
        known = set(VIDEO_COLUMNS) | set(TEXT_COLUMNS) | set(cfg.extra_columns) | set(cfg.json_columns)
        unknown = sorted(set(row) - known)
        if unknown:
            raise InputError(
                f"{self._where(number)} has unknown column(s) {unknown}; known: {sorted(known)} "
                "(declare extra ones with NSPDataConfig.extra_columns)"
            )
        checked: dict[str, Any] = {}
        for column in VIDEO_COLUMNS:
            value = row.get(column)
            if not isinstance(value, str) or not value:
                raise InputError(
                    f"{self._where(number)}: column {column!r} must be a video path, got {value!r}"
                )
            path = Path(value) if Path(value).is_absolute() else self.root / value
            if not path.is_file():
                raise InputError(f"{self._where(number)}: {column} file not found: {path}")
            if cfg.probe:
                self._probe(number, column, path)
            checked[column] = path
        for column in TEXT_COLUMNS:
            value = row.get(column)
            if value is not None and not isinstance(value, str):
                raise InputError(
                    f"{self._where(number)}: column {column!r} must be text, got {type(value).__name__}"
                )
        checked["context_caption"] = row.get("context_caption") or ""
        checked["next_caption"] = row.get("next_caption") or ""
        checked["instruction"] = row.get("instruction") or cfg.default_instruction
        for column in cfg.json_columns:  # validated now, kept as text (small), decoded per sample
            value = row.get(column)
            if isinstance(value, str):
                try:
                    json.loads(value)
                except json.JSONDecodeError as err:
                    raise InputError(
                        f"{self._where(number)}: column {column!r} is not valid JSON ({err.msg})"
                    ) from None
            checked[column] = value
        for column in cfg.extra_columns:
            checked[column] = row.get(column)
        return checked

    def _probe(self, number: int, column: str, path: Path) -> None:
        try:
            info = probe_video(path)
        except InputError as err:
            raise InputError(f"{self._where(number)}: {column}: {err}") from None
        count, anchor = self._wanted(column)
        times = np.arange(info.num_frames) / info.fps
        if select_frames(times, count, self.config.fps, anchor) is None:
            raise InputError(self._too_short(number, column, path, info.num_frames, info.fps))

    def _wanted(self, column: str) -> tuple[int, str]:
        if column == "context_video":
            return self.config.context_frames, "end"
        return self.config.next_frames, "start"

    def _too_short(self, number: int, column: str, path: Path, frames: int, fps: float | None) -> str:
        count, _ = self._wanted(column)
        want = f"{count} frames" + (f" at {self.config.fps:g} fps" if self.config.fps else "")
        have = f"{frames} frames" + (f" at {fps:g} fps" if fps else "")
        return (
            f"{self._where(number)}: {column} {path} is too short ({have}; need {want}); "
            "request fewer frames or a lower fps, or drop the row"
        )

    def _covered(self, times: list[float], count: int) -> bool:
        """Whether frames decoded so far (timestamps ``times``) hold every frame a clip taken from the
        start can use."""
        if not times:
            return False
        if self.config.fps is None:
            return len(times) >= count
        return times[-1] - times[0] >= (count - 1) / self.config.fps

    def _load(self, number: int, column: str, path: Path) -> torch.Tensor:
        cfg = self.config
        count, anchor = self._wanted(column)
        times: list[float] = []
        frames: list[np.ndarray] = []
        try:
            for time, frame in iter_frames(path, (cfg.height, cfg.width), cfg.resize_mode):
                if anchor == "start" and self._covered(times, count):
                    break  # no later frame can be picked: stop decoding
                times.append(time)
                frames.append(frame)
        except InputError as err:
            raise InputError(f"{self._where(number)}: {column}: {err}") from None
        picked = select_frames(times, count, cfg.fps, anchor)
        if picked is None:
            native = (
                (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else None
            )
            raise InputError(self._too_short(number, column, path, len(times), native))
        return from_uint8(np.stack([frames[i] for i in picked]))

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        index = int(index)
        if not 0 <= index < len(self.rows):
            raise IndexError(f"index {index} is out of range for a dataset of {len(self.rows)} rows")
        row, number = self.rows[index], self.row_numbers[index]
        try:
            context = self._load(number, "context_video", row["context_video"])
            next_ = self._load(number, "next_video", row["next_video"])
        except InputError as err:
            if self.config.on_error == "raise":
                raise
            if self.num_decode_skips == 0:
                warnings.warn(f"NSPVideoDataset: skipping undecodable rows (first: {err})", stacklevel=2)
            self.num_decode_skips += 1
            return None
        sample: dict[str, Any] = {
            "context": context,
            "next": next_,
            "context_caption": row["context_caption"],
            "next_caption": row["next_caption"],
            "instruction": row["instruction"],
            "fps": self.config.fps if self.config.fps is not None else probe_video(row["next_video"]).fps,
        }
        for column in self.extra_keys:
            value = row[column]
            sample[column] = (
                json.loads(value) if column in self.config.json_columns and isinstance(value, str) else value
            )
        if self.config.clip_frames is not None:
            sample["clips"] = split_clips(torch.cat([context, next_]), self.config.clip_frames)
        return sample


def collate_nsp(samples: Sequence[dict[str, Any] | None]) -> dict[str, Any] | None:
    """Batch sample dicts (from `NSPVideoDataset` or `ToyWorld`): tensors are stacked on a new first
    axis, everything else becomes a list (ready to pass as reward metadata). ``None`` samples
    (skipped rows) are dropped; a batch with none left is None."""
    kept = [s for s in samples if s is not None]
    if not kept:
        return None
    keys = list(kept[0])
    for i, sample in enumerate(kept):
        if list(sample) != keys:
            raise InputError(
                f"cannot batch: sample {i} has keys {sorted(sample)} but sample 0 has {sorted(keys)}"
            )
    batch: dict[str, Any] = {}
    for key in keys:
        values = [s[key] for s in kept]
        if isinstance(values[0], torch.Tensor):
            shapes = {tuple(v.shape) for v in values}
            if len(shapes) > 1:
                raise InputError(
                    f"cannot batch {key!r}: shapes differ {sorted(shapes)}; use one frame count and size"
                )
            batch[key] = torch.stack(values)
        else:
            batch[key] = values
    return batch
