"""The clipped surrogate objective of diffusion GRPO.

For each sample i and trained denoising step k, ``ratio = exp(log_prob - old_log_prob)`` and

    loss = -mean(min(ratio * A, clip(ratio, 1 - epsilon, 1 + epsilon_high) * A)) + beta * mean(kl)

where ``kl`` is the per-step KL(policy || reference) (for Gaussian steps sharing a std,
``policies.sde`` computes it). Entries where the clipped term is the smaller one have zero gradient:
the policy has already moved as far as the trust region allows in the direction of A.

``loss_type`` says how the (sample, trained step) entries are averaged when a ``mask`` marks which
steps each sample trains (TRL's names and meanings, with trained denoising steps in place of
completion tokens): ``"grpo"`` averages each sample's trained steps, then the samples (every sample
weighs the same, however many steps it trains); ``"bnpo"`` averages all trained entries of the batch
(every trained step weighs the same); ``"dr_grpo"`` divides the sum by the constant
``B * max_steps`` (TRL's ``B * max_completion_length``: a sample's weight grows with the steps it
trains, and the scale does not depend on the draw). They differ only when samples train different
numbers of steps (or, for ``dr_grpo``, fewer than ``max_steps``); with every entry trained all three
are the plain mean. `loss_weights` gives each entry's weight.

The trainer recomputes one trained step of every sample per forward (to keep activation memory
down); it computes the weights over the whole micro-batch and passes each call its column
(``weights``), so the gradients of the calls add up to the gradient of the micro-batch's loss.
"""

from __future__ import annotations

from typing import Literal

import torch

from policies.errors import InputError

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo")


def loss_weights(mask: torch.Tensor, loss_type: str, max_steps: int | None = None) -> torch.Tensor:
    """``[B, K]`` weight of each (sample, step) entry in the ``loss_type`` average (module docstring):
    the loss is ``(weights * per_entry_loss).sum()``; untrained entries (``mask`` 0) weigh 0.

    ``max_steps`` is ``dr_grpo``'s constant: the most steps a sample can train (default ``K``).
    """
    if loss_type not in LOSS_TYPES:
        raise InputError(f"loss_type must be 'grpo', 'bnpo' or 'dr_grpo', got {loss_type!r}")
    mask = mask.float() if not mask.is_floating_point() else mask
    if loss_type == "grpo":
        return mask / (mask.sum(-1, keepdim=True).clamp(min=1) * mask.shape[0])
    if loss_type == "bnpo":
        return mask / mask.sum().clamp(min=1)
    return mask / (mask.shape[0] * (mask.shape[1] if max_steps is None else max_steps))


def grpo_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    *,
    epsilon: float,
    epsilon_high: float | None = None,
    beta: float = 0.0,
    kl: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    loss_type: Literal["grpo", "bnpo", "dr_grpo"] = "grpo",
    max_steps: int | None = None,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate plus KL penalty, and detached statistics.

    Args:
        log_prob: ``[B, K]`` log-probs of the rollout's transitions under the current policy (with grad).
        old_log_prob: ``[B, K]`` the same under the rollout policy (no grad needed).
        advantages: ``[B]`` (one per sample) or ``[B, K]``.
        epsilon: clip range below 1 (and above, unless ``epsilon_high`` is given).
        epsilon_high: clip range above 1 (asymmetric clipping, DAPO); None = ``epsilon``.
        beta: KL penalty weight; needs ``kl`` when > 0.
        kl: ``[B, K]`` per-step KL(policy || reference), with grad.
        mask: ``[B, K]`` bool/0-1, which entries count; None = all.
        loss_type: how entries are averaged (module docstring).
        max_steps: ``dr_grpo``'s constant, the most steps a sample can train; None = ``K``.
        weights: ``[B, K]`` weights of the returned loss in place of the ``loss_type`` average (a
            column of `loss_weights` over a larger batch); the statistics stay this call's average.

    Returns:
        The scalar loss and a dict of detached 0-d tensors (reduce them across ranks as you see fit):
        ``loss``, ``policy_loss``, ``kl`` (mean KL, 0 without ``kl``), ``ratio_mean``, ``ratio_min``,
        ``ratio_max``, ``clip_frac`` (entries whose gradient the clip zeroes), ``clip_frac_low``
        (ratio < 1 - epsilon with A < 0), ``clip_frac_high`` (ratio > 1 + epsilon_high with A > 0) and
        ``approx_kl`` (k3 estimate of KL(old || new): mean of ``ratio - 1 - log ratio``), all over the
        masked entries.
    """
    if log_prob.dim() != 2 or old_log_prob.shape != log_prob.shape:
        raise InputError(
            f"log_prob and old_log_prob must both be [B, K], "
            f"got {list(log_prob.shape)} and {list(old_log_prob.shape)}"
        )
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)
    if (
        advantages.dim() != 2
        or advantages.shape[0] != log_prob.shape[0]
        or advantages.shape[1] not in (1, log_prob.shape[1])
    ):
        raise InputError(
            f"advantages must be [B] or [B, K] for log_prob {list(log_prob.shape)}, "
            f"got {list(advantages.shape)}"
        )
    epsilon_high = epsilon if epsilon_high is None else epsilon_high
    if epsilon <= 0 or epsilon_high <= 0:
        raise InputError(f"epsilon and epsilon_high must be > 0, got {epsilon} and {epsilon_high}")
    if beta > 0 and kl is None:
        raise InputError("beta > 0 needs the per-step kl tensor; pass kl=... or set beta to 0")
    if kl is not None and kl.shape != log_prob.shape:
        raise InputError(f"kl must have the shape of log_prob {list(log_prob.shape)}, got {list(kl.shape)}")
    mask = torch.ones_like(log_prob) if mask is None else mask.to(log_prob.dtype)
    if mask.shape != log_prob.shape:
        raise InputError(
            f"mask must have the shape of log_prob {list(log_prob.shape)}, got {list(mask.shape)}"
        )
    if weights is not None and weights.shape != log_prob.shape:
        raise InputError(
            f"weights must have the shape of log_prob {list(log_prob.shape)}, got {list(weights.shape)}"
        )
    average = loss_weights(mask, loss_type, max_steps).to(log_prob.dtype)

    advantages = advantages.to(log_prob.dtype).expand_as(log_prob)
    log_ratio = log_prob - old_log_prob.detach()
    ratio = torch.exp(log_ratio)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high) * advantages
    per_entry = -torch.minimum(unclipped, clipped)
    policy_loss = (per_entry * average).sum()
    kl_mean = (kl * average).sum() if kl is not None else torch.zeros((), dtype=log_prob.dtype)
    if beta > 0:
        per_entry = per_entry + beta * kl
    averaged = policy_loss + beta * kl_mean if beta > 0 else policy_loss
    loss = averaged if weights is None else (per_entry * weights.to(log_prob.dtype)).sum()

    with torch.no_grad():
        selected = mask.bool()
        ratio_sel = ratio.detach()[selected]
        low = (ratio.detach() < 1 - epsilon) & (advantages < 0) & selected
        high = (ratio.detach() > 1 + epsilon_high) & (advantages > 0) & selected
        count = selected.sum().clamp(min=1)
        if ratio_sel.numel() == 0:  # nothing trained in this call: statistics are undefined
            ratio_sel = torch.full((1,), torch.nan, dtype=ratio.dtype, device=ratio.device)
        stats = {
            "loss": averaged.detach(),
            "policy_loss": policy_loss.detach(),
            "kl": kl_mean.detach(),
            "ratio_mean": ratio_sel.mean(),
            "ratio_min": ratio_sel.min(),
            "ratio_max": ratio_sel.max(),
            "clip_frac": (low | high).sum() / count,
            "clip_frac_low": low.sum() / count,
            "clip_frac_high": high.sum() / count,
            "approx_kl": ((ratio_sel - 1) - torch.log(ratio_sel)).mean(),
        }
    return loss, stats
