"""Preference and score data for learned reward models, as `datasets.Dataset` tables.

Two row formats (videos ``[F, H, W, 3]``, stored as uint8 ``Array4D`` columns):

* **pairs** ``{context, chosen, rejected, tie, aspect[, prompt, kind, ...]}``: ``chosen`` is the
  better continuation of ``context`` for ``aspect``; ``tie: true`` says neither is (the order of a
  tied pair does not matter). Trained with Bradley-Terry (with ties).
* **scores** ``{context, video, score, aspect[, prompt, ...]}``: a teacher's score of ``video`` as
  the continuation of ``context`` (a judge, the verifiable reward). Trained by regression
  (distillation), or turned into pairs with `pairs_from_scores`.

Generators: `toyworld_pairs` (the true continuation against a perturbed one: wrong direction,
frozen, shuffled frames, another sample's future), `pairs_from_scores` / `score_rows` (candidates
scored by any reward function: GRPO samples ranked by the verifiable reward, or judge scores), and
`policy_candidates` (G samples per row from a policy, the way GRPO rolls out). `check_preferences`
validates a table against a model's aspects up front, with one-line errors.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch

from policies.errors import InputError
from policies.seeding import derived_seed
from policies.video_io import to_uint8
from rewards.composite import CompositeReward

PAIR_VIDEOS = ("context", "chosen", "rejected")
SCORE_VIDEOS = ("context", "video")
PERTURBATIONS = ("wrong_direction", "frozen", "shuffled", "other_sample")
DEFAULT_ASPECT = "causal"


def _video_feature(height: int, width: int) -> Any:
    import datasets

    return datasets.Array4D(shape=(None, height, width, 3), dtype="uint8")


def _to_dataset(rows: Sequence[dict[str, Any]], videos: Sequence[str]) -> Any:
    """Rows -> `datasets.Dataset`; video columns become uint8 ``Array4D`` of one frame size."""
    import datasets

    if not rows:
        raise InputError("no rows to build a dataset from")
    columns: dict[str, list[Any]] = {key: [] for key in rows[0]}
    size = None
    for i, row in enumerate(rows):
        if set(row) != set(columns):
            raise InputError(
                f"row {i} has columns {sorted(row)}, row 0 {sorted(columns)}; give the same ones"
            )
        for key, value in row.items():
            if key in videos and value is not None:
                value = to_uint8(value)
                if size is None:
                    size = value.shape[1:3]
                elif value.shape[1:3] != size:
                    raise InputError(
                        f"row {i} {key!r} is {value.shape[1:3]} px, row 0 {size}; resize videos to one size"
                    )
            columns[key].append(value)
    if size is None:
        raise InputError("every video in these rows is missing; give [F, H, W, 3] videos")
    features = {key: _video_feature(*size) for key in columns if key in videos}
    stacked = {key: _stack(columns[key]) for key in features}
    if all(value is not None for value in stacked.values()):  # one length per column: no per-value cast
        others = datasets.Dataset.from_dict({k: v for k, v in columns.items() if k not in features})
        return datasets.Dataset.from_dict(
            {**columns, **stacked}, features=datasets.Features({**others.features, **features})
        ).select_columns(list(columns))
    dataset = datasets.Dataset.from_dict(columns)
    return dataset.cast(datasets.Features({**dataset.features, **features})) if features else dataset


def _stack(values: list[Any]) -> np.ndarray | None:
    """A video column as one ``[N, F, H, W, 3]`` array; None if lengths differ or a video is missing."""
    if any(v is None for v in values) or len({tuple(v.shape) for v in values}) != 1:
        return None
    return np.stack([np.asarray(v.cpu() if isinstance(v, torch.Tensor) else v) for v in values])


def preference_dataset(rows: Iterable[dict[str, Any]]) -> Any:
    """Pair rows ``{context, chosen, rejected, [tie], [aspect], ...}`` as a `datasets.Dataset`.

    ``tie`` defaults to false and ``aspect`` to ``"causal"``; other columns (``prompt``, ``kind``,
    ``world``...) are kept as they are (scalars or strings).
    """
    rows = [{"tie": False, "aspect": DEFAULT_ASPECT, **row} for row in rows]
    return _to_dataset(rows, PAIR_VIDEOS)


def score_dataset(rows: Iterable[dict[str, Any]]) -> Any:
    """Score rows ``{context, video, score, [aspect], ...}`` as a `datasets.Dataset`."""
    rows = [{"aspect": DEFAULT_ASPECT, **row} for row in rows]
    return _to_dataset(rows, SCORE_VIDEOS)


def is_pairs(dataset: Any) -> bool:
    """Whether a table holds pairs (``chosen``/``rejected``) rather than scores."""
    return "chosen" in dataset.column_names


def check_preferences(dataset: Any, aspects: Sequence[str], *, pairs: bool, name: str = "data") -> None:
    """Raise a one-line `InputError` for a table a reward model cannot train on.

    Checks the columns of the format (pairs or scores), missing or empty videos (per row, from the
    Arrow storage without decoding), aspects the model has no head for, and score values.
    """
    import pyarrow.compute as pc

    required = ["context", "chosen", "rejected"] if pairs else ["context", "video", "score"]
    fmt = (
        "pairs {context, chosen, rejected[, tie], aspect}"
        if pairs
        else "scores {context, video, score, aspect}"
    )
    if not hasattr(dataset, "column_names"):
        raise InputError(f"{name} is a {type(dataset).__name__}; give a datasets.Dataset of {fmt}")
    if len(dataset) == 0:
        raise InputError(f"{name} is empty; give at least one row of {fmt}")
    missing = [c for c in required if c not in dataset.column_names]
    if missing:
        raise InputError(f"{name} lacks column(s) {missing}; rows must be {fmt}")
    for column in required[:-1] if not pairs else required:
        storage = dataset.data.column(column).combine_chunks()
        storage = getattr(storage, "storage", storage)
        nulls = np.flatnonzero(pc.is_null(storage).to_numpy(zero_copy_only=False))
        if len(nulls):
            raise InputError(f"{name} row {int(nulls[0])} has no {column!r} video; drop the row or give one")
        try:
            lengths = pc.list_value_length(storage).to_numpy(zero_copy_only=False)
        except Exception:  # noqa: BLE001 - not a list type: the column is not a video column
            raise InputError(
                f"{name} column {column!r} is not a video column; build the table with "
                "rewards.preferences.preference_dataset / score_dataset"
            ) from None
        empty = np.flatnonzero(lengths == 0)
        if len(empty):
            raise InputError(f"{name} row {int(empty[0])} has an empty {column!r} video (0 frames)")
    if "aspect" in dataset.column_names:
        unknown = sorted(set(dataset.unique("aspect")) - set(aspects))
        if unknown:
            raise InputError(
                f"{name} has aspect(s) {unknown} but the reward model scores {list(aspects)}; "
                "filter the rows or add the aspects to the model"
            )
    elif len(aspects) > 1:
        raise InputError(f"{name} has no 'aspect' column and the model scores {list(aspects)}; add one")
    if not pairs:
        scores = np.asarray(dataset["score"], dtype=np.float64)
        bad = np.flatnonzero(~np.isfinite(scores))
        if len(bad):
            raise InputError(f"{name} row {int(bad[0])} has score {scores[bad[0]]}; drop unscored rows")


# ------------------------------------------------------------------------------------------- toy world


def perturb(world: Any, index: int, sample: dict[str, Any], kind: str, other: dict[str, Any]) -> torch.Tensor:
    """A wrong future for toy-world sample ``index`` of ``world``.

    ``wrong_direction``: every ball's velocity reversed at the cut; ``frozen``: the last context
    frame held; ``shuffled``: the true frames in a seeded random order (never the identity);
    ``other_sample``: ``other``'s true future.
    """
    truth = sample["next"]
    if kind == "wrong_direction":
        return world.reversed_next(index)
    if kind == "frozen":
        return sample["context"][-1:].expand_as(truth).clone()
    if kind == "shuffled":
        rng = np.random.default_rng(world.seed(index))
        order = rng.permutation(len(truth))
        while (order == np.arange(len(truth))).all():
            order = rng.permutation(len(truth))
        return truth[torch.from_numpy(order)]
    if kind == "other_sample":
        return other["next"]
    raise InputError(f"unknown perturbation {kind!r}; choose from {', '.join(PERTURBATIONS)}")


def toyworld_pairs(
    world: Any,
    perturbations: Sequence[str] = PERTURBATIONS,
    *,
    aspect: str = DEFAULT_ASPECT,
    prompt: str | None = "context_caption",
    num_workers: int = 0,
) -> Any:
    """One pair per toy-world sample: the true future (chosen) against a perturbed one (rejected).

    Sample ``i`` gets perturbation ``perturbations[i % len]`` (a balanced mix; its name is the
    ``kind`` column); ``other_sample`` takes the next sample's future. ``prompt`` names the sample
    field shown as the prompt (or None). The ``world`` column (JSON) lets the verifiable reward
    score both candidates later. ``num_workers > 1`` simulates in that many processes (the same
    table, row for row; a few ms a sample in one process).
    """
    unknown = sorted(set(perturbations) - set(PERTURBATIONS))
    if not perturbations or unknown:
        raise InputError(f"perturbations {list(perturbations)}: choose from {', '.join(PERTURBATIONS)}")
    if len(world) < 2:
        raise InputError(
            "toyworld_pairs needs at least 2 samples (other_sample borrows a neighbour's future)"
        )
    args = (world, list(perturbations), aspect, prompt)
    workers = min(num_workers, len(world) // 64)
    if workers <= 1:
        return preference_dataset(_pair_rows(*args, 0, len(world)))
    import multiprocessing

    import datasets

    bounds = np.linspace(0, len(world), 4 * workers + 1).astype(int)
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        parts = pool.starmap(_pair_chunk, [(*args, int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])])
    return datasets.concatenate_datasets(parts)


def _pair_rows(
    world: Any, perturbations: Sequence[str], aspect: str, prompt: str | None, start: int, stop: int
) -> list[dict[str, Any]]:
    """The `toyworld_pairs` rows of samples ``start..stop - 1``."""
    samples = {i: world[i] for i in range(start, stop)}
    rows = []
    for i in range(start, stop):
        sample, after = samples[i], (i + 1) % len(world)
        other = samples[after] if after in samples else world[after]
        kind = perturbations[i % len(perturbations)]
        rows.append(
            {
                "context": sample["context"],
                "chosen": sample["next"],
                "rejected": perturb(world, i, sample, kind, other),
                "tie": False,
                "aspect": aspect,
                "prompt": sample[prompt] if prompt else None,
                "kind": kind,
                "world": json.dumps(sample["world"], separators=(",", ":")),
            }
        )
    return rows


def _pair_chunk(*args: Any) -> Any:
    """`toyworld_pairs` of one range of samples as a table (one process of ``num_workers``)."""
    torch.set_num_threads(1)
    return preference_dataset(_pair_rows(*args))


# ------------------------------------------------------------------------------------------- from scores


def score_candidates(
    reward: Callable[..., Any],
    contexts: Sequence[Any],
    candidates: Sequence[Sequence[Any]],
    prompts: Sequence[str | None] | None = None,
    metadata: Sequence[dict[str, Any]] | None = None,
) -> list[list[float | None]]:
    """Score each group of candidate videos with a reward function (a judge, the verifiable reward).

    ``candidates[g]`` are continuations of ``contexts[g]``; ``metadata[g]`` (e.g. ``{"world": ...}``)
    is repeated for each candidate of the group. Rewards run through `rewards.CompositeReward`,
    so their output is checked (one finite score or None per video).
    """
    if len(candidates) != len(contexts):
        raise InputError(f"{len(contexts)} contexts but {len(candidates)} candidate groups; give one each")
    scorer = CompositeReward([reward], names=["teacher"])
    out = []
    for g, group in enumerate(candidates):
        n = len(group)
        extra = {k: [v] * n for k, v in (metadata[g] if metadata else {}).items()}
        prompt = None if prompts is None else [prompts[g]] * n
        out.append(scorer(list(group), prompt, [contexts[g]] * n, **extra).columns["teacher"])
    return out


def pairs_from_scores(
    contexts: Sequence[Any],
    candidates: Sequence[Sequence[Any]],
    scores: Sequence[Sequence[float | None]],
    *,
    aspect: str = DEFAULT_ASPECT,
    margin: float = 0.0,
    tie_margin: float | None = None,
    prompts: Sequence[str | None] | None = None,
    extra: Sequence[dict[str, Any]] | None = None,
) -> Any:
    """All pairs within each group of scored candidates, the higher score chosen.

    A pair whose scores differ by at most ``tie_margin`` becomes a tie; otherwise pairs closer than
    ``margin`` are dropped (too close to call); unscored (None) candidates are skipped. Columns
    ``chosen_score`` / ``rejected_score`` keep the teacher's numbers; ``extra[g]`` (e.g. ``{"kind":
    "policy", "world": ...}``) adds columns to every pair of group ``g``.
    """
    if not (len(contexts) == len(candidates) == len(scores)) or (
        extra is not None and len(extra) != len(scores)
    ):
        raise InputError(
            f"{len(contexts)} contexts, {len(candidates)} candidate groups, {len(scores)} score groups"
            + ("" if extra is None else f", {len(extra)} extra column groups")
            + "; give one group per context"
        )
    rows = []
    for g, (group, values) in enumerate(zip(candidates, scores)):
        if len(group) != len(values):
            raise InputError(f"group {g} has {len(group)} candidates but {len(values)} scores")
        for i in range(len(group)):
            for j in range(i + 1, len(group)):
                if values[i] is None or values[j] is None:
                    continue
                gap = abs(values[i] - values[j])
                tie = tie_margin is not None and gap <= tie_margin
                if not tie and gap <= margin:
                    continue
                win, lose = (i, j) if values[i] >= values[j] else (j, i)
                rows.append(
                    {
                        "context": contexts[g],
                        "chosen": group[win],
                        "rejected": group[lose],
                        "tie": tie,
                        "aspect": aspect,
                        "prompt": None if prompts is None else prompts[g],
                        "chosen_score": float(values[win]),
                        "rejected_score": float(values[lose]),
                        **(extra[g] if extra is not None else {}),
                    }
                )
    if not rows:
        raise InputError("no pair left: every candidate pair was unscored or within `margin`; lower it")
    return preference_dataset(rows)


def score_rows(
    contexts: Sequence[Any],
    candidates: Sequence[Sequence[Any]],
    scores: Sequence[Sequence[float | None]],
    *,
    aspect: str = DEFAULT_ASPECT,
    prompts: Sequence[str | None] | None = None,
) -> Any:
    """Scored candidates as regression rows ``{context, video, score, aspect}`` (None scores dropped)."""
    rows = [
        {
            "context": contexts[g],
            "video": video,
            "score": float(value),
            "aspect": aspect,
            "prompt": None if prompts is None else prompts[g],
        }
        for g, (group, values) in enumerate(zip(candidates, scores, strict=True))
        for video, value in zip(group, values, strict=True)
        if value is not None
    ]
    return score_dataset(rows)


@torch.no_grad()
def policy_candidates(
    policy: Any, rows: Sequence[dict[str, Any]], num_generations: int, sampling: Any, seed: int = 0
) -> list[list[torch.Tensor]]:
    """``num_generations`` videos per row from a policy's stochastic sampler, as GRPO rolls them out.

    ``policy`` honours the rollout contract (`policies.LTXPolicy`): ``prepare_condition``,
    ``rollout`` and ``decode``; ``sampling`` is its `SamplingConfig`. Seeds derive from ``seed``.
    """
    out = []
    for r, row in enumerate(rows):
        condition = policy.prepare_condition([row], guidance_scale=sampling.guidance_scale)
        seeds = [derived_seed(seed, r, g) for g in range(num_generations)]
        rollout = policy.rollout(condition, num_generations=num_generations, sampling=sampling, seeds=seeds)
        out.append(list(policy.decode(rollout.final_latents, rollout.latent_shape).float().cpu()))
    return out
