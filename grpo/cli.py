"""The `nextscene` command.

Each sub-command lives next to the code it drives and exposes `register(subparsers)`, which adds
its parser and sets `func(args) -> int`. Modules are imported lazily so `nextscene --help` is fast
and one broken optional dependency does not take every command down.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from policies.errors import InputError

# module paths that define a `register(subparsers)` function, in --help order
COMMAND_MODULES: list[str] = [
    "grpo.commands.rollout",
    "grpo.commands.train",
    "grpo.commands.eval",
    "grpo.commands.report",
    "grpo.data.toyworld_cli",
    "rewards.judge.cli",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nextscene",
        description="RL fine-tuning of next-scene video diffusion models, and their rewards.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for module in COMMAND_MODULES:
        importlib.import_module(module).register(subparsers)
    return parser


def _one_line(err: Exception) -> bool:
    """Errors whose message names the problem and the fix: printed as one line, no traceback."""
    if isinstance(err, InputError | FileNotFoundError | NotImplementedError):
        return True
    types = sys.modules.get("rewards.types")  # loaded by whatever scored a reward (a judge server down)
    return types is not None and isinstance(err, types.RewardUnavailableError)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except Exception as err:
        if not _one_line(err):
            raise
        print(f"nextscene {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
