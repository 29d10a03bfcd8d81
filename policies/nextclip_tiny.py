"""Tiny next-clip checkpoints for tests, benchmarks and the toy-world recipes.

`build_tiny_nextclip` writes a random tiny LTX-Video checkpoint (`policies.tiny.build_tiny_ltx`) or,
with ``generator="ltx2"``, a tiny LTX-2 one (`policies.tiny_ltx2.build_tiny_ltx2`): the real diffusers
classes and directory layouts, plus ``nextclip.json``, loadable by `NextClipPolicy.from_pretrained`
exactly like a real one (which returns `NextClipLTX2Policy` for LTX-2). A random VAE decodes any latent
into nearly grey frames, so rewards that look for the toy world's coloured balls in decoded frames (the
verifiable reward) cannot tell predictions apart; `grpo.toy_checkpoints.build_fitted_tiny_nextclip`
first fits the VAE to the toy world's clips (`grpo.toy_vae`), as the toy-world recipes do.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Literal

from policies.errors import InputError
from policies.nextclip import CONFIG_NAME, NextClipConfig
from policies.tiny import TinyLTXSpec, build_tiny_ltx
from policies.tiny_ltx2 import TinyLTX2Spec, build_tiny_ltx2


def build_tiny_nextclip(
    path: str | Path,
    spec: TinyLTXSpec | TinyLTX2Spec | None = None,
    config: NextClipConfig | None = None,
    *,
    generator: Literal["ltx", "ltx2"] = "ltx",
) -> Path:
    """A tiny random next-clip checkpoint at ``path`` of the ``generator`` family: `build_tiny_ltx` with
    ``spec`` (default: no text encoder, i.e. video-only conditioning) or `build_tiny_ltx2` with
    ``spec`` (default: the toy-world layout; LTX-2 rows without a prompt get the empty prompt), plus
    ``nextclip.json`` from ``config``."""
    config = config or NextClipConfig()
    if generator == "ltx2":
        if spec is not None and not isinstance(spec, TinyLTX2Spec):
            raise InputError("a tiny LTX-2 next-clip checkpoint takes a TinyLTX2Spec")
        spec = spec or TinyLTX2Spec.toy_world()
        path = build_tiny_ltx2(path, spec)
    elif generator == "ltx":
        if spec is not None and not isinstance(spec, TinyLTXSpec):
            raise InputError("a tiny LTX-Video next-clip checkpoint takes a TinyLTXSpec")
        spec = spec or TinyLTXSpec(text_layers=0)
        path = build_tiny_ltx(path, spec)
    else:
        raise InputError(f"generator must be ltx or ltx2, got {generator!r}")
    (path / CONFIG_NAME).write_text(json.dumps(asdict(config), indent=2))
    return path
