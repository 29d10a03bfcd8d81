"""`nextscene report RUN_DIR`: (re)build a run's ``report.html`` from what the run left on disk.

Reads ``metrics.jsonl``, the held-out evaluations ``eval/step_*/`` and ``resolved_recipe.yaml``;
writes ``RUN_DIR/report.html`` (self-contained: open it in any browser, offline) and prints the
before / after table. `nextscene train` already does this at the end of a GRPO run; use this
command for a run that was interrupted, or to change the success threshold or the videos shown.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from grpo.evaluation import EvalResults, eval_steps
from grpo.report import compare, format_table, write_report
from policies.errors import InputError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "report",
        help="build RUN_DIR/report.html (reward curves, before/after table, videos)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("run_dir", type=Path, help="a training run's output_dir")
    parser.add_argument(
        "--threshold",
        type=float,
        default=0.5,
        help="a sample succeeds when its reward is >= this (rewards in [0, 1]; default 0.5)",
    )
    parser.add_argument(
        "--videos", type=int, default=4, help="held-out rows shown as side-by-side videos (default 4)"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not math.isfinite(args.threshold):
        raise InputError(f"--threshold must be a finite number, got {args.threshold}")
    if args.videos < 0:
        raise InputError(f"--videos must be >= 0, got {args.videos}")
    if not args.run_dir.is_dir():
        raise InputError(f"run directory {args.run_dir} does not exist; give a training run's output_dir")
    path = write_report(args.run_dir, threshold=args.threshold, num_videos=args.videos)
    folders = eval_steps(args.run_dir)
    if folders:
        before = EvalResults.load(folders[0])
        after = EvalResults.load(folders[-1]) if len(folders) > 1 else None
        steps = f"iteration {before.step}" + (f" -> {after.step}" if after is not None else "")
        print(f"held-out set, {steps}:")
        print(format_table(compare(before, after, args.threshold), args.threshold))
    print(f"wrote {path}  (open file://{path.resolve()} in a browser)")
    return 0
