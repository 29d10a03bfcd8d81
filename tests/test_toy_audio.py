"""Fitting the tiny LTX-2 audio VAE and vocoder to the toy world's sound (`grpo.toy_audio`)."""

from __future__ import annotations

import pytest
import torch

from grpo.data.toyworld import ToyWorldConfig
from grpo.toy_audio import (
    ToyAudioFitConfig,
    fit_toy_audio,
    resample,
    round_trip_reward,
    silence_in,
    vocoder_loss,
)
from policies.tiny_ltx2 import TinyLTX2Spec, build_audio_vae, build_vocoder


def _random_pair(seed: int = 0):
    spec = TinyLTX2Spec.toy_world(seed=seed)
    torch.manual_seed(spec.seed + 4)
    audio_vae = build_audio_vae(spec)
    torch.manual_seed(spec.seed + 5)
    return audio_vae, build_vocoder(spec)


def test_fit_is_seeded_and_stores_the_packed_latent_statistics():
    fit = ToyAudioFitConfig(vae_steps=2, vocoder_steps=2, batch_size=2, num_train=16)  # few rows to build
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
    # the fit keeps the vocoder's silence: its input convolution as drawn, every other bias 0
    assert torch.equal(vocoder.conv_in.weight, random_vocoder["conv_in.weight"])
    biases = [v for k, v in vocoder.state_dict().items() if k.endswith(".bias") and k != "conv_in.bias"]
    assert biases and not any(v.any() for v in biases)


def test_vocoder_loss_is_zero_on_the_truth_and_grows_when_the_sound_is_late():
    t = torch.arange(24000) / 24000
    tone = torch.sin(2 * torch.pi * 523.25 * t) * torch.exp(-t / 0.02) * 0.25
    truth = torch.zeros(1, 2, 24000)
    truth[..., 4800:] = tone[:19200]
    late = torch.zeros_like(truth)
    late[..., 7200:] = tone[:16800]  # 100 ms (almost a toy-world frame) late
    assert vocoder_loss(truth, truth, 24000).item() == 0.0
    assert vocoder_loss(late, truth, 24000).item() > 0.5


# The round trip's bar in CI: a smaller fit than the toy layout's (300 + 150 steps of 4 segments of 1.1 s),
# on the same world at 16 fps (0.56 s segments, the same tones) in batches of 2. The audio VAE's loss stays
# on a plateau, then drops; the held-out round trip of 8 clips with sound after audio VAE + vocoder steps
# (random pair: 0.0): batches of 4: 150 + 20: 0.0, 175 + 25: 0.93, 200 + 50: 0.91; batches of 2:
# 175 + 25: 0.0, 200 + 25: 0.93, 250 + 25: 0.975, the fit this test makes (~40 s on one CPU core).
_SHORT_CLIPS = ToyWorldConfig(fps=16)
_CI_FIT = ToyAudioFitConfig(vae_steps=250, vocoder_steps=25, batch_size=2, num_train=64)
_ROUND_TRIP_BAR = 0.6


@pytest.fixture(scope="module")
def fitted_pair():
    audio_vae, vocoder = _random_pair()
    fit_toy_audio(audio_vae, vocoder, _SHORT_CLIPS, _CI_FIT, log=lambda message: None)
    return audio_vae, vocoder


def test_the_fit_makes_the_toy_worlds_tones_survive_the_audio_vae_and_vocoder(fitted_pair):
    """Held-out true sounds through mel, the audio VAE and the vocoder: the fitted pair voices their
    onsets at the right frames (``toyworld_audio`` >= the bar); the random pair loses them (~0)."""
    random = round_trip_reward(*_random_pair(), _SHORT_CLIPS, num_samples=8)["score"]
    fitted = round_trip_reward(*fitted_pair, _SHORT_CLIPS, num_samples=8)["score"]
    assert random < 0.2
    assert fitted >= _ROUND_TRIP_BAR


def test_a_vocoder_started_at_silence_voices_silence_as_zero_and_a_tone_as_sound():
    """The collapse's cause: a random vocoder voices the silent level (-11.5 on every bin) as a loud
    steady pattern; `silence_in` makes it silence (away from the zero-padded ends), and a tone's
    mel bins still sound, where they are."""
    _, vocoder = _random_pair()
    floor = float(torch.log(torch.tensor(1e-5)))
    silent = torch.full((1, 2, 60, TinyLTX2Spec.toy_world().mel_bins), floor)
    hop = 240  # output samples per mel frame
    with torch.no_grad():
        assert vocoder(silent)[..., 10 * hop : 50 * hop].abs().mean() > 1e-2
        silence_in(vocoder, floor)
        assert vocoder(silent)[..., 10 * hop : 50 * hop].abs().max() < 1e-6  # float rounding
        tone = silent.clone()
        tone[:, :, 20:25, 30:33] = 0.0
        voiced = vocoder(tone)
    assert voiced[..., 20 * hop : 25 * hop].abs().mean() > 10 * voiced[..., 35 * hop : 50 * hop].abs().mean()


def test_resample_matches_a_sine_sampled_at_the_new_rate():
    t24, t16 = torch.arange(24000) / 24000, torch.arange(16000) / 16000
    resampled = resample(torch.sin(2 * torch.pi * 440 * t24), 24000, 16000)
    assert resampled.shape == (16000,)
    assert torch.allclose(resampled, torch.sin(2 * torch.pi * 440 * t16), atol=1e-3)
