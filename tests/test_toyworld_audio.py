"""The toy world with sound: tones at bounces and strikes, audio in MP4s and manifests, the audio reward."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch

from grpo.data import toyworld_cli
from grpo.data.nsp_dataset import load_manifest
from grpo.data.toyworld import (
    BOUNCE_PITCH,
    STRIKE_PITCH,
    ToyWorld,
    ToyWorldConfig,
    export_toyworld,
    generate_sample,
)
from policies.errors import InputError
from policies.video_io import read_audio, read_video, write_video
from rewards.registry import resolve
from rewards.verifiable_audio import (
    ToyWorldAudioReward,
    detect_onsets,
    match_onsets,
    onset_f1,
)

SR = 16000
AUDIO = ToyWorldConfig(audio=True)
REWARD = ToyWorldAudioReward()
AAC_TOLERANCE = 0.08  # max |decoded - true| of AAC at 16 kHz on these tones (measured <= 0.06)


@pytest.fixture(scope="module")
def samples() -> list[dict]:
    return list(ToyWorld(AUDIO, split="test", num_samples=100))


def _with_events(samples: list[dict]) -> list[dict]:
    return [s for s in samples if s["world"]["audio"]["onsets"]["next"]]


def _score(waveforms, samples, **kwargs) -> np.ndarray:
    videos = [s["next"] for s in samples]
    return np.array(REWARD(videos, audio=waveforms, world=[s["world"] for s in samples], **kwargs).scores)


def _expected_track(onsets: list[dict], num_samples: int, fps: float, sample_rate: int) -> np.ndarray:
    """The documented sound, written out independently: per onset a sine at its pitch from the frame's
    first sample, 0.25 * exp(-t / 20 ms) with 2 ms linear fades, lasting min(80 ms, 0.9 frame)."""
    seconds = min(0.08, 0.9 / fps)
    n = round(seconds * sample_rate)
    t = np.arange(n) / sample_rate
    envelope = 0.25 * np.exp(-t / 0.02) * np.minimum(1, t / 0.002) * np.minimum(1, (seconds - t) / 0.002)
    track = np.zeros(num_samples)
    for onset in onsets:
        start = round(onset["frame"] * sample_rate / fps)
        piece = (envelope * np.sin(2 * np.pi * onset["pitch"] * t))[: num_samples - start]
        track[start : start + len(piece)] += piece
    return track


# ---------------------------------------------------------------------------------------------------
# the sound of the toy world
# ---------------------------------------------------------------------------------------------------


def test_audio_off_changes_nothing_and_on_only_adds():
    for seed in (0, 7, 10_000_003):
        plain, loud = generate_sample(seed), generate_sample(seed, AUDIO)
        assert (
            not {"context_audio", "next_audio", "sample_rate"} & set(plain) and "audio" not in plain["world"]
        )
        for key in ("context", "next"):
            assert torch.equal(plain[key], loud[key])
        assert {k: v for k, v in loud["world"].items() if k != "audio"} == plain["world"]
        assert (plain["context_caption"], plain["next_caption"]) == (
            loud["context_caption"],
            loud["next_caption"],
        )
        again = generate_sample(seed, AUDIO)
        assert torch.equal(again["next_audio"], loud["next_audio"]) and again["world"] == loud["world"]


def test_tones_ring_at_the_event_frames_with_their_pitches(samples):
    fps = AUDIO.fps
    per_frame = round(SR / fps)
    checked = 0
    for s in samples:
        world = s["world"]
        assert s["sample_rate"] == SR and world["audio"]["sample_rate"] == SR
        assert json.loads(json.dumps(world)) == world
        for segment in ("context", "next"):
            audio = s[f"{segment}_audio"]
            assert audio.dtype == torch.float32 and audio.shape == (1, world[f"{segment}_frames"] * per_frame)
            onsets = world["audio"]["onsets"][segment]
            # the onsets are the segment's bounces and strikes, with the documented pitches
            events = [e for e in world["events"][segment] if e["type"] in ("wall", "hit")]
            assert [(o["frame"], o["type"], o["object"]) for o in onsets] == [
                (e["frame"], e["type"], e["object"]) for e in events
            ]
            for o in onsets:
                want = STRIKE_PITCH if o["type"] == "hit" else BOUNCE_PITCH[o["object"]]
                assert o["pitch"] == want and o["time"] == pytest.approx(o["frame"] / fps)
            expected = _expected_track(onsets, audio.shape[1], fps, SR)
            assert np.abs(audio[0].double().numpy() - expected).max() < 1e-6
            # frames without an onset are silent; a frame with one tone peaks at its pitch
            frames = audio[0].numpy().reshape(-1, per_frame)
            loud = {o["frame"] for o in onsets}
            assert all(not frames[f].any() for f in range(len(frames)) if f not in loud)
            for f in loud:
                pitches = {o["pitch"] for o in onsets if o["frame"] == f}
                if len(pitches) == 1:
                    spectrum = np.abs(np.fft.rfft(frames[f], n=16 * per_frame))
                    peak = np.argmax(spectrum) * SR / (16 * per_frame)
                    assert peak == pytest.approx(pitches.pop(), abs=5.0)
                    checked += 1
    assert checked >= 30


def test_overlapping_next_audio_is_the_same_soundtrack():
    plain = generate_sample(11, ToyWorldConfig(audio=True))
    shifted = generate_sample(11, ToyWorldConfig(audio=True, next_overlap=1))
    per_frame = SR // 8
    track = torch.cat([plain["context_audio"], plain["next_audio"]], dim=1)
    assert torch.equal(shifted["next_audio"], track[:, 8 * per_frame : 17 * per_frame])


def test_onsets_without_rendering_are_the_samples_own():
    """`ToyWorld.onsets` (the scene simulated, nothing rendered) equals the rendered sample's
    ``world["audio"]["onsets"]``, overlap included; a world without audio refuses."""
    for overlap in (0, 1):
        world = ToyWorld(ToyWorldConfig(audio=True, next_overlap=overlap), "train", num_samples=24)
        onsets = [world.onsets(i) for i in range(24)]
        assert onsets == [world[i]["world"]["audio"]["onsets"] for i in range(24)]
        assert any(o["next"] for o in onsets) and any(not o["next"] for o in onsets)
    with pytest.raises(InputError, match="audio=True"):
        ToyWorld(ToyWorldConfig(), "train", num_samples=2).onsets(0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sample_rate": 4000}, "8000..96000"),
        ({"audio": True, "fps": 200.0, "sample_rate": 8000}, "samples per frame"),
    ],
)
def test_bad_audio_config_is_one_line_input_error(kwargs, message):
    with pytest.raises(InputError, match=message) as info:
        ToyWorldConfig(**kwargs)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------------
# audio in files
# ---------------------------------------------------------------------------------------------------


def test_mp4_round_trip_keeps_the_onsets(tmp_path, samples):
    """AAC in MP4: same length, no offset (onset times within one 5 ms detection hop), amplitude
    error <= AAC_TOLERANCE; ALAC and NPZ are exact."""
    for s in _with_events(samples)[:10]:
        audio = s["next_audio"]
        path = write_video(
            tmp_path / "a.mp4", s["next"], 8.0, pix_fmt="yuv444p", crf=0, audio=audio, sample_rate=SR
        )
        video, fps, (decoded, rate) = read_video(path, with_audio=True)
        assert fps == 8.0 and rate == SR and decoded.shape == audio.shape
        assert torch.equal(video, read_video(path)[0])
        assert (decoded - audio).abs().max() <= AAC_TOLERANCE
        lags = np.arange(-200, 201)
        x, y = audio[0].double().numpy(), decoded[0].double().numpy()
        correlation = [
            np.dot(x[max(0, -k) : len(x) - max(0, k)], y[max(0, k) : len(y) - max(0, -k)]) for k in lags
        ]
        assert lags[int(np.argmax(correlation))] == 0
        original, after = detect_onsets(audio, SR), detect_onsets(decoded, SR)
        assert len(original) == len(after) and np.abs(original - after).max() <= 0.005 + 1e-9
    lossless = write_video(
        tmp_path / "b.mp4", s["next"], 8.0, audio=audio, sample_rate=SR, audio_codec="alac"
    )
    assert (read_audio(lossless)[0] - audio).abs().max() < 1e-6
    npz = write_video(tmp_path / "c.npz", s["next"], 8.0, audio=audio, sample_rate=SR)
    assert torch.equal(read_audio(npz)[0], audio) and read_audio(npz)[1] == SR


def test_files_without_sound_and_bad_audio(tmp_path, samples):
    s = samples[0]
    silent = write_video(tmp_path / "a.mp4", s["next"], 8.0)
    assert read_video(silent, with_audio=True)[2] is None
    with pytest.raises(InputError, match="no audio stream"):
        read_audio(silent)
    with pytest.raises(InputError, match="audio goes into"):
        write_video(tmp_path / "a.gif", s["next"], 8.0, audio=s["next_audio"], sample_rate=SR)
    with pytest.raises(InputError, match="sample_rate"):
        write_video(tmp_path / "b.mp4", s["next"], 8.0, audio=s["next_audio"])
    with pytest.raises(InputError, match="channels"):
        write_video(tmp_path / "b.mp4", s["next"], 8.0, audio=torch.zeros(3, 100), sample_rate=SR)
    with pytest.raises(InputError, match="no audio encoder"):
        write_video(
            tmp_path / "b.mp4", s["next"], 8.0, audio=s["next_audio"], sample_rate=SR, audio_codec="nope"
        )
    stereo = torch.stack([s["next_audio"][0], -s["next_audio"][0]])
    path = write_video(tmp_path / "s.mp4", s["next"], 8.0, audio=stereo, sample_rate=SR, audio_codec="alac")
    assert (read_audio(path)[0] - stereo).abs().max() < 1e-6


@pytest.mark.parametrize("video_format", ["mp4", "npz"])
def test_export_writes_sound_and_onsets(tmp_path, video_format):
    world = ToyWorld(AUDIO, split="validation", num_samples=4)
    manifest = export_toyworld(world, tmp_path, video_format=video_format, progress=False)
    rows, _ = load_manifest(manifest)
    for i, row in enumerate(rows):
        sample = world[i]
        assert json.loads(row["world"])["audio"] == sample["world"]["audio"]
        for part in ("context", "next"):
            audio, rate = read_audio(tmp_path / row[f"{part}_video"])
            assert rate == SR and audio.shape == sample[f"{part}_audio"].shape
            bound = AAC_TOLERANCE if video_format == "mp4" else 0.0
            assert (audio - sample[f"{part}_audio"]).abs().max() <= bound
    assert json.loads((tmp_path / "toyworld.json").read_text())["config"]["audio"] is True


def test_toyworld_command_audio(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="nextscene")
    toyworld_cli.register(parser.add_subparsers(dest="command"))
    out = tmp_path / "toy"
    args = parser.parse_args(
        ["toyworld", "--out", str(out), "--split", "test", "--num", "2", "--audio", "--no-progress"]
    )
    assert args.func(args) == 0
    assert "with sound at 16000 Hz" in capsys.readouterr().out
    rows, _ = load_manifest(out)
    truth = ToyWorld(AUDIO, split="test", num_samples=2)[1]
    assert json.loads(rows[1]["world"])["audio"] == truth["world"]["audio"]
    assert read_audio(out / rows[1]["next_video"])[0].shape == truth["next_audio"].shape


# ---------------------------------------------------------------------------------------------------
# the audio reward
# ---------------------------------------------------------------------------------------------------


def test_true_sound_scores_one_and_silence_zero(samples):
    truth = _score([s["next_audio"] for s in samples], samples)
    assert truth.min() == 1.0
    events = _with_events(samples)
    assert len(events) >= 30
    assert _score([torch.zeros_like(s["next_audio"]) for s in events], events).max() == 0.0
    quiet = [s for s in samples if not s["world"]["audio"]["onsets"]["next"]]
    assert _score([torch.zeros_like(s["next_audio"]) for s in quiet], quiet).min() == 1.0  # none and none


def test_shifted_onsets_score_lower(samples):
    events = _with_events(samples)
    per_frame = SR // 8
    truth = _score([s["next_audio"] for s in events], events)
    for k, bound in ((2, 0.3), (3, 0.3)):
        late = [
            torch.cat([torch.zeros(1, k * per_frame), s["next_audio"][:, : -k * per_frame]], 1)
            for s in events
        ]
        early = [
            torch.cat([s["next_audio"][:, k * per_frame :], torch.zeros(1, k * per_frame)], 1) for s in events
        ]
        for shifted in (late, early):
            scores = _score(shifted, events)
            assert scores.mean() < bound and np.all(scores <= truth)
    # one frame late is within the tolerance: only onsets pushed past the last frame are lost
    late = [torch.cat([torch.zeros(1, per_frame), s["next_audio"][:, :-per_frame]], 1) for s in events]
    assert 0.8 < _score(late, events).mean() < 1.0
    strict = ToyWorldAudioReward(tolerance=0)
    videos = [s["next"] for s in events]
    assert np.mean(strict(videos, audio=late, world=[s["world"] for s in events]).scores) < 0.3


def test_noise_is_robust(samples):
    generator = torch.Generator().manual_seed(0)
    noisy = [
        s["next_audio"] + 0.05 * torch.randn(s["next_audio"].shape, generator=generator) for s in samples
    ]
    assert _score(noisy, samples).mean() >= 0.98  # white noise at RMS 0.05: 14 dB below a tone's peak
    strict = ToyWorldAudioReward(score_pitch=True)  # and the pitches are still heard
    worlds = [s["world"] for s in samples]
    assert np.mean(strict([s["next"] for s in samples], audio=noisy, world=worlds).scores) >= 0.98
    quiet = [s for s in samples if not s["world"]["audio"]["onsets"]["next"]]
    noise = [0.1 * torch.randn(s["next_audio"].shape, generator=generator) for s in quiet]
    assert _score(noise, quiet).min() == 1.0  # stationary noise has no onset


def test_hand_computed_example():
    """True onsets at frames 2 and 5; bursts (a 440 Hz sine of 30 ms, independent of the toy world's
    tones) at frames 2, 6 and 8 of a 9-frame, 8 fps next scene: 2->2 and 5->6 match within one
    frame, 8 is spurious: precision 2/3, recall 1, F1 = 2 * 2 / (2 + 3) = 0.8; with tolerance 0 only
    2->2 matches: F1 = 2 / 5 = 0.4."""
    world = {
        "fps": 8.0,
        "next_frames": 9,
        "audio": {"sample_rate": SR, "onsets": {"next": [{"frame": 2}, {"frame": 5}]}},
    }
    wave = np.zeros(9 * 2000)
    t = np.arange(480) / SR
    for frame in (2, 6, 8):
        wave[frame * 2000 : frame * 2000 + 480] = 0.3 * np.sin(2 * np.pi * 440 * t)
    result = REWARD.score_audio(wave, world)
    assert result["onset_frames"] == [2, 6, 8] and result["true_frames"] == [2, 5]
    assert result["score"] == pytest.approx(0.8) and result["precision"] == pytest.approx(2 / 3)
    assert result["recall"] == 1.0
    assert ToyWorldAudioReward(tolerance=0).score_audio(wave, json.dumps(world))["score"] == pytest.approx(
        0.4
    )
    # matching is one-to-one and optimal: greedy in time order pairs 1-2 and 2-3, not 2-2
    assert match_onsets([1, 2], [2, 3], tolerance=1) == [(1, 2), (2, 3)]
    assert match_onsets([2, 2], [2], tolerance=1) == [(2, 2)]
    assert result["pitch"] is None  # this world gives no pitches
    with pytest.raises(InputError, match="score_pitch needs a 'pitch'"):
        ToyWorldAudioReward(score_pitch=True).score_audio(wave, world)
    for onset in world["audio"]["onsets"]["next"]:
        onset["pitch"] = 440.0
    assert REWARD.score_audio(wave, world)["pitch"] == 1.0
    for onset in world["audio"]["onsets"]["next"]:
        onset["pitch"] = 466.16  # one semitone off
    assert REWARD.score_audio(wave, world)["pitch"] == 0.0
    assert onset_f1([], [])["score"] == 1.0 and onset_f1([3], [])["score"] == 0.0
    assert onset_f1([], [3])["score"] == 0.0


def test_pitch_tells_which_event_rang(samples):
    """The true sound is heard at the true pitches; the same onsets three semitones too high (written
    with the test's own synthesiser) keep the timing F1 but lose every pitch, and with score_pitch
    the score."""
    events = _with_events(samples)
    truth = REWARD(
        [s["next"] for s in events],
        audio=[s["next_audio"] for s in events],
        world=[s["world"] for s in events],
    )
    assert all(p == 1.0 for p in truth.metadata["pitch"])
    sharp = []
    for s in events:
        onsets = [{**o, "pitch": o["pitch"] * 2 ** (3 / 12)} for o in s["world"]["audio"]["onsets"]["next"]]
        track = _expected_track(onsets, s["next_audio"].shape[1], 8.0, SR)
        sharp.append(torch.from_numpy(track).float())
    worlds = [s["world"] for s in events]
    out = REWARD([s["next"] for s in events], audio=sharp, world=worlds)
    assert min(out.scores) == 1.0 and max(out.metadata["pitch"]) == 0.0
    strict = ToyWorldAudioReward(score_pitch=True)
    assert max(strict([s["next"] for s in events], audio=sharp, world=worlds).scores) == 0.0
    assert (
        min(strict([s["next"] for s in events], audio=[s["next_audio"] for s in events], world=worlds).scores)
        == 1.0
    )


def test_score_on_mp4_decoded_true_continuations(tmp_path, samples):
    decoded = []
    for i, s in enumerate(samples[:40]):
        path = write_video(tmp_path / f"{i}.mp4", s["next"], 8.0, audio=s["next_audio"], sample_rate=SR)
        decoded.append(read_audio(path)[0])
    assert _score(decoded, samples[:40]).mean() >= 0.9


def test_other_sample_rate_and_frame_rate():
    """A 24 kHz waveform (LTX-2's vocoder rate) is scored with sample_rate=24000 against the 16 kHz
    world; at 24 fps tones are shorter (0.9 frame) and still land on their frames."""
    high = [generate_sample(seed, ToyWorldConfig(audio=True, sample_rate=24000)) for seed in range(20)]
    worlds = [generate_sample(seed, AUDIO)["world"] for seed in range(20)]
    scores = REWARD(
        [s["next"] for s in high], audio=[s["next_audio"] for s in high], world=worlds, sample_rate=24000
    )
    assert min(scores.scores) == 1.0
    fast = [generate_sample(seed, ToyWorldConfig(audio=True, fps=24.0)) for seed in range(20)]
    assert sum(bool(s["world"]["audio"]["onsets"]["next"]) for s in fast) >= 5
    assert _score([s["next_audio"] for s in fast], fast).min() == 1.0


def test_reward_contract(samples):
    reward = resolve("toyworld_audio")()
    assert reward.__name__ == "toyworld_audio"
    chosen = _with_events(samples)[:3]
    videos, worlds = [s["next"] for s in chosen], [json.dumps(s["world"]) for s in chosen]
    audio = [chosen[0]["next_audio"], None, chosen[2]["next_audio"][0].numpy()]
    out = reward(videos, None, None, audio=audio, world=worlds, sample_rate=[SR, SR, SR])
    assert out.scores[0] == 1.0 and out.scores[1] is None and out.scores[2] == 1.0
    assert reward(videos, audio=audio, world=worlds, sample_rate=float(SR)).scores == out.scores
    assert out.metadata["true_frames"][0] == sorted(
        {o["frame"] for o in chosen[0]["world"]["audio"]["onsets"]["next"]}
    )
    with pytest.raises(InputError, match="needs the 'audio' metadata column"):
        reward(videos, world=worlds)
    with pytest.raises(InputError, match="entries in metadata 'audio'"):
        reward(videos, audio=audio[:2], world=worlds)
    with pytest.raises(InputError, match="audio=True"):
        reward(videos[:1], audio=audio[:1], world=[generate_sample(0)["world"]])
    with pytest.raises(InputError, match="segment"):
        ToyWorldAudioReward(segment="middle")
