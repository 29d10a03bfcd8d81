"""Fit a tiny LTX-Video VAE to the toy world, so that tiny policies decode to readable videos.

A random VAE decodes latents to noise, which no reward can tell apart; the tiny toy-world policies
therefore start from an `AutoencoderKLLTXVideo` (the real class) trained as a plain autoencoder on
toy-world clips: reconstruction loss with the balls' pixels weighted up (they cover ~3 % of a
frame), plus a small pull of the latents towards zero so that they stay well scaled for diffusion.
The latent statistics are then written to the VAE config (``latents_mean`` / ``latents_std``
buffers), as LTX-Video's normalisation expects.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch


@dataclass
class ToyVAEFitConfig:
    """How the toy VAE is fitted."""

    steps: int = field(default=1500, metadata={"help": "Adam steps."})
    batch_size: int = field(default=4, metadata={"help": "Clips per step."})
    learning_rate: float = field(default=2e-3, metadata={"help": "Adam learning rate."})
    foreground_weight: float = field(default=10.0, metadata={"help": "Loss weight of ball and wall pixels."})
    latent_weight: float = field(default=1e-4, metadata={"help": "Weight of the latents' L2 penalty."})
    num_train: int = field(default=4096, metadata={"help": "Toy-world training samples drawn from."})
    seed: int = field(default=0, metadata={"help": "Seed of the batches."})


def fit_toy_vae(vae: torch.nn.Module, world_config, fit: ToyVAEFitConfig | None = None, log=print) -> dict:
    """Train ``vae`` in place on context and next clips of the toy world; returns fit statistics."""
    from grpo.data.toyworld import BACKGROUND, ToyWorld

    fit = fit or ToyVAEFitConfig()
    world = ToyWorld(world_config, split="train", num_samples=fit.num_train)
    generator = torch.Generator().manual_seed(fit.seed)
    optimizer = torch.optim.Adam(vae.parameters(), lr=fit.learning_rate)
    background = torch.tensor(BACKGROUND, dtype=torch.float32) / 255.0
    vae.train().requires_grad_(True)
    start = time.perf_counter()
    loss = torch.zeros(())
    for step in range(fit.steps):
        picks = torch.randint(0, len(world), (fit.batch_size,), generator=generator).tolist()
        which = torch.randint(0, 2, (fit.batch_size,), generator=generator).tolist()
        clips = torch.stack([world[i]["next" if w else "context"] for i, w in zip(picks, which, strict=True)])
        pixels = clips.permute(0, 4, 1, 2, 3) * 2 - 1  # [B, 3, F, H, W]
        foreground = ((clips - background).abs().amax(-1) > 0.1).float().unsqueeze(1)
        weight = 1.0 + (fit.foreground_weight - 1.0) * foreground  # [B, 1, F, H, W]
        latents = vae.encode(pixels).latent_dist.mode()
        recon = vae.decode(latents, torch.zeros(len(pixels)), return_dict=False)[0]
        loss = (weight * (recon - pixels) ** 2).mean() + fit.latent_weight * latents.pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 250 == 0:
            elapsed = time.perf_counter() - start
            log(f"toy VAE step {step}/{fit.steps}: loss {loss.item():.4f} ({elapsed:.0f} s)")
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        clips = torch.stack([world[i]["next"] for i in range(16)]).permute(0, 4, 1, 2, 3) * 2 - 1
        latents = vae.encode(clips).latent_dist.mode()
        vae.latents_mean.copy_(latents.mean(dim=(0, 2, 3, 4)))
        vae.latents_std.copy_(latents.std(dim=(0, 2, 3, 4)).clamp_min(1e-3))
    return {"loss": float(loss.detach()), "seconds": time.perf_counter() - start}
