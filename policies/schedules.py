"""Sigma schedules and the choice of which denoising steps are stochastic / trained.

Sigmas come from the checkpoint's own `FlowMatchEulerDiscreteScheduler` exactly as
`LTXPipeline` asks for them (linear sigmas, resolution-dependent dynamic shift, terminal
stretch), so an all-ODE rollout reproduces the pipeline.

Two separate choices shape GRPO's cost and credit assignment:

* **stochastic steps** (SDE window, MixGRPO): the steps sampled with noise, hence with a
  likelihood; every other step is a deterministic ODE step.
* **trained steps** (timestep fraction, Flow-GRPO): the subset of stochastic steps whose
  log-prob is recomputed and back-propagated in an iteration.
"""

from __future__ import annotations

import numpy as np
import torch

from policies.errors import InputError


def calculate_shift(
    seq_len: int, base_seq_len: int, max_seq_len: int, base_shift: float, max_shift: float
) -> float:
    """The resolution-dependent shift ``mu``: linear in the token count, as LTX and Flux use it."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return seq_len * slope + base_shift - slope * base_seq_len


def ltx_sigmas(scheduler, num_inference_steps: int, video_seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sigmas ``[N + 1]`` (ending at 0) and denoiser timesteps ``[N]`` for an LTX rollout.

    ``scheduler`` is the checkpoint's `FlowMatchEulerDiscreteScheduler`; it is asked exactly what
    `LTXPipeline` asks it, so shift settings in its config are honoured.
    """
    if num_inference_steps < 1:
        raise InputError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
    cfg = scheduler.config
    mu = calculate_shift(
        video_seq_len,
        cfg.get("base_image_seq_len", 256),
        cfg.get("max_image_seq_len", 4096),
        cfg.get("base_shift", 0.5),
        cfg.get("max_shift", 1.15),
    )
    sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
    scheduler.set_timesteps(sigmas=sigmas, mu=mu, device="cpu")
    return scheduler.sigmas.to(torch.float32).clone(), scheduler.timesteps.to(torch.float32).clone()


def sde_window(num_steps: int, size: int | None = None, start: int = 0) -> list[int]:
    """Stochastic steps: all of them when ``size`` is None, else the window ``[start, start + size)``."""
    if size is None:
        return list(range(num_steps))
    if size < 1 or start < 0 or start + size > num_steps:
        raise InputError(
            f"SDE window [start={start}, size={size}] does not fit in {num_steps} steps: "
            f"use 1 <= size and start + size <= {num_steps}"
        )
    return list(range(start, start + size))


def sliding_window_start(
    iteration: int,
    num_steps: int,
    size: int,
    stride: int = 1,
    shift_every: int = 1,
    max_start: int | None = None,
) -> int:
    """MixGRPO's sliding window: the window moves ``stride`` steps every ``shift_every`` iterations.

    It starts at the noisiest steps and wraps around after reaching ``max_start`` (default: the
    last start at which the window still fits), so training keeps cycling over the trajectory.
    """
    last = num_steps - size if max_start is None else min(max_start, num_steps - size)
    if last < 0:
        raise InputError(f"sliding window of size {size} does not fit in {num_steps} steps")
    return (iteration // shift_every) * stride % (last + 1)


def train_subset(stochastic_steps: list[int], fraction: float, generator: torch.Generator) -> list[int]:
    """A random subset (at least one, sorted) of the stochastic steps to train on this iteration."""
    if not 0.0 < fraction <= 1.0:
        raise InputError(f"timestep fraction must be in (0, 1], got {fraction}")
    count = max(1, round(len(stochastic_steps) * fraction))
    order = torch.randperm(len(stochastic_steps), generator=generator)[:count]
    return sorted(stochastic_steps[i] for i in order.tolist())
