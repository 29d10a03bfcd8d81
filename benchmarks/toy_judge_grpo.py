"""GRPO driven by the toy judge: does training on the judge alone raise the *verifiable* reward?

Runs recipes/toy_nsp_grpo_judge.yaml (checkpoints/toy_judge in-process as the only training reward,
toyworld_verifiable logged with weight 0) in three settings for each seed, every run a
`benchmarks/toy_learning.py` process, all side by side (one GPU holds them; ``OMP_NUM_THREADS``
defaults to 1 a process):

* ``choice``: the recipe as shipped -- P(yes) as the reward, KL weight 0.04, learning rate 1e-3;
* ``binary``: the thresholded verdict (the NSP paper's), at the Quickstart's KL 0.004 and 3e-3;
* ``choice_kl_low``: P(yes) at the Quickstart's KL and learning rate.

Every run evaluates every 20 iterations. The JSON holds, per setting and seed, the held-out
verifiable reward of the base and at every evaluation, the gain at the last one, the judge's own
held-out score (its mean reward) at every evaluation, the share of zero-advantage groups of the
judge's reward, the wall time, and the resolved recipe the setting trains with (``settings``: what
`tests/test_judge_grpo.py` holds the recipe to).

    python benchmarks/toy_judge_grpo.py --out-dir runs/toy_judge_grpo --json runs/toy_judge_grpo.json
    # smoke test on CPU (a minute):
    python benchmarks/toy_judge_grpo.py --seeds 0 --out-dir /tmp/jg --json /tmp/jg.json --extra \\
        trainer.max_iterations=1 trainer.num_prompts_per_iteration=1 data.num_eval=1 trainer.num_generations=2
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RECIPE = "recipes/toy_nsp_grpo_judge.yaml"
JUDGE = "causal_consistency_local"
SETTINGS = {  # name: (what it is, its overrides of the recipe)
    "choice": ("the recipe: P(yes) as the reward, KL weight 0.04, learning rate 1e-3", []),
    "binary": (
        "the thresholded verdict, the Quickstart's KL weight 0.004 and learning rate 3e-3",
        ["rewards.0.kwargs.scoring=binary", "trainer.beta=0.004", "trainer.learning_rate=3e-3"],
    ),
    "choice_kl_low": (
        "P(yes) with the Quickstart's KL weight 0.004 and learning rate 3e-3",
        ["trainer.beta=0.004", "trainer.learning_rate=3e-3"],
    ),
}
RUN_OVERRIDES = [  # evaluation and saving only: no effect on training
    "trainer.eval_every=20",
    "trainer.save_steps=0",
    "trainer.sample_every=0",
    "trainer.save_eval_videos=0",
]


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key: value})
    return out


def resolved_settings(overrides: list[str]) -> dict[str, Any]:
    """The recipe with ``overrides``, resolved and flattened (run paths left out)."""
    from grpo.recipe import load_recipe, recipe_to_dict

    resolved = _flat(recipe_to_dict(load_recipe(REPO / RECIPE, overrides)))
    return {k: v for k, v in resolved.items() if k not in ("name", "output_dir", "trainer.output_dir")}


def _judge_scores(metrics: Path) -> dict[str, float]:
    """The judge's held-out mean at every evaluation of a run (iteration -> mean)."""
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    key = f"eval/{JUDGE}/mean"
    return {f"{r['step']:06d}": round(r[key], 4) for r in records if key in r}


def merge(out_dir: Path, seeds: list[int], extra: list[str]) -> dict[str, Any]:
    """The results of finished runs in ``out_dir`` (``<setting>_<seed>.json`` from toy_learning.py and
    ``<setting>/seed_<seed>/metrics.jsonl``) as one table."""
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    results: dict[str, Any] = {
        "what": "GRPO of checkpoints/toy_nsp with checkpoints/toy_judge as the only training reward "
        f"({RECIPE}), held-out toyworld_verifiable (logged with weight 0) and the judge's own held-out "
        "score (its mean reward) at every evaluation; gain = last evaluation - base",
        "date": datetime.date.today().isoformat(),
        "machine": f"{device}, {os.cpu_count()} CPU cores, {platform.platform()}; the runs side by side",
        "command": " ".join(["python benchmarks/toy_judge_grpo.py", *sys.argv[1:]]),
        "run_overrides": RUN_OVERRIDES + extra,
    }
    for name, (what, overrides) in SETTINGS.items():
        per_seed = {}
        for seed in seeds:
            run = json.loads((out_dir / f"{name}_{seed}.json").read_text())["runs"][0]
            per_seed[str(seed)] = {
                "base": round(run["base"]["mean"], 4),
                "final": round(run["grpo"]["mean"], 4),
                "gain": round(run["gain"], 4),
                "success_rate": [run["base"]["success_rate"], run["grpo"]["success_rate"]],
                "verifiable_evaluations": {k: round(v, 4) for k, v in run["evaluations"].items()},
                "judge_evaluations": _judge_scores(out_dir / name / f"seed_{seed}" / "metrics.jsonl"),
                "judge_zero_advantage_mean": round(run["zero_advantage"][JUDGE]["mean"], 4),
                "median_iteration_seconds": round(run["median_iteration_seconds"], 2),
                "seconds": round(run["seconds"], 1),
            }
        results[name] = {
            "setting": what,
            "overrides": overrides,
            "settings": resolved_settings(overrides + RUN_OVERRIDES + extra),
            "seeds": per_seed,
            "seeds_gaining": sum(r["gain"] > 0 for r in per_seed.values()),
        }
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out-dir", type=Path, default=Path("runs/toy_judge_grpo"))
    parser.add_argument("--json", type=Path, required=True, help="where the merged results go")
    parser.add_argument("--extra", nargs="*", default=[], help="key=value overrides for every run")
    parser.add_argument("--merge-only", action="store_true", help="merge the finished runs in --out-dir")
    args = parser.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    if not args.merge_only:
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        runs = []
        for name, (_, overrides) in SETTINGS.items():
            for seed in args.seeds:
                command = [sys.executable, str(REPO / "benchmarks" / "toy_learning.py"), "--recipe", RECIPE]
                command += ["--seeds", str(seed), "--out-dir", str(args.out_dir / name)]
                command += ["--json", str(args.out_dir / f"{name}_{seed}.json")]
                command += ["--overrides", *overrides, *RUN_OVERRIDES, *args.extra]
                log = open(args.out_dir / f"{name}_{seed}.log", "w")  # noqa: SIM115 -- open while it runs
                runs.append((subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=log), log))
        failed = 0
        for process, log in runs:
            failed += process.wait() != 0
            log.close()
        if failed:
            sys.exit(f"{failed} runs failed; see their logs in {args.out_dir}")
    results = merge(args.out_dir, args.seeds, args.extra)
    for name in SETTINGS:
        gains = ", ".join(f"{r['gain']:+.4f}" for r in results[name]["seeds"].values())
        print(f"{name:14s} gain per seed: {gains}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1) + "\n")
    return results


if __name__ == "__main__":
    main()
