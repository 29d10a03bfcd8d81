"""The policy contract: what the trainers, evaluation and `grpo.training_state.TrainingState` call.

Every policy family (LTX-Video, LTX-2, NSP, NSP on LTX-2, next-clip, next-clip on LTX-2) satisfies
`Policy`; `tests/test_policy_protocol.py` checks each one's members and signatures against it. The
trainers exchange only typed values with a policy: conditioning built by the policy itself, a
`Rollout` record (typed fields; ``extras`` is the policy's own business), tensors.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from policies.ltx import SamplingConfig
from policies.rollout import Rollout
from policies.sde import StepOutput


@runtime_checkable
class Trainable(Protocol):
    """What `TrainingState` optimises and checkpoints: a trained module and how the result is saved."""

    transformer: nn.Module

    def extra_trainable_parameters(self) -> dict[str, nn.Parameter]:
        """Trained weights outside ``transformer`` (e.g. the NSP queries and connector); {} for none."""

    def wrap_transformer(self, wrapped: nn.Module | None) -> None:
        """Route training forwards through ``wrapped`` (DDP's wrapper of ``transformer``)."""

    def save_pretrained(
        self, path: str | Path, transformer_state_dict: dict[str, torch.Tensor] | None = None
    ) -> None:
        """Write the trained model to ``path`` (``transformer_state_dict``: full weights from shards)."""


@runtime_checkable
class Policy(Trainable, Protocol):
    """A video diffusion policy with per-step log-probs (the contract of `policies.LTXPolicy`)."""

    @classmethod
    def from_pretrained(
        cls, path: str | Path, *, torch_dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
    ) -> Policy:
        """Load a policy directory written by `save_pretrained`."""

    @property
    def device(self) -> torch.device:
        """Where the policy's weights are."""

    def to(self, device: str | torch.device) -> Policy:
        """Move the policy (an ``nn.Module``) to ``device``."""

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int]:
        """The latent grid of a video of that size; a one-line error if the size does not fit the VAE."""

    def add_lora(
        self, rank: int = 16, alpha: float | None = None, target_modules: list[str] | None = None
    ) -> None:
        """Freeze the transformer and train LoRA adapters instead (the frozen base is the reference)."""

    def keep_reference_copy(self) -> None:
        """Keep a frozen copy of the trained weights for the KL reference (full fine-tuning)."""

    def reference(self) -> contextlib.AbstractContextManager[None]:
        """Within the block, forwards use the reference weights (no adapters / the frozen copy)."""

    def prepare_condition(self, rows: list[dict], *, guidance_scale: float = 1.0) -> dict[str, torch.Tensor]:
        """Per-row conditioning tensors of ``rows`` (prompts, images, contexts), computed once per row."""

    def rollout(
        self,
        condition: dict[str, torch.Tensor],
        *,
        num_generations: int = 1,
        sampling: SamplingConfig | None = None,
        seeds: list[int] | None = None,
    ) -> Rollout:
        """``num_generations`` denoising chains per row, the stochastic steps recorded."""

    def log_prob(
        self, rollout: Rollout, step: int | torch.Tensor, *, guidance_scale: float | None = None
    ) -> StepOutput:
        """Recompute recorded step(s) ``step`` under the current weights (with gradients)."""

    def decode(
        self, latents: torch.Tensor, latent_shape: tuple[int, int, int], batch_size: int = 8
    ) -> torch.Tensor:
        """Videos ``[B, F, H, W, 3]`` in [0, 1] of clean latents, ``batch_size`` videos a VAE call."""

    def encode_video(self, videos: torch.Tensor) -> torch.Tensor:
        """Clean latents of videos ``[B, F, H, W, 3]`` in [0, 1] (the flow-matching target)."""

    def rollout_audio(self, rollout: Rollout) -> tuple[torch.Tensor, int] | None:
        """The generated sound of a rollout for rewards, ``(waveforms, sample_rate)``; None if it has none."""

    def flow_matching_noise(
        self, condition: dict[str, torch.Tensor], generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        """Further noise `flow_matching_loss` takes (keyword arguments), drawn from ``generator``."""

    def flow_matching_loss(
        self,
        condition: dict[str, torch.Tensor],
        target: torch.Tensor,
        sigmas: torch.Tensor,
        noise: torch.Tensor,
        latent_shape: tuple[int, int, int],
        frame_rate: float = 25.0,
    ) -> torch.Tensor:
        """Per-sample velocity-regression loss at noise levels ``sigmas`` ``[B]``."""
