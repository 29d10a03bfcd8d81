"""Video tensors, video files and report images.

The library's one video convention: a video is a ``torch.Tensor`` of dtype float32 and shape
``[F, H, W, 3]`` (frames, height, width, RGB) with values in [0, 1]. `as_video` turns what users
hand in (uint8 or float, numpy or torch) into that; `to_uint8` goes back for files and images.

Files, chosen by suffix:

* ``.mp4`` / ``.mkv`` / ``.mov`` / ``.webm`` / ``.avi`` -- decoded with PyAV (FFmpeg); written with
  PyAV as H.264 (``libx264``, or ``mpeg4`` where the FFmpeg build has no libx264).
* ``.gif`` -- Pillow (reports; 8-bit palette, delays in 1/100 s).
* ``.npz`` -- raw uint8 frames (``frames [F, H, W, 3]``, ``fps``) with numpy, never pickled.

Chroma subsampling: ``yuv420p`` (what every player reads) stores colour at half resolution, which
smears a 3-pixel ball's colour over its neighbours (errors up to ~100/255 at 32x32) and needs even
width and height. ``pix_fmt="yuv444p"`` with ``crf=0`` is lossless up to the RGB<->YUV rounding
(<= 1/255 measured) and accepts odd sizes; use it for training data, yuv420p for reports.

Audio: a waveform is a float32 ``torch.Tensor`` ``[C, N]`` (channels, samples) in [-1, 1] with a
sample rate in Hz (`as_audio` also takes mono ``[N]``, numpy, and int16/int32 PCM). `write_video`
adds it to a file as a second stream (AAC in ``.mp4``/``.mov``/``.mkv``; arrays ``audio`` and
``sample_rate`` in ``.npz``); `read_audio` and ``read_video(..., with_audio=True)`` decode it,
aligned to the video by the stream timestamps (the MP4 edit list removes the AAC encoder's priming
delay, so sample 0 is the first frame's time; measured offset 0 samples). AAC at 16 kHz is lossy
(<= 0.06 on the toy world's 0.25-peak tones, measured); ``audio_codec="alac"`` is lossless.
Matroska stores no audio length, so an ``.mkv`` reads back with the encoder's last-frame padding
(< 1024 samples of silence).
"""

from __future__ import annotations

import math
import os
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal, overload

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, ImageSequence

from policies.errors import InputError

VideoLike = torch.Tensor | np.ndarray
PathLike = str | os.PathLike

AV_SUFFIXES = (".mp4", ".mkv", ".mov", ".webm", ".avi")
VIDEO_SUFFIXES = (*AV_SUFFIXES, ".gif", ".npz")
AUDIO_SUFFIXES = (".mp4", ".mov", ".mkv", ".npz")  # where write_video stores sound (timing verified)


def as_video(video: VideoLike, name: str = "video") -> torch.Tensor:
    """Return ``video`` as a float32 ``[F, H, W, 3]`` tensor in [0, 1] (uint8 input is divided by 255).

    Float input is converted without clipping: values outside [0, 1] (a VAE's overshoot) are kept so
    that callers decide; `to_uint8` clips.
    """
    if isinstance(video, np.ndarray):
        video = torch.from_numpy(np.ascontiguousarray(video))
    if not isinstance(video, torch.Tensor):
        raise InputError(
            f"{name} must be a torch.Tensor or numpy array [F, H, W, 3], got {type(video).__name__}"
        )
    if video.ndim != 4 or video.shape[-1] != 3:
        raise InputError(
            f"{name} has shape {tuple(video.shape)}; expected [frames, height, width, 3] (THWC, RGB)"
        )
    if video.dtype == torch.uint8:
        return video.to(torch.float32) / 255.0
    if not video.is_floating_point():
        raise InputError(f"{name} has dtype {video.dtype}; expected uint8 (0..255) or float (0..1)")
    return video.to(torch.float32)


def to_uint8(video: VideoLike) -> np.ndarray:
    """Return ``video`` as a uint8 numpy array ``[F, H, W, 3]`` (float input clipped to [0, 1], rounded)."""
    video = as_video(video)
    return (video.detach().cpu().clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).numpy()


def as_audio(waveform: VideoLike, name: str = "audio") -> torch.Tensor:
    """Return ``waveform`` as a float32 ``[C, N]`` tensor: ``[N]`` is mono; int16 / int32 PCM is scaled
    to [-1, 1]. Float input is not clipped (files clip)."""
    if isinstance(waveform, np.ndarray):
        waveform = torch.from_numpy(np.ascontiguousarray(waveform))
    if not isinstance(waveform, torch.Tensor):
        raise InputError(
            f"{name} must be a torch.Tensor or numpy array [samples] or [channels, samples], "
            f"got {type(waveform).__name__}"
        )
    if waveform.ndim == 1:
        waveform = waveform[None]
    if waveform.ndim != 2 or not 1 <= waveform.shape[0] <= 8 or waveform.shape[1] < 1:
        raise InputError(
            f"{name} has shape {tuple(waveform.shape)}; expected [samples] or [channels (1..8), samples]"
        )
    scale = {torch.int16: 32768.0, torch.int32: 2147483648.0}.get(waveform.dtype)
    if scale is not None:
        return waveform.to(torch.float32) / scale
    if not waveform.is_floating_point():
        raise InputError(f"{name} has dtype {waveform.dtype}; expected float (-1..1), int16 or int32")
    return waveform.to(torch.float32)


def from_uint8(frames: np.ndarray) -> torch.Tensor:
    """Return uint8 frames ``[F, H, W, 3]`` (numpy) as the library's float32 video tensor."""
    if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8:
        raise InputError("from_uint8 expects a uint8 numpy array [F, H, W, 3]; use as_video for other inputs")
    return as_video(frames)


def split_clips(video: VideoLike, clip_frames: int) -> torch.Tensor:
    """Split a video into consecutive clips: ``[F, H, W, 3] -> [F // clip_frames, clip_frames, H, W, 3]``."""
    video = as_video(video)
    if clip_frames < 1 or video.shape[0] % clip_frames:
        raise InputError(
            f"cannot split {video.shape[0]} frames into clips of {clip_frames}; "
            "the frame count must be a multiple of clip_frames"
        )
    return video.reshape(video.shape[0] // clip_frames, clip_frames, *video.shape[1:])


# ---------------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VideoInfo:
    """What a file's header says, read without decoding frames."""

    num_frames: int
    fps: float
    height: int
    width: int


def _suffix(path: Path, allowed: Sequence[str]) -> str:
    suffix = path.suffix.lower()
    if suffix not in allowed:
        raise InputError(f"{path}: unsupported video suffix {suffix!r}; use one of {', '.join(allowed)}")
    return suffix


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _check_exists(path: Path) -> None:
    if not path.is_file():
        raise InputError(f"video file not found: {path}")


def probe_video(path: PathLike) -> VideoInfo:
    """Read frame count, fps and size from a video file's header (cheap: no frame is decoded).

    Raises `InputError` for a missing, unreadable or frame-less file.
    """
    import av  # PyAV loads FFmpeg: imported only where a video file is read or written

    path = Path(path)
    suffix = _suffix(path, VIDEO_SUFFIXES)
    _check_exists(path)
    try:
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as data:
                frames = _npz_frames(data, path)
                return VideoInfo(frames.shape[0], float(data["fps"]), frames.shape[1], frames.shape[2])
        if suffix == ".gif":
            with Image.open(path) as image:
                durations = [
                    frame.info.get("duration", 100) or 100 for frame in ImageSequence.Iterator(image)
                ]
                counts, fps = _gif_frame_counts(durations)
                return VideoInfo(int(sum(counts)), fps, image.height, image.width)
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise InputError(f"{path}: the file has no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            if not rate:
                raise InputError(f"{path}: the video stream has no frame rate")
            num_frames = stream.frames
            if not num_frames and stream.duration is not None and stream.time_base is not None:
                num_frames = int(round(float(stream.duration * stream.time_base * rate)))
            if not num_frames and container.duration:
                num_frames = int(round(container.duration / av.time_base * float(rate)))
            info = VideoInfo(int(num_frames), float(rate), stream.height, stream.width)
    except InputError:
        raise
    except (av.FFmpegError, OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        raise InputError(f"cannot read video {path}: {_one_line(err)}") from None
    if info.num_frames < 1:
        raise InputError(f"{path}: the video has no frames")
    return info


def _npz_frames(data: np.lib.npyio.NpzFile, path: Path) -> np.ndarray:
    if "frames" not in data.files or "fps" not in data.files:
        raise InputError(f"{path}: an .npz video needs arrays 'frames' [F, H, W, 3] uint8 and 'fps'")
    frames = data["frames"]
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1:
        raise InputError(
            f"{path}: 'frames' is {frames.dtype} {frames.shape}; expected uint8 [F, H, W, 3], F >= 1"
        )
    return frames


def _gif_frame_counts(durations: Sequence[int]) -> tuple[list[int], float]:
    """GIF frames with equal neighbours are merged by encoders into one longer delay: undo that by
    repeating each stored frame ``duration / shortest_duration`` times."""
    base = min(durations)
    return [max(1, round(d / base)) for d in durations], 1000.0 / base


def resize_frame(frame: np.ndarray, height: int, width: int, mode: str = "crop") -> np.ndarray:
    """Resize one uint8 ``[h, w, 3]`` frame to ``[height, width, 3]``.

    ``crop`` scales the frame to cover the target (aspect kept) and centre-crops; ``stretch`` scales
    each axis independently. Pillow's bicubic filter is antialiased when downscaling.
    """
    h, w = frame.shape[:2]
    if (h, w) == (height, width):
        return frame
    image = Image.fromarray(frame)
    if mode == "stretch":
        return np.asarray(image.resize((width, height), Image.Resampling.BICUBIC))
    if mode != "crop":
        raise InputError(f"unknown resize mode {mode!r}; use 'crop' or 'stretch'")
    scale = max(height / h, width / w)
    new_h, new_w = max(height, math.ceil(h * scale - 1e-6)), max(width, math.ceil(w * scale - 1e-6))
    image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    top, left = (new_h - height) // 2, (new_w - width) // 2
    return np.asarray(image.crop((left, top, left + width, top + height)))


def iter_frames(
    path: PathLike, size: tuple[int, int] | None = None, resize_mode: str = "crop"
) -> Iterator[tuple[float, np.ndarray]]:
    """Yield ``(time_in_seconds, uint8 frame [H, W, 3])`` for every frame of a file, resized to
    ``size = (height, width)`` as it is decoded (so long, large videos never sit in memory whole).

    Decoder failures surface as `InputError` naming the file.
    """
    import av  # PyAV loads FFmpeg: imported only where a video file is read or written

    path = Path(path)
    suffix = _suffix(path, VIDEO_SUFFIXES)
    _check_exists(path)

    def fit(frame: np.ndarray) -> np.ndarray:
        return frame if size is None else resize_frame(frame, size[0], size[1], resize_mode)

    try:
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as data:
                frames, fps = _npz_frames(data, path), float(data["fps"])
            for i, frame in enumerate(frames):
                yield i / fps, fit(frame)
        elif suffix == ".gif":
            with Image.open(path) as image:
                stored = [
                    (frame.info.get("duration", 100) or 100, np.asarray(frame.convert("RGB")))
                    for frame in ImageSequence.Iterator(image)
                ]
            counts, fps = _gif_frame_counts([d for d, _ in stored])
            index = 0
            for count, (_, frame) in zip(counts, stored, strict=True):
                frame = fit(frame)
                for _ in range(count):
                    yield index / fps, frame
                    index += 1
        else:
            with av.open(str(path)) as container:
                if not container.streams.video:
                    raise InputError(f"{path}: the file has no video stream")
                stream = container.streams.video[0]
                rate = float(stream.average_rate or stream.guessed_rate or 0) or None
                for index, frame in enumerate(container.decode(stream)):
                    time = frame.time if frame.time is not None else index / (rate or 1.0)
                    yield float(time), fit(frame.to_ndarray(format="rgb24"))
    except InputError:
        raise
    except (av.FFmpegError, OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        raise InputError(f"cannot decode video {path}: {_one_line(err)}") from None


@overload
def read_video(path: PathLike, *, with_audio: Literal[False] = ...) -> tuple[torch.Tensor, float]: ...


@overload
def read_video(
    path: PathLike, *, with_audio: Literal[True]
) -> tuple[torch.Tensor, float, tuple[torch.Tensor, int] | None]: ...


def read_video(
    path: PathLike, *, with_audio: bool = False
) -> tuple[torch.Tensor, float] | tuple[torch.Tensor, float, tuple[torch.Tensor, int] | None]:
    """Decode a whole video file: returns ``(video [F, H, W, 3] float32 in [0, 1], fps)``.

    With ``with_audio=True`` a third item is the file's sound as `read_audio` returns it,
    ``(waveform [C, N], sample_rate)``, or None when the file has none.
    """
    path = Path(path)
    info = probe_video(path)
    frames = [frame for _, frame in iter_frames(path)]
    if not frames:
        raise InputError(f"{path}: the video has no frames")
    video = from_uint8(np.stack(frames))
    if not with_audio:
        return video, info.fps
    return video, info.fps, _read_audio(path)


def read_audio(path: PathLike) -> tuple[torch.Tensor, int]:
    """Decode the first audio stream of a file: ``(waveform [C, N] float32 in [-1, 1], sample_rate)``.

    Samples are placed by their timestamps (sample 0 is time 0, the first video frame's time) and
    the encoder's padding after the stream's stated duration is cut. Raises `InputError` when the
    file has no sound.
    """
    audio = _read_audio(Path(path))
    if audio is None:
        raise InputError(f"{path}: the file has no audio stream; write it with write_video(..., audio=...)")
    return audio


def _read_audio(path: Path) -> tuple[torch.Tensor, int] | None:
    import av

    suffix = _suffix(path, VIDEO_SUFFIXES)
    _check_exists(path)
    if suffix == ".gif":
        return None
    try:
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as data:
                if "audio" not in data.files:
                    return None
                return as_audio(data["audio"], name=f"{path}: 'audio'"), int(data["sample_rate"])
        with av.open(str(path)) as container:
            if not container.streams.audio:
                return None
            stream = container.streams.audio[0]
            rate = int(stream.rate or stream.codec_context.sample_rate)
            pieces, cursor = [], 0
            for frame in container.decode(stream):
                data = frame.to_ndarray()
                if not frame.format.is_planar:  # packed [1, n * C] -> [C, n]
                    data = data.reshape(-1, len(frame.layout.channels)).T
                start = cursor if frame.pts is None else round(float(frame.pts * frame.time_base) * rate)
                pieces.append((start, as_audio(data)))
                cursor = start + data.shape[1]
            if not pieces:
                return None
            total = max(start + piece.shape[1] for start, piece in pieces)
            if stream.duration is not None and stream.time_base is not None:
                total = min(total, round(float(stream.duration * stream.time_base) * rate))
            waveform = torch.zeros(pieces[0][1].shape[0], max(total, 0))
            for start, piece in pieces:  # a negative start is encoder priming before time 0
                skip = max(0, -start)
                piece = piece[:, skip : max(skip, total - start)]
                waveform[:, start + skip : start + skip + piece.shape[1]] = piece
            return waveform, rate
    except InputError:
        raise
    except (av.FFmpegError, OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        raise InputError(f"cannot decode the audio of {path}: {_one_line(err)}") from None


def default_mp4_codec() -> str:
    """``libx264`` when this FFmpeg build has it (PyAV wheels do), else ``mpeg4``."""
    import av

    return "libx264" if "libx264" in av.codecs_available else "mpeg4"


def write_video(
    path: PathLike,
    video: VideoLike,
    fps: float,
    *,
    codec: str | None = None,
    pix_fmt: str | None = None,
    crf: int | None = None,
    audio: VideoLike | None = None,
    sample_rate: int | None = None,
    audio_codec: str | None = None,
) -> Path:
    """Write a video to ``path``; the format follows the suffix (``.mp4``, ``.gif``, ``.npz``...).

    MP4 options: ``codec`` (default `default_mp4_codec`), ``pix_fmt`` (default ``yuv420p`` when
    height and width are even, else ``yuv444p``, which H.264 encodes at odd sizes) and ``crf``
    (libx264 quality, 0 = lossless; default 18). ``audio`` (a waveform, see `as_audio`; 1 or 2
    channels in files, clipped to [-1, 1]) at ``sample_rate`` Hz adds a sound stream, encoded with
    ``audio_codec`` (default ``aac``) in ``.mp4``/``.mov``/``.mkv``; ``.npz`` stores it exactly. Returns
    the path.
    """
    path = Path(path)
    suffix = _suffix(path, VIDEO_SUFFIXES)
    frames = to_uint8(video)
    if frames.shape[0] < 1:
        raise InputError(f"cannot write {path}: the video has no frames")
    if not (fps > 0 and math.isfinite(fps)):
        raise InputError(f"cannot write {path}: fps must be a positive number, got {fps}")
    sound = None
    if audio is not None:
        if suffix not in AUDIO_SUFFIXES:
            raise InputError(
                f"cannot write {path}: audio goes into {', '.join(AUDIO_SUFFIXES)} files, not {suffix}"
            )
        if not (isinstance(sample_rate, int | np.integer) and sample_rate > 0):
            raise InputError(
                f"cannot write {path}: audio needs sample_rate, a positive int, got {sample_rate}"
            )
        sound = as_audio(audio).detach().cpu().clamp(-1.0, 1.0).numpy()
        if sound.shape[0] > 2:
            raise InputError(f"cannot write {path}: audio has {sound.shape[0]} channels; files take 1 or 2")
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".npz":
        arrays = {} if sound is None else {"audio": sound, "sample_rate": np.int64(sample_rate)}
        with open(path, "wb") as handle:
            np.savez_compressed(handle, frames=frames, fps=np.float64(fps), **arrays)
    elif suffix == ".gif":
        _write_gif(path, frames, fps)
    else:
        spec = None if sound is None else (sound, int(sample_rate), audio_codec or "aac")
        _write_av(path, frames, fps, codec or default_mp4_codec(), pix_fmt, crf, spec)
    return path


def _write_gif(path: Path, frames: np.ndarray, fps: float) -> None:
    images = [
        Image.fromarray(frame).quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
        for frame in frames
    ]
    duration = max(20, round(1000.0 / fps / 10.0) * 10)  # GIF delays are 1/100 s; browsers floor 10 ms
    images[0].save(path, save_all=True, append_images=images[1:], duration=duration, loop=0, optimize=False)


def _write_av(
    path: Path,
    frames: np.ndarray,
    fps: float,
    codec: str,
    pix_fmt: str | None,
    crf: int | None,
    sound: tuple[np.ndarray, int, str] | None = None,
) -> None:
    import av

    height, width = frames.shape[1:3]
    odd = height % 2 or width % 2
    pix_fmt = pix_fmt or ("yuv444p" if odd else "yuv420p")
    if odd and pix_fmt == "yuv420p":
        raise InputError(
            f"cannot write {path}: {height}x{width} has an odd side and yuv420p needs even sizes; "
            "use pix_fmt='yuv444p' or an even size"
        )
    if codec not in av.codecs_available:
        raise InputError(f"cannot write {path}: this FFmpeg build has no encoder {codec!r}; try 'mpeg4'")
    if sound is not None and sound[2] not in av.codecs_available:
        raise InputError(
            f"cannot write {path}: this FFmpeg build has no audio encoder {sound[2]!r}; try 'aac'"
        )
    rate = Fraction(fps).limit_denominator(1001)
    try:
        with av.open(str(path), "w") as container:
            stream = container.add_stream(codec, rate=rate)
            stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
            if codec.startswith("libx264"):
                stream.options = {"crf": str(18 if crf is None else crf)}
            if sound is not None:  # every stream is added before the first packet writes the header
                waveform, sample_rate, audio_codec = sound
                layout = "mono" if waveform.shape[0] == 1 else "stereo"
                audio_stream = container.add_stream(audio_codec, rate=sample_rate, layout=layout)
            for frame in frames:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            container.mux(stream.encode())
            if sound is not None:
                _encode_audio(container, audio_stream, waveform, sample_rate)
    except av.FFmpegError as err:
        what = f"{codec}/{pix_fmt}" + (f" + {sound[2]} at {sound[1]} Hz" if sound is not None else "")
        raise InputError(f"cannot encode {path} with {what}: {_one_line(err)}") from None


def _encode_audio(container: Any, stream: Any, waveform: np.ndarray, sample_rate: int) -> None:
    """Encode a waveform ``[C, N]`` into a PyAV audio stream as float planar frames of 1024 samples,
    which PyAV converts to the encoder's sample format and frame size."""
    import av

    layout = stream.layout.name
    waveform = np.ascontiguousarray(waveform, dtype=np.float32)
    for start in range(0, waveform.shape[1], 1024):
        frame = av.AudioFrame.from_ndarray(
            np.ascontiguousarray(waveform[:, start : start + 1024]), format="fltp", layout=layout
        )
        frame.sample_rate, frame.pts = sample_rate, start
        container.mux(stream.encode(frame))
    container.mux(stream.encode())


# ---------------------------------------------------------------------------------------------------
# report images
# ---------------------------------------------------------------------------------------------------

_WHITE = (255, 255, 255)


def _upscale(frames: np.ndarray, scale: int) -> np.ndarray:
    if scale < 1:
        raise InputError(f"scale must be an integer >= 1, got {scale}")
    return frames.repeat(scale, axis=-3).repeat(scale, axis=-2) if scale > 1 else frames


def _text_size(text: str) -> tuple[int, int]:
    left, top, right, bottom = ImageFont.load_default().getbbox(text)
    return right - left, bottom - top


def _draw_text(
    canvas: np.ndarray, text: str, left: int, top: int, colour: tuple[int, int, int]
) -> np.ndarray:
    image = Image.fromarray(canvas)
    ImageDraw.Draw(image).text((left, top), text, fill=colour, font=ImageFont.load_default(), anchor="lt")
    return np.asarray(image).copy()


def frame_grid(
    videos: Sequence[VideoLike],
    labels: Sequence[str] | None = None,
    *,
    num_frames: int | None = None,
    scale: int = 1,
    pad: int = 1,
    pad_value: int = 255,
) -> np.ndarray:
    """One image of several videos: row r shows video r's frames left to right.

    For reports such as context | true next | before | after. ``num_frames`` picks that many
    evenly spaced frames per video (default: all); shorter rows are padded; ``labels`` are written
    in a left margin; ``scale`` enlarges pixels (nearest neighbour). Returns uint8 ``[H, W, 3]``.
    """
    if not videos:
        raise InputError("frame_grid needs at least one video")
    if labels is not None and len(labels) != len(videos):
        raise InputError(f"frame_grid got {len(labels)} labels for {len(videos)} videos")
    rows = [_upscale(to_uint8(v), scale) for v in videos]
    if num_frames is not None:
        if num_frames < 1:
            raise InputError(f"num_frames must be >= 1, got {num_frames}")
        rows = [
            r[np.unique(np.linspace(0, len(r) - 1, num=min(num_frames, len(r))).round().astype(int))]
            for r in rows
        ]
    cell_h = max(r.shape[1] for r in rows)
    cell_w = max(r.shape[2] for r in rows)
    columns = max(len(r) for r in rows)
    margin = 0
    if labels is not None:
        margin = max(_text_size(label)[0] for label in labels) + 2 * pad + 4
    height = len(rows) * (cell_h + pad) + pad
    width = margin + columns * (cell_w + pad) + pad
    grid = np.full((height, width, 3), pad_value, dtype=np.uint8)
    for i, row in enumerate(rows):
        top = pad + i * (cell_h + pad)
        for j, frame in enumerate(row):
            left = margin + pad + j * (cell_w + pad)
            grid[top : top + frame.shape[0], left : left + frame.shape[1]] = frame
    if labels is not None:
        text_colour = (0, 0, 0) if pad_value > 127 else _WHITE
        for i, label in enumerate(labels):
            top = pad + i * (cell_h + pad) + max(0, (cell_h - _text_size(label)[1]) // 2)
            grid = _draw_text(grid, label, pad + 2, top, text_colour)
    return grid


def side_by_side(
    videos: Sequence[VideoLike],
    labels: Sequence[str] | None = None,
    *,
    scale: int = 1,
    pad: int = 2,
    pad_value: int = 255,
) -> np.ndarray:
    """Several videos played next to each other: uint8 ``[F, H, W, 3]`` with F the longest video.

    Shorter videos hold their last frame; ``labels`` go in a band above each panel; ``scale``
    enlarges pixels so that 32-pixel videos are readable.
    """
    if not videos:
        raise InputError("side_by_side needs at least one video")
    if labels is not None and len(labels) != len(videos):
        raise InputError(f"side_by_side got {len(labels)} labels for {len(videos)} videos")
    panels = [_upscale(to_uint8(v), scale) for v in videos]
    num_frames = max(len(p) for p in panels)
    panel_h = max(p.shape[1] for p in panels)
    band = _text_size("Ag")[1] + 2 * pad + 2 if labels is not None else 0
    width = sum(p.shape[2] for p in panels) + pad * (len(panels) + 1)
    strip = np.full((num_frames, band + panel_h + 2 * pad, width, 3), pad_value, dtype=np.uint8)
    left = pad
    for panel in panels:
        frames = np.concatenate([panel, np.repeat(panel[-1:], num_frames - len(panel), axis=0)])
        strip[:, band + pad : band + pad + panel.shape[1], left : left + panel.shape[2]] = frames
        left += panel.shape[2] + pad
    if labels is not None:
        header = strip[0, :band].copy()
        left = pad
        text_colour = (0, 0, 0) if pad_value > 127 else _WHITE
        for panel, label in zip(panels, labels, strict=True):
            offset = max(0, (panel.shape[2] - _text_size(label)[0]) // 2)
            header = _draw_text(header, label, left + offset, pad, text_colour)
            left += panel.shape[2] + pad
        strip[:, :band] = header
    return strip


def write_video_strip(
    path: PathLike,
    videos: Sequence[VideoLike],
    fps: float,
    labels: Sequence[str] | None = None,
    *,
    scale: int = 4,
    pad: int = 2,
) -> Path:
    """Write `side_by_side` videos as one GIF or MP4 (by suffix) for reports; returns the path."""
    strip = side_by_side(videos, labels, scale=scale, pad=pad)
    if strip.shape[1] % 2 or strip.shape[2] % 2:  # yuv420p players need even sizes
        strip = np.pad(
            strip, ((0, 0), (0, strip.shape[1] % 2), (0, strip.shape[2] % 2), (0, 0)), constant_values=255
        )
    return write_video(path, strip, fps)
