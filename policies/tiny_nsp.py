"""Tiny random NSP policies: a tiny Qwen-VL and a tiny LTX-Video or LTX-2 inside one NSP directory.

The directory has the layout a real one has (``nsp_config.json``, ``vlm/``, ``ltx/``,
``nsp_trainable.safetensors``) and loads through `NSPPolicy.from_pretrained`, the code path of a
real Qwen2.5-VL-7B + LTX-Video-2B (or LTX-2) pair; ``generator`` picks the family written to ``ltx/``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch

from policies.errors import InputError
from policies.nsp import CONFIG_FILE, NSPConfig, NSPPolicy
from policies.tiny import TinyLTXSpec, build_tiny_ltx
from policies.tiny_ltx2 import TinyLTX2Spec, build_tiny_ltx2
from policies.tiny_qwen_vl import TinyQwenVLSpec, build_tiny_qwen_vl


@dataclass
class TinyNSPSpec:
    """A tiny NSP policy: the VLM and LTX specs and the NSP wiring."""

    vlm: TinyQwenVLSpec = field(default_factory=TinyQwenVLSpec, metadata={"help": "Tiny Qwen-VL sizes."})
    ltx: TinyLTXSpec = field(
        default_factory=TinyLTXSpec.toy_world,
        metadata={"help": "Tiny LTX-Video sizes (TinyLTXSpec.toy_world: 8x8 latents per frame at 32 px)."},
    )
    generator: Literal["ltx", "ltx2"] = field(
        default="ltx", metadata={"help": "Generator family written to ltx/: ltx (LTX-Video 0.9) or ltx2."}
    )
    ltx2: TinyLTX2Spec = field(
        default_factory=TinyLTX2Spec.toy_world,
        metadata={"help": "Tiny LTX-2 sizes, with generator ltx2 (its own VAE / audio fits included)."},
    )
    nsp: NSPConfig = field(
        default_factory=lambda: NSPConfig(num_queries=8, connector_layers=1, connector_heads=4),
        metadata={"help": "Queries, connector and conditioning."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of the queries and connector."})
    vae_fit_steps: int = field(
        default=0,
        metadata={"help": "Fit the generator's video VAE to the toy world for this many steps (0: random)."},
    )
    audio_fit_steps: int = field(
        default=0,
        metadata={
            "help": "Generator ltx2: fit its audio VAE to the toy world's sound for this many steps, then "
            "its vocoder for half as many (0: random)."
        },
    )

    def __post_init__(self) -> None:
        if self.generator not in ("ltx", "ltx2"):
            raise InputError(f"TinyNSPSpec: generator must be 'ltx' or 'ltx2', got {self.generator!r}")
        if self.audio_fit_steps and self.generator != "ltx2":
            raise InputError(
                "TinyNSPSpec: audio_fit_steps needs generator 'ltx2' (LTX-Video has no audio path)"
            )


def build_tiny_nsp(path: str | Path, spec: TinyNSPSpec | None = None) -> Path:
    """Write a random tiny NSP policy directory to ``path`` and return it (a spec asking for a VAE fit,
    ``vae_fit_steps`` or ``audio_fit_steps``, is built by `grpo.toy_checkpoints`)."""
    spec = spec or TinyNSPSpec()
    if spec.vae_fit_steps or spec.audio_fit_steps:
        raise NotImplementedError(
            "build_tiny_nsp writes random weights; fitting its VAEs to the toy world trains: build with "
            "grpo.toy_checkpoints.build_fitted_tiny_nsp"
        )
    path = Path(path)
    if spec.generator == "ltx2":
        build_tiny_ltx2(path / "ltx", spec.ltx2)
    else:
        build_tiny_ltx(path / "ltx", spec.ltx)
    build_tiny_qwen_vl(path / "vlm", spec.vlm)
    (path / CONFIG_FILE).write_text(json.dumps({**asdict(spec.nsp), "vlm": "vlm", "ltx": "ltx"}, indent=2))
    torch.manual_seed(spec.seed)
    policy = NSPPolicy.from_pretrained(path)
    policy.save_pretrained(path)  # writes the seeded queries and connector
    (path / "tiny_spec.json").write_text(json.dumps(asdict(spec), indent=2))
    return path
