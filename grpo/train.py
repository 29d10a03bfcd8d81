"""Run a recipe: build the policy, the data and the rewards it names, then the trainer of its stage.

`validate` does every check that needs no model (keys, types, files, reward names) so a bad
recipe fails in well under a second; `run` then loads models and trains.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from grpo.recipe import Recipe, from_dict
from policies.errors import InputError

# ----------------------------------------------------------------------------------------- policies


@dataclass
class LTXPolicySpec:
    """``policy: {type: ltx, ...}``: an LTX-Video checkpoint directory, or a tiny random one."""

    type: Literal["ltx"] = field(default="ltx", metadata={"help": "policy kind"})
    path: str | None = field(default=None, metadata={"help": "diffusers-format LTX-Video directory"})
    tiny: bool = field(default=False, metadata={"help": "build a tiny random checkpoint when path is null"})
    torch_dtype: Literal["float32", "bfloat16"] = field(default="float32", metadata={"help": "weights dtype"})
    device: str | None = field(default=None, metadata={"help": "torch device (default: cuda if available)"})


POLICY_SPECS: dict[str, type] = {"ltx": LTXPolicySpec}


def _policy_spec(recipe: Recipe) -> Any:
    kind = recipe.policy["type"]
    if kind not in POLICY_SPECS:
        raise InputError(f"policy.type: unknown policy {kind!r}; choose one of {', '.join(POLICY_SPECS)}")
    spec = from_dict(POLICY_SPECS[kind], recipe.policy, where="policy")
    if spec.path is None and not spec.tiny:
        raise InputError(
            "policy.path: give a checkpoint directory (or set policy.tiny: true for a random tiny one)"
        )
    if spec.path is not None and not Path(spec.path).is_dir():
        raise InputError(f"policy.path: checkpoint directory {spec.path!r} does not exist")
    return spec


def build_policy(spec: LTXPolicySpec, output_dir: Path) -> Any:
    import torch

    from policies import LTXPolicy
    from policies.tiny import build_tiny_ltx

    path = Path(spec.path) if spec.path else output_dir / "base_tiny_ltx"
    if spec.path is None and not (path / "model_index.json").is_file():
        build_tiny_ltx(path)
    device = spec.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return LTXPolicy.from_pretrained(path, torch_dtype=getattr(torch, spec.torch_dtype), device=device)


# ----------------------------------------------------------------------------------------- data


@dataclass
class PromptDataSpec:
    """``data: {type: prompts, ...}``: text prompts inline or from a file (one per line, or JSONL rows)."""

    type: Literal["prompts"] = field(default="prompts", metadata={"help": "data kind"})
    prompts: list[str] | None = field(default=None, metadata={"help": "training prompts"})
    path: str | None = field(
        default=None, metadata={"help": ".txt (one prompt a line) or .jsonl with 'prompt'"}
    )
    eval_prompts: list[str] | None = field(default=None, metadata={"help": "held-out prompts for evaluation"})


DATA_SPECS: dict[str, type] = {"prompts": PromptDataSpec}


def _data_spec(recipe: Recipe) -> Any:
    kind = recipe.data["type"]
    if kind not in DATA_SPECS:
        raise InputError(f"data.type: unknown data kind {kind!r}; choose one of {', '.join(DATA_SPECS)}")
    spec = from_dict(DATA_SPECS[kind], recipe.data, where="data")
    if (spec.prompts is None) == (spec.path is None):
        raise InputError("data: give exactly one of data.prompts (a list) or data.path (a file)")
    if spec.path is not None and not Path(spec.path).is_file():
        raise InputError(f"data.path: dataset file {spec.path!r} does not exist")
    return spec


def build_datasets(spec: PromptDataSpec) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    if spec.prompts is not None:
        train = [{"prompt": p} for p in spec.prompts]
    elif spec.path.endswith(".jsonl"):
        train = []
        for number, line in enumerate(Path(spec.path).read_text().splitlines(), start=1):
            if line.strip():
                row = json.loads(line)
                if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                    raise InputError(f"{spec.path}:{number}: each JSONL row needs a 'prompt' string")
                train.append(row)
    else:
        train = [
            {"prompt": line.strip()} for line in Path(spec.path).read_text().splitlines() if line.strip()
        ]
    if not train:
        raise InputError("data: the training set is empty")
    evaluation = [{"prompt": p} for p in spec.eval_prompts] if spec.eval_prompts else None
    return train, evaluation


# ----------------------------------------------------------------------------------------- running


def validate(recipe: Recipe) -> tuple[Any, Any]:
    """Every check that needs no model; returns the policy and data specs."""
    if recipe.stage != "grpo":
        raise NotImplementedError(
            f"stage {recipe.stage!r} is not runnable from a recipe yet; only 'grpo' is (see README, Status)"
        )
    return _policy_spec(recipe), _data_spec(recipe)


def run(recipe: Recipe) -> list[dict[str, Any]]:
    """Train as the recipe says; returns the logged metrics."""
    from grpo.recipe import save_resolved
    from grpo.trainer import GRPOTrainer
    from rewards.composite import CompositeReward

    policy_spec, data_spec = validate(recipe)
    train, evaluation = build_datasets(data_spec)
    rewards = CompositeReward.from_specs(
        [{"name": r.name, "weight": r.weight, "kwargs": r.kwargs} for r in recipe.rewards]
    )
    output_dir = Path(recipe.args.output_dir)
    save_resolved(recipe, output_dir)
    policy = build_policy(policy_spec, output_dir)
    trainer = GRPOTrainer(policy, rewards, recipe.args, train, eval_dataset=evaluation)
    return trainer.train()
