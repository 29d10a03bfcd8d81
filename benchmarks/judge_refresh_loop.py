"""Judge-driven GRPO with the judge refreshed on the policy's own samples, round after round.

GRPO with the toy judge as its only reward finds the judge's blind spots within tens of iterations
(benchmarks/results/judge_grpo_cpu.json); one refresh of the judge on the exploiting policy's samples
buys ~30 iterations of real gains before the next blind spot (judge_refresh_cpu.json). This runs the
refresh as a loop, per seed, exactly as a user would (``nextscene train`` subprocesses):

    policy_0 = checkpoints/toy_nsp, judge_0 = checkpoints/toy_judge
    round r:  GRPO (recipes/toy_nsp_grpo_judge.yaml) for --iterations from policy_r scored by judge_r
                  -> policy_{r+1} (its `final`: the EMA weights)
              judge_r fine-tuned (recipes/toy_judge_sft_gpu.yaml) for --judge-steps on fresh true and
                  perturbed scenes plus policy_{r+1}'s samples labelled by toyworld_verifiable -> judge_{r+1}
              [--auroc-contexts > 0] judge_{r+1} scored by benchmarks/judge_auroc.py on held-out scenes
                  with policy_{r+1}'s samples

Each round's GRPO starts a fresh run from policy_r: its KL reference and EMA restart there. The
held-out verifiable reward of policy_r (each GRPO run's step-0 and final evaluations, logged with
weight 0) is the measure; ``gain`` is policy_R's against policy_0's. Prints a table, writes JSON.

    python benchmarks/judge_refresh_loop.py --seeds 0 1 2 --rounds 3 --iterations 20 --judge-steps 150
    python benchmarks/judge_refresh_loop.py --seeds 0 --rounds 1 --iterations 1 --judge-steps 2 \\
        --judge-overrides data.num_train=8 data.num_eval=4 data.policy_contexts=1 \\
        data.policy_eval_contexts=1 data.policy_generations=2 --auroc-contexts 0   # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from toy_learning import _summarise  # noqa: E402

VERIFIABLE, JUDGE = "toyworld_verifiable", "causal_consistency_local"
# the refresh of benchmarks/results/judge_refresh_cpu.json: the shipped judge's own recipe, loading the
# judge to refresh instead of a tiny random one, on fewer fresh scenes, at a fine-tuning learning rate
JUDGE_SETTINGS = [
    "policy.tiny=false",
    "policy.tiny_spec={}",
    "policy.aim_verdict=false",
    "data.num_train=512",
    "data.num_eval=64",
    "data.policy_contexts=64",
    "data.policy_eval_contexts=8",
    "trainer.warmup_steps=10",
    "trainer.learning_rate=1e-4",
    "trainer.per_device_train_batch_size=32",
]


def _train(recipe: Path, run_dir: Path, overrides: list[str]) -> float:
    """``nextscene train recipe`` into ``run_dir`` (log beside it); its wall seconds."""
    command = [sys.executable, "-m", "grpo.cli", "train", str(recipe), f"output_dir={run_dir}", *overrides]
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    log = run_dir.with_suffix(".log")
    start = time.perf_counter()
    with log.open("w") as handle:
        done = subprocess.run(command, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT)
    if done.returncode:
        raise SystemExit(f"`{' '.join(command)}` failed (exit {done.returncode}); see {log}")
    return time.perf_counter() - start


def _auroc(judge: Path, policy: Path, contexts: int, seed: int, out: Path) -> dict:
    command = [
        sys.executable, "benchmarks/judge_auroc.py", "--recipe", "recipes/toy_judge_sft_gpu.yaml",
        "--judge", str(judge), "--policy", str(policy), "--contexts", str(contexts), "--seed", str(seed),
        "--json", str(out),
    ]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"`{' '.join(command)}` failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
    (result,) = json.loads(out.read_text())
    # policy/auroc is absent when the policy's samples are all on one side of the threshold
    return {k: result.get(k) for k in ("auroc", "spearman", "policy/auroc", "p_yes/true", "p_yes/policy")}


def run_seed(args: argparse.Namespace, seed: int) -> dict:
    root = args.out_dir / f"seed_{seed}"
    policy, judge = args.policy, args.judge
    rounds = []
    for r in range(args.rounds):
        grpo_dir = root / f"round_{r}" / "grpo"
        grpo_overrides = [
            f"trainer.seed={seed + 1000 * r}", f"policy.path={policy}", f"rewards.0.kwargs.model={judge}",
            f"rewards.0.kwargs.scoring={args.scoring}", f"trainer.max_iterations={args.iterations}",
            f"trainer.eval_every={args.iterations}", "trainer.save_steps=0", *args.grpo_overrides,
        ]  # fmt: skip
        grpo_s = _train(REPO / "recipes" / "toy_nsp_grpo_judge.yaml", grpo_dir, grpo_overrides)
        verifiable = _summarise(grpo_dir, seed, VERIFIABLE, grpo_s)
        judged = _summarise(grpo_dir, seed, JUDGE, grpo_s)
        policy = grpo_dir / "final"
        judge_dir = root / f"round_{r}" / "judge"
        judge_overrides = [
            f"trainer.seed={seed + 1000 * r}", f"policy.path={judge}", f"data.policy={policy}",
            f"trainer.max_steps={args.judge_steps}", *JUDGE_SETTINGS, *args.judge_overrides,
        ]  # fmt: skip
        judge_s = _train(REPO / "recipes" / "toy_judge_sft_gpu.yaml", judge_dir, judge_overrides)
        judge = judge_dir / "final"
        record = {
            "round": r,
            "verifiable": {"start": verifiable["base"]["mean"], "end": verifiable["grpo"]["mean"]},
            "judge_score": {"start": judged["base"]["mean"], "end": judged["grpo"]["mean"]},
            "grpo_seconds": round(grpo_s, 1),
            "median_iteration_seconds": verifiable["median_iteration_seconds"],
            "judge_refresh_seconds": round(judge_s, 1),
        }
        if args.auroc_contexts:
            out = root / f"round_{r}" / "auroc.json"
            record["refreshed_judge"] = _auroc(judge, policy, args.auroc_contexts, seed, out)
        rounds.append(record)
        print(f"seed {seed} round {r}: {json.dumps(record)}", flush=True)
    base, final = rounds[0]["verifiable"]["start"], rounds[-1]["verifiable"]["end"]
    return {"seed": seed, "base": base, "final": final, "gain": final - base, "rounds": rounds}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=3, help="GRPO + refresh rounds per seed")
    parser.add_argument("--iterations", type=int, default=20, help="GRPO iterations per round")
    parser.add_argument("--judge-steps", type=int, default=150, help="judge fine-tuning steps per refresh")
    parser.add_argument("--scoring", default="choice", choices=["choice", "binary"], help="judge reward")
    parser.add_argument("--policy", type=Path, default=REPO / "checkpoints" / "toy_nsp", help="policy_0")
    parser.add_argument("--judge", type=Path, default=REPO / "checkpoints" / "toy_judge", help="judge_0")
    parser.add_argument("--auroc-contexts", type=int, default=24, help="held-out contexts per AUROC; 0: off")
    parser.add_argument("--grpo-overrides", nargs="*", default=[], help="more overrides of every GRPO run")
    parser.add_argument("--judge-overrides", nargs="*", default=[], help="more overrides of every refresh")
    parser.add_argument("--out-dir", type=Path, default=REPO / "runs" / "judge_refresh_loop")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)
    for name in ("policy", "judge", "out_dir"):
        setattr(args, name, getattr(args, name).resolve())
    if min(args.rounds, args.iterations, args.judge_steps) < 1:
        parser.error("--rounds, --iterations and --judge-steps must be >= 1")

    runs = [run_seed(args, seed) for seed in args.seeds]
    print(f"held-out {VERIFIABLE} of the policy after each round (round 0 starts from {args.policy.name})")
    for run in runs:
        chain = " -> ".join(f"{r['verifiable']['end']:.3f}" for r in run["rounds"])
        print(f"seed {run['seed']}: {run['base']:.3f} -> {chain}  gain {run['gain']:+.3f}")
    result = {
        "command": " ".join(["python", "benchmarks/judge_refresh_loop.py", *(argv or sys.argv[1:])]),
        "settings": {
            key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()
        },
        "judge_settings": JUDGE_SETTINGS,
        "runs": runs,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
    }
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
