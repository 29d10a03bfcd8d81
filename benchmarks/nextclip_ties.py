"""How often next-clip GRPO's (group, clip) cells tie, under the thresholded and the dense per-clip reward.

A cell is one generated clip index of one group of G samples of the same context; when all G score
the same, every advantage of that cell is exactly 0 (`grpo.advantages`) and its steps teach nothing.
This rolls out the base policy with the GRPO recipe's sampler (``--steps`` steps, each SDE noise
level of ``--noise-levels``, G = ``--generations``) on ``--contexts`` training contexts of the toy
world (drawn as the trainer's first epoch draws them), decodes, and scores the *same* videos with
``toyworld_verifiable`` (``per_clip``) and with its ``dense`` variant. Reports per reward: mean score,
the share of zero-advantage cells (`compute_advantages`' ``zero_std_frac``), the share of near-ties
(max - min within the cell < 0.01, which group normalisation blows up to full-size advantages) and the
mean within-cell std.

    python benchmarks/nextclip_ties.py                 # 32 contexts, noise 0.7 and 1.0, CPU (~10 min)
    python benchmarks/nextclip_ties.py --contexts 8 --noise-levels 0.7 --json runs/ties.json

The GRPO runs themselves log the same share every iteration (``reward/<name>/zero_std_frac``), which
`benchmarks/toy_learning.py` summarises per run.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from grpo.advantages import compute_advantages
from grpo.train import ToyWorldClipsDataSpec, build_datasets
from policies import NextClipPolicy, SamplingConfig
from policies.seeding import derived_seed
from rewards.verifiable import ToyWorldVerifiableReward

REPO = Path(__file__).resolve().parents[1]
NEAR_TIE = 0.01


def _shown(path: Path) -> str:
    """A path as the results show it: relative to the repository when inside it."""
    path = path.resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def measure(policy: NextClipPolicy, train: list[dict], args: argparse.Namespace, noise_level: float) -> dict:
    """Roll out, decode and score ``args.contexts`` groups at ``noise_level``; each reward's ties."""
    rewards = {
        "thresholded": ToyWorldVerifiableReward(per_clip=True),
        "dense": ToyWorldVerifiableReward(per_clip=True, dense=True),
    }
    clip_frames = policy.clip_config.clip_frames
    sampling = SamplingConfig(
        num_frames=len(train[0]["video"]) - len(train[0]["context"]),
        height=train[0]["video"].shape[1],
        width=train[0]["video"].shape[2],
        num_inference_steps=args.steps,
        kind="sde",
        noise_level=noise_level,
    )
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(derived_seed(args.seed, 0)))
    scores: dict[str, list[list[float]]] = {name: [] for name in rewards}
    tick = time.perf_counter()
    for g, index in enumerate(order[: args.contexts].tolist()):
        row = train[index]
        condition = policy.prepare_condition([{"context": row["context"]}])
        seeds = [derived_seed(args.seed, 1, g * args.generations + i) for i in range(args.generations)]
        rollout = policy.rollout(condition, num_generations=args.generations, sampling=sampling, seeds=seeds)
        videos = policy.decode(rollout.final_latents, rollout.latent_shape)
        for name, reward in rewards.items():
            scores[name] += [reward.score_clips(v, row["world"], clip_frames) for v in videos]
    result: dict = {"noise_level": noise_level, "seconds": time.perf_counter() - tick}
    print(f"{args.contexts} contexts x G {args.generations}, noise {noise_level}: {result['seconds']:.0f} s")
    groups = torch.arange(args.contexts).repeat_interleave(args.generations)
    for name, values in scores.items():
        table = np.array(values)  # [contexts * G, clips]
        _, stats = compute_advantages(torch.tensor(table)[None], groups, reward_names=[name])
        cells = table.reshape(args.contexts, args.generations, -1)
        spread = cells.max(1) - cells.min(1)
        r = result[name] = {
            "mean": float(table.mean()),
            "per_clip_mean": table.mean(0).tolist(),
            "zero_advantage_cells": stats[f"reward/{name}/zero_std_frac"],
            "near_tie_cells": float((spread < NEAR_TIE).mean()),
            "mean_within_cell_std": float(cells.std(1).mean()),
        }
        print(
            f"{name:>12}: mean {r['mean']:.3f}  zero-advantage cells {100 * r['zero_advantage_cells']:.1f}%  "
            f"near-ties (< {NEAR_TIE}) {100 * r['near_tie_cells']:.1f}%  within-cell std "
            f"{r['mean_within_cell_std']:.3f}"
        )
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", type=Path, default=REPO / "checkpoints" / "toy_nextclip")
    parser.add_argument("--contexts", type=int, default=32, help="training contexts (groups)")
    parser.add_argument("--generations", type=int, default=8, help="samples per context, G")
    parser.add_argument("--steps", type=int, default=6, help="denoising steps per clip")
    parser.add_argument(
        "--noise-levels", type=float, nargs="+", default=[0.7, 1.0], help="SDE noise levels compared"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the context order and the samples")
    parser.add_argument(
        "--json", type=Path, default=REPO / "benchmarks" / "results" / "toy_nextclip_ties.json"
    )
    args = parser.parse_args(argv)

    train, _ = build_datasets(ToyWorldClipsDataSpec())
    policy = NextClipPolicy.from_pretrained(args.checkpoint)
    result: dict = {
        "command": " ".join(["python benchmarks/nextclip_ties.py", *(argv or [])]),
        **vars(args),
        "checkpoint": _shown(args.checkpoint),
        "json": _shown(args.json),
        "device": str(policy.device),
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "runs": [measure(policy, train, args, noise) for noise in args.noise_levels],
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
