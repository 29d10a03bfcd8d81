"""How well does a causal-consistency judge judge? AUROC and Spearman against the verifiable reward.

For a judge directory (``--judge``; several: one row each, e.g. the untrained ``base`` and the
trained ``final`` of a ``judge_sft`` run) and the question it is asked (``--recipe``: a
``judge_sft`` recipe's ``policy.judge``; or ``--judge-kwargs`` JSON), scores held-out toy scenes
the judge never saw (test-split seeds): each context's true continuation, one of each perturbation
and ``--generations`` samples of the shipped NSP policy (``--policy``, drawn as its GRPO rollouts
are), every candidate labelled by ``toyworld_verifiable`` (`grpo.judge_training.held_out_candidates`).
Reports the AUROC of P(yes) against "verifiable reward >= 0.5", its Spearman correlation with the
verifiable reward, the same over the policy's samples only, and the mean P(yes) per kind. Each
result also reports ``ceiling/auroc``: the verifier's own AUROC on just the frames the judge is shown
(`grpo.judge_training.verifier_ceiling`): the reference a judge asked that question is read against.

    python benchmarks/judge_auroc.py --recipe recipes/toy_judge_sft.yaml \\
        --judge runs/toy-judge-sft/base runs/toy-judge-sft/final --contexts 64 --generations 4

Prints one JSON object per judge and writes them all to ``--json`` (if given). ``--provenance
DIR`` also writes ``DIR/provenance.json`` (what the judge is, the exact command that regenerates
and measures it, the figures of every judge scored, the machine): how ``checkpoints/toy_judge``
records where it came from.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    from grpo.judge_training import held_out_candidates, judge_auroc
    from grpo.recipe import load_recipe
    from rewards.judge.local import InProcessJudge

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--judge", nargs="+", required=True, help="judge checkpoint directories")
    parser.add_argument("--recipe", help="judge_sft recipe whose policy.judge is the question asked")
    parser.add_argument("--judge-kwargs", default="{}", help="JSON of JudgeConfig prompt fields")
    parser.add_argument("--contexts", type=int, default=64, help="held-out contexts (the first of --split)")
    parser.add_argument(
        "--split",
        default="test",
        choices=("test", "validation"),
        help="toy-world split of the contexts: test (the reported figure), or validation (to choose "
        "between trained judges without touching test)",
    )
    parser.add_argument("--generations", type=int, default=4, help="policy samples per context (0: none)")
    parser.add_argument("--policy", default=str(ROOT / "checkpoints" / "toy_nsp"), help="NSP checkpoint")
    parser.add_argument("--seed", type=int, default=2, help="seed of the policy's samples")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument(
        "--provenance",
        help="write provenance.json into this judge directory (one of --judge, trained by --recipe)",
    )
    parser.add_argument(
        "--train-overrides",
        nargs="*",
        default=[],
        help="recipe overrides the judge was trained with (provenance)",
    )
    args = parser.parse_args()
    if args.provenance and (not args.recipe or args.provenance not in args.judge):
        parser.error(
            "--provenance names one of the --judge directories and needs the --recipe it was trained by"
        )
    kwargs = dict(load_recipe(args.recipe).policy.get("judge", {})) if args.recipe else {}
    kwargs.update(json.loads(args.judge_kwargs))
    start = time.perf_counter()
    held_out = held_out_candidates(
        args.contexts, policy=args.policy if args.generations else None, generations=args.generations,
        seed=args.seed, split=args.split,
    )  # fmt: skip
    built = time.perf_counter() - start
    results = []
    for path in args.judge:
        judge = InProcessJudge(path, dtype="float32", **kwargs)
        result = {"judge": path, "judge_kwargs": kwargs, **judge_auroc(judge, held_out)}
        result.update(
            split=args.split,
            contexts=args.contexts,
            generations=args.generations,
            candidates_s=round(built, 1),
        )
        print(json.dumps(result))
        results.append(result)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    if args.provenance:
        write_provenance(Path(args.provenance), args, kwargs, results)


def write_provenance(judge: Path, args: argparse.Namespace, kwargs: dict, results: list[dict]) -> Path:
    """``judge/provenance.json``: the recipe, the question the judge answers (the reward's kwargs),
    the command that regenerates and measures it (``nextscene train`` with the training overrides,
    then this invocation restricted to the judges of that run: its untrained base and this judge),
    every scored judge's AUROC / Spearman, and the machine."""
    import torch
    import transformers

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    recipe, overrides = args.recipe, args.train_overrides
    judges = [j for j in args.judge if Path(j).parent == judge.parent]
    measure = ["python", "benchmarks/judge_auroc.py", "--recipe", recipe, "--judge", *judges]
    measure += [
        "--contexts",
        str(args.contexts),
        "--generations",
        str(args.generations),
        "--seed",
        str(args.seed),
    ]
    if args.split != "test":
        measure += ["--split", args.split]
    if args.judge_kwargs != "{}":
        measure += ["--judge-kwargs", args.judge_kwargs]
    if Path(args.policy).resolve() != (ROOT / "checkpoints" / "toy_nsp").resolve():
        measure += ["--policy", args.policy]
    measure += ["--provenance", str(judge), "--train-overrides", *overrides]
    measure = shlex.join(measure)
    keys = ("auroc", "spearman", "policy/auroc", "policy/spearman", "candidates", "positives")
    payload = {
        "what": f"causal-consistency judge fine-tuned by {recipe} (stage judge_sft); score it with "
        f"causal_consistency_local, kwargs {{model: <this directory>, **judge_kwargs}}",
        "command": f"{shlex.join(['nextscene', 'train', recipe, *overrides])} && {measure}",
        "recipe": recipe,
        "overrides": overrides,
        "judge_kwargs": kwargs,
        "measured": {
            "held_out": f"{args.split}-split toy contexts: the true continuation, one of each perturbation "
            "and policy samples; positive = toyworld_verifiable >= 0.5 (grpo.judge_training.judge_auroc)",
            **{r["judge"]: {k: r[k] for k in keys if k in r} for r in results},
        },
        "made_on": f"{device}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"{datetime.date.today().isoformat()}",
    }
    path = judge / "provenance.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


if __name__ == "__main__":
    main()
