"""How far apart two runs of one recipe and seed end up, with and without ``trainer.full_determinism``.

Each setting runs ``nextscene train RECIPE`` twice, in separate processes, on the default device (the
GPU when there is one), with only ``output_dir`` different, and compares the two runs: the max abs
difference of every weight in ``final/`` and the last checkpoint, and of every logged number but
timings. On CPU both settings give 0 (bitwise the same run, tested in tests/test_reproducibility.py);
on GPU this measures the tolerance the README states.

    python benchmarks/determinism.py                                   # the Quickstart recipe, 6 iterations
    python benchmarks/determinism.py --iterations 20 --recipe recipes/toy_nextclip_grpo.yaml

Prints a table and writes JSON (``--json``, default benchmarks/results/determinism_<device>.json).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
TIMING_KEYS = ("time", "samples_per_s", "memory/peak_gb")


def train(out: Path, recipe: str, iterations: int, deterministic: bool) -> None:
    overrides = [
        f"output_dir={out}",
        f"trainer.max_iterations={iterations}",
        f"trainer.save_steps={iterations}",
    ]
    overrides += [
        f"trainer.eval_every={iterations}",
        f"trainer.full_determinism={str(deterministic).lower()}",
    ]
    command = [sys.executable, "-m", "grpo.cli", "train", recipe, *overrides]
    subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)


def weight_difference(a: Path, b: Path) -> float:
    worst = 0.0
    for file in sorted(a.rglob("*.safetensors")):
        x, y = load_file(str(file)), load_file(str(b / file.relative_to(a)))
        for key in x:
            worst = max(worst, (x[key].double() - y[key].double()).abs().max().item())
    return worst


def metric_difference(a: Path, b: Path) -> float:
    worst = 0.0
    rows = zip((a / "metrics.jsonl").read_text().splitlines(), (b / "metrics.jsonl").read_text().splitlines())
    for line_a, line_b in rows:
        x, y = json.loads(line_a), json.loads(line_b)
        for key, value in x.items():
            if isinstance(value, float) and not key.startswith(TIMING_KEYS) and math.isfinite(value):
                worst = max(worst, abs(value - y[key]))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--recipe", default="recipes/toy_nsp_grpo.yaml")
    parser.add_argument("--iterations", type=int, default=6)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    results = {
        "recipe": args.recipe,
        "iterations": args.iterations,
        "device": device,
        "torch": torch.__version__,
    }
    with tempfile.TemporaryDirectory() as tmp:
        for deterministic in (False, True):
            runs = [Path(tmp) / f"{deterministic}-{i}" for i in range(2)]
            for run in runs:
                train(run, args.recipe, args.iterations, deterministic)
            results[f"full_determinism={deterministic}"] = {
                "max_abs_weight_diff": weight_difference(*runs),
                "max_abs_metric_diff": metric_difference(*runs),
            }
    print(f"{args.recipe}, {args.iterations} iterations, {device}, torch {torch.__version__}")
    for setting in ("full_determinism=False", "full_determinism=True"):
        weights, metrics = (results[setting][k] for k in ("max_abs_weight_diff", "max_abs_metric_diff"))
        print(f"  {setting:<24} weights {weights:.3e}  metrics {metrics:.3e}")
    name = "cpu" if device == "cpu" else device.replace(" ", "_").lower()
    path = args.json or ROOT / "benchmarks" / "results" / f"determinism_{name}.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
