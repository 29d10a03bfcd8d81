"""Tiny checkpoints fitted to the toy world, for the toy-world recipes, tests and benchmarks.

`policies` writes tiny checkpoints with random weights (`policies.tiny_ltx2`, `policies.tiny_nsp`,
`policies.nextclip_tiny`). A random VAE decodes every latent to noise, which no reward can tell apart, so
the toy-world policies start from checkpoints whose video VAE (and, for LTX-2, audio VAE and vocoder) is
first fitted to the toy world (`grpo.toy_vae`, `grpo.toy_audio`). Fitting trains, so it lives here, in
the training layer: each builder writes the random checkpoint, fits the components its spec asks for and
saves them in place (the same files, bitwise, as when the fits ran inside the random build: every
component's initialisation is seeded on its own and the fits draw from their own generators).
"""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Literal

from grpo.data.toyworld import ToyWorldConfig
from grpo.toy_audio import ToyAudioFitConfig, fit_toy_audio
from grpo.toy_vae import ToyVAEFitConfig, fit_toy_vae
from policies.nextclip import NextClipConfig
from policies.nextclip_tiny import build_tiny_nextclip
from policies.tiny import TinyLTXSpec
from policies.tiny_ltx2 import TinyLTX2Spec, build_tiny_ltx2
from policies.tiny_nsp import TinyNSPSpec, build_tiny_nsp


def _fit_video_vae(
    vae_dir: Path, vae_class: Any, world: ToyWorldConfig, steps: int, seed: int, device: str = "cpu"
) -> None:
    """Fit the video VAE saved in ``vae_dir`` to ``world``'s clips for ``steps`` steps on ``device`` and
    save it back."""
    vae = vae_class.from_pretrained(vae_dir, use_safetensors=True).to(device)
    fit_toy_vae(vae, world, ToyVAEFitConfig(steps=steps, seed=seed))
    vae.to("cpu").save_pretrained(vae_dir)


def _video_vae_class(generator: str) -> Any:
    """The diffusers video VAE class of a generator family (``ltx`` or ``ltx2``)."""
    from diffusers import AutoencoderKLLTX2Video, AutoencoderKLLTXVideo

    return AutoencoderKLLTX2Video if generator == "ltx2" else AutoencoderKLLTXVideo


def fit_tiny_ltx2_audio(path: str | Path, steps: int, seed: int = 0) -> dict:
    """Fit the audio VAE of the LTX-2 checkpoint at ``path`` for ``steps`` steps, then its vocoder for
    ``steps // 2`` (`grpo.toy_audio.ToyAudioFitConfig`'s 2:1, the budget measured to reach a held-out
    round trip of 0.99: the vocoder, started at silence, needs fewer), to the toy world's sound, and save
    both back in place; returns the fit statistics."""
    from diffusers import AutoencoderKLLTX2Audio
    from diffusers.pipelines.ltx2.vocoder import LTX2Vocoder

    path = Path(path)
    audio_vae = AutoencoderKLLTX2Audio.from_pretrained(path / "audio_vae", use_safetensors=True)
    vocoder = LTX2Vocoder.from_pretrained(path / "vocoder", use_safetensors=True)
    fit = ToyAudioFitConfig(vae_steps=steps, vocoder_steps=steps // 2, seed=seed)
    stats = fit_toy_audio(audio_vae, vocoder, ToyWorldConfig(), fit)
    audio_vae.save_pretrained(path / "audio_vae")
    vocoder.save_pretrained(path / "vocoder")
    return stats


def build_fitted_tiny_ltx2(
    directory: str | Path, spec: TinyLTX2Spec | None = None, seed: int | None = None
) -> Path:
    """`policies.tiny_ltx2.build_tiny_ltx2`, then its video VAE fitted for ``spec.vae_fit_steps`` steps and
    its audio VAE and vocoder as `fit_tiny_ltx2_audio` fits them for ``spec.audio_fit_steps``; ``seed``
    overrides ``spec.seed``."""
    from diffusers import AutoencoderKLLTX2Video

    spec = spec or TinyLTX2Spec()
    if seed is not None:
        spec = replace(spec, seed=seed)
    path = build_tiny_ltx2(directory, replace(spec, vae_fit_steps=0, audio_fit_steps=0))
    if spec.vae_fit_steps:
        _fit_video_vae(path / "vae", AutoencoderKLLTX2Video, ToyWorldConfig(), spec.vae_fit_steps, spec.seed)
    if spec.audio_fit_steps:
        fit_tiny_ltx2_audio(path, spec.audio_fit_steps, spec.seed)
    (path / "tiny_spec.json").write_text(json.dumps(asdict(spec), indent=2))
    return path


def build_fitted_tiny_nsp(path: str | Path, spec: TinyNSPSpec | None = None, device: str = "cpu") -> Path:
    """`policies.tiny_nsp.build_tiny_nsp`, then its generator's video VAE fitted for ``spec.vae_fit_steps``
    steps on ``device`` and (LTX-2) its audio VAE and vocoder as `fit_tiny_ltx2_audio` fits them for
    ``spec.audio_fit_steps``."""
    spec = spec or TinyNSPSpec()
    path = build_tiny_nsp(path, replace(spec, vae_fit_steps=0, audio_fit_steps=0))
    if spec.vae_fit_steps:
        vae_class = _video_vae_class(spec.generator)
        world = ToyWorldConfig()
        _fit_video_vae(path / "ltx" / "vae", vae_class, world, spec.vae_fit_steps, spec.seed, device)
    if spec.audio_fit_steps:
        fit_tiny_ltx2_audio(path / "ltx", spec.audio_fit_steps, spec.seed)
    (path / "tiny_spec.json").write_text(json.dumps(asdict(spec), indent=2))
    return path


def build_fitted_tiny_nextclip(
    path: str | Path,
    spec: TinyLTXSpec | TinyLTX2Spec | None = None,
    config: NextClipConfig | None = None,
    *,
    vae_fit_steps: int = 0,
    generator: Literal["ltx", "ltx2"] = "ltx",
    device: str = "cpu",
) -> Path:
    """`policies.nextclip_tiny.build_tiny_nextclip` of the ``generator`` family, then its VAE fitted for
    ``vae_fit_steps`` steps on ``device`` to toy-world clips of ``config.clip_frames`` frames."""
    config = config or NextClipConfig()
    path = build_tiny_nextclip(path, spec, config, generator=generator)
    if vae_fit_steps:
        seed = json.loads((path / "tiny_spec.json").read_text())["seed"]  # the generator's, as built
        world = ToyWorldConfig(context_frames=config.clip_frames, next_frames=config.clip_frames)
        _fit_video_vae(path / "vae", _video_vae_class(generator), world, vae_fit_steps, seed, device)
    return path
