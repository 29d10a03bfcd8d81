"""`nextscene train RECIPE.yaml [key.sub=value ...]`: run a recipe.

Multi-GPU: ``accelerate launch -m grpo.cli train RECIPE.yaml`` (or ``torchrun --nproc_per_node N
-m grpo.cli train ...``); each process rolls out its share of the prompts.

Reproducible: every random draw comes from trainer.seed, so the same recipe and seed give bitwise
the same run on CPU; on GPU, trainer.full_determinism=true uses torch's deterministic kernels where
it has them. With trainer.resume_from_checkpoint=auto a killed run continues from its latest
complete checkpoint, exactly, and metrics.jsonl keeps each step once.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from grpo.recipe import TRAINER_CONFIGS, load_recipe
from grpo.train import run as run_recipe
from grpo.train import validate
from grpo.training_state import leave_process_group


def register(subparsers: argparse._SubParsersAction) -> None:
    stages = ", ".join(TRAINER_CONFIGS)
    parser = subparsers.add_parser(
        "train",
        help=f"run a YAML recipe (stage: {stages})",
        description=f"{__doc__}\nThe recipe's stage is one of: {stages}.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("recipe", type=Path, help="YAML recipe")
    parser.add_argument(
        "overrides", nargs="*", help="key.sub=value overrides, e.g. trainer.learning_rate=1e-4"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe, args.overrides)
    validate(recipe)
    history = run_recipe(recipe)
    if history:
        last = history[-1]
        shown = {
            k: round(v, 5)
            for k, v in last.items()
            if k.startswith(("reward/mean", "eval/", "train/kl", "loss"))
        }
        print(
            f"done: {len(history)} iterations logged in {recipe.args.output_dir}/metrics.jsonl; last: {shown}"
        )
    leave_process_group()
    return 0
