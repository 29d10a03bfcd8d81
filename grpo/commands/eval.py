"""`nextscene eval RECIPE [key.sub=value ...]`: score a checkpoint on the recipe's held-out set.

Builds the policy, the held-out rows and the rewards exactly as `nextscene train` does (same recipe,
same overrides: ``policy.path=runs/x/final`` evaluates a trained policy), rolls out
``trainer.num_generations`` deterministic (ODE) videos per held-out row with the noise the trainer's
evaluations use, and prints the table the run report shows: per reward the mean, std and success
rate (share of samples >= ``--threshold``, for rewards in [0, 1]). Writes ``summary.json``,
``results.json`` (every sample's rewards) and the first rows' videos to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict
from pathlib import Path

from grpo.evaluation import eval_sampling, evaluate, write_evaluation
from grpo.recipe import load_recipe
from grpo.report import compare, format_table
from grpo.schema import build_rewards
from grpo.train import build_datasets, build_policy, validate
from policies.errors import InputError
from policies.files import check_output_dir


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="score a checkpoint on a recipe's held-out set (mean, success rate per reward)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("recipe", type=Path, help="YAML recipe (stage grpo: its data, rewards and sampler)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. policy.path=runs/x/final")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder (default: <output_dir>/eval_<checkpoint folder name>, or eval_base)",
    )
    parser.add_argument(
        "--threshold",
        type=float,
        default=0.5,
        help="success: reward >= this (rewards in [0, 1]; default 0.5)",
    )
    parser.add_argument(
        "--videos", type=int, default=None, help="held-out rows whose videos are written (default: recipe's)"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe, args.overrides)
    if recipe.stage != "grpo":
        raise InputError(
            f"{args.recipe}: stage {recipe.stage!r}; nextscene eval needs a grpo recipe "
            "(its rewards and trainer sampling settings)"
        )
    if not math.isfinite(args.threshold):
        raise InputError(f"--threshold must be a finite number, got {args.threshold}")
    videos = recipe.args.save_eval_videos if args.videos is None else args.videos
    if videos < 0:
        raise InputError(f"--videos must be >= 0, got {videos}")
    policy_spec, data_spec = validate(recipe)
    _, heldout = build_datasets(data_spec)
    if heldout is None or len(heldout) == 0:
        raise InputError(
            "the recipe has no held-out rows: set data.eval_prompts (prompts), data.num_eval (toyworld) "
            "or data.eval_path (nsp_manifest)"
        )
    sampling = eval_sampling(recipe.args)
    rewards = build_rewards(recipe.rewards)
    output_dir = Path(recipe.args.output_dir)
    out = args.out or output_dir / f"eval_{Path(policy_spec.path).name if policy_spec.path else 'base'}"
    check_output_dir(out, "--out")

    policy = build_policy(policy_spec, output_dir)
    policy.latent_shape(sampling.num_frames, sampling.height, sampling.width)
    evaluation = evaluate(
        policy,
        rewards,
        heldout,
        sampling,
        num_generations=recipe.args.num_generations,
        seed=recipe.args.seed,
        num_videos=videos,
        rows_per_call=recipe.args.rollout_rows_per_call,
        decode_batch_size=recipe.args.decode_batch_size,
    )
    write_evaluation(out, evaluation, heldout, recipe.args.frame_rate)
    comparisons = compare(evaluation.results, None, args.threshold)
    summary = {
        "recipe": str(args.recipe),
        "overrides": list(args.overrides),
        "policy": policy_spec.path or "tiny random (policy.tiny)",
        "threshold": args.threshold,
        "num_rows": len(evaluation.results.rows),
        "num_generations": evaluation.results.num_generations,
        "rewards": {c.name: {"weight": c.weight, **asdict(c.before)} for c in comparisons},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    rows, generations = summary["num_rows"], summary["num_generations"]
    print(f"held-out set of {args.recipe}: {rows} rows x {generations} generations")
    print(format_table(comparisons, args.threshold))
    print(f"wrote {out}/summary.json, {out}/results.json and {len(evaluation.videos)} rows' videos")
    return 0
