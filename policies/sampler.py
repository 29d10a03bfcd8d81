"""The family-independent sampler core: the denoising chain with its record, and the recompute.

Every policy family (LTX-Video, NSP, next-clip, LTX-2) denoises a *state* tensor per sample that
it packs for its own transformer; this module holds what does not depend on how:

* `run_chain`: the step loop over a sigma schedule. The family gives the velocity of the current
  state at schedule step ``i``; the core draws each stochastic step's noise from the samples'
  generators, takes the `policies.sde` step and records (state, next state, log-prob).
* `rescore`: the log-prob of a recorded step under the current weights (GRPO's ratio / KL).
* `joint_step`: one step of a state made of *parts* (e.g. LTX-2's video and audio tokens,
  flattened and concatenated). Each part has its own step kind (a part sampled by the ODE carries
  no likelihood) and its own log-prob; the joint log-prob reduces over all stochastic elements of
  all parts together (``mean``: their average; ``sum``: the exact joint likelihood).
* `cfg_batch`: the ``[uncond; cond]`` batch of classifier-free guidance.

A state of one part is stepped by exactly one `policies.sde.step` call, so single-part families
are bitwise what they were before the core existed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from policies import sde as sde_lib
from policies.errors import InputError


@dataclass(frozen=True)
class Part:
    """A contiguous segment of a flat state ``[B, N]`` (``size`` elements) and whether it is sampled
    stochastically at the stochastic steps (False: always the deterministic ODE step)."""

    name: str
    size: int
    stochastic: bool = True


def draw_noise(generators: Sequence[torch.Generator], shape: Sequence[int], device) -> torch.Tensor:
    """One standard-normal draw of ``shape`` per sample, each from the sample's own generator."""
    return torch.stack([torch.randn(tuple(shape), generator=g, device=device) for g in generators])


def cfg_batch(tensor: torch.Tensor, cfg: bool) -> torch.Tensor:
    """``[x; x]`` for the batched ``[uncond; cond]`` CFG forward, ``x`` without CFG."""
    return torch.cat([tensor, tensor]) if cfg else tensor


def joint_step(
    kind: str,
    sample: torch.Tensor,
    velocity: torch.Tensor,
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    noise_level: float,
    *,
    parts: Sequence[Part] | None = None,
    noise: torch.Tensor | None = None,
    prev_sample: torch.Tensor | None = None,
    reduction: str = "mean",
) -> tuple[sde_lib.StepOutput, dict[str, torch.Tensor]]:
    """`policies.sde.step` over a state of ``parts`` (split along dim 1; None = one part).

    Returns the joint `StepOutput` (log-prob over the stochastic elements of all parts, reduced by
    ``reduction``) and each part's own log-prob ``[B]`` (same reduction, over its elements).
    """
    if parts is None:
        out = sde_lib.step(
            kind,
            sample,
            velocity,
            sigma,
            sigma_next,
            noise_level,
            noise=noise,
            prev_sample=prev_sample,
            reduction=reduction,
        )
        return out, {}
    sizes = [p.size for p in parts]
    if sum(sizes) != sample.shape[1]:
        raise InputError(f"state has {sample.shape[1]} elements, its parts {sizes}")

    def split(t: torch.Tensor | None) -> list[torch.Tensor | None]:
        if t is None:
            return [None] * len(parts)
        if t.ndim >= 2 and t.shape[1] == sample.shape[1]:
            return list(t.split(sizes, dim=1))
        return [t] * len(parts)  # per-sample sigma [B] / [B, 1]: the same for every part

    outs, per_part, total, count = [], {}, 0.0, 0.0
    for part, x, v, s, s_next, z, prev in zip(
        parts,
        split(sample),
        split(velocity),
        split(sigma),
        split(sigma_next),
        split(noise),
        split(prev_sample),
        strict=True,
    ):
        part_kind = kind if part.stochastic else "ode"
        out = sde_lib.step(
            part_kind, x, v, s, s_next, noise_level, noise=z, prev_sample=prev, reduction="sum"
        )
        outs.append(out)
        n = (out.std.expand_as(out.mean) > 0).flatten(1).sum(1).float()
        per_part[part.name] = out.log_prob if reduction == "sum" else out.log_prob / n.clamp_min(1.0)
        total, count = total + out.log_prob, count + n
    log_prob = total if reduction == "sum" else total / count.clamp_min(1.0)
    joint = sde_lib.StepOutput(
        torch.cat([o.next_sample for o in outs], 1),
        log_prob,
        torch.cat([o.mean for o in outs], 1),
        torch.cat([o.std.expand_as(o.mean) for o in outs], 1),
    )
    return joint, per_part


@dataclass
class ChainRecord:
    """What `run_chain` recorded: per stochastic step the input state, the drawn next state and the
    log-probs (joint, and per part for states of several parts)."""

    latents: list[torch.Tensor] = field(default_factory=list)
    next_latents: list[torch.Tensor] = field(default_factory=list)
    log_probs: list[torch.Tensor] = field(default_factory=list)
    part_log_probs: dict[str, list[torch.Tensor]] = field(default_factory=dict)

    def add(self, latents: torch.Tensor, out: sde_lib.StepOutput, per_part: dict[str, torch.Tensor]) -> None:
        self.latents.append(latents)
        self.next_latents.append(out.next_sample)
        self.log_probs.append(out.log_prob)
        for name, value in per_part.items():
            self.part_log_probs.setdefault(name, []).append(value)

    def stacked(self, like: torch.Tensor) -> dict[str, torch.Tensor]:
        """`Rollout` fields ``latents`` / ``next_latents`` ``[B, K, ...]`` and ``log_probs`` ``[B, K]``
        (``like`` is a state ``[B, ...]`` giving the empty record its shape)."""
        batch = like.shape[0]
        empty = like.new_zeros((batch, 0, *like.shape[1:]))
        return {
            "latents": torch.stack(self.latents, 1) if self.latents else empty,
            "next_latents": torch.stack(self.next_latents, 1) if self.latents else empty,
            "log_probs": torch.stack(self.log_probs, 1) if self.log_probs else like.new_zeros((batch, 0)),
        }


def run_chain(
    latents: torch.Tensor,
    velocity_fn: Callable[[torch.Tensor, int], torch.Tensor],
    sigmas: torch.Tensor,
    *,
    kind: str,
    noise_level: float,
    stochastic: Sequence[int],
    generators: Sequence[torch.Generator],
    reduction: str,
    record: ChainRecord,
    sigma_scale: torch.Tensor | None = None,
    parts: Sequence[Part] | None = None,
) -> torch.Tensor:
    """Denoise ``latents`` through ``sigmas`` (``[N + 1]``); returns the final state.

    ``velocity_fn(state, i)`` is the family's (guided) velocity at schedule step ``i``. Steps in
    ``stochastic`` take ``kind``; each draws its noise (shape of one sample's state) from the
    samples' ``generators`` after the velocity, and is appended to ``record``. ``sigma_scale``
    (broadcastable to the state) scales every sigma per element: 0 keeps clean conditioning
    tokens fixed and out of the log-prob.
    """
    scale = sigma_scale if sigma_scale is not None else torch.ones(1, device=latents.device)
    for i in range(len(sigmas) - 1):
        velocity = velocity_fn(latents, i)
        step_kind = kind if i in stochastic else "ode"
        noise = None
        if step_kind != "ode":
            noise = draw_noise(generators, latents.shape[1:], latents.device)
        out, per_part = joint_step(
            step_kind,
            latents,
            velocity,
            sigmas[i] * scale,
            sigmas[i + 1] * scale,
            noise_level,
            parts=parts,
            noise=noise,
            reduction=reduction,
        )
        if step_kind != "ode":
            record.add(latents, out, per_part)
        latents = out.next_sample
    return latents


def recorded_steps(step: int | torch.Tensor, num_samples: int, num_recorded: int, device) -> torch.Tensor:
    """``step`` (an int, or one record position per sample) as ``[num_samples]``, checked."""
    steps = torch.as_tensor(step, dtype=torch.long, device=device).expand(num_samples)
    if steps.numel() and not bool(((steps >= 0) & (steps < num_recorded)).all()):
        raise InputError(f"step {step} is not a recorded stochastic step (0..{num_recorded - 1})")
    return steps


def rescore(
    rollout,
    steps: torch.Tensor,
    velocity_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    sigma_scale: torch.Tensor | None = None,
    parts: Sequence[Part] | None = None,
    rows: torch.Tensor | None = None,
) -> tuple[sde_lib.StepOutput, dict[str, torch.Tensor]]:
    """Re-score record positions ``steps`` (``[b]``) of samples ``rows`` (default: all) of a `Rollout`.

    ``velocity_fn(states, schedule)`` gives the velocity of the recorded input states at schedule
    indices ``schedule`` ``[b]``; ``sigma_scale`` is `run_chain`'s (per sample ``[b, ...]``).
    """
    device = rollout.latents.device
    rows = torch.arange(rollout.num_samples, device=device) if rows is None else rows
    schedule = rollout.step_indices.to(device)[steps]
    latents = rollout.latents[rows, steps]
    velocity = velocity_fn(latents, schedule)
    scale = sigma_scale if sigma_scale is not None else torch.ones(len(rows), 1, device=device)
    return joint_step(
        rollout.kind,
        latents,
        velocity,
        rollout.sigmas[schedule][:, None] * scale,
        rollout.sigmas[schedule + 1][:, None] * scale,
        rollout.noise_level,
        parts=parts,
        prev_sample=rollout.next_latents[rows, steps],
        reduction=rollout.reduction,
    )


def sample_plan(
    rows: int, num_generations: int, seeds: Sequence[int] | None, device
) -> tuple[list[int], torch.Tensor, list[torch.Generator]]:
    """Seeds (drawn if None), the conditioning row of every sample (``b // num_generations``) and
    one generator per sample, seeded by its seed: the draws of a rollout."""
    batch = rows * num_generations
    if seeds is None:
        seeds = torch.randint(0, 2**62, (batch,)).tolist()
    if len(seeds) != batch:
        raise InputError(f"got {len(seeds)} seeds for {rows} rows x {num_generations} generations = {batch}")
    condition_index = torch.arange(rows, device=device).repeat_interleave(num_generations)
    generators = [torch.Generator(device).manual_seed(int(s)) for s in seeds]
    return list(seeds), condition_index, generators
