"""Fit a tiny LTX-2 audio VAE and vocoder to the toy world's sound, so that audio latents mean something.

A random audio VAE and vocoder turn any audio latent into noise, so the toy world's audio reward
(`rewards.verifiable_audio`: tone onsets at the bounce and strike frames) cannot tell generations apart.
The tiny toy-world LTX-2 (`policies.tiny_ltx2.TinyLTX2Spec.toy_world`) therefore fits both, from the
real classes, to toy-world sounds (``ToyWorldConfig(audio=True)``), in two stages:

1. the audio VAE (`AutoencoderKLLTX2Audio`) as a plain autoencoder of the 64-bin log-mel spectrograms
   LTX-2 encodes (`policies.ltx2.log_mel_spectrogram` of the 16 kHz waveform, duplicated to stereo, as
   `LTX2Policy.encode_audio` computes it): squared error between the decoded mel, as the pipeline's
   decode path reads it (latents cut to the pipeline's length for the duration), and the input's frames,
   the sounding bins' mean and the silent bins' mean weighing alike (the tones cover a few % of a
   spectrogram: unweighted, silence everywhere is a good fit), plus a small pull of the latents
   towards zero; its ``latents_mean`` / ``latents_std`` buffers then get the packed latents'
   statistics, as `LTX2Policy.encode_audio` and `LTX2Pipeline` normalise with them;
2. the vocoder (`LTX2Vocoder`) on the fitted VAE's decoded mels (what it voices after diffusion), the
   target being the same scene's sound rendered at the vocoder's 24 kHz (the toy world's sound follows
   from the scene alone), in stereo: L1 between the log-mel of its output (resampled to the VAE's rate)
   and its input mel (HiFi-GAN's reconstruction loss) plus L1 between the 10 ms energy levels in dB
   (the envelope whose rises the reward detects; tone and silent windows weigh alike). It starts at
   silence (`silence_in`) and keeps its input convolution and biases there, so silence stays silent:
   fitted from its random state it collapsed to one steady output for every clip.

`round_trip_reward` scores the pair as the shipped checkpoints are checked: held-out waveforms through
mel, encode, decode and vocoder, judged by ``toyworld_audio``.

``python -m grpo.toy_audio`` fits the toy-world layout's audio VAE and vocoder from their seeded
random initialisation and prints the held-out reward (before and after) and the time taken, as JSON.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from grpo.data.toyworld import ToyWorld, ToyWorldConfig
from grpo.toy_vae import adam_fit, store_latent_statistics
from policies.ltx2 import log_mel_spectrogram
from policies.tiny_ltx2 import TinyLTX2Spec, build_audio_vae, build_vocoder
from rewards.verifiable_audio import ToyWorldAudioReward

# STFT sizes (samples at 24 kHz) of the vocoder's multi-resolution spectral loss: ~5, 21 and 43 ms windows.
_STFT_SIZES = (128, 512, 1024)
_SILENT_MEL = math.log(1e-5) + 0.5  # log-mels above this hear a tone (log_mel_spectrogram's floor + 0.5)
_LEVEL_FLOOR = 1e-5  # energy floor of the envelope loss: -50 dBFS, the audio reward's silence
_SOUNDING_DB = -40.0  # 10 ms windows above this level ring a tone (10 dB over the floor)


@dataclass
class ToyAudioFitConfig:
    """How the toy audio VAE and vocoder are fitted."""

    vae_steps: int = field(default=300, metadata={"help": "Adam steps of the audio VAE."})
    vocoder_steps: int = field(default=150, metadata={"help": "Adam steps of the vocoder."})
    batch_size: int = field(default=4, metadata={"help": "Waveforms per step."})
    learning_rate: float = field(default=5e-3, metadata={"help": "Adam learning rate of the audio VAE."})
    vocoder_learning_rate: float = field(
        default=3e-3, metadata={"help": "Adam learning rate of the vocoder."}
    )
    latent_weight: float = field(default=1e-4, metadata={"help": "Weight of the audio latents' L2 penalty."})
    envelope_weight: float = field(default=1.0, metadata={"help": "Weight of the vocoder's envelope loss."})
    spectral_weight: float = field(
        default=0.0, metadata={"help": "Weight of the vocoder's multi-resolution log-STFT loss."}
    )
    mel_weight: float = field(
        default=1.0,
        metadata={"help": "Weight of the vocoder's log-mel loss (its output's mel vs its input)."},
    )
    num_train: int = field(default=1024, metadata={"help": "Toy-world training samples drawn from."})
    seed: int = field(default=0, metadata={"help": "Seed of the batches."})
    log_every: int = field(default=100, metadata={"help": "Steps between progress logs."})


def _with_sound(world_config, sample_rate: int):
    """``world_config`` with sound at ``sample_rate`` Hz (the scenes are the same at any rate)."""
    from dataclasses import replace

    return replace(world_config, audio=True, sample_rate=sample_rate)


def toy_mels(audio_vae: torch.nn.Module, waveforms: torch.Tensor) -> torch.Tensor:
    """Log-mel spectrograms ``[B, C, frames, mel_bins]`` of mono waveforms ``[B, 1, samples]`` at the audio
    VAE's rate, duplicated to its input channels, as `LTX2Policy.encode_audio` computes them."""
    config = audio_vae.config
    stereo = waveforms.expand(-1, config.in_channels, -1)
    return log_mel_spectrogram(stereo, config.sample_rate, config.mel_bins, config.mel_hop_length)


def audio_latents(audio_vae: torch.nn.Module, mels: torch.Tensor, samples: int) -> torch.Tensor:
    """The audio VAE's latents (mode) of ``mels``, cut to the frames `LTX2Pipeline` generates for
    ``samples`` audio samples (the causal encoder yields one more for a partial tail)."""
    config = audio_vae.config
    frames = round(samples / config.mel_hop_length / audio_vae.temporal_compression_ratio)
    return audio_vae.encode(mels).latent_dist.mode()[:, :, :frames]


def _batch(world, picks: list[int], part: str, device: torch.device) -> torch.Tensor:
    return torch.stack([world[i][f"{part}_audio"] for i in picks]).to(device)  # [B, 1, samples]


def _sounding(world) -> dict[str, list[int]]:
    """Per segment (context, next), the samples of ``world`` whose segment rings at least one tone (a
    silent clip teaches little)."""
    onsets = [world.onsets(i) for i in range(len(world))]
    return {part: [i for i, o in enumerate(onsets) if o[part]] for part in ("context", "next")}


def _draw(pools: dict[str, list[int]], batch_size: int, generator: torch.Generator) -> tuple[list[int], str]:
    """A segment and ``batch_size`` of its sounding samples, drawn from ``generator``."""
    part = "next" if torch.randint(0, 2, (), generator=generator) else "context"
    picks = torch.randint(0, len(pools[part]), (batch_size,), generator=generator).tolist()
    return [pools[part][j] for j in picks], part


def fit_toy_audio_vae(
    audio_vae: torch.nn.Module, world_config, fit: ToyAudioFitConfig | None = None, log=print
) -> dict:
    """Train ``audio_vae`` (an `AutoencoderKLLTX2Audio`, on any device) in place as an autoencoder of the
    log-mels of toy-world context and next sounds, then store its packed latents' statistics; returns fit
    statistics. Batches are drawn on the CPU from ``fit.seed``."""
    fit = fit or ToyAudioFitConfig()
    device = audio_vae.latents_mean.device
    world = ToyWorld(
        _with_sound(world_config, audio_vae.config.sample_rate), "train", num_samples=fit.num_train
    )
    pools = _sounding(world)

    def step_loss(generator: torch.Generator) -> torch.Tensor:
        picks, part = _draw(pools, fit.batch_size, generator)
        waveforms = _batch(world, picks, part, device)
        mels = toy_mels(audio_vae, waveforms)
        latents = audio_latents(audio_vae, mels, waveforms.shape[-1])
        decoded = audio_vae.decode(latents, return_dict=False)[0]
        target = mels[:, :, : decoded.shape[2]]
        sounding = (target > _SILENT_MEL).float()  # the tones' bins: a few % of the spectrogram
        error = _balanced_mean((decoded - target) ** 2, sounding)
        return error + fit.latent_weight * latents.pow(2).mean()

    with torch.no_grad():  # start the decoded mels at silence (log_mel_spectrogram's floor), not at 0
        audio_vae.decoder.conv_out.conv.bias.fill_(math.log(1e-5))
    stats = adam_fit(
        audio_vae, step_loss, fit.vae_steps, fit.learning_rate, fit.seed, fit.log_every, log, "toy audio VAE"
    )
    with torch.no_grad():
        waveforms = _batch(world, pools["next"][:16], "next", device)
        latents = audio_latents(audio_vae, toy_mels(audio_vae, waveforms), waveforms.shape[-1])
        packed = latents.transpose(1, 2).flatten(2, 3)  # [B, C, L, M] -> [B, L, C*M], as the pipeline packs
        store_latent_statistics(audio_vae, packed, dims=(0, 1))
    return stats


def _balanced_mean(error: torch.Tensor, sounding: torch.Tensor) -> torch.Tensor:
    """Mean of ``error`` over the ``sounding`` entries plus its mean over the others: the tones, a few % of
    a toy clip, weigh as much as its silence (unweighted, silence everywhere is a good fit)."""
    tones = (error * sounding).sum() / sounding.sum().clamp_min(1.0)
    return tones + (error * (1 - sounding)).sum() / (1 - sounding).sum().clamp_min(1.0)


def _log_magnitudes(waveforms: torch.Tensor, n_fft: int) -> torch.Tensor:
    window = torch.hann_window(n_fft, device=waveforms.device)
    spectrum = torch.stft(waveforms.flatten(0, 1), n_fft, n_fft // 4, window=window, return_complex=True)
    return torch.log(spectrum.abs() + 1e-4)


def _levels(waveforms: torch.Tensor, window: int) -> torch.Tensor:
    """Energy in dB of windows of ``window`` samples at half-window hops, as the audio reward reads it."""
    energy = torch.nn.functional.avg_pool1d(waveforms.flatten(0, 1)[:, None] ** 2, window, window // 2)
    return 10 * torch.log10(energy + _LEVEL_FLOOR)


def vocoder_loss(
    output: torch.Tensor,
    target: torch.Tensor,
    sample_rate: int,
    envelope_weight: float = 1.0,
    spectral_weight: float = 1.0,
) -> torch.Tensor:
    """``spectral_weight`` x the multi-resolution log-STFT-magnitude L1 plus ``envelope_weight`` x the L1 of
    10 ms energy levels (in units of 10 dB) between waveforms ``[B, C, samples]`` at ``sample_rate``."""
    spectral = sum(
        (_log_magnitudes(output, n) - _log_magnitudes(target, n)).abs().mean() for n in _STFT_SIZES
    )
    window = round(0.01 * sample_rate)
    levels = _levels(target, window)
    error = (_levels(output, window) - levels).abs() / 10
    sounding = (levels > _SOUNDING_DB).float()  # the tones' windows: a few % of a clip
    envelope = _balanced_mean(error, sounding)
    return spectral_weight * spectral / len(_STFT_SIZES) + envelope_weight * envelope


def resample(waveforms: torch.Tensor, rate: int, new_rate: int) -> torch.Tensor:
    """Band-limited (FFT) resampling of waveforms ``[..., samples]`` from ``rate`` to ``new_rate`` Hz:
    differentiable, exact for a periodic signal, content above both Nyquist frequencies dropped."""
    samples = waveforms.shape[-1]
    new_samples = round(samples * new_rate / rate)
    spectrum = torch.fft.rfft(waveforms)[..., : min(samples, new_samples) // 2 + 1]
    return torch.fft.irfft(spectrum, n=new_samples) * (new_samples / samples)


def mel_loss(output: torch.Tensor, rate: int, mels: torch.Tensor, audio_vae: torch.nn.Module) -> torch.Tensor:
    """L1 between the log-mel spectrogram of waveforms ``output`` ``[B, C, samples]`` at ``rate`` Hz, computed
    as ``audio_vae`` reads sound (`toy_mels`' transform, after resampling to its rate), and ``mels``
    ``[B, C, frames, mel_bins]``, over their common frames: HiFi-GAN's reconstruction loss."""
    config = audio_vae.config
    voiced = resample(output, rate, config.sample_rate)
    voiced_mels = log_mel_spectrogram(voiced, config.sample_rate, config.mel_bins, config.mel_hop_length)
    frames = min(voiced_mels.shape[2], mels.shape[2])
    return (voiced_mels[:, :, :frames] - mels[:, :, :frames]).abs().mean()


@torch.no_grad()
def silence_in(vocoder: torch.nn.Module, silent_mel: float) -> None:
    """Make ``vocoder`` (an `LTX2Vocoder`) voice a spectrogram of ``silent_mel`` everywhere as silence
    (but near its zero-padded ends): every convolution's bias 0, except the input convolution's, which
    cancels that level. At random initialisation the silent level (log_mel_spectrogram's floor, -11.5,
    on almost every bin of a toy clip) drives the hidden states far more than the tones do, so the output
    is one loud steady pattern; fitting it away shrinks the whole network and the tones with it (the
    collapse to a steady output). Started here, the hidden states carry only the input's departures from
    silence: the tones."""
    for module in vocoder.modules():
        if isinstance(module, torch.nn.Conv1d | torch.nn.ConvTranspose1d) and module.bias is not None:
            module.bias.zero_()
    vocoder.conv_in.bias.copy_(-silent_mel * vocoder.conv_in.weight.sum((1, 2)))


def fit_toy_vocoder(
    vocoder: torch.nn.Module,
    audio_vae: torch.nn.Module,
    world_config,
    fit: ToyAudioFitConfig | None = None,
    log=print,
) -> dict:
    """Train ``vocoder`` (an `LTX2Vocoder`, on ``audio_vae``'s device) in place to voice ``audio_vae``'s
    decoded log-mels of toy-world sounds as the same sounds at the vocoder's rate (`vocoder_loss`);
    returns fit statistics. Batches are drawn on the CPU from ``fit.seed``."""
    fit = fit or ToyAudioFitConfig()
    device = audio_vae.latents_mean.device
    rate = int(vocoder.config.output_sampling_rate)
    worlds = [
        ToyWorld(_with_sound(world_config, r), "train", num_samples=fit.num_train)
        for r in (audio_vae.config.sample_rate, rate)
    ]
    pools = _sounding(worlds[0])
    silence_in(vocoder, math.log(1e-5))
    # the input convolution and every bias stay as silence_in set them (zero gradients: Adam leaves them),
    # so silence stays silent and the fit cannot answer every clip with one steady level
    frozen = [p for n, p in vocoder.named_parameters() if n.startswith("conv_in.") or n.endswith(".bias")]
    handles = [p.register_hook(torch.zeros_like) for p in frozen]

    def step_loss(generator: torch.Generator) -> torch.Tensor:
        picks, part = _draw(pools, fit.batch_size, generator)
        waveforms, targets = (_batch(world, picks, part, device) for world in worlds)
        with torch.no_grad():
            latents = audio_latents(audio_vae, toy_mels(audio_vae, waveforms), waveforms.shape[-1])
            mels = audio_vae.decode(latents, return_dict=False)[0]
        output = vocoder(mels)
        targets = torch.nn.functional.pad(targets, (0, max(0, output.shape[-1] - targets.shape[-1])))
        targets = targets[..., : output.shape[-1]].expand_as(output)
        loss = fit.mel_weight * mel_loss(output, rate, mels, audio_vae) if fit.mel_weight else 0.0
        return loss + vocoder_loss(output, targets, rate, fit.envelope_weight, fit.spectral_weight)

    stats = adam_fit(
        vocoder,
        step_loss,
        fit.vocoder_steps,
        fit.vocoder_learning_rate,
        fit.seed + 1,
        fit.log_every,
        log,
        "toy vocoder",
    )
    for handle in handles:
        handle.remove()
    return stats


def fit_toy_audio(
    audio_vae: torch.nn.Module,
    vocoder: torch.nn.Module,
    world_config,
    fit: ToyAudioFitConfig | None = None,
    log=print,
) -> dict:
    """Fit ``audio_vae`` then ``vocoder`` (on its decoded mels) to the toy world's sound; returns both
    stages' statistics."""
    fit = fit or ToyAudioFitConfig()
    vae_stats = fit_toy_audio_vae(audio_vae, world_config, fit, log)
    vocoder_stats = fit_toy_vocoder(vocoder, audio_vae, world_config, fit, log)
    return {"audio_vae": vae_stats, "vocoder": vocoder_stats}


@torch.no_grad()
def round_trip_reward(
    audio_vae: torch.nn.Module, vocoder: torch.nn.Module, world_config, num_samples: int = 16
) -> dict[str, float]:
    """Mean ``toyworld_audio`` score (onset F1) and pitch accuracy of the first ``num_samples`` held-out
    next sounds that ring at least one tone, passed through mel, the audio VAE's encode and decode, and
    the vocoder (the truth scores 1; silent clips are left out, as a silent output would score them 1)."""
    world = ToyWorld(_with_sound(world_config, audio_vae.config.sample_rate), "test")
    rows = []
    for row in world:
        rows += [row] if row["world"]["audio"]["onsets"]["next"] else []
        if len(rows) == num_samples:
            break
    waveforms = torch.stack([r["next_audio"] for r in rows]).to(audio_vae.latents_mean.device)
    latents = audio_latents(audio_vae, toy_mels(audio_vae, waveforms), waveforms.shape[-1])
    voiced = list(vocoder(audio_vae.decode(latents, return_dict=False)[0]).float().cpu())
    rate = int(vocoder.config.output_sampling_rate)
    out = ToyWorldAudioReward()(voiced, audio=voiced, world=[r["world"] for r in rows], sample_rate=rate)
    pitches = [p for p in out.metadata["pitch"] if p is not None]
    return {
        "score": sum(out.scores) / len(out.scores),
        "pitch": sum(pitches) / len(pitches) if pitches else 0.0,
    }


def main(argv: list[str] | None = None) -> dict:
    """Fit the toy-world layout's audio VAE and vocoder from their seeded random initialisation; print and
    return the held-out round-trip reward before and after, the steps and the seconds."""
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m grpo.toy_audio", description=main.__doc__)
    parser.add_argument("--vae-steps", type=int, default=ToyAudioFitConfig.vae_steps)
    parser.add_argument("--vocoder-steps", type=int, default=ToyAudioFitConfig.vocoder_steps)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--spec", default="{}", help="JSON overrides of TinyLTX2Spec.toy_world()")
    args = parser.parse_args(argv)
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(args.spec).items()}
    spec = TinyLTX2Spec.toy_world(seed=args.seed, audio_fit_steps=0, **overrides)
    torch.manual_seed(spec.seed + 4)  # the seeds `build_tiny_ltx2` builds them from
    audio_vae = build_audio_vae(spec)
    torch.manual_seed(spec.seed + 5)
    vocoder = build_vocoder(spec)
    world = ToyWorldConfig()
    before = round_trip_reward(audio_vae, vocoder, world)
    fit = ToyAudioFitConfig(vae_steps=args.vae_steps, vocoder_steps=args.vocoder_steps, seed=args.seed)
    stats = fit_toy_audio(audio_vae, vocoder, world, fit, log=lambda m: print(m, flush=True))
    after = round_trip_reward(audio_vae, vocoder, world)
    result = {
        "spec": overrides,
        "vae_steps": args.vae_steps,
        "vocoder_steps": args.vocoder_steps,
        "parameters": {
            "audio_vae": sum(p.numel() for p in audio_vae.parameters()),
            "vocoder": sum(p.numel() for p in vocoder.parameters()),
        },
        "fit_seconds": {k: round(v["seconds"], 1) for k, v in stats.items()},
        "final_loss": {k: round(v["loss"], 4) for k, v in stats.items()},
        "heldout_random": {k: round(v, 4) for k, v in before.items()},
        "heldout_fitted": {k: round(v, 4) for k, v in after.items()},
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
