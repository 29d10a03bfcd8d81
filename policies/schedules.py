"""Sigma schedules as LTX-Video uses them.

Sigmas come from the checkpoint's own `FlowMatchEulerDiscreteScheduler` exactly as
`LTXPipeline` asks for them (linear sigmas, resolution-dependent dynamic shift, terminal
stretch), so an all-ODE rollout reproduces the pipeline. Which steps are stochastic (SDE
windows) and which are trained (timestep fractions) is the trainer's choice:
`grpo.GRPOConfig.sde_steps` / `trained_steps`.
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


# Shift settings a pipeline falls back to when the scheduler config lacks them:
# (base_image_seq_len, max_image_seq_len, base_shift, max_shift).
LTX_SHIFT_DEFAULTS = (256, 4096, 0.5, 1.15)
LTX2_SHIFT_DEFAULTS = (1024, 4096, 0.95, 2.05)


def ltx_sigmas(
    scheduler,
    num_inference_steps: int,
    video_seq_len: int,
    shift_defaults: tuple[int, int, float, float] = LTX_SHIFT_DEFAULTS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sigmas ``[N + 1]`` (ending at 0) and denoiser timesteps ``[N]`` for an LTX rollout.

    ``scheduler`` is the checkpoint's `FlowMatchEulerDiscreteScheduler`; it is asked exactly what
    `LTXPipeline` (or, with ``LTX2_SHIFT_DEFAULTS``, `LTX2Pipeline`) asks it, so shift settings in
    its config are honoured.
    """
    if num_inference_steps < 1:
        raise InputError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
    cfg = scheduler.config
    keys = ("base_image_seq_len", "max_image_seq_len", "base_shift", "max_shift")
    mu = calculate_shift(video_seq_len, *(cfg.get(k, d) for k, d in zip(keys, shift_defaults, strict=True)))
    sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
    scheduler.set_timesteps(sigmas=sigmas, mu=mu, device="cpu")
    return scheduler.sigmas.to(torch.float32).clone(), scheduler.timesteps.to(torch.float32).clone()
