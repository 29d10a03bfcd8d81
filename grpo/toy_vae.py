"""Fit a tiny LTX VAE to the toy world, so that tiny policies decode to readable videos.

A random VAE decodes latents to noise, which no reward can tell apart; the tiny toy-world policies
therefore start from a real LTX VAE class (`AutoencoderKLLTXVideo` for LTX-Video,
`AutoencoderKLLTX2Video` for LTX-2: both ``encode(pixels).latent_dist`` / ``decode(latents, temb)`` with
``latents_mean`` / ``latents_std`` buffers) trained as a plain autoencoder on toy-world clips:
reconstruction loss with the balls' pixels weighted up (they cover ~3 % of a frame), plus a small pull
of the latents towards zero so that they stay well scaled for diffusion. The latent statistics are then
written to the ``latents_mean`` / ``latents_std`` buffers, as both pipelines' normalisation expects.
`reconstruction_reward` scores a VAE the way the shipped checkpoints are checked: held-out clips through
encode and decode, judged by the toy world's verifiable reward.

``python -m grpo.toy_vae --layout ltx2 --steps 1500`` fits a toy-world layout from scratch and prints
the held-out reward and the time taken, as JSON.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from grpo.data.toyworld import BACKGROUND, ToyWorld, ToyWorldConfig
from policies.tiny import TinyLTXSpec, build_tiny_ltx
from policies.tiny_ltx2 import TinyLTX2Spec, build_video_vae
from rewards.verifiable import ToyWorldVerifiableReward


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
    log_every: int = field(default=250, metadata={"help": "Steps between progress logs."})


def adam_fit(
    module: torch.nn.Module,
    step_loss,
    steps: int,
    learning_rate: float,
    seed: int,
    log_every: int,
    log=print,
    name: str = "toy VAE",
) -> dict:
    """Train ``module`` in place with Adam for ``steps`` steps of ``step_loss(generator)`` (the loss of one
    batch, drawn from ``generator``, a CPU generator seeded with ``seed``), logging every ``log_every``
    steps; leaves it in eval mode without gradients. Returns the last loss and the seconds taken."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(module.parameters(), lr=learning_rate)
    module.train().requires_grad_(True)
    start = time.perf_counter()
    loss = torch.zeros(())
    for step in range(steps):
        loss = step_loss(generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % log_every == 0:
            log(f"{name} step {step}/{steps}: loss {loss.item():.4f} ({time.perf_counter() - start:.0f} s)")
    module.eval().requires_grad_(False)
    return {"loss": float(loss.detach()), "seconds": time.perf_counter() - start}


def fit_toy_vae(vae: torch.nn.Module, world_config, fit: ToyVAEFitConfig | None = None, log=print) -> dict:
    """Train ``vae`` (an LTX-Video or LTX-2 video VAE, on any device) in place on context and next clips
    of the toy world; returns fit statistics. Batches are drawn on the CPU from ``fit.seed``."""
    fit = fit or ToyVAEFitConfig()
    device = vae.latents_mean.device
    world = ToyWorld(world_config, split="train", num_samples=fit.num_train)
    background = torch.tensor(BACKGROUND, dtype=torch.float32, device=device) / 255.0

    def step_loss(generator: torch.Generator) -> torch.Tensor:
        picks = torch.randint(0, len(world), (fit.batch_size,), generator=generator).tolist()
        which = torch.randint(0, 2, (fit.batch_size,), generator=generator).tolist()
        clips = torch.stack([world[i]["next" if w else "context"] for i, w in zip(picks, which, strict=True)])
        clips = clips.to(device)
        pixels = clips.permute(0, 4, 1, 2, 3) * 2 - 1  # [B, 3, F, H, W]
        foreground = ((clips - background).abs().amax(-1) > 0.1).float().unsqueeze(1)
        weight = 1.0 + (fit.foreground_weight - 1.0) * foreground  # [B, 1, F, H, W]
        latents = vae.encode(pixels).latent_dist.mode()
        recon = vae.decode(latents, torch.zeros(len(pixels), device=device), return_dict=False)[0]
        return (weight * (recon - pixels) ** 2).mean() + fit.latent_weight * latents.pow(2).mean()

    stats = adam_fit(vae, step_loss, fit.steps, fit.learning_rate, fit.seed, fit.log_every, log)
    with torch.no_grad():
        clips = torch.stack([world[i]["next"] for i in range(16)]).to(device).permute(0, 4, 1, 2, 3) * 2 - 1
        store_latent_statistics(vae, vae.encode(clips).latent_dist.mode(), dims=(0, 2, 3, 4))
    return stats


def store_latent_statistics(vae: torch.nn.Module, latents: torch.Tensor, dims: tuple[int, ...]) -> None:
    """Write the mean and standard deviation of ``latents`` over ``dims`` to ``vae``'s ``latents_mean`` /
    ``latents_std`` buffers, which the pipelines normalise latents with."""
    vae.latents_mean.copy_(latents.mean(dim=dims))
    vae.latents_std.copy_(latents.std(dim=dims).clamp_min(1e-3))


def reconstruction_reward(vae: torch.nn.Module, world_config, num_samples: int = 12) -> float:
    """Mean toy-world verifiable reward of ``num_samples`` held-out next clips passed through ``vae``'s
    encode and decode (the truth scores ~1; a random VAE ~0.05)."""
    world = ToyWorld(world_config, split="test", num_samples=num_samples)
    rows = [world[i] for i in range(len(world))]
    clips = torch.stack([r["next"] for r in rows]).to(vae.latents_mean.device)  # [B, F, H, W, 3]
    with torch.no_grad():
        latents = vae.encode(clips.permute(0, 4, 1, 2, 3) * 2 - 1).latent_dist.mode()
        decoded = vae.decode(latents, torch.zeros(len(rows), device=latents.device), return_dict=False)[0]
    videos = ((decoded.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 4, 1).cpu()
    scores = ToyWorldVerifiableReward()(list(videos), world=[r["world"] for r in rows]).scores
    return sum(scores) / len(scores)


def main(argv: list[str] | None = None) -> dict:
    """Fit a toy-world VAE layout from its seeded random initialisation; print and return the held-out
    reward, steps and seconds."""
    import argparse
    import json
    import tempfile

    parser = argparse.ArgumentParser(prog="python -m grpo.toy_vae", description=main.__doc__)
    parser.add_argument(
        "--layout", choices=("ltx", "ltx2"), default="ltx2", help="TinyLTXSpec or TinyLTX2Spec"
    )
    parser.add_argument("--steps", type=int, default=ToyVAEFitConfig.steps)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--log-every", type=int, default=250, help="steps between held-out evaluations")
    parser.add_argument("--spec", default="{}", help="JSON overrides of the spec's toy_world() layout")
    args = parser.parse_args(argv)
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(args.spec).items()}
    if args.layout == "ltx2":
        spec = TinyLTX2Spec.toy_world(seed=args.seed, **overrides)
        torch.manual_seed(spec.seed)
        vae = build_video_vae(spec)
    else:
        from diffusers import AutoencoderKLLTXVideo

        spec = TinyLTXSpec.toy_world(seed=args.seed, **overrides)
        with tempfile.TemporaryDirectory() as tmp:
            vae = AutoencoderKLLTXVideo.from_pretrained(build_tiny_ltx(tmp, spec) / "vae")
    vae.to(args.device)
    world = ToyWorldConfig()
    curve, eval_seconds = [], [0.0]  # held-out reward after steps 1, 1 + log_every, ...

    def log(message: str) -> None:
        start = time.perf_counter()
        curve.append(round(reconstruction_reward(vae, world), 4))
        eval_seconds[0] += time.perf_counter() - start
        print(f"{message}; held-out verifiable reward {curve[-1]}", flush=True)

    fit = ToyVAEFitConfig(steps=args.steps, seed=args.seed, log_every=args.log_every)
    stats = fit_toy_vae(vae, world, fit, log=log)
    result = {
        "layout": args.layout,
        "spec": {k: getattr(spec, k) for k in overrides} | {"vae_compression": spec.vae_compression},
        "parameters": sum(p.numel() for p in vae.parameters()),
        "steps": args.steps,
        "device": args.device,
        "fit_seconds": round(stats["seconds"] - eval_seconds[0], 1),  # without the curve's evaluations
        "final_loss": round(stats["loss"], 5),
        "heldout_verifiable_reward": round(reconstruction_reward(vae, world), 4),
        "curve_every": args.log_every,
        "curve": curve,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
