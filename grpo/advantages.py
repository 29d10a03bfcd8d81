"""Group-relative advantages (GRPO): each sample's reward compared with the other samples generated
for the same prompt.

For one reward and one group: ``A_i = (R_i - mean_group) / (std + 1e-4)``, where std is the group's
(``scale_rewards="group"``), the whole batch's (``"batch"``) or none at all (``"none"``: ``A_i = R_i -
mean_group``). Standard deviations are population ones (divide by n, as Flow-GRPO's ``np.std``).
A group whose scored rewards are all equal carries no signal: its advantages are exactly 0.

``None`` / NaN rewards ("could not score") are left out of that reward's mean and std and contribute
0 to the sample's advantage. With several rewards:

* ``normalize_then_sum``: normalise each reward within its group, then take the weighted sum; a
  sample unscored by one reward still gets the others' contributions.
* ``sum_then_normalize``: weighted sum of the raw rewards, then normalise the sum. The sum is
  undefined for a sample missing any reward, so such a sample is left out of its group's statistics
  and gets advantage 0.

Finally advantages are clipped to ``[-adv_clip, adv_clip]``. Rewards ``[num_rewards, B, num_clips]``
(one score per generated clip) give advantages ``[B, num_clips]``, each clip index normalised within
its group on its own. With several ranks, gather the whole batch's rewards before calling this
(``"batch"`` needs every sample; groups must not be split across the call).

Best-of-N (`best_of_n_indices`, the NSP paper's selection): of each group's N samples only the
``k_top`` highest- and ``k_bottom`` lowest-scored are kept, and the advantages above are computed over
the kept samples alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch

from policies.errors import InputError

STD_EPS = 1e-4


def _none_to_nan(value: Any) -> Any:
    if value is None:
        return math.nan
    if isinstance(value, list | tuple):
        return [_none_to_nan(v) for v in value]
    return value


def rewards_to_tensor(rewards: torch.Tensor | Sequence[Any]) -> torch.Tensor:
    """Rewards as a float64 tensor with NaN where a reward function returned None."""
    if isinstance(rewards, torch.Tensor):
        return rewards.detach().to(dtype=torch.float64, device="cpu")
    try:
        return torch.tensor(_none_to_nan(rewards), dtype=torch.float64)
    except (TypeError, ValueError) as err:
        raise InputError(f"rewards must be a rectangular nested list of numbers or None ({err})") from None


def _population_std(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Std over dim 0 of the valid entries (0 where fewer than one)."""
    count = valid.sum(0).clamp(min=1)
    x = torch.where(valid, values, 0.0)
    mean = x.sum(0) / count
    return torch.sqrt(torch.where(valid, (values - mean) ** 2, 0.0).sum(0) / count)


def _normalize(
    values: torch.Tensor, valid: torch.Tensor, group_index: torch.Tensor, scale_rewards: str
) -> tuple[torch.Tensor, float]:
    """Group-normalised ``values`` ``[B, C]`` (0 where not ``valid``) and the fraction of (group, clip)
    cells whose valid values are all equal (those get advantage 0)."""
    out = torch.zeros_like(values)
    batch_std = _population_std(values, valid)
    num_groups = int(group_index.max()) + 1
    constant_cells = 0
    for g in range(num_groups):
        members = group_index == g
        x, v = values[members], valid[members]
        mean = torch.where(v, x, 0.0).sum(0) / v.sum(0).clamp(min=1)
        centred = torch.where(v, x - mean, 0.0)
        if scale_rewards == "group":
            centred = centred / (_population_std(x, v) + STD_EPS)
        elif scale_rewards == "batch":
            centred = centred / (batch_std + STD_EPS)
        highest = torch.where(v, x, -math.inf).amax(0)
        lowest = torch.where(v, x, math.inf).amin(0)
        constant = ~(highest > lowest)  # also true with 0 or 1 valid values
        out[members] = torch.where(constant, 0.0, centred)
        constant_cells += int(constant.sum())
    return out, constant_cells / (num_groups * values.shape[1])


def compute_advantages(
    rewards: torch.Tensor | Sequence[Any],
    group_ids: torch.Tensor | Sequence[int],
    *,
    reward_weights: Sequence[float] | None = None,
    scale_rewards: Literal["group", "batch", "none"] = "group",
    aggregation: Literal["normalize_then_sum", "sum_then_normalize"] = "normalize_then_sum",
    adv_clip: float | None = None,
    reward_names: Sequence[str] | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Advantages of a batch of samples and statistics for logging.

    Args:
        rewards: ``[num_rewards, B]`` or ``[num_rewards, B, num_clips]``; None or NaN = could not score.
        group_ids: ``[B]``, equal for samples generated from the same prompt.
        reward_weights: one weight per reward (default all 1).
        scale_rewards: divide by the group std, the batch std, or nothing.
        aggregation: how several rewards combine (module docstring).
        adv_clip: clip advantages to ``[-adv_clip, adv_clip]``; None disables.
        reward_names: names used in the statistics' keys (default ``"0"``, ``"1"``...).

    Returns:
        Advantages, float32 ``[B]`` (``[B, num_clips]`` for per-clip rewards), and a dict:
        ``reward/<name>/{mean,std,num_unscored,zero_std_frac}``, ``reward/mean`` (weighted sum over
        samples scored by every reward), ``reward/zero_std_frac`` (sum_then_normalize), and
        ``advantage/{mean,std,abs_mean,min,max,clip_frac,zero_frac}``. Empty statistics are NaN.
    """
    values = rewards_to_tensor(rewards)
    if values.dim() not in (2, 3):
        raise InputError(
            f"rewards must be [num_rewards, B] or [num_rewards, B, num_clips], got shape {list(values.shape)}"
        )
    per_clip = values.dim() == 3
    if not per_clip:
        values = values.unsqueeze(-1)
    num_rewards, batch, _ = values.shape
    groups = torch.as_tensor(group_ids)
    if groups.shape != (batch,):
        raise InputError(f"group_ids must have shape [{batch}] (one per sample), got {list(groups.shape)}")
    weights = torch.tensor(
        [1.0] * num_rewards if reward_weights is None else list(reward_weights), dtype=torch.float64
    )
    if weights.shape != (num_rewards,):
        raise InputError(
            f"reward_weights has {weights.numel()} entries for {num_rewards} rewards; give one per reward"
        )
    names = [str(i) for i in range(num_rewards)] if reward_names is None else list(reward_names)
    if len(names) != num_rewards:
        raise InputError(f"reward_names has {len(names)} entries for {num_rewards} rewards")
    if scale_rewards not in ("group", "batch", "none"):
        raise InputError(f"scale_rewards must be 'group', 'batch' or 'none', got {scale_rewards!r}")
    if aggregation not in ("normalize_then_sum", "sum_then_normalize"):
        raise InputError(
            f"aggregation must be 'normalize_then_sum' or 'sum_then_normalize', got {aggregation!r}"
        )
    if adv_clip is not None and adv_clip <= 0:
        raise InputError(f"adv_clip must be > 0 or None, got {adv_clip}")

    group_index = torch.unique(groups, return_inverse=True)[1]
    valid = ~torch.isnan(values)
    all_valid = valid.all(0)
    weighted_sum = (weights[:, None, None] * torch.where(valid, values, 0.0)).sum(0)
    stats: dict[str, float] = {}
    if aggregation == "normalize_then_sum":
        advantages = torch.zeros(values.shape[1:], dtype=torch.float64)
        for r in range(num_rewards):
            normalised, zero_std_frac = _normalize(values[r], valid[r], group_index, scale_rewards)
            advantages += weights[r] * normalised
            stats[f"reward/{names[r]}/zero_std_frac"] = zero_std_frac
    else:
        advantages, zero_std_frac = _normalize(weighted_sum, all_valid, group_index, scale_rewards)
        stats["reward/zero_std_frac"] = zero_std_frac

    clip_frac = 0.0
    if adv_clip is not None:
        clip_frac = (advantages.abs() > adv_clip).double().mean().item()
        advantages = advantages.clamp(-adv_clip, adv_clip)

    def mean_of(x: torch.Tensor) -> float:
        return x.mean().item() if x.numel() else math.nan

    for r, name in enumerate(names):
        scored = values[r][valid[r]]
        stats[f"reward/{name}/mean"] = mean_of(scored)
        stats[f"reward/{name}/std"] = scored.std(correction=0).item() if scored.numel() else math.nan
        stats[f"reward/{name}/num_unscored"] = float((~valid[r]).sum())
    stats["reward/mean"] = mean_of(weighted_sum[all_valid])
    stats.update(
        {
            "advantage/mean": advantages.mean().item(),
            "advantage/std": advantages.std(correction=0).item(),
            "advantage/abs_mean": advantages.abs().mean().item(),
            "advantage/min": advantages.min().item(),
            "advantage/max": advantages.max().item(),
            "advantage/clip_frac": clip_frac,
            "advantage/zero_frac": (advantages == 0).double().mean().item(),
        }
    )
    advantages = advantages.float()
    return (advantages if per_clip else advantages.squeeze(-1)), stats


def best_of_n_indices(
    scores: torch.Tensor | Sequence[Any], group_size: int, keep_top: int, keep_bottom: int
) -> torch.Tensor:
    """Indices of the samples best-of-N keeps: per group, the ``keep_top`` highest and the
    ``keep_bottom`` lowest of the remaining scores.

    Args:
        scores: ``[B]`` one ranking score per sample (None / NaN = unscored), groups of ``group_size``
            consecutive samples.
        group_size: N, the samples generated per group.
        keep_top, keep_bottom: how many of the best and of the worst samples each group keeps.

    Returns:
        int64 ``[num_groups * (keep_top + keep_bottom)]``: the kept indices, group after group, in
        ascending order within a group (the rollout's order).

    The rule is deterministic: the top is taken first, then the bottom from the rest; equal scores go
    to the lower sample index (a stable sort). Unscored samples rank after every scored one in both
    directions, so they are kept only when a group has too few scored samples (they then get
    advantage 0 from `compute_advantages`).
    """
    values = rewards_to_tensor(scores)
    if values.dim() != 1 or group_size < 1 or values.numel() % group_size:
        raise InputError(
            f"scores must be [B] with B a multiple of group_size {group_size}, got shape {list(values.shape)}"
        )
    if keep_top < 0 or keep_bottom < 0 or keep_top + keep_bottom > group_size:
        raise InputError(
            f"best-of-N keeps {keep_top} + {keep_bottom} of groups of {group_size}: "
            "both must be >= 0 with a sum <= the group size"
        )
    kept = []
    for start in range(0, values.numel(), group_size):
        group = values[start : start + group_size].tolist()
        unscored = [math.isnan(v) for v in group]
        by_index = range(group_size)
        top = sorted(by_index, key=lambda i: (unscored[i], -group[i] if not unscored[i] else 0.0, i))
        top = top[:keep_top]
        rest = [i for i in by_index if i not in top]
        bottom = sorted(rest, key=lambda i: (unscored[i], group[i] if not unscored[i] else 0.0, i))
        kept.extend(start + i for i in sorted(top + bottom[:keep_bottom]))
    return torch.tensor(kept, dtype=torch.long)
