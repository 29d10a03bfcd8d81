"""How the audio reward ranks sounds: its mean over the test-split scenes whose next scene has sound,
for the true sound and wrong ones (the README's table), and what AAC in MP4 does to the sound.

Candidates per scene (``toyworld_audio`` with its defaults, against the scene's ``world``): the true
next-scene sound; the same after an MP4 round trip (written as `export_toyworld` writes it, sound
as AAC, then `read_audio`); with white noise of RMS ``--noise-rms`` added (seeded); shifted one
frame late, two frames late and two frames early (zeros fill in, what is pushed past the end is
lost); the next-scene sound of another scene with sound (the following one); the scene's own
context sound; silence.
Besides the mean score, each candidate reports the mean ``pitch`` (the fraction of a scene's matched
onsets at a right pitch, over the scenes with matches). The MP4 round trip of every segment with
sound (context and next) gives the largest amplitude error of the decoded sound and the largest
shift of its detected onset times (the count must not change).
`tests/test_toyworld_audio.py` asserts the same with margins; this script writes the numbers.

    python benchmarks/audio_reward.py   # CPU, seconds; writes benchmarks/results/audio_reward.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from grpo.data.toyworld import EXPORT_MP4, ToyWorld, ToyWorldConfig
from policies.video_io import read_audio, write_video
from rewards.verifiable_audio import ToyWorldAudioReward, detect_onsets


def _shift(audio: torch.Tensor, samples: int) -> torch.Tensor:
    """``audio`` [C, N] delayed by ``samples`` (early when negative), zero-filled, same length."""
    pad = torch.zeros(audio.shape[0], abs(samples), dtype=audio.dtype)
    if samples >= 0:
        return torch.cat([pad, audio[:, : audio.shape[1] - samples]], dim=1)
    return torch.cat([audio[:, -samples:], pad], dim=1)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num", type=int, default=100, help="test-split scenes (those with sound count)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the added noise")
    parser.add_argument("--noise-rms", type=float, default=0.05, help="RMS of the added white noise")
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "audio_reward.json")
    args = parser.parse_args(argv)

    world = ToyWorld(ToyWorldConfig(audio=True), split="test", num_samples=args.num)
    samples = list(world)
    with_sound = [i for i, s in enumerate(samples) if s["world"]["audio"]["onsets"]["next"]]
    scenes = [samples[i] for i in with_sound]
    rate, fps = world.config.sample_rate, world.config.fps
    per_frame = round(rate / fps)
    truth = [s["next_audio"] for s in scenes]

    # every segment with sound of all the scenes, written to MP4 as `export_toyworld` does, read back
    segments = [
        (i, part)
        for i, s in enumerate(samples)
        for part in ("context", "next")
        if s["world"]["audio"]["onsets"][part]
    ]
    errors, shifts, decoded = [], [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, part in segments:
            audio, video = samples[i][f"{part}_audio"], samples[i][part]
            path = Path(tmp) / f"{i}-{part}.mp4"
            write_video(path, video, fps, **EXPORT_MP4, audio=audio, sample_rate=rate)
            back, back_rate = read_audio(path)
            assert back_rate == rate and back.shape == audio.shape, (back_rate, back.shape)
            decoded[i, part] = back
            errors.append(float((back - audio).abs().max()))
            before, after = detect_onsets(audio, rate), detect_onsets(back, rate)
            assert len(before) == len(after), f"scene {i} {part}: AAC changed the number of onsets"
            shifts.append(float(np.abs(before - after).max()))

    noise = torch.Generator().manual_seed(args.seed)
    candidates = {
        "true sound": truth,
        "true sound after AAC in MP4": [decoded[i, "next"] for i in with_sound],
        f"true sound with white noise at RMS {args.noise_rms}": [
            a + args.noise_rms * torch.randn(a.shape, generator=noise) for a in truth
        ],
        "true sound one frame late": [_shift(a, per_frame) for a in truth],
        "true sound two frames late": [_shift(a, 2 * per_frame) for a in truth],
        "true sound two frames early": [_shift(a, -2 * per_frame) for a in truth],
        "another sample's next-scene sound": [truth[(i + 1) % len(truth)] for i in range(len(truth))],
        "the context's sound": [s["context_audio"] for s in scenes],
        "silence": [torch.zeros_like(a) for a in truth],
    }
    reward = ToyWorldAudioReward()
    videos, worlds = [s["next"] for s in scenes], [s["world"] for s in scenes]
    means, pitch = {}, {}
    for name, waveforms in candidates.items():
        out = reward(videos, audio=waveforms, world=worlds, sample_rate=rate)
        means[name] = sum(out.scores) / len(out.scores)
        heard = [p for p in out.metadata["pitch"] if p is not None]
        pitch[name] = sum(heard) / len(heard) if heard else None
        shown = "-" if pitch[name] is None else f"{pitch[name]:.2f}"
        print(f"{name:45} {means[name]:.2f}  pitch {shown}")
    hop = reward.config.window_seconds / 2
    print(f"AAC in MP4: max |decoded - true| {max(errors):.3f}, onset shift <= {1e3 * max(shifts):.2f} ms")

    result = {
        "command": "python benchmarks/audio_reward.py",
        "split": "test",
        "scenes": args.num,
        "scenes_with_sound": len(scenes),
        "sample_rate": rate,
        "fps": fps,
        "noise_seed": args.seed,
        "noise_rms": args.noise_rms,
        "mean_score": means,
        "mean_pitch": pitch,
        "aac_in_mp4": {
            "segments": len(segments),
            "max_abs_error": max(errors),
            "max_onset_shift_seconds": max(shifts),
            "detection_hop_seconds": hop,
        },
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
