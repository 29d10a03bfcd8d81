"""Tiny next-clip checkpoints for tests, benchmarks and the toy-world recipes.

`build_tiny_nextclip` writes a random tiny LTX-Video checkpoint (`policies.tiny.build_tiny_ltx`: the
real diffusers classes and directory layout) plus ``nextclip.json``, loadable by
`NextClipPolicy.from_pretrained` exactly like a real one. A random VAE decodes any latent into
nearly grey frames, so rewards that look for the toy world's coloured balls in decoded frames (the
verifiable reward) cannot tell predictions apart; `grpo.toy_checkpoints.build_fitted_tiny_nextclip`
first fits the VAE to the toy world's clips (`grpo.toy_vae`), as the toy-world recipes do.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from policies.nextclip import CONFIG_NAME, NextClipConfig
from policies.tiny import TinyLTXSpec, build_tiny_ltx


def build_tiny_nextclip(
    path: str | Path, spec: TinyLTXSpec | None = None, config: NextClipConfig | None = None
) -> Path:
    """A tiny random next-clip checkpoint at ``path``: `build_tiny_ltx` with ``spec`` (default: no text
    encoder, i.e. video-only conditioning) plus ``nextclip.json`` from ``config``."""
    spec = spec or TinyLTXSpec(text_layers=0)
    config = config or NextClipConfig()
    path = build_tiny_ltx(path, spec)
    (path / CONFIG_NAME).write_text(json.dumps(asdict(config), indent=2))
    return path
