"""Held-out evaluation: deterministic (ODE) rollouts of every held-out row, scored by every reward.

One function serves the trainer (`GRPOTrainer.evaluate`, every ``eval_every`` iterations) and the
``nextscene eval`` command (any checkpoint, no optimizer), so both produce the same numbers for the
same weights. The noise of generation ``g`` of held-out row ``i`` is seeded by ``(seed, i, g)`` only,
whatever the number of processes: every evaluation of a run sees the same noise, which makes the
first (before RL) and the last (after RL) evaluation a paired comparison.

With several processes, row ``i`` is rolled out by rank ``i % world_size``; scores (and the videos
that are kept) are gathered so every rank holds the whole result, and only the main process writes.

On disk an evaluation is a folder (``<output_dir>/eval/step_<iteration>/`` for the trainer)::

    results.json      per held-out row: its index and every reward of every generation (and the
                      prompt of the rows whose videos are saved)
    videos/row0000_generated.mp4   generation 0 of the first rows (``save_eval_videos``)
    videos/row0000_context.mp4     the row's context video, if it has one (``context``)
    videos/row0000_true.mp4        the row's true next scene, if it has one (``video``)
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from grpo.config import GRPOConfig
from policies.errors import InputError
from policies.ltx import SamplingConfig
from policies.protocol import Policy
from policies.rollout import Rollout
from policies.seeding import derived_seed
from policies.video_io import as_video, default_mp4_codec, to_uint8, write_video
from rewards.composite import CompositeOutput, CompositeReward

# dataset columns that condition the policy rather than being passed to rewards as metadata
CONDITION_COLUMNS = (
    "prompt",
    "negative_prompt",
    "prompt_embeds",
    "prompt_attention_mask",
    "image",
    "context",
)
# a row's target sound (supervised data): never a reward input, rewards get the generated sound instead
TARGET_AUDIO_COLUMNS = ("audio", "sample_rate")


def reward_metadata(policy: Policy, rollout: Rollout, row: dict[str, Any]) -> dict[str, list[Any]]:
    """Reward metadata of one group: the row's columns (conditioning and target sound left out), one
    per sample, and the generated sound when the rollout has one: when the policy's ``rollout_audio``
    returns ``(waveforms, sample_rate)``, ``audio`` (a waveform per sample) and ``sample_rate``."""
    n = rollout.num_samples
    skip = CONDITION_COLUMNS + TARGET_AUDIO_COLUMNS
    metadata = {k: [v] * n for k, v in row.items() if k not in skip}
    sound = policy.rollout_audio(rollout)
    if sound is not None:
        waveforms, sample_rate = sound
        metadata.update(audio=list(waveforms), sample_rate=[sample_rate] * n)
    return metadata


EVAL_DIR = "eval"
RESULTS_FILE = "results.json"
# a row's own videos, saved next to the generated one: panel name -> row key
ROW_VIDEOS = {"context": "context", "true": "video"}


@dataclass
class RewardSummary:
    """One reward over a held-out set: mean and std over scored samples, success rate, counts."""

    mean: float
    std: float
    success_rate: float | None  # share of scored samples >= threshold; None if a score lies outside [0, 1]
    scored: int
    total: int


@dataclass
class EvalResults:
    """Scores of one held-out evaluation.

    ``scores[name][i][g]`` is reward ``name`` of generation ``g`` of the i-th evaluated row (whose
    dataset index is ``rows[i]``); ``None`` where the reward could not score the sample.
    ``videos[row]`` maps panel names (``generated``, ``context``, ``true``) to files relative to the
    evaluation folder; ``prompts[row]`` is the prompt of a row whose videos were saved.
    """

    reward_names: list[str]
    reward_weights: dict[str, float]
    num_generations: int
    rows: list[int]
    scores: dict[str, list[list[float | None]]]
    prompts: dict[int, str] = field(default_factory=dict)
    step: int | None = None
    videos: dict[int, dict[str, str]] = field(default_factory=dict)

    def values(self, name: str) -> list[float]:
        """Every scored value of reward ``name`` (unscored samples left out)."""
        return [s for row in self.scores[name] for s in row if s is not None]

    def summary(self, threshold: float = 0.5) -> dict[str, RewardSummary]:
        """Per reward: mean, std, success rate (share >= ``threshold``, for rewards in [0, 1])."""
        out = {}
        for name in self.reward_names:
            values = self.values(name)
            n = len(values)
            mean = sum(values) / n if n else math.nan
            std = math.sqrt(sum((v - mean) ** 2 for v in values) / n) if n else math.nan
            in_unit = n > 0 and all(0.0 <= v <= 1.0 for v in values)
            success = sum(v >= threshold for v in values) / n if in_unit else None
            out[name] = RewardSummary(mean, std, success, n, len(self.rows) * self.num_generations)
        return out

    def metrics(self) -> dict[str, float]:
        """``eval/<reward>/mean`` for the metrics log."""
        return {f"eval/{name}/mean": s.mean for name, s in self.summary().items()}

    def to_json(self) -> dict[str, Any]:
        rows = []
        for i, index in enumerate(self.rows):
            entry: dict[str, Any] = {"row": index}
            if index in self.prompts:
                entry["prompt"] = self.prompts[index]
            entry["rewards"] = {name: self.scores[name][i] for name in self.reward_names}
            if index in self.videos:
                entry["videos"] = self.videos[index]
            rows.append(entry)
        return {
            "step": self.step,
            "num_generations": self.num_generations,
            "reward_names": self.reward_names,
            "reward_weights": self.reward_weights,
            "rows": rows,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> EvalResults:
        names = list(data["reward_names"])
        rows = data["rows"]
        return cls(
            reward_names=names,
            reward_weights={k: float(v) for k, v in data["reward_weights"].items()},
            num_generations=int(data["num_generations"]),
            rows=[int(r["row"]) for r in rows],
            scores={name: [r["rewards"][name] for r in rows] for name in names},
            prompts={int(r["row"]): r["prompt"] for r in rows if "prompt" in r},
            step=data.get("step"),
            videos={int(r["row"]): dict(r["videos"]) for r in rows if "videos" in r},
        )

    def save(self, folder: str | os.PathLike[str]) -> Path:
        """Write ``folder/results.json`` (non-finite scores are not JSON: they were ``None`` already)."""
        path = Path(folder) / RESULTS_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=1))
        return path

    @classmethod
    def load(cls, folder: str | os.PathLike[str]) -> EvalResults:
        """Read an evaluation folder's ``results.json``."""
        path = Path(folder)
        path = path if path.suffix == ".json" else path / RESULTS_FILE
        if not path.is_file():
            raise InputError(f"no evaluation results at {path}; run an evaluation first")
        try:
            return cls.from_json(json.loads(path.read_text()))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise InputError(
                f"{path}: not an evaluation results file ({type(err).__name__}: {err})"
            ) from None


@dataclass
class Evaluation:
    """What `evaluate` returns: the scores, and generation 0 of the first rows (``[F, H, W, 3]``)."""

    results: EvalResults
    videos: dict[int, torch.Tensor]


def ode_sampling(args: GRPOConfig, num_inference_steps: int) -> SamplingConfig:
    """A GRPO config's deterministic sampler: its geometry, CFG and ``num_inference_steps``, every
    step ODE (held-out evaluation; DiffusionNFT's rollouts; the SDE rollout's base)."""
    return SamplingConfig(
        num_frames=args.num_frames,
        height=args.height,
        width=args.width,
        frame_rate=args.frame_rate,
        num_inference_steps=num_inference_steps,
        guidance_scale=args.guidance_scale,
        kind="ode",
        noise_level=0.0,
        reduction=args.logprob_reduction,
    )


def eval_sampling(args: GRPOConfig) -> SamplingConfig:
    """The held-out sampler of a GRPO config: `ode_sampling` at ``eval_num_inference_steps`` (default
    ``num_inference_steps``), so runs that roll out with fewer steps can still be compared at one."""
    steps = args.eval_num_inference_steps or args.num_inference_steps
    return ode_sampling(args, steps)


def eval_seeds(seed: int, index: int, num_generations: int) -> list[int]:
    """Noise seeds of held-out row ``index``: the same at every evaluation and on any number of ranks."""
    return [derived_seed(seed, 0, index * num_generations + g) for g in range(num_generations)]


def score_videos(
    reward: CompositeReward, videos: torch.Tensor, row: dict[str, Any], metadata: dict[str, list[Any]]
) -> CompositeOutput:
    """Every reward of one row's videos (its prompt / context and `reward_metadata` passed along)."""
    n = len(videos)
    return reward(list(videos), [row.get("prompt")] * n, [row.get("context")] * n, **metadata)


class _HeldOutRows(Sequence):
    """Held-out rows ``indices`` of ``dataset``, read when indexed (a slice: a chunk to roll out);
    indices past the end are padding rows, which repeat row 0."""

    def __init__(self, dataset: Sequence[dict[str, Any]], indices: list[int]) -> None:
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: Any) -> Any:
        if isinstance(item, slice):
            return [self[i] for i in range(*item.indices(len(self)))]
        index = self.indices[item]
        return self.dataset[index if index < len(self.dataset) else 0]


def rollout_groups(
    policy: Policy,
    rows: Sequence[dict[str, Any]],
    sampling: SamplingConfig,
    seeds: Sequence[int],
    *,
    num_generations: int,
    part_size: int,
    rows_per_call: int,
    autocast: Any,
    timing: dict[str, float] | None = None,
    options: dict[str, Any] | None = None,
) -> Iterator[tuple[Rollout, list[tuple[int, dict[str, Any], Rollout]]]]:
    """The rollout step GRPO and evaluation share: each row's ``num_generations`` samples (sample
    ``i * num_generations + g`` of row ``i`` seeded by ``seeds`` at that place), ``rows_per_call`` rows
    conditioned together (a context is encoded once) and ``part_size`` samples of each row per
    rollout call; ``rows`` is read a chunk at a time (`_HeldOutRows` reads the dataset then). Yields
    each call's rollout and its groups, ``(index in rows, row, the row's samples)``, so the caller
    scores a group while the next call rolls out. ``timing["rollout_s"]``
    (if given) adds the time spent conditioning and rolling out. ``options``: further keyword
    arguments of every ``policy.rollout`` call (e.g. a next-clip policy's ``branch``)."""
    timing = {} if timing is None else timing
    timing.setdefault("rollout_s", 0.0)
    for k in range(0, len(rows), rows_per_call):
        chunk = list(rows[k : k + rows_per_call])
        tick = time.perf_counter()
        with torch.no_grad(), autocast:
            condition = policy.prepare_condition(chunk, guidance_scale=sampling.guidance_scale)
        timing["rollout_s"] += time.perf_counter() - tick
        for g in range(0, num_generations, part_size):
            tick = time.perf_counter()
            picks = [(k + j) * num_generations + g + i for j in range(len(chunk)) for i in range(part_size)]
            with torch.no_grad(), autocast:
                part = policy.rollout(
                    condition,
                    num_generations=part_size,
                    sampling=sampling,
                    seeds=[seeds[i] for i in picks],
                    **(options or {}),
                )
            timing["rollout_s"] += time.perf_counter() - tick
            groups = [
                (
                    k + j,
                    row,
                    part if len(chunk) == 1 else part.select(list(range(j * part_size, (j + 1) * part_size))),
                )
                for j, row in enumerate(chunk)
            ]
            yield part, groups


def evaluate(
    policy: Policy,
    reward: CompositeReward,
    dataset: Sequence[dict[str, Any]],
    sampling: SamplingConfig,
    *,
    num_generations: int,
    seed: int,
    num_videos: int = 0,
    accelerator: Any = None,
    autocast: Any = None,
    rows_per_call: int = 1,
    decode_batch_size: int = 8,
) -> Evaluation:
    """Roll out ``num_generations`` videos per held-out row with ``sampling`` and score them.

    Args:
        policy: a policy with ``prepare_condition`` / ``rollout`` / ``decode`` (e.g. `LTXPolicy`).
        reward: the rewards, as the trainer holds them.
        dataset: held-out rows (``prompt`` and/or ``context``; other columns reach the rewards).
        sampling: the sampler settings (`eval_sampling`: deterministic ODE).
        num_generations: videos per row (G).
        seed: the run's seed; see `eval_seeds`.
        num_videos: keep generation 0 of the first ``num_videos`` rows.
        accelerator: an ``accelerate.Accelerator`` when several processes share the rows.
        autocast: a context manager around the rollout (the trainer's bf16 autocast).
        rows_per_call: held-out rows rolled out together (their samples keep their seeds).
        decode_batch_size: videos per VAE decode call.
    Returns every score on every rank (gathered), and the kept videos (on every rank).
    """
    if len(dataset) == 0:
        raise InputError("the held-out dataset is empty: give at least one evaluation row")
    world = accelerator.num_processes if accelerator is not None else 1
    rank = accelerator.process_index if accelerator is not None else 0
    device = accelerator.device if accelerator is not None else torch.device("cpu")
    autocast = autocast if autocast is not None else contextlib.nullcontext()
    n_rows = len(dataset)
    # every rank rolls out the same number of rows (FSDP forwards are collective); padding rows
    # repeat row 0 and are dropped when the results are assembled
    per_rank = math.ceil(n_rows / world)
    indices = [rank + k * world for k in range(per_rank)]
    futures: list[Future] = []
    kept: list[torch.Tensor] = []
    rows = _HeldOutRows(dataset, indices)
    seeds = [s for index in indices for s in eval_seeds(seed, index, num_generations)]
    calls = rollout_groups(
        policy,
        rows,
        sampling,
        seeds,
        num_generations=num_generations,
        part_size=num_generations,
        rows_per_call=rows_per_call,
        autocast=autocast,
    )
    with ThreadPoolExecutor(max_workers=1) as scorer:  # score rows while the next ones roll out
        for _, groups in calls:
            for j, row, rollout in groups:
                index = indices[j]
                with torch.no_grad():
                    videos = (
                        policy.decode(rollout.final_latents, rollout.latent_shape, decode_batch_size)
                        .float()
                        .cpu()
                    )
                    metadata = reward_metadata(policy, rollout, row)
                if index < min(num_videos, n_rows):
                    kept.append(videos[0])
                futures.append(scorer.submit(score_videos, reward, videos, row, metadata))
        outputs = [f.result() for f in futures]

    # [R, per_rank, G] on this rank (float64: scores as the rewards returned them, NaN where
    # unscored) -> [world, R, per_rank, G] everywhere
    local = torch.tensor(
        [[[math.nan if s is None else s for s in o.columns[name]] for o in outputs] for name in reward.names],
        dtype=torch.float64,
    )
    local = local[None].to(device)
    gathered = (accelerator.gather(local) if world > 1 else local).cpu()
    scores: dict[str, list[list[float | None]]] = {}
    for r, name in enumerate(reward.names):
        scores[name] = [
            [None if math.isnan(v) else v for v in gathered[i % world, r, i // world].tolist()]
            for i in range(n_rows)
        ]
    videos = _gather_videos(kept, min(num_videos, n_rows), world, device, accelerator)
    results = EvalResults(
        reward_names=list(reward.names),
        reward_weights={name: float(reward.weights[name]) for name in reward.names},
        num_generations=num_generations,
        rows=list(range(n_rows)),
        scores=scores,
    )
    return Evaluation(results, videos)


def _gather_videos(
    kept: list[torch.Tensor], count: int, world: int, device: torch.device, accelerator: Any
) -> dict[int, torch.Tensor]:
    """Generation 0 of rows ``0..count-1``; rank ``i % world`` kept row ``i`` as its ``i // world``-th.

    Videos travel as uint8 (what their files hold), so any world size returns the same values."""
    if count == 0:
        return {}
    if world == 1:
        return {i: as_video(to_uint8(video)) for i, video in enumerate(kept)}
    slots = math.ceil(count / world)  # rank 0 keeps the most rows
    # ranks without a kept row still join the collective, with zeros of rank 0's video shape
    shape = torch.tensor([list(kept[0].shape) if kept else [0, 0, 0, 0]], device=device)
    shape = tuple(accelerator.gather(shape).amax(dim=0).tolist())
    local = torch.zeros((1, slots, *shape), dtype=torch.uint8, device=device)
    for k, video in enumerate(kept):
        local[0, k] = torch.from_numpy(to_uint8(video)).to(device)
    everything = accelerator.gather(local).cpu()
    return {i: as_video(everything[i % world, i // world]) for i in range(count)}


def write_evaluation(
    folder: str | os.PathLike[str],
    evaluation: Evaluation,
    dataset: Sequence[dict[str, Any]],
    fps: float,
    step: int | None = None,
) -> Path:
    """Write ``results.json`` and the kept videos (with each of those rows' context, true next scene
    and prompt, read from ``dataset``)."""
    folder = Path(folder)
    results = evaluation.results
    results.step = step
    # 4:4:4 keeps a few-pixel object's colour (4:2:0 smears it); the report re-encodes for browsers
    pix_fmt = "yuv444p" if evaluation.videos and default_mp4_codec() == "libx264" else None
    results.videos = {}
    for index, generated in evaluation.videos.items():
        panels = {"generated": generated}
        row = dataset[index]
        if isinstance(row.get("prompt"), str):
            results.prompts[index] = row["prompt"]
        for panel, key in ROW_VIDEOS.items():
            if _is_video(row.get(key)):
                panels[panel] = row[key]
        files = {}
        for panel, video in panels.items():
            name = f"videos/row{index:04d}_{panel}.mp4"
            write_video(folder / name, video, fps, pix_fmt=pix_fmt)
            files[panel] = name
        results.videos[index] = files
    return results.save(folder)


def _is_video(value: Any) -> bool:
    shape = getattr(value, "shape", None)
    return shape is not None and len(shape) == 4 and shape[-1] == 3


def eval_steps(run_dir: str | os.PathLike[str]) -> list[Path]:
    """The trainer's evaluation folders of a run (``eval/step_*`` with results), oldest first."""
    root = Path(run_dir) / EVAL_DIR
    folders = [p for p in root.glob("step_*") if (p / RESULTS_FILE).is_file()] if root.is_dir() else []
    return sorted(folders, key=lambda p: int(p.name.removeprefix("step_")))
