"""Tiny next-clip checkpoints for tests, benchmarks and the toy-world recipes.

`build_tiny_nextclip` writes a random tiny LTX-Video checkpoint (`policies.tiny.build_tiny_ltx`: the
real diffusers classes and directory layout) plus ``nextclip.json``, loadable by
`NextClipPolicy.from_pretrained` exactly like a real one. A random VAE decodes any latent into
nearly grey frames, so rewards that look for the toy world's coloured balls in decoded frames (the
verifiable reward) cannot tell predictions apart; ``vae_fit_steps`` first fits the VAE to the toy
world's clips (`policies.toy_vae`), as the toy-world recipes do.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from policies.nextclip import CONFIG_NAME, NextClipConfig
from policies.tiny import TinyLTXSpec, build_tiny_ltx


def build_tiny_nextclip(
    path: str | Path,
    spec: TinyLTXSpec | None = None,
    config: NextClipConfig | None = None,
    *,
    vae_fit_steps: int = 0,
) -> Path:
    """A tiny next-clip checkpoint at ``path``: `build_tiny_ltx` with ``spec`` (default: no text
    encoder, i.e. video-only conditioning) plus ``nextclip.json`` from ``config``; with
    ``vae_fit_steps`` its VAE is fitted to toy-world clips of ``config.clip_frames`` frames."""
    spec = spec or TinyLTXSpec(text_layers=0)
    config = config or NextClipConfig()
    path = build_tiny_ltx(path, spec)
    if vae_fit_steps:
        from diffusers import AutoencoderKLLTXVideo

        from grpo.data.toyworld import ToyWorldConfig
        from policies.toy_vae import ToyVAEFitConfig, fit_toy_vae

        vae = AutoencoderKLLTXVideo.from_pretrained(path / "vae", use_safetensors=True)
        world = ToyWorldConfig(context_frames=config.clip_frames, next_frames=config.clip_frames)
        fit_toy_vae(vae, world, ToyVAEFitConfig(steps=vae_fit_steps, seed=spec.seed))
        vae.save_pretrained(path / "vae")
    (path / CONFIG_NAME).write_text(json.dumps(asdict(config), indent=2))
    return path
