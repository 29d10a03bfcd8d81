"""Training learned video reward models (recipe stage ``reward_model``): config, recipe specs, trainer.

`RewardModelTrainer` is an accelerate loop over preference pairs (Bradley-Terry, or Bradley-Terry
with ties) or teacher scores (regression, to distil a judge), a stage of `grpo.engine.Engine` like
the policy trainers -- AdamW, LR schedule, EMA, gradient clipping, DDP, atomic checkpoints and exact
resume -- so a reward-model run is killed, resumed and logged like any other run. At the end the
raw scores of the training candidates give the calibration statistics (mean, std per aspect)
stored with the model, and ``output_dir/final`` is a `rewards.VideoRewardModel` directory, ready
for ``rewards: [{name: reward_model, kwargs: {model: .../final}}]``.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from grpo.config import ConfigError, TrainerConfig, _require
from grpo.data import ToyWorld, ToyWorldConfig
from grpo.data.rows import scene_row
from grpo.engine import Engine, RowSampler, Stage, make_accelerator
from grpo.schema import from_dict, from_nested_dict, save_resolved
from grpo.training_state import TrainingState
from policies.errors import InputError
from policies.files import check_model_weights
from policies.ltx import SamplingConfig
from policies.nsp import NSPPolicy
from policies.seeding import INIT_STREAM, derived_seed, seeded
from rewards.preferences import (
    PERTURBATIONS,
    check_preferences,
    pairs_from_scores,
    policy_candidates,
    score_candidates,
    toyworld_pairs,
)
from rewards.reward_model import (
    DEFAULT_QUESTION,
    RewardModelArgs,
    TinyRewardModelSpec,
    VideoRewardModel,
    bradley_terry_loss,
    bradley_terry_ties_loss,
    build_tiny_reward_model,
    check_reward_model_dir,
    regression_loss,
    spearman,
)
from rewards.verifiable import ToyWorldVerifiableReward

LOSS_TYPES = ("bradley_terry", "bradley_terry_ties", "regression")


@dataclass
class RewardModelConfig(TrainerConfig):
    """Reward-model training (TRL's `RewardConfig` names where the meaning is the same).

    ``save_steps``, ``logging_steps`` and ``eval_every`` count optimizer steps.
    """

    max_steps: int = field(default=500, metadata={"help": "Optimizer steps to run."})
    per_device_train_batch_size: int = field(
        default=16, metadata={"help": "Pairs (or scored videos) per device per micro-batch."}
    )
    per_device_eval_batch_size: int = field(
        default=64, metadata={"help": "Pairs (or scored videos) per device per evaluation batch."}
    )
    loss_type: Literal["bradley_terry", "bradley_terry_ties", "regression"] = field(
        default="bradley_terry",
        metadata={"help": "Pairs: bradley_terry (ties skipped) or bradley_terry_ties; scores: regression."},
    )
    tie_theta: float = field(
        default=5.0, metadata={"help": "Rao-Kupper theta > 1 of bradley_terry_ties (VideoAlign uses 5)."}
    )
    center_rewards_coefficient: float | None = field(
        default=None, metadata={"help": "TRL's penalty on (r_chosen + r_rejected)^2, keeps scores centred."}
    )
    calibration_samples: int = field(
        default=512, metadata={"help": "Training candidates scored at the end for the normalisation stats."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(self.max_steps >= 1, "max_steps", f"must be >= 1, got {self.max_steps}")
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size"):
            _require(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        _require(self.tie_theta > 1, "tie_theta", f"must be > 1, got {self.tie_theta}")
        _require(
            self.calibration_samples >= 2,
            "calibration_samples",
            f"must be >= 2, got {self.calibration_samples}",
        )
        _require(
            not self.use_lora, "use_lora", "reward models train the full model; LoRA is not supported yet"
        )
        _require(not self.fsdp, "fsdp", "reward models use DDP; FSDP is not supported yet")


# ------------------------------------------------------------------------------------------- recipe specs


def all_perturbations() -> list[str]:
    """Every toy-world perturbation (`rewards.preferences.PERTURBATIONS`): the default mix."""
    return list(PERTURBATIONS)


@dataclass
class RewardModelSpec:
    """``policy: {type: video_reward_model, ...}``: the reward model to train."""

    type: Literal["video_reward_model"] = field(default="video_reward_model", metadata={"help": "model kind"})
    path: str | None = field(default=None, metadata={"help": "trained reward model directory to continue"})
    backbone: str | None = field(
        default=None, metadata={"help": "Qwen2-VL / Qwen2.5-VL checkpoint directory"}
    )
    tiny: bool = field(
        default=False, metadata={"help": "a random tiny Qwen2.5-VL backbone (tests, toy world)"}
    )
    tiny_spec: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "sizes of the tiny backbone (rewards.reward_model.TinyRewardModelSpec fields)"},
    )
    aspects: list[str] = field(default_factory=lambda: ["causal"], metadata={"help": "scored aspects"})
    head: Literal["token", "mean"] = field(
        default="mean", metadata={"help": "aspect tokens or mean video state"}
    )
    context_frames: int = field(default=4, metadata={"help": "context frames shown (0: candidate only)"})
    video_frames: int = field(default=4, metadata={"help": "candidate frames shown"})
    frame_stride: int = field(default=2, metadata={"help": "frames between shown frames"})
    video_fps: float | None = field(
        default=None, metadata={"help": "frame rate declared for temporal positions (null: 8 / frame_stride)"}
    )
    question: str | None = field(default=None, metadata={"help": "text shown after the clip (null: default)"})
    use_prompt: bool = field(default=False, metadata={"help": "also show each sample's prompt"})
    torch_dtype: Literal["float32", "bfloat16"] = field(default="float32", metadata={"help": "weights dtype"})

    def __post_init__(self) -> None:
        if self.tiny:  # every size written out, so resolved_recipe.yaml pins the backbone
            self.tiny_spec = asdict(from_nested_dict(TinyRewardModelSpec, self.tiny_spec, "policy.tiny_spec"))

    def check(self, recipe: Any) -> None:
        """One source (a trained model, a backbone or tiny), and its directory's files."""
        sources = [name for name in ("path", "backbone") if getattr(self, name)] + (
            ["tiny"] if self.tiny else []
        )
        if len(sources) != 1:
            raise InputError("policy: give exactly one of policy.path, policy.backbone or policy.tiny: true")
        if self.tiny_spec and not self.tiny:
            raise InputError("policy.tiny_spec: sizes a tiny backbone; set policy.tiny: true or drop it")
        for name in ("path", "backbone"):
            value = getattr(self, name)
            if value is not None and not Path(value).is_dir():
                raise InputError(f"policy.{name}: checkpoint directory {value!r} does not exist")
        if self.path is not None:
            check_reward_model_dir(Path(self.path))
        if self.backbone is not None:
            check_model_weights(self.backbone)


@dataclass
class PolicySamplesSpec:
    """The ``policy*`` fields of the toy-world data specs: the NSP policy whose own samples, labelled
    by ``toyworld_verifiable``, join the true-vs-perturbed data (`policy_samples`)."""

    policy: str | None = field(
        default=None,
        metadata={"help": "NSP checkpoint whose own samples, scored by toyworld_verifiable, add data"},
    )
    policy_contexts: int = field(default=256, metadata={"help": "train contexts the policy continues"})
    policy_eval_contexts: int = field(default=32, metadata={"help": "held-out contexts the policy continues"})
    policy_generations: int = field(default=8, metadata={"help": "samples per context"})
    policy_inference_steps: int = field(default=8, metadata={"help": "denoising steps of each policy sample"})
    policy_noise_level: float = field(
        default=0.7, metadata={"help": "SDE noise level of the policy's samples (as in its GRPO rollouts)"}
    )
    policy_sde_steps: int = field(
        default=3, metadata={"help": "first denoising steps sampled stochastically (GRPO's SDE window)"}
    )


@dataclass
class ToyCandidatesSpec(PolicySamplesSpec):
    """What the toy-world data specs of the reward-model and judge stages share: true continuations
    of toy contexts against perturbed ones (``perturbations``), and with ``policy`` (`PolicySamplesSpec`)
    that policy's own samples. ``__post_init__`` checks them: known, non-empty ``perturbations``,
    ``num_train`` and ``num_eval`` >= 2, ``next_overlap`` in ``[0, context_frames)``, and with a
    ``policy`` an NSP checkpoint and sampling settings in range; a `ConfigError` naming the field."""

    size: int = field(default=32, metadata={"help": "frame height and width in pixels"})
    context_frames: int = field(default=9, metadata={"help": "frames of each context clip (8k+1)"})
    next_frames: int = field(default=9, metadata={"help": "frames of each continuation (8k+1)"})
    next_overlap: int = field(
        default=0, metadata={"help": "context frames repeated at the start of each continuation (NSP: 1)"}
    )
    num_train: int = field(default=1024, metadata={"help": "training samples (train split seeds)"})
    num_eval: int = field(default=256, metadata={"help": "held-out samples (validation split seeds)"})
    perturbations: list[str] = field(
        default_factory=all_perturbations, metadata={"help": "the perturbed continuations, mixed"}
    )
    num_workers: int = field(
        default=0, metadata={"help": "processes simulating the data (at most the CPU count; 0: this one)"}
    )

    def __post_init__(self) -> None:
        unknown = sorted(set(self.perturbations) - set(PERTURBATIONS))
        if not self.perturbations or unknown:
            raise ConfigError("perturbations", f"choose from {', '.join(PERTURBATIONS)}, got {unknown}")
        if self.num_train < 2 or self.num_eval < 2:
            raise ConfigError("num_train", "num_train and num_eval must be >= 2")
        if not 0 <= self.next_overlap < self.context_frames:
            raise ConfigError("next_overlap", f"must be in [0, context_frames), got {self.next_overlap}")
        if self.policy is not None:
            if not (Path(self.policy) / "nsp_config.json").is_file():
                raise ConfigError("policy", f"{self.policy!r} is not an NSP checkpoint (no nsp_config.json)")
            if not 1 <= self.policy_sde_steps <= self.policy_inference_steps:
                raise ConfigError("policy_sde_steps", "must be in [1, policy_inference_steps]")
            if self.policy_generations < 2 or self.policy_contexts < 1 or self.policy_eval_contexts < 1:
                raise ConfigError(
                    "policy_generations", "needs policy_generations >= 2 and >= 1 train and held-out context"
                )

    def toy_config(self) -> ToyWorldConfig:
        """The toy world the contexts and continuations come from."""
        return ToyWorldConfig(
            size=self.size,
            context_frames=self.context_frames,
            next_frames=self.next_frames,
            next_overlap=self.next_overlap,
        )


@dataclass
class ToyPreferencesSpec(ToyCandidatesSpec):
    """``data: {type: toyworld_preferences, ...}``: true vs perturbed toy-world continuations."""

    type: Literal["toyworld_preferences"] = field(
        default="toyworld_preferences", metadata={"help": "data kind"}
    )
    aspect: str = field(default="causal", metadata={"help": "aspect of every pair"})
    policy_margin: float = field(
        default=0.05, metadata={"help": "drop policy pairs whose verifiable rewards differ by <= this"}
    )

    def check(self, recipe: Any, model: RewardModelSpec) -> None:
        """Pairs (no regression) of an aspect the model scores."""
        if recipe.args.loss_type == "regression":
            raise InputError("trainer.loss_type: toyworld_preferences are pairs; use bradley_terry(_ties)")
        if self.aspect not in model.aspects:
            raise InputError(f"data.aspect: {self.aspect!r} is not one of policy.aspects {model.aspects}")


@dataclass
class PreferencesSpec:
    """``data: {type: preferences, ...}``: tables saved with ``Dataset.save_to_disk`` (pairs or scores)."""

    type: Literal["preferences"] = field(default="preferences", metadata={"help": "data kind"})
    path: str = field(default="", metadata={"help": "training table directory (datasets.save_to_disk)"})
    eval_path: str | None = field(default=None, metadata={"help": "held-out table directory"})

    def check(self, recipe: Any, model: RewardModelSpec) -> None:
        """The tables are datasets saved to disk."""
        for name in ("path", "eval_path"):
            value = getattr(self, name)
            if (name == "path" or value is not None) and not (
                Path(value or "") / "dataset_info.json"
            ).is_file():
                raise InputError(f"data.{name}: {value!r} is not a dataset saved with Dataset.save_to_disk")


def build_model(spec: RewardModelSpec) -> Any:
    """The reward model a spec names: a trained one, a new one on a Qwen-VL backbone, or a tiny one."""
    if spec.path:
        return VideoRewardModel.from_pretrained(spec.path, dtype=spec.torch_dtype)
    args = RewardModelArgs(
        aspects=spec.aspects,
        head=spec.head,
        context_frames=spec.context_frames,
        video_frames=spec.video_frames,
        frame_stride=spec.frame_stride,
        video_fps=spec.video_fps,
        question=DEFAULT_QUESTION if spec.question is None else spec.question,
        use_prompt=spec.use_prompt,
    )
    if spec.tiny:
        return build_tiny_reward_model(
            args, from_dict(TinyRewardModelSpec, spec.tiny_spec, where="policy.tiny_spec")
        )
    return VideoRewardModel.from_backbone(spec.backbone, args=args, dtype=spec.torch_dtype)


def build_tables(data: Any) -> tuple[Any, Any]:
    """Training and held-out tables of a data spec."""
    if isinstance(data, ToyPreferencesSpec):
        config = data.toy_config()
        workers = min(data.num_workers, os.cpu_count() or 1)
        tables = [
            toyworld_pairs(
                ToyWorld(config, split=split, num_samples=n),
                data.perturbations,
                aspect=data.aspect,
                num_workers=workers,
            )
            for split, n in (("train", data.num_train), ("validation", data.num_eval))
        ]
        if data.policy is not None:
            import datasets

            counts = {"train": data.policy_contexts, "validation": data.policy_eval_contexts}
            tables = [
                datasets.concatenate_datasets([table, policy_pairs(data, config, split, counts[split])])
                for table, split in zip(tables, ("train", "validation"))
            ]
        return tables[0], tables[1]
    import datasets

    evaluation = datasets.load_from_disk(data.eval_path) if data.eval_path else None
    return datasets.load_from_disk(data.path), evaluation


def policy_samples(
    data: Any, config: Any, split: str, num_contexts: int, seed: int | None = None
) -> tuple[list[dict[str, Any]], list[list[Any]], list[list[float | None]]]:
    """``data.policy``'s own samples of the first ``num_contexts`` toy contexts of ``split``, drawn as
    its GRPO rollouts are (``data.policy_*`` settings; seeds from ``seed``, by default 0 for the
    train split and 1 otherwise), and their verifiable rewards: the toy-world samples, the
    candidates (``policy_generations`` videos per context) and the scores."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    policy = NSPPolicy.from_pretrained(data.policy, device=device)
    world = ToyWorld(config, split=split, num_samples=num_contexts)
    samples = [world[i] for i in range(num_contexts)]
    rows = [scene_row("context_caption", context=True)(sample) for sample in samples]
    sampling = SamplingConfig(
        num_frames=config.next_frames,
        height=data.size,
        width=data.size,
        frame_rate=config.fps,  # the toy world's: the rate the policy is trained and sampled at
        num_inference_steps=data.policy_inference_steps,
        kind="sde",
        noise_level=data.policy_noise_level,
        sde_steps=list(range(data.policy_sde_steps)),
    )
    seed = (0 if split == "train" else 1) if seed is None else seed
    candidates = policy_candidates(policy, rows, data.policy_generations, sampling, seed=seed)
    worlds = [{"world": sample["world"]} for sample in samples]
    scores = score_candidates(
        ToyWorldVerifiableReward(), [s["context"] for s in samples], candidates, metadata=worlds
    )
    return samples, candidates, scores


def policy_pairs(data: ToyPreferencesSpec, config: Any, split: str, num_contexts: int) -> Any:
    """Pairs (``kind`` "policy") of ``data.policy``'s own samples of the first ``num_contexts`` toy
    contexts of ``split``, ranked by the verifiable reward: what the policy actually produces during
    GRPO, which true-vs-perturbed pairs never show the reward model."""
    import json

    samples, candidates, scores = policy_samples(data, config, split, num_contexts)
    table = pairs_from_scores(
        [s["context"] for s in samples],
        candidates,
        scores,
        aspect=data.aspect,
        margin=data.policy_margin,
        prompts=[s["context_caption"] for s in samples],
        extra=[{"kind": "policy", "world": json.dumps(s["world"], separators=(",", ":"))} for s in samples],
    )
    return table.remove_columns(["chosen_score", "rejected_score"])


def run_recipe(recipe: Any, spec: RewardModelSpec, data: Any) -> list[dict[str, Any]]:
    """Train the reward model a recipe describes (its validated model and data specs); returns the
    logged metrics."""
    save_resolved(recipe, recipe.args.output_dir)
    train, evaluation = build_tables(data)
    with seeded(derived_seed(recipe.args.seed, INIT_STREAM)):  # new heads, resized token embeddings
        model = build_model(spec)
    return RewardModelTrainer(model, recipe.args, train, eval_dataset=evaluation).train()


# ------------------------------------------------------------------------------------------- trainer


class _Trainable:
    """The reward model as `TrainingState` takes it (`policies.protocol.Trainable`): the trained module
    and saving."""

    def __init__(self, transformer: Any) -> None:
        self.transformer = transformer

    def extra_trainable_parameters(self) -> dict[str, Any]:  # the model is the whole trained module
        return {}

    def wrap_transformer(self, wrapped: Any) -> None:  # forwards go through `TrainingState.wrapped`
        pass

    def save_pretrained(self, path: Path, transformer_state_dict: Any = None) -> None:
        self.transformer.save_pretrained(path)


class RewardModelTrainer(Stage):
    """Trains a `rewards.VideoRewardModel` on preference pairs or teacher scores.

    Args:
        model: the reward model.
        args: the `RewardModelConfig`.
        train_dataset / eval_dataset: `datasets.Dataset` tables of pairs ``{context, chosen,
            rejected, tie, aspect}`` or scores ``{context, video, score, aspect}``
            (`rewards.preferences`); ``loss_type`` says which.
        callbacks: objects with optional ``on_optimizer_step(trainer, step)``.
    """

    def __init__(
        self,
        model: Any,
        args: RewardModelConfig,
        train_dataset: Any,
        eval_dataset: Any = None,
        callbacks: Sequence[Any] | None = None,
    ) -> None:
        self.pairs = args.loss_type != "regression"
        aspects = model.args.aspects
        check_preferences(train_dataset, aspects, pairs=self.pairs, name="train_dataset")
        if eval_dataset is not None:
            check_preferences(eval_dataset, aspects, pairs=self.pairs, name="eval_dataset")
        self.args = args
        self.train_dataset = train_dataset.with_format("numpy")
        self.eval_dataset = eval_dataset.with_format("numpy") if eval_dataset is not None else None
        self.callbacks = list(callbacks or [])
        self.accelerator = make_accelerator()
        self.model = model.to(self.accelerator.device)
        self.model.train()
        self.state = TrainingState(_Trainable(self.model), args, self.accelerator, args.max_steps)
        self.rows = RowSampler(len(self.train_dataset), args.seed)
        self.engine = Engine(
            self,
            self.state,
            total=args.max_steps,
            evaluates=self.eval_dataset is not None,
            final_eval=self.eval_dataset is not None,
            progress_keys=("loss", "eval/accuracy"),
            callbacks=self.callbacks,
        )

    # ------------------------------------------------------------------ the stage
    def train(self) -> list[dict[str, Any]]:
        """Run optimizer steps up to ``max_steps`` (resuming if asked), calibrate, save ``final``."""
        return self.engine.run()

    def train_step(self, step: int, started: float) -> dict[str, Any]:
        """One optimizer step over ``gradient_accumulation_steps`` micro-batches; its metrics."""
        losses, accuracies = [], []
        accum = self.args.gradient_accumulation_steps
        for micro in range(accum):
            rows = self._batch(step, micro)
            with self.state.no_sync(micro == accum - 1), self.state.autocast:
                loss, accuracy = self._loss(rows, self.state.wrapped)
                self.accelerator.backward(loss / accum)
            losses.append(loss.item())
            accuracies.append(accuracy)
        metrics = {"grad_norm": self.engine.optimizer_step()}
        metrics.update(loss=sum(losses) / accum, lr=self.state.learning_rate)
        if self.pairs:
            metrics["accuracy"] = sum(accuracies) / accum
        metrics["time/step_s"] = time.perf_counter() - started
        return metrics

    def eval_metrics(self, step: int) -> dict[str, Any]:
        return self.evaluate()

    def finish(self) -> None:
        self.calibrate()

    def _batch(self, step: int, micro: int) -> dict[str, Any]:
        """Columns of one micro-batch (`grpo.engine.RowSampler`), this rank's slice."""
        args = self.args
        picks = self.rows.micro_batch(
            step, micro, args.gradient_accumulation_steps, args.per_device_train_batch_size, self.accelerator
        )
        return self.train_dataset[picks]

    def _scores(self, forward: Any, rows: dict[str, Any], videos: str) -> Any:
        """Raw scores of one video column of ``rows`` for each row's aspect, ``[B]``."""
        import torch

        model = self.model
        inputs = model.prepare(_videos(rows[videos]), _videos(rows["context"]), _prompts(rows))
        scores = forward(**inputs)
        aspects = rows.get("aspect")
        index = [0] * len(scores) if aspects is None else [model.args.aspects.index(a) for a in aspects]
        return scores[
            torch.arange(len(scores), device=scores.device), torch.tensor(index, device=scores.device)
        ]

    def _pair_scores(self, rows: dict[str, Any], forward: Any) -> tuple[Any, Any, Any]:
        """Scores of the chosen and rejected videos of pair rows (one forward) and the tie mask."""
        import torch

        both = {k: list(v) * 2 for k, v in rows.items() if k not in ("chosen", "rejected")}
        both["video"] = list(rows["chosen"]) + list(rows["rejected"])
        scores = self._scores(forward, both, "video")
        n = len(scores) // 2
        tie = torch.as_tensor(rows["tie"] if "tie" in rows else [False] * n, dtype=torch.bool)
        return scores[:n], scores[n:], tie.to(scores.device)

    def _pair_loss(self, chosen: Any, rejected: Any, tie: Any) -> Any:
        """Mean Bradley-Terry (ties skipped) or Bradley-Terry-with-ties loss, plus TRL's centring term."""
        args = self.args
        if args.loss_type == "bradley_terry_ties":
            loss = bradley_terry_ties_loss(chosen, rejected, tie, args.tie_theta).mean()
        else:
            keep = (~tie).to(chosen.dtype)
            loss = (bradley_terry_loss(chosen, rejected) * keep).sum() / keep.sum().clamp(min=1)
        if args.center_rewards_coefficient:
            loss = loss + args.center_rewards_coefficient * ((chosen + rejected) ** 2).mean()
        return loss

    def _loss(self, rows: dict[str, Any], forward: Any) -> tuple[Any, float]:
        """Mean loss of a micro-batch and its pairwise accuracy (non-tied pairs; NaN for scores)."""
        import torch

        if not self.pairs:
            predicted = self._scores(forward, rows, "video")
            target = torch.as_tensor(np.asarray(rows["score"], dtype=np.float32), device=predicted.device)
            return regression_loss(predicted, target).mean(), math.nan
        chosen, rejected, tie = self._pair_scores(rows, forward)
        wins = (chosen > rejected)[~tie]
        return self._pair_loss(chosen, rejected, tie), float(wins.float().mean()) if len(wins) else math.nan

    # ------------------------------------------------------------------ evaluation and calibration
    def evaluate(self, dataset: Any = None) -> dict[str, float]:
        """Held-out loss and, for pairs, pairwise accuracy (overall and per ``kind``); with a ``world``
        column also the Spearman correlation of the model's scores with the verifiable reward."""
        import torch

        dataset = self.eval_dataset if dataset is None else dataset.with_format("numpy")
        size = self.args.per_device_eval_batch_size
        losses, chosen, rejected, predicted = [], [], [], []
        self.model.eval()
        with torch.no_grad(), self.state.autocast:
            for start in range(0, len(dataset), size):
                rows = dataset[start : start + size]
                if self.pairs:
                    c, r, tie = self._pair_scores(rows, self.model)
                    loss = self._pair_loss(c.float(), r.float(), tie)
                    chosen += c.float().cpu().tolist()
                    rejected += r.float().cpu().tolist()
                else:
                    scores = self._scores(self.model, rows, "video").float()
                    target = torch.as_tensor(
                        np.asarray(rows["score"], dtype=np.float32), device=scores.device
                    )
                    loss = ((scores - target) ** 2).mean()
                    predicted += scores.cpu().tolist()
                losses.append(float(loss) * len(rows["context"]))
        self.model.train()
        out = {"eval/loss": sum(losses) / len(dataset)}
        if not self.pairs:
            out["eval/spearman_teacher"] = spearman(predicted, np.asarray(dataset["score"], dtype=float))
            return out
        tie = (
            np.asarray(dataset["tie"], dtype=bool)
            if "tie" in dataset.column_names
            else np.zeros(len(chosen), bool)
        )
        wins = np.asarray(chosen) > np.asarray(rejected)
        out["eval/accuracy"] = float(wins[~tie].mean()) if (~tie).any() else math.nan
        if "kind" in dataset.column_names:
            kinds = np.asarray(dataset["kind"])
            for kind in sorted(set(kinds.tolist())):
                out[f"eval/accuracy/{kind}"] = float(wins[(kinds == kind) & ~tie].mean())
        if "world" in dataset.column_names:
            out["eval/spearman_verifiable"] = self._spearman_verifiable(dataset, chosen + rejected)
        return out

    def _spearman_verifiable(self, dataset: Any, scores: list[float]) -> float:
        """Spearman of the model's scores of every candidate with the toy world's verifiable reward."""
        reward = ToyWorldVerifiableReward()
        worlds = list(dataset["world"]) * 2
        videos = _videos(dataset["chosen"]) + _videos(dataset["rejected"])
        return spearman(scores, reward(videos, None, None, world=worlds).scores)

    def calibrate(self) -> dict[str, list[float]]:
        """Score up to ``calibration_samples`` training candidates; store their mean and std per aspect."""
        per_row = 2 if self.pairs else 1
        n = min(len(self.train_dataset), self.args.calibration_samples // per_row)
        order = np.random.default_rng(self.args.seed).permutation(len(self.train_dataset))[: max(n, 2)]
        rows = self.train_dataset[[int(i) for i in order]]
        columns = ["chosen", "rejected"] if self.pairs else ["video"]
        videos = sum((_videos(rows[c]) for c in columns), [])
        contexts = _videos(rows["context"]) * len(columns)
        prompts = _prompts(rows)
        prompts = None if prompts is None else prompts * len(columns)
        return self.model.calibrate(
            videos, contexts, prompts, batch_size=self.args.per_device_eval_batch_size
        )


def _videos(column: Any) -> list[Any]:
    """Video cells of a numpy-formatted column as uint8 arrays (datasets hands back int64 stacks)."""
    return [np.asarray(v, dtype=np.uint8) for v in column]


def _prompts(rows: dict[str, Any]) -> list[str | None] | None:
    prompts = rows.get("prompt")
    return None if prompts is None else [None if p is None else str(p) for p in prompts]
