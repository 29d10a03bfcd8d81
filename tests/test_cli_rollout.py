"""`nextscene rollout` end to end (LTX-Video and LTX-2 with sound), and geometry checks against the real
LTX-2B VAE config."""

import json
import os
import shutil

import pytest
import torch

from grpo.cli import main
from policies import LTX2Policy, LTX2SamplingConfig, LTXPolicy, Rollout
from policies.errors import InputError
from policies.ltx import latent_shape, vae_compression
from policies.tiny import TinyLTXSpec
from policies.tiny_ltx2 import build_tiny_ltx2
from policies.video_io import read_video


def test_rollout_command_writes_videos_and_recomputable_log_probs(tmp_path):
    out = tmp_path / "run"
    assert (
        main(
            ["rollout", "--out", str(out), "--num-generations", "2", "--steps", "4", "--guidance-scale", "2"]
        )
        == 0
    )
    samples = json.loads((out / "samples.json").read_text())
    assert len(samples) == 4
    video, fps = read_video(out / samples[0]["video"])
    assert video.shape == (9, 32, 32, 3) and fps == pytest.approx(8.0)
    rollout = Rollout.load(out / "rollout")
    assert rollout.uses_cfg and rollout.log_probs.shape == (4, 4)
    assert rollout.frame_rate == 8.0  # sampled at the frame rate the videos are written at
    assert samples[3]["log_prob_per_step"] == pytest.approx(rollout.log_probs[3].tolist())
    policy = LTXPolicy.from_pretrained(out / "base_tiny_ltx")
    with torch.no_grad():
        recomputed = policy.log_prob(rollout, 2).log_prob
    assert (recomputed - rollout.log_probs[:, 2]).abs().max() <= 1e-5


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--frames", "12"], "num_frames=12 is not 8k+1"),
        (["--height", "20"], "height=20 is not a multiple of 8"),
        (["--kind", "euler"], "unknown SDE kind"),
        (["--noise-level", "3"], "out of range"),
        (["--checkpoint", "/nonexistent/ltx"], "does not exist"),
        (["--modalities", "video"], "--modalities: only for LTX-2 checkpoints"),
        (["--stg-scale", "1", "--audio-guidance-scale", "3"], "--stg-scale, --audio-guidance-scale: only"),
    ],
)
def test_rollout_command_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, argv, message):
    out = tmp_path / "run"
    assert main(["rollout", "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err
    assert not out.exists()


def test_vae_compression_of_the_real_ltx_config(tmp_path):
    """LTX-Video 0.9.x VAE (diffusers defaults: patch 4, three space-time downsamplings) is 32x / 8x."""
    ckpt = tmp_path / "ltx2b"
    for sub in ("transformer", "vae"):
        (ckpt / sub).mkdir(parents=True)
        (ckpt / sub / "config.json").write_text(json.dumps({"_class_name": "x"}))
    (ckpt / "scheduler").mkdir()
    (ckpt / "scheduler" / "scheduler_config.json").write_text("{}")
    assert vae_compression(ckpt) == (32, 8)
    assert latent_shape(121, 512, 768, 32, 8) == (16, 16, 24)
    with pytest.raises(InputError, match="height=500 is not a multiple of 32"):
        latent_shape(121, 500, 768, 32, 8)
    with pytest.raises(InputError, match="use 121 or 129"):
        latent_shape(120, 512, 768, 32, 8)


def test_tiny_spec_compression_matches_the_built_vae(tmp_path):
    from policies.tiny import build_tiny_ltx

    path = build_tiny_ltx(tmp_path / "tiny", TinyLTXSpec(text_layers=0))
    policy = LTXPolicy.from_pretrained(path)
    assert (policy.spatial_compression, policy.temporal_compression) == TinyLTXSpec().vae_compression
    assert vae_compression(path) == TinyLTXSpec().vae_compression
    assert policy.text_encoder is None
    with pytest.raises(InputError, match="no text_encoder"):
        policy.encode_prompt(["x"])


@pytest.fixture(scope="module")
def tiny_ltx2(tmp_path_factory):
    """A tiny random LTX-2 checkpoint (model_index.json: LTX2Pipeline), as a user's would be laid out."""
    return build_tiny_ltx2(tmp_path_factory.mktemp("tiny_ltx2") / "ckpt")


LTX2_GEOMETRY = ["--frames", "9", "--height", "64", "--width", "64", "--fps", "8"]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the command's default; compared on it


def test_rollout_command_on_ltx2_writes_sound_and_recomputable_per_modality_log_probs(tiny_ltx2, tmp_path):
    """The checkpoint picks LTX2Policy; every LTX-2 option reaches the rollout (checked against a direct
    LTX2Policy.rollout with the same seeds); the MP4s carry each sample's decoded sound."""
    ckpt = tmp_path / "ltx23"  # LTX-2.3's STG layout: perturbed attention on, no extra weights
    shutil.copytree(tiny_ltx2, ckpt)
    config = json.loads((ckpt / "transformer" / "config.json").read_text())
    (ckpt / "transformer" / "config.json").write_text(json.dumps({**config, "perturbed_attn": True}))
    out = tmp_path / "run"
    guidance = ["--guidance-scale", "2", "--audio-guidance-scale", "3", "--modality-scale", "1.5"]
    guidance += ["--guidance-rescale", "0.5", "--stg-scale", "0.5", "--stg-blocks", "1"]
    argv = ["rollout", "--checkpoint", str(ckpt), "--out", str(out), "--num-generations", "2"]
    assert main([*argv, "--steps", "3", "--seed", "5", "--device", DEVICE, *LTX2_GEOMETRY, *guidance]) == 0

    samples = json.loads((out / "samples.json").read_text())
    rollout = Rollout.load(out / "rollout").to(DEVICE)
    assert len(samples) == 4 and rollout.extras["modalities"] == "audio_video"
    assert rollout.extras["guidance"] == {
        "cfg": [2.0, 3.0],
        "stg": [0.5, 0.5],
        "modality": [1.5, 1.5],
        "rescale": [0.5, 0.5],
        "stg_blocks": [1],
    }
    policy = LTX2Policy.from_pretrained(ckpt, device=DEVICE)
    waveforms, rate = policy.rollout_audio(rollout)
    for b, sample in enumerate(samples):
        video, fps, (audio, audio_rate) = read_video(out / sample["video"], with_audio=True)
        assert video.shape == (9, 64, 64, 3) and fps == pytest.approx(8.0)
        assert audio_rate == rate == 24000 and audio.shape == waveforms[b].shape and audio.shape[0] == 2
        # as long as the video (9 / 8 = 1.125 s), to LTX2Pipeline's precision: the audio is a whole number
        # of 40 ms latent frames, and its causal VAE decodes the last one to 1 mel frame of 4 (-30 ms)
        assert abs(audio.shape[1] / audio_rate - 9 / 8) <= 0.05
        # the decoded sound through AAC: far closer than silence would be
        error = (audio - waveforms[b]).pow(2).mean().sqrt()
        assert error < 0.5 * waveforms[b].pow(2).mean().sqrt()
        assert sample["seed"] == 5 + b
        assert sample["log_prob_per_step"] == pytest.approx(rollout.log_probs[b].tolist(), abs=1e-6)
        by_modality = sample["log_prob_per_step_by_modality"]
        assert set(by_modality) == {"video", "audio"}
        for name, values in by_modality.items():
            assert values == pytest.approx(rollout.part_log_probs[name][b].tolist(), abs=1e-6)

    with torch.no_grad():  # recomputed under unchanged weights, every step, both modalities
        for step in range(rollout.log_probs.shape[1]):
            joint, parts = policy.log_prob_parts(rollout, step)
            assert (joint.log_prob - rollout.log_probs[:, step]).abs().max() <= 1e-5
            for name, values in parts.items():
                assert (values - rollout.part_log_probs[name][:, step]).abs().max() <= 1e-5
    sampling = LTX2SamplingConfig(
        num_frames=9, height=64, width=64, frame_rate=8.0, num_inference_steps=3, guidance_scale=2.0,
        audio_guidance_scale=3.0, modality_scale=1.5, guidance_rescale=0.5, stg_scale=0.5, stg_blocks=[1],
    )  # fmt: skip
    prompts = [s["prompt"] for s in samples[::2]]
    direct = policy.rollout(
        policy.encode_prompt(prompts, negative_prompt=""),
        num_generations=2,
        sampling=sampling,
        seeds=[5, 6, 7, 8],
    )
    assert (direct.log_probs - rollout.log_probs).abs().max() <= 1e-5
    assert (direct.final_latents - rollout.final_latents).abs().max() <= 1e-5


def test_rollout_command_on_ltx2_video_modality_writes_silent_videos(tiny_ltx2, tmp_path):
    """``--modalities video``: the audio is not a random variable, so nothing of it is scored or voiced."""
    out = tmp_path / "run"
    argv = ["rollout", "--checkpoint", str(tiny_ltx2), "--out", str(out), "--num-generations", "1"]
    assert main([*argv, "--prompt", "a ball", "--steps", "2", "--modalities", "video", *LTX2_GEOMETRY]) == 0
    (sample,) = json.loads((out / "samples.json").read_text())
    video, _, audio = read_video(out / sample["video"], with_audio=True)
    assert video.shape == (9, 64, 64, 3) and audio is None
    assert sample["log_prob_per_step"] == pytest.approx(sample["log_prob_per_step_by_modality"]["video"])
    assert sample["log_prob_per_step_by_modality"]["audio"] == [0.0, 0.0]


def _without_sound(ckpt):
    """A video-only LTX-2 directory: no audio VAE, no vocoder."""
    shutil.rmtree(ckpt / "audio_vae")
    shutil.rmtree(ckpt / "vocoder")


def _truncated_transformer(ckpt):
    """The transformer's weights cut in half, as an interrupted download leaves them."""
    weights = ckpt / "transformer" / "diffusion_pytorch_model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)


@pytest.mark.parametrize(
    "argv,damage,message",
    [
        (["--height", "32"], None, "height=32 is 1 latent cell"),
        (["--frames", "12"], None, "num_frames=12 is not 8k+1"),
        (["--modalities", "audio"], None, "modalities must be one of video, audio_video"),
        (["--stg-scale", "1", "--stg-blocks", "0"], None, "needs a transformer with perturbed attention"),
        ([], _without_sound, "has no audio_vae/ or vocoder/: use --modalities video"),
        ([], _truncated_transformer, "is truncated or corrupt"),
    ],
)
def test_rollout_command_on_ltx2_bad_input_is_one_line_before_loading(
    tiny_ltx2, tmp_path, capsys, monkeypatch, argv, damage, message
):
    ckpt = tiny_ltx2
    if damage is not None:
        ckpt = shutil.copytree(tiny_ltx2, tmp_path / "ckpt")
        damage(ckpt)

    def load(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(LTX2Policy, "from_pretrained", load)
    out = tmp_path / "run"
    assert main(["rollout", "--checkpoint", str(ckpt), "--out", str(out), *LTX2_GEOMETRY, *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err
    assert not out.exists()
