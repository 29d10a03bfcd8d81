"""`nextscene rollout` end to end, and geometry checks against the real LTX-2B VAE config."""

import json

import pytest
import torch

from grpo.cli import main
from grpo.data.video import read_video
from policies import LTXPolicy, Rollout
from policies.errors import InputError
from policies.ltx import latent_shape, vae_compression
from policies.tiny import TinyLTXSpec


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
