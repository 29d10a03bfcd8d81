"""The record of a rollout: everything needed to recompute any stochastic step's log-prob later."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file


@dataclass
class Rollout:
    """G videos per conditioning row, denoised by a policy, with the stochastic steps recorded.

    Tensors are indexed by sample (``B`` = rows x generations) first. Step ``j`` of the record is
    schedule step ``step_indices[j]``: the denoiser saw ``latents[:, j]`` at
    ``sigmas[step_indices[j]]`` and the sampler produced ``next_latents[:, j]`` with log-prob
    ``log_probs[:, j]``. Conditioning is stored once per row (``condition[...][condition_index]``
    is a sample's), so G samples of one prompt or context share one copy.
    """

    latents: torch.Tensor = field(metadata={"help": "[B, K, S, C] denoiser inputs at the stochastic steps."})
    next_latents: torch.Tensor = field(metadata={"help": "[B, K, S, C] samples drawn at those steps."})
    log_probs: torch.Tensor = field(metadata={"help": "[B, K] fp32 log-probs under the sampling policy."})
    final_latents: torch.Tensor = field(metadata={"help": "[B, S, C] the clean output of the chain."})
    step_indices: torch.Tensor = field(metadata={"help": "[K] schedule index of each recorded step."})
    sigmas: torch.Tensor = field(metadata={"help": "[N + 1] fp32 sigma schedule, ending at 0."})
    timesteps: torch.Tensor = field(metadata={"help": "[N] fp32 timesteps the denoiser was given."})
    condition: dict[str, torch.Tensor] = field(metadata={"help": "Per-row conditioning tensors."})
    condition_index: torch.Tensor = field(metadata={"help": "[B] row of `condition` used by each sample."})
    generated_mask: torch.Tensor = field(metadata={"help": "[B, S] bool: True for generated tokens."})
    seeds: torch.Tensor = field(metadata={"help": "[B] int64 seed of each sample's noise."})
    guidance_scale: float = field(metadata={"help": "CFG scale used in the rollout (<= 1: no CFG)."})
    kind: str = field(metadata={"help": "SDE kind of the stochastic steps."})
    noise_level: float = field(metadata={"help": "Noise level of the stochastic steps."})
    reduction: str = field(metadata={"help": "Log-prob reduction over elements: mean or sum."})
    latent_shape: tuple[int, int, int] = field(
        metadata={"help": "(frames, height, width) of the latent grid."}
    )
    frame_rate: float = field(metadata={"help": "Frame rate the video is generated at."})
    extras: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "Policy-specific JSON-able fields."}
    )
    part_log_probs: dict[str, torch.Tensor] = field(
        default_factory=dict,
        metadata={"help": "[B, K] log-prob of each part of a joint state (video, audio); {}: one part."},
    )
    num_clips: int = field(
        default=0, metadata={"help": "Clips a next-clip rollout generated per video; 0: a single video."}
    )
    step_clips: list[int] = field(
        default_factory=list,
        metadata={"help": "[K] the generated clip of each recorded step (next-clip); []: no clips."},
    )

    @property
    def num_samples(self) -> int:
        return self.latents.shape[0]

    @property
    def uses_cfg(self) -> bool:
        return self.guidance_scale > 1.0

    def select(self, samples: torch.Tensor | list[int]) -> Rollout:
        """The sub-rollout of the given samples (for micro-batching); conditioning rows are shared."""
        idx = torch.as_tensor(samples, dtype=torch.long, device=self.latents.device)
        per_sample = (
            "latents",
            "next_latents",
            "log_probs",
            "final_latents",
            "condition_index",
            "generated_mask",
            "seeds",
        )
        return replace(
            self,
            **{name: getattr(self, name)[idx.to(getattr(self, name).device)] for name in per_sample},
            part_log_probs={k: v[idx.to(v.device)] for k, v in self.part_log_probs.items()},
        )

    @classmethod
    def cat(cls, parts: list[Rollout]) -> Rollout:
        """One rollout from several made with the same settings (e.g. one per group, for overlap)."""
        if len(parts) == 1:
            return parts[0]
        first = parts[0]
        offsets = torch.tensor([0] + [len(next(iter(p.condition.values()))) for p in parts[:-1]]).cumsum(0)
        per_sample = ("latents", "next_latents", "log_probs", "final_latents", "generated_mask", "seeds")
        return replace(
            first,
            **{name: torch.cat([getattr(p, name) for p in parts]) for name in per_sample},
            condition={k: torch.cat([p.condition[k] for p in parts]) for k in first.condition},
            condition_index=torch.cat(
                [p.condition_index + int(o) for p, o in zip(parts, offsets, strict=True)]
            ),
            part_log_probs={k: torch.cat([p.part_log_probs[k] for p in parts]) for k in first.part_log_probs},
        )

    def to(self, device: torch.device | str) -> Rollout:
        moved = {
            f.name: getattr(self, f.name).to(device)
            for f in fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        moved["condition"] = {k: v.to(device) for k, v in self.condition.items()}
        moved["part_log_probs"] = {k: v.to(device) for k, v in self.part_log_probs.items()}
        return replace(self, **moved)

    def save(self, path: str | Path) -> None:
        """Write the record as ``rollout.safetensors`` + ``rollout.json`` in directory ``path``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors, scalars = {}, {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                tensors[f.name] = value.detach().cpu().contiguous()
            elif f.name in ("condition", "part_log_probs"):
                tensors.update({f"{f.name}.{k}": v.detach().cpu().contiguous() for k, v in value.items()})
            else:
                scalars[f.name] = value
        save_file(tensors, str(path / "rollout.safetensors"))
        (path / "rollout.json").write_text(json.dumps(scalars, indent=2))

    @classmethod
    def load(cls, path: str | Path) -> Rollout:
        path = Path(path)
        tensors = load_file(str(path / "rollout.safetensors"))
        scalars = json.loads((path / "rollout.json").read_text())
        scalars["latent_shape"] = tuple(scalars["latent_shape"])
        dicts = {
            name: {k.split(".", 1)[1]: tensors.pop(k) for k in list(tensors) if k.startswith(f"{name}.")}
            for name in ("condition", "part_log_probs")
        }
        return cls(**dicts, **tensors, **scalars)
