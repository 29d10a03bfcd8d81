"""Does the Quickstart job learn? Held-out verifiable reward of the base vs the GRPO policy, 3 seeds.

Runs ``nextscene train RECIPE`` (default: the Quickstart job, ``recipes/toy_nsp_grpo.yaml``, from the
shipped checkpoint) once per seed, exactly as a user would (a subprocess, same CLI), and reads the
run's own held-out evaluations: the first (``eval/step_0``: the base policy) and the last (the GRPO
policy), both deterministic ODE rollouts with paired noise. Prints a table of mean verifiable reward
and success rate (share of samples >= 0.5) before and after, the gain and each run's wall time, and
writes JSON.

    python benchmarks/toy_learning.py                                    # 3 seeds, CPU
    python benchmarks/toy_learning.py --seeds 0 --overrides trainer.max_iterations=10
    python benchmarks/toy_learning.py --recipe recipes/toy_nextclip_grpo.yaml --seeds 0 \
        --out-dir runs/toy_nextclip_learning --json benchmarks/results/toy_nextclip_learning.json

Each run's held-out mean at every evaluation is kept too (``evaluations``: iteration -> mean), and
so is the share of zero-advantage groups (``zero_advantage``: per reward, its logged
``reward/<name>/zero_std_frac`` -- the (group, clip) cells whose samples all score the same -- at the
first and last training iterations and averaged over the run).

Each run's training time as the issue counts it is kept as well: the median iteration time (from the
run's metrics.jsonl) times the iterations (``median_iteration_seconds``, ``training_seconds``).

The issue's bar: gain >= +0.10 for 3 of 3 seeds, training <= 5 minutes on a 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SUCCESS_THRESHOLD = 0.5  # a sample "succeeds" when its reward is at least this


def _summary(folder: Path, reward: str) -> dict[str, float | None]:
    from grpo.evaluation import EvalResults

    summary = EvalResults.load(folder).summary(SUCCESS_THRESHOLD)[reward]
    return {"mean": summary.mean, "success_rate": summary.success_rate, "scored": summary.scored}


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _logged_seconds(run_dir: Path) -> float:
    """Wall time of a finished run from its metrics log (first to last record; excludes start-up)."""
    times = [record["time"] for record in _records(run_dir)]
    return max(times) - min(times)


def _iteration_timing(run_dir: Path) -> dict[str, float | int]:
    """The issue's training time of a run: its median iteration time (``time/iteration_s`` of every
    logged iteration; the few that include a held-out evaluation do not move the median) times its
    iterations."""
    seconds = [r["time/iteration_s"] for r in _records(run_dir) if "time/iteration_s" in r]
    if not seconds:
        raise SystemExit(f"{run_dir}/metrics.jsonl logs no time/iteration_s")
    median = statistics.median(seconds)
    return {
        "iterations": len(seconds),
        "median_iteration_seconds": median,
        "training_seconds": median * len(seconds),
    }


def _zero_advantage(run_dir: Path) -> dict[str, dict[str, float]]:
    """Per reward, the share of tied (group, clip) cells (advantage 0) in the run's training iterations:
    ``{name: {"first", "last", "mean"}}`` from the metrics log's ``reward/<name>/zero_std_frac``."""
    shares: dict[str, list[float]] = {}
    for record in _records(run_dir):
        for key, value in record.items():
            name = key.removeprefix("reward/").removesuffix("/zero_std_frac")
            if key.endswith("/zero_std_frac") and name != key and value is not None:
                shares.setdefault(name, []).append(value)
    return {
        name: {"first": values[0], "last": values[-1], "mean": sum(values) / len(values)}
        for name, values in shares.items()
    }


def run_seed(
    recipe: Path, seed: int, out_dir: Path, reward: str, overrides: list[str], reuse: bool = False
) -> dict:
    """One Quickstart run with ``trainer.seed=seed``; its base and final held-out numbers and wall time
    (``reuse``: read an already finished run instead of training again)."""

    run_dir = out_dir / f"seed_{seed}"
    if reuse and (run_dir / "final").is_dir():
        return _summarise(run_dir, seed, reward, _logged_seconds(run_dir))
    command = [
        sys.executable, "-m", "grpo.cli", "train", str(recipe),
        f"trainer.seed={seed}", f"trainer.output_dir={run_dir}", *overrides,
    ]  # fmt: skip
    start = time.perf_counter()
    log = run_dir.with_suffix(".log")
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as handle:
        done = subprocess.run(command, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"seed {seed}: `{' '.join(command)}` failed (exit {done.returncode}); see {log}")
    return _summarise(run_dir, seed, reward, seconds)


def _summarise(run_dir: Path, seed: int, reward: str, seconds: float) -> dict:
    from grpo.evaluation import eval_steps

    steps = eval_steps(run_dir)
    if len(steps) < 2 or int(steps[0].name.removeprefix("step_")) != 0:
        raise SystemExit(f"seed {seed}: {run_dir} has no step-0 and final evaluations; is eval_every > 0?")
    base, final = _summary(steps[0], reward), _summary(steps[-1], reward)
    return {
        "seed": seed,
        "run_dir": str(run_dir),
        "final_step": int(steps[-1].name.removeprefix("step_")),
        "base": base,
        "grpo": final,
        "gain": final["mean"] - base["mean"],
        "evaluations": {step.name.removeprefix("step_"): _summary(step, reward)["mean"] for step in steps},
        "seconds": seconds,
        **_iteration_timing(run_dir),
        "zero_advantage": _zero_advantage(run_dir),
    }


def _fmt(value: float | None, percent: bool = False) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}%" if percent else f"{value:.3f}"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--recipe", type=Path, default=REPO / "recipes" / "toy_nsp_grpo.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--reward", default="toyworld_verifiable", help="reward whose held-out mean is compared"
    )
    parser.add_argument("--out-dir", type=Path, default=REPO / "runs" / "toy_learning")
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "toy_learning.json")
    parser.add_argument("--min-gain", type=float, default=0.10, help="the bar each seed's gain must reach")
    parser.add_argument("--reuse", action="store_true", help="read finished runs in --out-dir again")
    parser.add_argument("--overrides", nargs="*", default=[], help="key=value recipe overrides for every run")
    args = parser.parse_args(argv)

    runs = [
        run_seed(args.recipe.resolve(), s, args.out_dir.resolve(), args.reward, args.overrides, args.reuse)
        for s in args.seeds
    ]
    columns = ("seed", 4), ("base", 6), ("GRPO", 6), ("gain", 7), ("success base", 12), ("success GRPO", 12)
    header = "  ".join(f"{name:>{width}}" for name, width in columns) + f"  {'wall':>7}  {'median x it':>11}"
    print(
        f"held-out {args.reward} of {args.recipe.name} (base = step 0, GRPO = step {runs[0]['final_step']})"
    )
    print(header)
    for r in runs:
        print(
            f"{r['seed']:>4}  {_fmt(r['base']['mean']):>6}  {_fmt(r['grpo']['mean']):>6}  "
            f"{r['gain']:>+7.3f}  "
            f"{_fmt(r['base']['success_rate'], True):>12}  {_fmt(r['grpo']['success_rate'], True):>12}  "
            f"{r['seconds'] / 60:>5.1f} m  {r['training_seconds']:>9.0f} s"
        )
    for r in runs:
        for name, share in r["zero_advantage"].items():
            print(
                f"seed {r['seed']}: {name} zero-advantage cells {_fmt(share['first'], True)} at the first "
                f"iteration, {_fmt(share['last'], True)} at the last, {_fmt(share['mean'], True)} on average"
            )
    passed = sum(r["gain"] >= args.min_gain for r in runs)
    print(f"gain >= {args.min_gain:+.2f} in {passed} of {len(runs)} seeds")
    result = {
        "command": " ".join(
            ["python", "benchmarks/toy_learning.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "recipe": str(args.recipe),
        "reward": args.reward,
        "overrides": args.overrides,
        "min_gain": args.min_gain,
        "success_threshold": SUCCESS_THRESHOLD,
        "seeds_passing": passed,
        "runs": runs,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
