"""What a reward function returns.

A reward function is any callable ``(videos, prompts, contexts, **metadata)`` (sync or async).
It returns either a plain ``list[float | None]`` (one score per video; ``None`` = could not
score, which excludes that sample from this reward's advantage) or a `RewardOutput` when it has
per-sample details worth logging. ``videos`` are float32 tensors ``[F, H, W, 3]`` in [0, 1];
``metadata`` holds the dataset's extra columns, one list entry per video.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class RewardUnavailableError(RuntimeError):
    """A reward's service could not score a batch (e.g. its judge server is down). Called alone, the
    reward raises it; in a `rewards.CompositeReward` that reward scores the batch ``None`` and the
    output names it (``CompositeOutput.unavailable``), so a training run decides how long to go on."""


@dataclass
class RewardOutput:
    """Scores plus per-sample columns (each a list as long as ``scores``) for logging."""

    scores: list[float | None]
    metadata: dict[str, list[Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for key, column in self.metadata.items():
            if len(column) != len(self.scores):
                raise ValueError(
                    f"reward metadata column {key!r} has {len(column)} entries for {len(self.scores)} scores"
                )


def as_reward_output(result: list[float | None] | RewardOutput) -> RewardOutput:
    """Normalise what a reward function returned into a `RewardOutput`."""
    if isinstance(result, RewardOutput):
        return result
    return RewardOutput(scores=[None if s is None else float(s) for s in result])
