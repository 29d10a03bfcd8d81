"""Verdict data for training the causal-consistency judge: (context, candidate next scene, yes/no).

A row is ``{context, candidate, verdict, kind, prompt, group, score}``: ``context`` and ``candidate`` are
uint8 videos ``[F, H, W, 3]``, ``verdict`` is the judge's positive or negative answer ("yes" /
"no"), ``kind`` says where the row came from (``true``, a perturbation name, ``manifest``),
``prompt`` is the text a judge template may show (``{prompt}``), or None, and ``group`` names the
context the row continues (rows of one group share it: a toy scene's true and perturbed futures, a
policy's samples of one context; `grpo.judge_training.pair_order` pairs a yes with a no of one
group), and ``score`` is the candidate's verifiable reward where the verdict came from one (None
otherwise; `grpo.judge_training.JudgeSFTConfig.cross_pair_margin` pairs scored rows across
contexts). Sources:

* `toyworld_verdicts`: the toy world's true continuations -> yes, perturbed ones -> no. The
  perturbations are the reward-model preference data's own (`rewards.preferences.toyworld_pairs`:
  wrong direction, frozen, shuffled, another sample's future): each pair gives one yes row (its
  chosen video) and one no row (its rejected video), so the two kinds of data cannot drift apart.
* `synthetic_failures`: true continuations damaged as the NSP policy's samples are (blurred, faded,
  smeared over time, drawn a few pixels off), each labelled by ``toyworld_verifiable`` -- never
  assumed wrong: a ball that fades as it leaves the view still passes.
* `verdicts_from_scores`: scored candidates (the policy's own samples and their verifiable reward)
  -> yes at or above a threshold, no below it.
* `read_verdict_manifest`: a user's JSON Lines file, one ``{"context": PATH, "candidate": PATH,
  "verdict": "yes" | "no"[, "prompt": TEXT]}`` object a line (paths relative to the file). Every
  line is checked before any video is decoded; a problem is a one-line error naming FILE:LINE.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from policies.errors import InputError
from policies.video_io import read_video, to_uint8
from rewards.preferences import PAIR_VIDEOS, toyworld_pairs
from rewards.verifiable import ToyWorldVerifiableReward

VERDICT_KEYS = ("context", "candidate", "verdict")
VERIFIABLE_YES = 0.5  # a candidate whose verifiable reward reaches this is a good continuation ("yes")
FAILURES = ("blur", "fade", "smear", "shift")  # `synthetic_failure` kinds


def verdict_row(
    context: Any,
    candidate: Any,
    verdict: str,
    kind: str,
    prompt: str | None = None,
    group: str | None = None,
    score: float | None = None,
) -> dict[str, Any]:
    """One verdict row, videos as uint8 ``[F, H, W, 3]`` tensors; ``group`` names its context and
    ``score`` is the verifiable reward the verdict was read from (None: none)."""
    return {
        "context": torch.from_numpy(np.ascontiguousarray(to_uint8(context))),
        "candidate": torch.from_numpy(np.ascontiguousarray(to_uint8(candidate))),
        "verdict": verdict,
        "kind": kind,
        "prompt": prompt,
        "group": group,
        "score": None if score is None else float(score),
    }


def verdict_dataset(rows: Sequence[dict[str, Any]]) -> Any:
    """Verdict rows as a `datasets.Dataset` in torch format (videos: uint8 ``Array4D`` of one frame
    size, as `SFTTrainer` takes them)."""
    import datasets

    if not rows:
        raise InputError("no verdict rows to train on; give at least one (context, candidate, verdict)")
    size = tuple(rows[0]["context"].shape[1:3])
    for i, row in enumerate(rows):
        for key in ("context", "candidate"):
            if tuple(row[key].shape[1:3]) != size:
                raise InputError(
                    f"verdict row {i} {key!r} is {tuple(row[key].shape[1:3])} px, row 0 {size}; "
                    "resize the videos to one size"
                )
    video = datasets.Array4D(shape=(None, *size, 3), dtype="uint8")
    features = datasets.Features(
        context=video,
        candidate=video,
        verdict=datasets.Value("string"),
        kind=datasets.Value("string"),
        prompt=datasets.Value("string"),
        group=datasets.Value("string"),
        score=datasets.Value("float64"),
    )
    columns = {name: [row.get(name) for row in rows] for name in features}
    columns["context"] = [v.numpy() for v in columns["context"]]
    columns["candidate"] = [v.numpy() for v in columns["candidate"]]
    return datasets.Dataset.from_dict(columns, features=features).with_format(
        "torch", columns=["context", "candidate"], output_all_columns=True
    )


def verdicts_from_pairs(pairs: Any, choices: Sequence[str] = ("yes", "no")) -> list[dict[str, Any]]:
    """Verdict rows of a preference table (`rewards.preferences`): chosen -> ``choices[0]`` (kind
    ``true``), rejected -> ``choices[1]`` (kind: the pair's ``kind`` column, else ``rejected``).
    Tied pairs say neither is better, so they carry no verdict and are skipped."""
    table = pairs.with_format("numpy")
    rows = []
    for i in range(len(table)):
        pair = table[i]
        if bool(pair.get("tie", False)):
            continue
        prompt = pair.get("prompt")
        prompt = None if prompt is None else str(prompt)
        context, chosen, rejected = (np.asarray(pair[k], dtype=np.uint8) for k in PAIR_VIDEOS)
        kind = str(pair.get("kind", "rejected"))
        rows.append(verdict_row(context, chosen, choices[0], "true", prompt, f"pair{i}"))
        rows.append(verdict_row(context, rejected, choices[1], kind, prompt, f"pair{i}"))
    return rows


def verdicts_from_scores(
    contexts: Sequence[Any],
    candidates: Sequence[Sequence[Any]],
    scores: Sequence[Sequence[float | None]],
    threshold: float,
    *,
    choices: Sequence[str] = ("yes", "no"),
    prompts: Sequence[str | None] | None = None,
    kind: str = "policy",
) -> list[dict[str, Any]]:
    """Verdict rows of scored candidates (`rewards.preferences.score_candidates`: ``candidates[g]``
    continue ``contexts[g]``): ``choices[0]`` when the score reaches ``threshold``, else
    ``choices[1]``; unscored (None) candidates are skipped. Candidates of one context share a group."""
    return [
        verdict_row(
            contexts[g],
            video,
            choices[0] if value >= threshold else choices[1],
            kind,
            None if prompts is None else prompts[g],
            f"{kind}{g}",
            value,
        )
        for g, (group, values) in enumerate(zip(candidates, scores, strict=True))
        for video, value in zip(group, values, strict=True)
        if value is not None
    ]


def _static(context: torch.Tensor) -> torch.Tensor:
    """The scene without its balls: per pixel, the context frame where it is least coloured (balls
    are saturated hues, background and walls grey)."""
    chroma = context.amax(-1) - context.amin(-1)
    return context.gather(0, chroma.argmin(0)[None, ..., None].expand(1, *context.shape[1:])).squeeze(0)


def _blur(frames: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Each frame ``[F, H, W, C]`` (float) blurred by a Gaussian of its own ``sigma`` (px; edges
    replicated)."""
    radius = 4
    x = torch.arange(-radius, radius + 1, dtype=frames.dtype)
    out = torch.empty_like(frames)
    for f, s in enumerate(sigma.tolist()):
        kernel = torch.exp(-(x**2) / (2 * max(s, 1e-3) ** 2))
        kernel = torch.outer(kernel, kernel) / kernel.sum() ** 2
        padded = torch.nn.functional.pad(frames[f].permute(2, 0, 1)[:, None], (radius,) * 4, mode="replicate")
        out[f] = torch.nn.functional.conv2d(padded, kernel[None, None])[:, 0].permute(1, 2, 0)
    return out


def synthetic_failure(context: Any, truth: Any, kind: str, rng: np.random.Generator) -> torch.Tensor:
    """A true continuation damaged as the NSP policy's samples are, getting worse frame by frame at
    a strength drawn from ``rng`` (uint8 ``[F, H, W, 3]``; frame 0, the context's last, is kept):

    ``fade``: the balls fade linearly into the empty scene (`_static` of the context), gone after
    25-125% of the continuation; ``blur``: a Gaussian blur growing to sigma 1-4 px; ``smear``: each
    frame averaged with the 1-3 before it (ghost trails); ``shift``: the balls drift 3-10 px off
    their true place. Whether the result still continues the context is the verifier's call
    (`synthetic_verdicts`): a ball fading as it leaves the view passes, one fading in view fails."""
    video = torch.as_tensor(to_uint8(truth)).float()
    ramp = torch.linspace(0, 1, len(video))
    static = _static(torch.as_tensor(to_uint8(context)).float())
    if kind == "fade":
        keep = (1 - ramp / rng.uniform(0.25, 1.25)).clamp(min=0)[:, None, None, None]
        out = static + keep * (video - static)
    elif kind == "blur":
        out = _blur(video, ramp * rng.uniform(1.0, 4.0))
    elif kind == "smear":
        span = int(rng.integers(1, 4))
        out = torch.stack([video[max(0, f - span) : f + 1].mean(0) for f in range(len(video))])
    elif kind == "shift":
        angle, distance = rng.uniform(0, 2 * np.pi), rng.uniform(3.0, 10.0)
        out = video.clone()
        for f, t in enumerate(ramp.tolist()):
            dy, dx = round(t * distance * np.sin(angle)), round(t * distance * np.cos(angle))
            out[f] = static + torch.roll(video[f] - static, (dy, dx), dims=(0, 1))  # moves the balls only
    else:
        raise InputError(f"unknown synthetic failure {kind!r}; choose from {', '.join(FAILURES)}")
    return out.round().clamp(0, 255).to(torch.uint8)


def synthetic_verdicts(
    world: Any,
    kinds: Sequence[str],
    seed: int,
    *,
    choices: Sequence[str] = ("yes", "no"),
    num_workers: int = 0,
) -> Any:
    """``len(kinds)`` rows per toy-world sample ``i`` (kind ``synthetic_<failure>``, group ``pair<i>``
    as its true and perturbed rows in `toyworld_verdicts`): its true future damaged by each of
    ``kinds`` (`synthetic_failure`; a kind may repeat: another strength), strengths drawn from
    ``seed`` and the sample's seed, labelled by ``toyworld_verifiable`` (the ``score`` column):
    ``choices[0]`` at or above `VERIFIABLE_YES`, else ``choices[1]``; a `verdict_dataset`.
    ``num_workers > 1`` builds it in that many processes (the same table, row for row)."""
    args = (world, list(kinds), seed, list(choices))
    workers = min(num_workers, len(world) // 64)
    if workers <= 1:
        return verdict_dataset(_synthetic_rows(*args, 0, len(world)))
    import multiprocessing

    import datasets

    bounds = np.linspace(0, len(world), 4 * workers + 1).astype(int)
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        parts = pool.starmap(
            _synthetic_chunk, [(*args, int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]
        )
    return datasets.concatenate_datasets(parts)


def _synthetic_rows(
    world: Any, kinds: Sequence[str], seed: int, choices: Sequence[str], start: int, stop: int
) -> list[dict[str, Any]]:
    """The `synthetic_verdicts` rows of samples ``start..stop - 1``."""
    rows, worlds = [], []
    for i in range(start, stop):
        sample = world[i]
        rng = np.random.default_rng([seed, world.seed(i)])
        for kind in kinds:
            video = synthetic_failure(sample["context"], sample["next"], kind, rng)
            prompt = sample.get("context_caption")
            rows.append(verdict_row(sample["context"], video, "", f"synthetic_{kind}", prompt, f"pair{i}"))
            worlds.append(sample["world"])
    scores = ToyWorldVerifiableReward()([r["candidate"] for r in rows], world=worlds).scores
    for row, score in zip(rows, scores, strict=True):
        row["verdict"] = choices[0] if score >= VERIFIABLE_YES else choices[1]
        row["score"] = float(score)
    return rows


def _synthetic_chunk(*args: Any) -> Any:
    """`synthetic_verdicts` of one range of samples as a table (one process of ``num_workers``)."""
    torch.set_num_threads(1)
    return verdict_dataset(_synthetic_rows(*args))


def toyworld_verdicts(
    world: Any,
    perturbations: Sequence[str],
    *,
    choices: Sequence[str] = ("yes", "no"),
    num_workers: int = 0,
    verify: bool = False,
) -> Any:
    """Two rows per toy-world sample: its true future (yes) and a perturbed one (no; sample ``i``
    gets ``perturbations[i % len]``), with the context caption as the prompt; a `verdict_dataset`.

    ``verify``: both rows labelled by ``toyworld_verifiable`` instead (``choices[0]`` at or above
    `VERIFIABLE_YES`, the ``score`` column set), as the synthetic failures and the policy's samples
    are: a frozen or shuffled future of a scene whose balls barely move is a right one, and the
    judge is measured against the verifier (`grpo.judge_training.judge_auroc`). Scored in
    ``num_workers`` processes (~30 ms a row)."""
    pairs = toyworld_pairs(world, perturbations, num_workers=num_workers)
    rows = verdicts_from_pairs(pairs, choices)
    if verify:
        worlds = [str(w) for w in pairs["world"] for _ in range(2)]  # a yes and a no row per pair
        assert len(worlds) == len(rows), "toy pairs are never ties: every pair gives two rows"
        scores = _verify([r["candidate"] for r in rows], worlds, num_workers)
        for row, score in zip(rows, scores, strict=True):
            row["verdict"] = choices[0] if score >= VERIFIABLE_YES else choices[1]
            row["score"] = float(score)
    return verdict_dataset(rows)


def _verify(videos: Sequence[Any], worlds: Sequence[str], num_workers: int) -> list[float]:
    """``toyworld_verifiable`` of each video (its world's JSON), in up to ``num_workers`` processes."""
    workers = min(num_workers, len(videos) // 128)
    if workers <= 1:
        return list(ToyWorldVerifiableReward()(list(videos), world=list(worlds)).scores)
    import multiprocessing

    bounds = np.linspace(0, len(videos), 4 * workers + 1).astype(int)
    chunks = [(list(videos[a:b]), list(worlds[a:b])) for a, b in zip(bounds[:-1], bounds[1:])]
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        return [score for part in pool.starmap(_verify_chunk, chunks) for score in part]


def _verify_chunk(videos: list[Any], worlds: list[str]) -> list[float]:
    """`_verify` of one chunk (one process)."""
    torch.set_num_threads(1)
    return list(ToyWorldVerifiableReward()(videos, world=worlds).scores)


def read_verdict_manifest(path: str | Path, choices: Sequence[str] = ("yes", "no")) -> Any:
    """The rows of a verdict manifest (JSON Lines) as a `verdict_dataset`. Every line is validated
    first -- JSON object, the keys, a verdict that is one of ``choices``, both video files present --
    so a bad line fails in milliseconds with ``FILE:LINE: problem; fix``; then the videos are decoded."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"verdict manifest {path} does not exist; give a .jsonl file of {VERDICT_KEYS} rows")
    entries = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"{where}: not valid JSON ({err.msg}); write one object a line") from None
        if not isinstance(row, dict):
            raise InputError(f"{where}: a JSON {type(row).__name__}, not an object with keys {VERDICT_KEYS}")
        missing = [key for key in VERDICT_KEYS if not isinstance(row.get(key), str) or not row[key]]
        if missing:
            raise InputError(f"{where}: missing or empty {missing}; every line needs {VERDICT_KEYS} strings")
        verdict = row["verdict"].strip().lower()
        if verdict not in choices:
            raise InputError(
                f"{where}: verdict {row['verdict']!r} is neither {choices[0]!r} nor {choices[1]!r}"
            )
        videos = {}
        for key in ("context", "candidate"):
            video = Path(row[key]) if Path(row[key]).is_absolute() else path.parent / row[key]
            if not video.is_file():
                raise InputError(
                    f"{where}: {key} video {str(video)!r} not found; fix the path (relative to the file)"
                )
            videos[key] = video
        prompt = row.get("prompt")
        entries.append((where, videos, verdict, None if prompt is None else str(prompt)))
    if not entries:
        raise InputError(f"verdict manifest {path} has no rows; write one {VERDICT_KEYS} object a line")
    rows = []
    for where, videos, verdict, prompt in entries:
        try:
            context, candidate = (read_video(videos[key])[0] for key in ("context", "candidate"))
        except InputError as err:
            raise InputError(f"{where}: {err}") from None
        group = str(videos["context"])  # rows continuing one context video
        rows.append(verdict_row(context, candidate, verdict, "manifest", prompt, group))
    return verdict_dataset(rows)
