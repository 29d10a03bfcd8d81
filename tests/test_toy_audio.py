"""Fitting the tiny LTX-2 audio VAE and vocoder to the toy world's sound (`grpo.toy_audio`)."""

from __future__ import annotations

import torch

from grpo.data.toyworld import ToyWorldConfig
from grpo.toy_audio import ToyAudioFitConfig, fit_toy_audio, round_trip_reward, vocoder_loss
from policies.tiny_ltx2 import TinyLTX2Spec, build_audio_vae, build_vocoder


def _random_pair(seed: int = 0):
    spec = TinyLTX2Spec.toy_world(seed=seed)
    torch.manual_seed(spec.seed + 4)
    audio_vae = build_audio_vae(spec)
    torch.manual_seed(spec.seed + 5)
    return audio_vae, build_vocoder(spec)


def test_fit_is_seeded_and_stores_the_packed_latent_statistics():
    fit = ToyAudioFitConfig(vae_steps=2, vocoder_steps=2, batch_size=2)
    fitted = []
    for _ in range(2):
        audio_vae, vocoder = _random_pair()
        random_vocoder = {k: v.clone() for k, v in vocoder.state_dict().items()}
        fit_toy_audio(audio_vae, vocoder, ToyWorldConfig(), fit, log=lambda message: None)
        fitted.append(
            {**audio_vae.state_dict(), **{f"vocoder.{k}": v for k, v in vocoder.state_dict().items()}}
        )
    assert fitted[0].keys() == fitted[1].keys()
    assert all(torch.equal(fitted[0][k], fitted[1][k]) for k in fitted[0])
    assert not torch.equal(audio_vae.latents_std, torch.ones_like(audio_vae.latents_std))
    assert audio_vae.latents_std.shape == (TinyLTX2Spec.toy_world().audio_token_channels,)
    assert any(not torch.equal(v, random_vocoder[k]) for k, v in vocoder.state_dict().items())


def test_vocoder_loss_is_zero_on_the_truth_and_grows_when_the_sound_is_late():
    t = torch.arange(24000) / 24000
    tone = torch.sin(2 * torch.pi * 523.25 * t) * torch.exp(-t / 0.02) * 0.25
    truth = torch.zeros(1, 2, 24000)
    truth[..., 4800:] = tone[:19200]
    late = torch.zeros_like(truth)
    late[..., 7200:] = tone[:16800]  # 100 ms (almost a toy-world frame) late
    assert vocoder_loss(truth, truth, 24000).item() == 0.0
    assert vocoder_loss(late, truth, 24000).item() > 0.5


def test_random_audio_vae_and_vocoder_lose_the_onsets():
    """The round trip's bar: random weights voice no onset at the right frames (score ~0)."""
    audio_vae, vocoder = _random_pair()
    assert round_trip_reward(audio_vae, vocoder, ToyWorldConfig(), num_samples=4)["score"] < 0.2
