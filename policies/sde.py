"""One stochastic denoising step of a flow-matching sampler, with its Gaussian log-probability.

Convention (diffusers, LTX): ``x_s = (1 - s) x0 + s eps``, the model predicts ``v = eps - x0``,
sigmas run from 1 (noise) to 0. Every kind turns the Euler step ``x' = x + (s' - s) v`` into a
Gaussian transition ``x' ~ N(mean, std^2)`` whose log-density is what GRPO optimises:

* ``"sde"``   (Flow-GRPO): the reverse-time SDE with marginal-preserving drift, noise ``a``.
* ``"cps"``   (coefficients-preserving): re-noises the predicted ``x0`` to ``s'`` keeping the
  signal/noise coefficients exact, noise ``a`` in [0, 1].
* ``"dance"`` (DanceGRPO): Euler step plus a score correction, noise ``eta``.
* ``"ode"``:  the deterministic Euler step; its log-prob is 0 (it carries no likelihood).

Elements whose sigma does not move (``s == s'``, e.g. clean conditioning tokens kept at
timestep 0) and elements with zero transition std (a ``cps`` step into ``s' = 0``) are
deterministic: they are returned unchanged / at their mean and left out of the log-prob.

Log-probs are computed in fp32 whatever the input dtype, and always of the sample *as
returned* (after casting to the input dtype), so that re-scoring the stored sample later
reproduces the recorded value exactly.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch

from policies.errors import InputError

SDEKind = Literal["sde", "cps", "dance", "ode"]
KINDS: tuple[str, ...] = ("sde", "cps", "dance", "ode")
# Upper bounds that catch typos (70 for 0.7) without excluding settings used in the literature.
_MAX_NOISE_LEVEL = {"sde": 2.0, "cps": 1.0, "dance": 2.0, "ode": math.inf}
_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


class StepOutput(NamedTuple):
    """Result of `step`: the next sample, its log-prob ``[B]`` (fp32), and the Gaussian ``mean`` / ``std``."""

    next_sample: torch.Tensor
    log_prob: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor


def check_kind_and_noise(kind: str, noise_level: float) -> None:
    """Raise `InputError` for an unknown kind or a noise level outside the kind's valid range."""
    if kind not in KINDS:
        raise InputError(f"unknown SDE kind {kind!r}; choose one of {', '.join(KINDS)}")
    if kind == "ode":
        return
    if not isinstance(noise_level, (int, float)) or not math.isfinite(noise_level):
        raise InputError(f"noise_level must be a finite number, got {noise_level!r}")
    if not 0.0 < noise_level <= _MAX_NOISE_LEVEL[kind]:
        raise InputError(
            f"noise_level={noise_level} is out of range for kind {kind!r}: use 0 < noise_level <= "
            f"{_MAX_NOISE_LEVEL[kind]} (or kind='ode' for a deterministic step)"
        )


def _as_sigma(sigma: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A sigma as an fp32 tensor broadcastable against ``like`` (trailing singleton dims added)."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=like.device)
    while sigma.ndim < like.ndim:
        sigma = sigma.unsqueeze(-1)
    return sigma


def _reduce(values: torch.Tensor, weight: torch.Tensor, reduction: str) -> torch.Tensor:
    """Sum or mean of ``values * weight`` over every non-batch dim, counting only weighted elements."""
    dims = tuple(range(1, values.ndim))
    total = (values * weight).sum(dim=dims)
    if reduction == "sum":
        return total
    count = weight.expand_as(values).sum(dim=dims)
    return total / count.clamp_min(1.0)


def _check_reduction(reduction: str) -> None:
    if reduction not in ("mean", "sum"):
        raise InputError(f"reduction must be 'mean' or 'sum', got {reduction!r}")


def step(
    kind: SDEKind,
    sample: torch.Tensor,
    velocity: torch.Tensor,
    sigma: float | torch.Tensor,
    sigma_next: float | torch.Tensor,
    noise_level: float,
    *,
    noise: torch.Tensor | None = None,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    reduction: Literal["mean", "sum"] = "mean",
) -> StepOutput:
    """Take (or score) one denoising step from ``sigma`` to ``sigma_next``.

    Args:
        kind: "sde", "cps", "dance" or "ode" (see module docstring).
        sample: ``x`` at ``sigma``, shape ``[B, ...]``, any float dtype.
        velocity: the model's ``v = eps - x0`` prediction, same shape as ``sample``.
        sigma, sigma_next: floats, or tensors broadcastable over the batch — ``[B]`` per sample
            or ``[B, S]`` / ``[B, S, 1]`` per token (trailing dims are added as needed).
        noise_level: ``a`` for sde / cps, ``eta`` for dance; ignored for ode.
        noise: the standard normal draw to use (default: drawn with ``generator``).
        prev_sample: if given, score this sample instead of drawing one (training).
        generator: RNG for the noise draw when ``noise`` is not given.
        reduction: "mean" (the anchors' per-element average; default) or "sum" (exact likelihood)
            over the non-batch dims of the stochastic elements.
    """
    check_kind_and_noise(kind, noise_level)
    _check_reduction(reduction)
    if velocity.shape != sample.shape:
        raise InputError(f"velocity shape {tuple(velocity.shape)} != sample shape {tuple(sample.shape)}")

    x = sample.float()
    v = velocity.float()
    s = _as_sigma(sigma, x)
    s_next = _as_sigma(sigma_next, x)
    d = s_next - s  # < 0 where the element moves
    frozen = d == 0

    if kind == "ode":
        mean = x + d * v
        std = torch.zeros_like(s)
    elif kind == "sde":
        # std_t = a sqrt(s / (1 - s)); at s = 1 use 1 - s' in the denominator (Flow-GRPO's guard).
        s_safe = torch.where(s > 0, s, torch.ones_like(s))
        one_minus = torch.where(s < 1, 1 - s, 1 - s_next).clamp_min(1e-6)
        std_t = noise_level * torch.sqrt(s / one_minus)
        drift = v + std_t**2 / (2 * s_safe) * (x + (1 - s) * v)
        mean = x + drift * d
        std = std_t * torch.sqrt((-d).clamp_min(0))
    elif kind == "cps":
        x0_hat = x - s * v
        x1_hat = x + (1 - s) * v
        std = s_next * math.sin(noise_level * math.pi / 2)
        mean = (1 - s_next) * x0_hat + torch.sqrt((s_next**2 - std**2).clamp_min(0)) * x1_hat
    else:  # dance
        s_safe = torch.where(s > 0, s, torch.ones_like(s))
        x0_hat = x - s * v
        score = -(x - (1 - s) * x0_hat) / s_safe**2
        mean = x + d * v - 0.5 * noise_level**2 * score * d
        std = noise_level * torch.sqrt((-d).clamp_min(0))

    std = torch.where(frozen, torch.zeros_like(std), std).expand_as(mean)
    mean = torch.where(frozen, x, mean)
    stochastic = std > 0

    if prev_sample is None:
        if kind == "ode":
            next_sample = mean
        else:
            if noise is None:
                noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=torch.float32)
            next_sample = mean + std * noise.float()
        next_sample = next_sample.to(sample.dtype)
    else:
        if prev_sample.shape != sample.shape:
            raise InputError(
                f"prev_sample shape {tuple(prev_sample.shape)} != sample shape {tuple(sample.shape)}"
            )
        next_sample = prev_sample

    if kind == "ode":
        log_prob = torch.zeros(x.shape[0], dtype=torch.float32, device=x.device)
    else:
        std_safe = torch.where(stochastic, std, torch.ones_like(std))
        z = (next_sample.detach().float() - mean) / std_safe
        element_log_prob = -0.5 * z**2 - torch.log(std_safe) - _LOG_SQRT_2PI
        log_prob = _reduce(element_log_prob, stochastic.float(), reduction)
    return StepOutput(next_sample, log_prob, mean, std)


def kl_divergence(
    mean: torch.Tensor,
    ref_mean: torch.Tensor,
    std: torch.Tensor,
    reduction: Literal["mean", "sum"] = "mean",
) -> torch.Tensor:
    """``KL(N(mean, std^2) || N(ref_mean, std^2))`` per sample ``[B]``, reduced like `step`'s log-prob.

    Both Gaussians share the transition std (same sigmas and noise level), so the KL is
    ``||mean - ref_mean||^2 / (2 std^2)`` over the stochastic (std > 0) elements.
    """
    _check_reduction(reduction)
    std = std.expand_as(mean)
    stochastic = std > 0
    std_safe = torch.where(stochastic, std, torch.ones_like(std))
    element_kl = (mean.float() - ref_mean.float()) ** 2 / (2 * std_safe**2)
    return _reduce(element_kl, stochastic.float(), reduction)
