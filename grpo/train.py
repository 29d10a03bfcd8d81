"""Run a recipe: build the policy, the data and the rewards it names, then the trainer of its stage
(``pretrain`` / ``sft``: `FlowMatchingTrainer`; ``grpo``: `GRPOTrainer`).

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


@dataclass
class ToyWorldDataSpec:
    """``data: {type: toyworld, ...}``: the embedded toy causal world, generated in memory from seeds."""

    type: Literal["toyworld"] = field(default="toyworld", metadata={"help": "data kind"})
    size: int = field(default=32, metadata={"help": "frame height and width in pixels"})
    context_frames: int = field(default=9, metadata={"help": "frames of the context clip (8k+1)"})
    next_frames: int = field(default=9, metadata={"help": "frames of the next scene (8k+1)"})
    num_train: int = field(default=2048, metadata={"help": "training samples (train split seeds)"})
    num_eval: int = field(default=32, metadata={"help": "held-out samples (validation split seeds)"})
    prompt: Literal["next_caption", "context_caption", "instruction"] = field(
        default="next_caption", metadata={"help": "which caption is the text prompt"}
    )


@dataclass
class ManifestDataSpec:
    """``data: {type: nsp_manifest, ...}``: an NSP manifest (JSONL / Parquet) of (context, next) videos."""

    type: Literal["nsp_manifest"] = field(default="nsp_manifest", metadata={"help": "data kind"})
    path: str = field(default="", metadata={"help": "manifest file, or the folder holding manifest.jsonl"})
    eval_path: str | None = field(default=None, metadata={"help": "held-out manifest"})
    context_frames: int = field(default=9, metadata={"help": "context frames to load"})
    next_frames: int = field(default=9, metadata={"help": "next-scene frames to load (8k+1)"})
    fps: float | None = field(default=None, metadata={"help": "resample to this frame rate (null: native)"})
    height: int = field(default=32, metadata={"help": "frame height after resize/crop"})
    width: int = field(default=32, metadata={"help": "frame width after resize/crop"})
    on_error: Literal["raise", "skip"] = field(default="raise", metadata={"help": "bad rows: raise or skip"})
    prompt: Literal["next_caption", "context_caption", "instruction"] = field(
        default="next_caption", metadata={"help": "which caption is the text prompt"}
    )


DATA_SPECS: dict[str, type] = {
    "prompts": PromptDataSpec,
    "toyworld": ToyWorldDataSpec,
    "nsp_manifest": ManifestDataSpec,
}


def _data_spec(recipe: Recipe) -> Any:
    kind = recipe.data["type"]
    if kind not in DATA_SPECS:
        raise InputError(f"data.type: unknown data kind {kind!r}; choose one of {', '.join(DATA_SPECS)}")
    spec = from_dict(DATA_SPECS[kind], recipe.data, where="data")
    if kind == "prompts" and (spec.prompts is None) == (spec.path is None):
        raise InputError("data: give exactly one of data.prompts (a list) or data.path (a file)")
    for key in ("path", "eval_path"):
        value = getattr(spec, key, None)
        if kind != "toyworld" and value is not None and not Path(value).exists():
            raise InputError(f"data.{key}: dataset file {value!r} does not exist")
    if recipe.stage in ("pretrain", "sft") and kind == "prompts":
        raise InputError(
            f"data.type: stage {recipe.stage!r} needs target videos: use toyworld or nsp_manifest"
        )
    return spec


class _Rows:
    """A lazy sequence of rows: ``source[i]`` turned into a trainer row by ``convert``."""

    def __init__(self, source: Any, convert: Any) -> None:
        self.source, self.convert = source, convert

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.convert(self.source[index])


def _scene_row(prompt_column: str):
    """Dataset sample -> row: the prompt text, the target next scene, and the rest as reward metadata."""

    def convert(sample: dict[str, Any]) -> dict[str, Any]:
        row = {"prompt": sample[prompt_column], "video": sample["next"]}
        row.update({k: v for k, v in sample.items() if k in ("world", "next_caption", "context_caption")})
        return row

    return convert


def build_datasets(spec: Any) -> tuple[Any, Any]:
    """Training and held-out rows for a data spec."""
    if isinstance(spec, ToyWorldDataSpec):
        from grpo.data import ToyWorld, ToyWorldConfig

        config = ToyWorldConfig(
            size=spec.size, context_frames=spec.context_frames, next_frames=spec.next_frames
        )
        convert = _scene_row(spec.prompt)
        return (
            _Rows(ToyWorld(config, split="train", num_samples=spec.num_train), convert),
            _Rows(ToyWorld(config, split="validation", num_samples=spec.num_eval), convert),
        )
    if isinstance(spec, ManifestDataSpec):
        from grpo.data import NSPDataConfig, NSPVideoDataset

        config = NSPDataConfig(
            context_frames=spec.context_frames,
            next_frames=spec.next_frames,
            fps=spec.fps,
            height=spec.height,
            width=spec.width,
            on_error=spec.on_error,
        )
        convert = _scene_row(spec.prompt)
        evaluation = _Rows(NSPVideoDataset(spec.eval_path, config), convert) if spec.eval_path else None
        return _Rows(NSPVideoDataset(spec.path, config), convert), evaluation
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
    if recipe.stage == "reward_model":
        raise NotImplementedError(
            "stage 'reward_model' is not runnable yet (learned reward models: issue 10)"
        )
    return _policy_spec(recipe), _data_spec(recipe)


def run(recipe: Recipe) -> list[dict[str, Any]]:
    """Train as the recipe says; returns the logged metrics."""
    from grpo.recipe import save_resolved
    from grpo.trainer import GRPOTrainer
    from rewards.composite import CompositeReward

    policy_spec, data_spec = validate(recipe)
    train, evaluation = build_datasets(data_spec)
    output_dir = Path(recipe.args.output_dir)
    save_resolved(recipe, output_dir)
    policy = build_policy(policy_spec, output_dir)
    if recipe.stage in ("pretrain", "sft"):
        from grpo.sft import FlowMatchingTrainer

        return FlowMatchingTrainer(policy, recipe.args, train, eval_dataset=evaluation).train()
    rewards = CompositeReward.from_specs(
        [{"name": r.name, "weight": r.weight, "kwargs": r.kwargs} for r in recipe.rewards]
    )
    return GRPOTrainer(policy, rewards, recipe.args, train, eval_dataset=evaluation).train()
