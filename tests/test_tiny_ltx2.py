"""Tiny LTX-2 checkpoints: built from the real classes, loaded by diffusers' own LTX-2 pipelines."""

from __future__ import annotations

import json

import pytest
import torch

from policies.errors import InputError
from policies.tiny_ltx2 import TinyLTX2Spec, build_tiny_gemma_tokenizer, build_tiny_ltx2

# Few steps on a tiny clip; guidance off (one transformer pass a step) and STG off (needs real block ids).
CALL = dict(
    height=64,
    width=64,
    num_frames=9,
    frame_rate=25.0,
    num_inference_steps=2,
    guidance_scale=1.0,
    audio_guidance_scale=1.0,
    stg_scale=0.0,
    audio_stg_scale=0.0,
    modality_scale=1.0,
    audio_modality_scale=1.0,
    guidance_rescale=0.0,
    audio_guidance_rescale=0.0,
    spatio_temporal_guidance_blocks=None,
    max_sequence_length=16,
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_tiny_ltx2(tmp_path_factory.mktemp("tiny_ltx2") / "ckpt", seed=3)


@pytest.fixture(scope="module")
def pipe(checkpoint):
    from diffusers import LTX2Pipeline

    return LTX2Pipeline.from_pretrained(checkpoint)


def test_layout_is_the_diffusers_one_with_safetensors_only(checkpoint):
    index = json.loads((checkpoint / "model_index.json").read_text())
    assert index["_class_name"] == "LTX2Pipeline"
    assert index["text_encoder"] == ["transformers", "Gemma3ForConditionalGeneration"]
    assert index["tokenizer"] == ["transformers", "GemmaTokenizer"]
    assert index["connectors"] == ["ltx2", "LTX2TextConnectors"]
    assert index["vocoder"] == ["ltx2", "LTX2Vocoder"]
    files = [p for p in checkpoint.rglob("*") if p.is_file()]
    weights = [p for p in files if p.suffix in {".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl"}]
    assert {p.parent.name for p in weights} == {
        "transformer", "vae", "audio_vae", "text_encoder", "connectors", "vocoder"
    }  # fmt: skip
    assert all(p.suffix == ".safetensors" for p in weights)
    assert sum(p.stat().st_size for p in files) < 8 * 2**20


def test_real_ratios(pipe):
    """The pipeline reads the real LTX-2 compression and audio settings off the tiny components."""
    assert (pipe.vae_spatial_compression_ratio, pipe.vae_temporal_compression_ratio) == (32, 8)
    assert pipe.vae.config.patch_size == 4
    assert (pipe.audio_sampling_rate, pipe.audio_hop_length, pipe.audio_vae.config.mel_bins) == (
        16000,
        160,
        64,
    )
    assert (pipe.audio_vae_temporal_compression_ratio, pipe.audio_vae_mel_compression_ratio) == (4, 4)
    assert pipe.vocoder.config.output_sampling_rate == 24000
    with torch.no_grad():  # the VAE really compresses as it says: 9 frames of 64x64 -> 2 latent frames of 2x2
        latents = pipe.vae.encode(torch.zeros(1, 3, 9, 64, 64)).latent_dist.mode()
        mel = pipe.audio_vae.encode(torch.zeros(1, 2, 36, 64)).latent_dist.mode()
    assert latents.shape == (1, pipe.transformer.config.in_channels, 2, 2, 2)
    assert mel.shape[2:] == (9, 16)
    assert mel.shape[1] * mel.shape[3] == pipe.transformer.config.audio_in_channels


def test_text_to_video_runs_and_latents_decode_to_the_same_video_and_audio(pipe):
    """End to end from a text prompt: the latent output, decoded through the checkpoint's VAEs and vocoder by
    hand, is the video and audio the pipeline decodes itself."""
    out = pipe(
        prompt="a red ball moves left", generator=torch.Generator().manual_seed(0), output_type="pt", **CALL
    )
    video, audio = out.frames, out.audio
    assert video.shape == (1, 9, 3, 64, 64) and torch.isfinite(video).all()
    latent = pipe(
        prompt="a red ball moves left",
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
        **CALL,
    )
    assert latent.frames.shape == (1, 16, 2, 2, 2)
    assert latent.audio.shape == (1, 2, 9, 16)  # 0.36 s at 25 audio latents/s, 64 mel bins / 4
    with torch.no_grad():
        decoded = pipe.vae.decode(latent.frames, return_dict=False)[0]
        mel = pipe.audio_vae.decode(latent.audio, return_dict=False)[0]
        waveform = pipe.vocoder(mel)
    frames = ((decoded + 1) / 2).clamp(0, 1).permute(0, 2, 1, 3, 4)
    torch.testing.assert_close(video, frames, atol=1e-5, rtol=0)
    assert audio.shape == (1, 2, 240 * mel.shape[2])  # stereo, 24 kHz from 100 mel frames/s
    torch.testing.assert_close(audio, waveform, atol=1e-5, rtol=0)


def test_prompt_reaches_the_transformer(pipe):
    """Different prompts give different videos: the Gemma features pass through the connectors."""
    a = pipe(prompt="a red ball", generator=torch.Generator().manual_seed(0), output_type="latent", **CALL)
    b = pipe(prompt="a blue wall", generator=torch.Generator().manual_seed(0), output_type="latent", **CALL)
    assert not torch.allclose(a.frames, b.frames)


def test_image_to_video_pipeline_loads_and_runs(checkpoint):
    from diffusers import LTX2ImageToVideoPipeline
    from PIL import Image

    pipe = LTX2ImageToVideoPipeline.from_pretrained(checkpoint)
    image = Image.new("RGB", (64, 64), (200, 30, 30))
    out = pipe(
        image=image,
        image_crf=0,
        prompt="the ball falls",
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
        **CALL,
    )
    assert out.frames.shape == (1, 9, 3, 64, 64) and torch.isfinite(out.frames).all()


def test_same_seed_same_bytes_other_seed_other_weights(checkpoint, tmp_path):
    again = build_tiny_ltx2(tmp_path / "again", seed=3)
    other = build_tiny_ltx2(tmp_path / "other", seed=4)
    files = sorted(p.relative_to(checkpoint) for p in checkpoint.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for rel in files:
        assert (checkpoint / rel).read_bytes() == (again / rel).read_bytes(), rel
    transformer = "transformer/diffusion_pytorch_model.safetensors"
    assert (checkpoint / transformer).read_bytes() != (other / transformer).read_bytes()


def test_gemma_tokenizer_pads_left_and_prepends_bos():
    tokenizer = build_tiny_gemma_tokenizer()
    batch = tokenizer(["a red ball", "Zebra!"], padding="max_length", max_length=8, return_tensors="pt")
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id) == (0, 1, 2)
    assert tokenizer.padding_side == "left"
    for ids, mask in zip(batch.input_ids, batch.attention_mask, strict=True):
        first = int((mask == 0).sum())
        assert (ids[:first] == 0).all() and ids[first] == tokenizer.bos_token_id
    # unseen characters fall back to bytes and decode back
    assert tokenizer.decode(batch.input_ids[1], skip_special_tokens=True) == "Zebra!"


def test_bad_spec_is_one_input_error():
    with pytest.raises(InputError, match="vae_downsample"):
        TinyLTX2Spec(vae_channels=(8, 8), vae_downsample=("spatial",))
    with pytest.raises(InputError, match="mel_bins"):
        TinyLTX2Spec(mel_bins=30)
    with pytest.raises(InputError, match="cannot change the width"):
        TinyLTX2Spec(latent_channels=16, vae_channels=(32,), vae_downsample=("none",))
    with pytest.raises(InputError, match="text_layers"):
        TinyLTX2Spec(text_layers=0)


class _IdentityVAE(torch.nn.Module):
    """Latents are the pixels: a perfect autoencoder with the LTX VAEs' interface."""

    def __init__(self, blank: bool = False) -> None:
        super().__init__()
        self.blank = blank
        self.register_buffer("latents_mean", torch.zeros(3))

    def encode(self, pixels):
        dist = type("Dist", (), {"mode": lambda _self: pixels})()
        return type("Out", (), {"latent_dist": dist})()

    def decode(self, latents, temb, return_dict=True):
        return (torch.full_like(latents, -1.0) if self.blank else latents,)


def test_reconstruction_reward_scores_the_truth_high_and_a_blank_decoder_low():
    from grpo.data.toyworld import ToyWorldConfig
    from grpo.toy_vae import reconstruction_reward

    assert reconstruction_reward(_IdentityVAE(), ToyWorldConfig(), num_samples=4) > 0.9
    assert reconstruction_reward(_IdentityVAE(blank=True), ToyWorldConfig(), num_samples=4) < 0.2


def test_toy_world_layout_fits_and_runs_through_the_pipeline_at_toy_size(tmp_path):
    """The toy layout (4x space, no temporal compression) is fitted by `grpo.toy_vae` and
    `grpo.toy_audio` during the build (latent statistics written) and the pipeline draws 32x32
    toy-size clips with it."""
    from diffusers import LTX2Pipeline

    from grpo.toy_checkpoints import build_fitted_tiny_ltx2

    spec = TinyLTX2Spec.toy_world(vae_fit_steps=2, audio_fit_steps=2)
    assert spec.vae_compression == (4, 1)
    with pytest.raises(NotImplementedError, match="build_fitted_tiny_ltx2"):
        build_tiny_ltx2(tmp_path / "random", spec)  # policies builds random weights only: fits train
    pipe = LTX2Pipeline.from_pretrained(build_fitted_tiny_ltx2(tmp_path / "toy", spec))
    assert (pipe.vae_spatial_compression_ratio, pipe.vae_temporal_compression_ratio) == (4, 1)
    assert not torch.equal(pipe.vae.latents_std, torch.ones_like(pipe.vae.latents_std))
    # the audio VAE is fitted too (grpo.toy_audio): its packed latents' statistics are written
    assert not torch.equal(pipe.audio_vae.latents_std, torch.ones_like(pipe.audio_vae.latents_std))
    call = {**CALL, "height": 32, "width": 32}
    out = pipe(prompt="a red ball", generator=torch.Generator().manual_seed(0), output_type="latent", **call)
    assert out.frames.shape == (1, 16, 9, 8, 8)
