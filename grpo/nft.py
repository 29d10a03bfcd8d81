"""DiffusionNFT's objective: reinforcement on the forward (noising) process, no log-probs.

DiffusionNFT (Zheng et al. 2025, arXiv 2509.16117) trains a flow-matching policy on its own clean
samples ``x0``, drawn by a *sampling* policy (``old``) that follows the trained one by a soft update.
A sample's group-relative advantage ``A`` becomes its optimality ``r = (1 + clip(A, -1, 1)) / 2`` in
[0, 1]. At a forward-process point ``x_s = (1 - s) x0 + s eps`` with flow-matching target
``u = eps - x0``, the trained velocity ``v`` defines an implicit positive and negative policy

    v+ = v_old + beta (v - v_old),     v- = v_old - beta (v - v_old)

and the loss is ``r ||v+ - u||^2 + (1 - r) ||v- - u||^2``. It is a quadratic in ``v`` with minimum

    v* = v_old + (2 r - 1) / beta * (u - v_old)

so better-than-group samples pull the velocity towards their own target, worse ones push it away,
by the group's margin, and an average sample (r = 1/2) keeps the sampling policy's velocity: the
negative term is bounded, unlike a flow-matching loss with negative weights. At ``v = v_old`` its
gradient is ``2 beta (2 r - 1) (v_old - u)``: the advantage-weighted flow-matching gradient.
"""

from __future__ import annotations

import torch


def optimality(advantages: torch.Tensor) -> torch.Tensor:
    """``r = (1 + clip(A, -1, 1)) / 2`` of group-relative advantages ``A``: 1 best, 0 worst, 1/2 average."""
    return (1 + advantages.clamp(-1, 1)) / 2


def nft_loss(
    velocity: torch.Tensor,
    old_velocity: torch.Tensor,
    target: torch.Tensor,
    optimality: torch.Tensor,
    beta: float,
    generated: torch.Tensor,
) -> torch.Tensor:
    """Per-entry DiffusionNFT loss ``[b]`` (module docstring), mean over generated elements.

    Args:
        velocity: ``[b, S, C]`` the trained policy's velocity at ``x_s`` (with gradient).
        old_velocity: ``[b, S, C]`` the sampling policy's velocity there (no gradient).
        target: ``[b, S, C]`` the flow-matching target ``eps - x0``.
        optimality: ``[b]`` each entry's ``r`` in [0, 1] (`optimality`), or ``[b, S]`` one per token
            (a next-clip sample's clips each carry their own clip's ``r``).
        beta: the implicit policies' step, > 0.
        generated: ``[b, S]`` True for generated tokens (clean conditioning tokens are left out).
    """
    step = beta * (velocity - old_velocity.detach())
    weight = generated.to(velocity.dtype)
    r = optimality.to(velocity.dtype)
    if r.dim() == 1:
        r = r[:, None]

    def error(v: torch.Tensor) -> torch.Tensor:  # [b, S]
        return ((v - target) ** 2).mean(-1)

    per_token = r * error(old_velocity + step) + (1 - r) * error(old_velocity - step)
    return (per_token * weight).sum(1) / weight.sum(1)
