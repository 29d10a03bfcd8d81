"""How good is the toy-world reward model? Held-out pairwise accuracy, agreement with the verifiable reward.

Trains ``recipes/toy_reward_model.yaml`` (``--train``, timed; the same run as ``nextscene train``)
or loads a trained model (``--model DIR``), then measures on toy-world scenes the training never saw:

* **pairwise accuracy** on the recipe's held-out pairs (validation seeds, the trainer's own final
  evaluation) and on fresh pairs of the test split (``--test-pairs``; seeds used for nothing else):
  the true next scene against each perturbation (wrong direction, frozen, shuffled, other sample),
  overall and per kind;
* **Spearman correlation** between the model's scores and ``toyworld_verifiable`` over a varied set
  of candidate continuations of ``--scenes`` test scenes, whose verifiable reward spans [0, 1]: the
  truth, time-warped truths (slowed, sped up, started late, stopped part-way, played backwards),
  the four perturbations, and the truth with a wrong future after ``j`` frames. Reported pooled over
  all candidates and as the mean over scenes (within one context, the ranking GRPO uses), with the
  mean scores of each family.

    python benchmarks/reward_model_accuracy.py --train                     # recipe as it stands
    python benchmarks/reward_model_accuracy.py --model runs/toy_reward_model/final
    python benchmarks/reward_model_accuracy.py --train trainer.max_steps=50   # recipe overrides

Prints a table and writes JSON (``--json``, default benchmarks/results/reward_model_accuracy.json).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


# ------------------------------------------------------------------------------------------- candidates
def _warp(full: Any, start: int, picks: list[int]) -> Any:
    """Frames ``start + picks[i]`` of ``full`` (clamped to it): a time-warped continuation."""
    return full[[min(max(start + p, 0), len(full) - 1) for p in picks]]


def candidate_families(
    world: Any, index: int, sample: dict[str, Any], other: dict[str, Any]
) -> dict[str, Any]:
    """Continuations of one toy-world sample whose verifiable reward ranges from ~1 to ~0, by name."""
    import torch

    from rewards.preferences import PERTURBATIONS, perturb

    fc, n = len(sample["context"]), len(sample["next"])
    full = torch.cat([sample["context"], sample["next"]])
    steps = list(range(n))
    out = {"truth": sample["next"]}
    for a in (0.75, 0.5, 0.25):
        out[f"slow_{a}"] = _warp(full, fc, [math.floor(a * i) for i in steps])
    out["fast_2x"] = _warp(full, fc, [2 * i for i in steps])
    for k in (1, 2, 4):
        out[f"late_{k}"] = _warp(full, fc, [i - k for i in steps])
    for j in (2, 4, 6):
        out[f"stop_after_{j}"] = _warp(full, fc, [min(i, j) for i in steps])
    out["backwards"] = _warp(full, fc, [-2 - i for i in steps])
    wrong = world.reversed_next(index)
    for j in (2, 5):
        out[f"reverse_after_{j}"] = torch.cat([sample["next"][:j], _reverse_from(world, index, j)])
    for kind in PERTURBATIONS:
        out[kind] = wrong if kind == "wrong_direction" else perturb(world, index, sample, kind, other)
    return out


def _reverse_from(world: Any, index: int, j: int) -> Any:
    """Frames ``j..`` of a future whose velocities flip after frame ``j - 1`` of the true next scene."""
    from grpo.data.toyworld import PALETTE, _make_scene, _simulate, render

    config = world.config
    scene = _make_scene(world.seed(index), config)
    at = config.context_frames - 1 + j
    positions, _, _ = _simulate(
        scene.positions[at], -scene.velocities[at], scene.radii, config.next_frames - j + 1, scene.walls,
        scene.gravity,
    )  # fmt: skip
    size = config.size
    return render(
        positions[1:] * size, scene.radii * size, [PALETTE[c] for c in scene.colours], size, scene.walls
    )


# ------------------------------------------------------------------------------------------- measures
def pair_accuracy(model: Any, pairs: Any, batch_size: int = 64) -> dict[str, float]:
    """Fraction of pairs whose chosen video scores above the rejected one, overall and per kind."""
    rows = pairs.with_format("numpy")[:]
    chosen, rejected, contexts = (
        [np.asarray(v, dtype=np.uint8) for v in rows[c]] for c in ("chosen", "rejected", "context")
    )
    c = model.score(chosen, contexts, batch_size=batch_size)[:, 0].numpy()
    r = model.score(rejected, contexts, batch_size=batch_size)[:, 0].numpy()
    wins, kinds = c > r, np.asarray(rows["kind"])
    out = {"accuracy": float(wins.mean()), "pairs": len(wins)}
    for kind in sorted(set(kinds.tolist())):
        out[f"accuracy/{kind}"] = float(wins[kinds == kind].mean())
    return out


def spearman_study(model: Any, world: Any, batch_size: int = 64) -> dict[str, Any]:
    """Model scores against the verifiable reward over `candidate_families` of every scene of ``world``."""
    from rewards.reward_model import spearman
    from rewards.verifiable import ToyWorldVerifiableReward

    verifiable = ToyWorldVerifiableReward()
    samples = [world[i] for i in range(len(world))]
    names, rm, vr = [], [], []
    per_scene = []
    for i, sample in enumerate(samples):
        family = candidate_families(world, i, sample, samples[(i + 1) % len(samples)])
        videos = list(family.values())
        truth = verifiable(videos, None, None, world=[sample["world"]] * len(videos)).scores
        scores = model.score(videos, [sample["context"]] * len(videos), batch_size=batch_size)[:, 0].tolist()
        names += list(family)
        rm += scores
        vr += truth
        if np.std(truth) > 0 and np.std(scores) > 0:
            per_scene.append(spearman(scores, truth))
    names_arr, rm_arr, vr_arr = np.asarray(names), np.asarray(rm), np.asarray(vr)
    families = {
        name: {
            "verifiable": float(vr_arr[names_arr == name].mean()),
            "model": float(rm_arr[names_arr == name].mean()),
        }
        for name in dict.fromkeys(names)
    }
    return {
        "spearman": spearman(rm, vr),
        "spearman_per_scene_mean": float(np.mean(per_scene)),
        "candidates": len(rm),
        "scenes": len(samples),
        "families": families,
    }


# ------------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("overrides", nargs="*", help="recipe overrides key.sub=value (with --train)")
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "toy_reward_model.yaml"))
    parser.add_argument("--train", action="store_true", help="train the recipe first (timed)")
    parser.add_argument("--model", help="trained reward model directory (default: the recipe's final)")
    parser.add_argument("--test-pairs", type=int, default=1024, help="fresh test-split pairs")
    parser.add_argument("--scenes", type=int, default=128, help="test scenes of the Spearman study")
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "reward_model_accuracy.json"))
    args = parser.parse_args()

    import torch
    import transformers

    from grpo.data import ToyWorld, ToyWorldConfig
    from grpo.recipe import load_recipe
    from grpo.reward_modeling import ToyPreferencesSpec
    from rewards.preferences import toyworld_pairs
    from rewards.reward_model import VideoRewardModel

    recipe = load_recipe(args.recipe, args.overrides)
    result: dict[str, Any] = {
        "recipe": Path(args.recipe).name,
        "overrides": args.overrides,
        "device": torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    if args.train:
        from grpo.train import run, validate

        validate(recipe)
        tick = time.perf_counter()
        history = run(recipe)
        result["train_wall_s"] = round(time.perf_counter() - tick, 1)
        final = [h for h in history if "eval/accuracy" in h][-1]
        result["validation"] = {k.removeprefix("eval/"): v for k, v in final.items()}
    model_dir = Path(args.model or Path(recipe.args.output_dir) / "final")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = VideoRewardModel.from_pretrained(model_dir, device=device).eval()
    result["model"] = str(model_dir)
    result["parameters"] = sum(p.numel() for p in model.parameters())
    data = recipe.data if recipe.data.get("type") == "toyworld_preferences" else {}
    spec = ToyPreferencesSpec(**data)
    config = ToyWorldConfig(size=spec.size, context_frames=spec.context_frames, next_frames=spec.next_frames)
    tick = time.perf_counter()
    test_world = ToyWorld(config, split="test", num_samples=args.test_pairs)
    result["test"] = pair_accuracy(model, toyworld_pairs(test_world, spec.perturbations))
    result["verifiable"] = spearman_study(model, ToyWorld(config, split="test", num_samples=args.scenes))
    result["eval_wall_s"] = round(time.perf_counter() - tick, 1)

    print(f"reward model {model_dir} ({result['parameters'] / 1e6:.2f} M parameters) on {result['device']}")
    if "train_wall_s" in result:
        print(f"trained in {result['train_wall_s']} s")
    kinds = sorted(k for k in result["test"] if k.startswith("accuracy/"))
    print(f"{'pairs':<12}{'overall':>9}" + "".join(f"{k.split('/')[1]:>17}" for k in kinds))
    for name in ("validation", "test"):
        if name in result:
            row = result[name]
            print(
                f"{name:<12}{row['accuracy']:>9.3f}"
                + "".join(f"{row.get(k, math.nan):>17.3f}" for k in kinds)
            )
    study = result["verifiable"]
    print(
        f"Spearman with toyworld_verifiable: {study['spearman']:.3f} pooled over {study['candidates']} "
        f"candidates, {study['spearman_per_scene_mean']:.3f} mean within a scene ({study['scenes']} scenes)"
    )
    print(f"{'family':<20}{'verifiable':>11}{'model':>9}")
    for name, row in study["families"].items():
        print(f"{name:<20}{row['verifiable']:>11.3f}{row['model']:>9.3f}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
