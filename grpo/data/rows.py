"""Dataset samples -> trainer rows: what a policy is conditioned on, the target, and reward metadata.

Shared by the recipe's data builders (`grpo.train`) and the reward-model stage's pair data
(`grpo.reward_modeling`).
"""

from __future__ import annotations

from typing import Any


def scene_row(prompt_column: str, context: bool = False, first_frame: bool = False):
    """Dataset sample -> row: the prompt text (or, with ``context``, the context clip, instruction and
    frame rate), the target next scene, and the rest as reward metadata. ``first_frame``: the next
    scene's first frame as ``image`` too (image-to-video conditioning)."""

    def convert(sample: dict[str, Any]) -> dict[str, Any]:
        row = {"prompt": sample[prompt_column], "video": sample["next"]}
        if first_frame:
            row["image"] = sample["next"][0]
        if "next_audio" in sample:  # the target's sound (toy world with audio)
            row.update(audio=sample["next_audio"], sample_rate=sample["sample_rate"])
        if context:
            row.update({k: sample[k] for k in ("context", "instruction", "fps") if sample.get(k) is not None})
        row.update({k: v for k, v in sample.items() if k in ("world", "next_caption", "context_caption")})
        return row

    return convert
