"""The tiny base checkpoints shipped in ``checkpoints/``: small, safetensors only, loadable, and with a
VAE fitted to the toy world (a random one decodes every prediction to noise that no reward can rank).

The recipes that regenerate them run a few steps in `tests/test_sft.py::test_toy_recipes_run_a_few_steps`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from grpo.data.toyworld import ToyWorldConfig
from grpo.toy_vae import reconstruction_reward

ROOT = Path(__file__).resolve().parents[1] / "checkpoints"
SHIPPED = {"toy_nsp": "nsp_config.json", "toy_nextclip": "nextclip.json"}  # dir -> its policy's config


def _load(name: str):
    from policies.nextclip import NextClipPolicy
    from policies.nsp import NSPPolicy

    return (NSPPolicy if name == "toy_nsp" else NextClipPolicy).from_pretrained(ROOT / name)


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_checkpoint_is_small_and_safetensors_only(name):
    path = ROOT / name
    assert (path / SHIPPED[name]).is_file(), f"{path} is missing {SHIPPED[name]}"
    files = [p for p in path.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 8 * 2**20
    weights = [p for p in files if p.suffix in {".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl"}]
    assert weights and all(p.suffix == ".safetensors" for p in weights)
    recipe = json.loads((path / "provenance.json").read_text())
    assert recipe["command"].startswith("nextscene train recipes/")


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_vae_reconstructs_the_toy_world(name):
    """Held-out clips through the checkpoint's VAE keep the balls: verifiable reward >= 0.85 (the truth
    scores ~1; a random VAE ~0.05)."""
    assert reconstruction_reward(_load(name).vae, ToyWorldConfig(), num_samples=12) >= 0.85
