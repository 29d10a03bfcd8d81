"""Verifiable audio reward for the toy world: does the generated sound ring at the right frames?

With ``ToyWorldConfig(audio=True)`` every wall bounce and strike of the toy world rings a short tone
that starts at the first frame showing the event (`grpo.data.toyworld`), and the ``world``
metadata lists those onsets per segment (``world["audio"]["onsets"]["next"]``: frame indices within
the segment). An audio+video model that predicts the next scene should put a sound onset at each
of those frames and nowhere else. Registered as ``"toyworld_audio"``.

How a waveform is scored:

* Onset detection (`detect_onsets`): the mono mix's energy in windows of ``window_seconds``
  (10 ms; half-window hops), as a level in dB above a floor of ``floor_db`` dBFS (so silence is
  flat); the *rise* at a hop is its window's level minus the level of the window just before it
  (before the start: the waveform's background level, see `onset_strength`).
  Onsets are rises of at least ``threshold_db`` that are the largest within ``+-min(min_gap_seconds,
  0.5 / fps)``; an onset's time is the boundary between the two windows (+ half a hop). Stationary
  noise does not rise, so it adds no onsets; a tone over it still rises by its level above it.
* Frames: onset time ``t`` falls on frame ``round(t * fps)`` (frame ``f`` starts at ``f / fps``);
  detected frames are made unique, and those outside the segment's frames are ignored.
* Score: F1 between detected and true onset frames, matched one-to-one with a tolerance of
  ``tolerance`` frames (``2 matches / (true + detected)``); 1 when there are no true onsets and none
  is detected, 0 when only one side has onsets.
* Pitch: for each matched onset, the strongest frequency of the 40 ms (at most half a frame) from
  the detected onset (`dominant_pitch`) is right when it is within ``pitch_tolerance`` semitones
  of a true pitch at the matched frame (the pitch tells which ball bounced, or that it was a
  strike). The ``pitch`` column reports the fraction right; with ``score_pitch=True`` only matches
  at a right pitch count in the F1.

The callable takes the reward contract ``(videos, prompts, contexts, **metadata)``: the sound comes
as the metadata column ``audio`` (one waveform per video, ``[N]`` or ``[C, N]``, float in [-1, 1],
numpy or torch; ``None`` gives a ``None`` score) with ``sample_rate`` (Hz: one int, or one per
video; default the world's rate), the truth as ``world`` (a dict or JSON per video). The videos are
only counted: the sound alone is scored, so combine it with ``toyworld_verifiable`` for the frames.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from policies.errors import InputError
from policies.video_io import as_audio
from rewards.registry import register
from rewards.types import RewardOutput
from rewards.verifiable import world_metadata


@dataclass
class AudioRewardConfig:
    """Knobs of the toy-world audio reward; the defaults score the true sound (also after AAC) 1."""

    world_key: str = field(default="world", metadata={"help": "Metadata column of the toy-world truth."})
    audio_key: str = field(default="audio", metadata={"help": "Metadata column of the waveforms."})
    segment: str = field(
        default="next", metadata={"help": "Segment the waveforms belong to: 'next' or 'context'."}
    )
    tolerance: int = field(default=1, metadata={"help": "Frames an onset may be off and still match."})
    window_seconds: float = field(default=0.01, metadata={"help": "Energy window (s); hops are half."})
    threshold_db: float = field(
        default=6.0, metadata={"help": "Least level rise (dB) between adjacent windows for an onset."}
    )
    floor_db: float = field(
        default=-50.0, metadata={"help": "Level floor (dBFS of mean-square energy): quieter is silence."}
    )
    min_gap_seconds: float = field(
        default=0.05, metadata={"help": "Onsets closer than this (and half a frame) are one onset."}
    )
    pitch_tolerance: float = field(
        default=0.5, metadata={"help": "Semitones a matched onset's pitch may be off and count as right."}
    )
    score_pitch: bool = field(
        default=False,
        metadata={
            "help": "Count a match only when its pitch is right too (the right ball, the right event)."
        },
    )

    def __post_init__(self) -> None:
        if self.segment not in ("next", "context"):
            raise InputError(f"segment={self.segment!r}; use 'next' or 'context'")
        if not (isinstance(self.tolerance, int) and self.tolerance >= 0):
            raise InputError(f"tolerance must be an int >= 0 (frames), got {self.tolerance}")
        for name in ("window_seconds", "threshold_db", "min_gap_seconds", "pitch_tolerance"):
            if not getattr(self, name) > 0:
                raise InputError(f"{name} must be > 0, got {getattr(self, name)}")


def _world_dict(world: Any, index: int, key: str) -> Mapping[str, Any]:
    world = world_metadata(world, index, key)
    if not isinstance(world, Mapping):
        raise InputError(f"{key}[{index}] is a {type(world).__name__}; expected toy-world metadata (a dict)")
    return world


def _mono(waveform: torch.Tensor | np.ndarray, name: str) -> np.ndarray:
    return as_audio(waveform, name=name).detach().cpu().double().mean(dim=0).numpy()


def _window(window_seconds: float, sample_rate: int) -> tuple[int, int]:
    """Energy window and hop (half of it) in samples."""
    window = max(2, round(window_seconds * sample_rate))
    return window, window // 2


def onset_strength(
    waveform: torch.Tensor | np.ndarray,
    sample_rate: int,
    *,
    window_seconds: float = 0.01,
    floor_db: float = -50.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Level rise per hop: ``(times [T] in seconds, rise [T] in dB)``.

    ``rise[t]`` is the level of the window starting at ``times[t]`` minus that of the window just
    before it, levels being ``10 log10(mean square + floor)``. Before the waveform's start the level
    is taken to be its background, the 10th percentile of its window levels (silence for a sparse
    sound, the noise level for a noisy one), so that sound already going on at the start is no onset
    but a tone starting at sample 0 is.
    """
    x = _mono(waveform, "audio")
    window, hop = _window(window_seconds, sample_rate)
    if len(x) < window:
        x = np.concatenate([x, np.zeros(window - len(x))])
    cumulative = np.concatenate([[0.0], np.cumsum(x**2)])
    starts = np.arange(0, len(x) - window + 1, hop)
    level = 10 * np.log10((cumulative[starts + window] - cumulative[starts]) / window + 10 ** (floor_db / 10))
    lag = window // hop  # the adjacent window before
    before = np.concatenate([np.full(lag, np.percentile(level, 10)), level[:-lag]])
    return starts / sample_rate, level - before


def detect_onsets(
    waveform: torch.Tensor | np.ndarray,
    sample_rate: int,
    *,
    window_seconds: float = 0.01,
    threshold_db: float = 6.0,
    floor_db: float = -50.0,
    min_gap_seconds: float = 0.05,
) -> np.ndarray:
    """Onset times (seconds, ascending) of a waveform: rises of >= ``threshold_db`` that are the
    largest within ``+-min_gap_seconds`` (the first of equal ones)."""
    if not (isinstance(sample_rate, int | np.integer) and sample_rate > 0):
        raise InputError(f"sample_rate must be a positive int (Hz), got {sample_rate!r}")
    times, rise = onset_strength(waveform, sample_rate, window_seconds=window_seconds, floor_db=floor_db)
    hop_seconds = _window(window_seconds, sample_rate)[1] / sample_rate
    gap = max(1, int(min_gap_seconds / hop_seconds))
    padded = np.concatenate([np.full(gap, -np.inf), rise, np.full(gap, -np.inf)])
    onsets = []
    for t in np.flatnonzero(rise >= threshold_db):
        before, after = padded[t : t + gap], padded[t + gap + 1 : t + 2 * gap + 1]
        if rise[t] > before.max() and rise[t] >= after.max():
            onsets.append(times[t] + hop_seconds / 2)
    return np.asarray(onsets, dtype=np.float64)


def dominant_pitch(
    waveform: torch.Tensor | np.ndarray, sample_rate: int, start: float, seconds: float
) -> float | None:
    """Frequency (Hz) of the strongest spectral peak of the mono mix in ``[start, start + seconds)``
    (Hann window, zero-padded 8x; 60 Hz and up); None when that stretch is silent."""
    x = _mono(waveform, "audio")[max(0, round(start * sample_rate)) : round((start + seconds) * sample_rate)]
    if len(x) < 2 or not np.any(x):
        return None
    n = 8 * 2 ** math.ceil(math.log2(len(x)))
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x)), n=n))
    freqs = np.fft.rfftfreq(n, 1.0 / sample_rate)
    spectrum[freqs < 60.0] = 0.0
    return float(freqs[int(np.argmax(spectrum))])


def onset_frames(times: Sequence[float] | np.ndarray, fps: float, num_frames: int) -> dict[int, float]:
    """The frames of onset times, ``round(t * fps)`` within ``0..num_frames - 1``, ascending, each
    with its first onset's time."""
    frames: dict[int, float] = {}
    for t in sorted(float(t) for t in times):
        frames.setdefault(round(t * fps), t)
    return {f: frames[f] for f in sorted(frames) if 0 <= f < num_frames}


def match_onsets(true: Sequence[int], detected: Sequence[int], tolerance: int = 1) -> list[tuple[int, int]]:
    """The most one-to-one ``(true, detected)`` frame pairs at most ``tolerance`` frames apart.

    Greedy in time order (each true onset takes the earliest free detection it reaches) is optimal
    for matching points on a line within a fixed distance.
    """
    detected = sorted(detected)
    used = [False] * len(detected)
    pairs = []
    for frame in sorted(true):
        for j, candidate in enumerate(detected):
            if not used[j] and abs(candidate - frame) <= tolerance:
                used[j] = True
                pairs.append((frame, candidate))
                break
    return pairs


def onset_f1(true: Sequence[int], detected: Sequence[int], tolerance: int = 1) -> dict[str, float | None]:
    """``score`` (F1), ``precision`` and ``recall`` (None when undefined) of detected onset frames."""
    return _f1(len(match_onsets(true, detected, tolerance)), len(true), len(detected))


def _f1(matches: int, num_true: int, num_detected: int) -> dict[str, float | None]:
    if not num_true and not num_detected:
        return {"score": 1.0, "precision": None, "recall": None}
    return {
        "score": 2 * matches / (num_true + num_detected),
        "precision": matches / num_detected if num_detected else None,
        "recall": matches / num_true if num_true else None,
    }


@register("toyworld_audio")
class ToyWorldAudioReward:
    """Reward ``(videos, prompts, contexts, audio=..., world=..., sample_rate=...) -> RewardOutput``:
    F1 of the sound's onset frames against the toy world's (see the module docstring)."""

    __name__ = "toyworld_audio"  # instances are named like functions (TRL logs reward_func.__name__)

    def __init__(self, config: AudioRewardConfig | None = None, **overrides: Any) -> None:
        if config is not None and overrides:
            raise InputError("pass either an AudioRewardConfig or keyword overrides, not both")
        self.config = config or AudioRewardConfig(**overrides)

    def score_audio(
        self,
        waveform: torch.Tensor | np.ndarray,
        world: Any,
        sample_rate: int | None = None,
        index: int = 0,
    ) -> dict[str, Any]:
        """One waveform of the segment ``config.segment``: ``score``, ``precision``, ``recall``,
        ``pitch`` (fraction of matched onsets at a true pitch; None without matches or pitches),
        ``onset_frames`` (detected) and ``true_frames``."""
        cfg = self.config
        world = _world_dict(world, index, cfg.world_key)
        sound = world.get("audio")
        if not isinstance(sound, Mapping) or cfg.segment not in sound.get("onsets", {}):
            raise InputError(
                f"{cfg.world_key}[{index}] has no audio onsets; generate the toy world with "
                "ToyWorldConfig(audio=True) (nextscene toyworld --audio)"
            )
        try:
            fps = float(world["fps"])
            num_frames = int(world[f"{cfg.segment}_frames"])
            onsets = sound["onsets"][cfg.segment]
            true = sorted({int(onset["frame"]) for onset in onsets})
            pitches: dict[int, set[float]] | None = None
            if all("pitch" in onset for onset in onsets):
                pitches = {f: {float(o["pitch"]) for o in onsets if int(o["frame"]) == f} for f in true}
            rate = int(sample_rate if sample_rate is not None else sound["sample_rate"])
        except (KeyError, TypeError, ValueError) as err:
            raise InputError(f"{cfg.world_key}[{index}] lacks toy-world audio field {err}") from None
        if not (fps > 0 and math.isfinite(fps)):
            raise InputError(f"{cfg.world_key}[{index}] has fps {fps}; expected a positive number")
        if cfg.score_pitch and pitches is None:
            raise InputError(f"{cfg.world_key}[{index}]: score_pitch needs a 'pitch' in every onset")
        waveform = as_audio(waveform, name=f"{cfg.audio_key}[{index}]")
        times = detect_onsets(
            waveform,
            rate,
            window_seconds=cfg.window_seconds,
            threshold_db=cfg.threshold_db,
            floor_db=cfg.floor_db,
            min_gap_seconds=min(cfg.min_gap_seconds, 0.5 / fps),
        )
        detected = onset_frames(times, fps, num_frames)
        pairs = match_onsets(true, list(detected), cfg.tolerance)
        right_pitch = None
        if pitches is not None and pairs:
            heard = {f: dominant_pitch(waveform, rate, detected[f], min(0.04, 0.5 / fps)) for _, f in pairs}
            right_pitch = [
                heard[f] is not None
                and min(abs(12 * math.log2(heard[f] / p)) for p in pitches[t]) <= cfg.pitch_tolerance
                for t, f in pairs
            ]
        matches = sum(right_pitch) if cfg.score_pitch and right_pitch is not None else len(pairs)
        return {
            **_f1(matches, len(true), len(detected)),
            "pitch": None if right_pitch is None else sum(right_pitch) / len(right_pitch),
            "onset_frames": list(detected),
            "true_frames": true,
        }

    def __call__(
        self,
        videos: Sequence[Any] | torch.Tensor,
        prompts: Sequence[str] | None = None,
        contexts: Sequence[Any] | None = None,
        **metadata: Any,
    ) -> RewardOutput:
        cfg = self.config
        for key in (cfg.audio_key, cfg.world_key):
            if key not in metadata:
                raise InputError(
                    f"toyworld_audio needs the {key!r} metadata column ({cfg.audio_key!r}: one waveform "
                    f"per video; {cfg.world_key!r}: toy-world truth); got {sorted(metadata) or 'none'}"
                )
        audio, worlds = metadata[cfg.audio_key], metadata[cfg.world_key]
        rates = metadata.get("sample_rate")
        if rates is None or isinstance(rates, int | float | np.number):
            rates = [rates] * len(audio)
        for name, column in ((cfg.audio_key, audio), (cfg.world_key, worlds), ("sample_rate", rates)):
            if len(column) != len(videos):
                raise InputError(f"{len(videos)} videos but {len(column)} entries in metadata {name!r}")
        columns = ("precision", "recall", "pitch", "onset_frames", "true_frames")
        scores: list[float | None] = []
        out: dict[str, list[Any]] = {c: [] for c in columns}
        for i, (waveform, world, rate) in enumerate(zip(audio, worlds, rates, strict=True)):
            result = None if waveform is None or world is None else self.score_audio(waveform, world, rate, i)
            scores.append(None if result is None else result["score"])
            for c in columns:
                out[c].append(None if result is None else result[c])
        return RewardOutput(scores=scores, metadata=out)
