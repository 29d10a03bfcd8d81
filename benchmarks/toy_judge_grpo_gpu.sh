#!/usr/bin/env bash
# GRPO driven by the toy judge in one GPU call: recipes/toy_nsp_grpo_judge.yaml (the judge, in-process,
# as the only training reward; toyworld_verifiable logged with weight 0) for seeds 0, 1, 2 with the
# binary verdict and with P(yes) as the reward, six processes side by side, each through
# benchmarks/toy_learning.py (held-out verifiable reward of the base and of the GRPO policy). Needs
# checkpoints/toy_judge (benchmarks/toy_judge_gpu.sh). $OUT gets judge_grpo.json (both scorings, every
# seed: base, GRPO, gain, wall time) and logs.tar.gz.
#   OUT=/some/dir bash benchmarks/toy_judge_grpo_gpu.sh
# Smoke test on CPU: EXTRA="trainer.max_iterations=1 ..." SEEDS=0.
set -euo pipefail
OUT=${OUT:-runs/toy_judge_grpo}
RUNS=runs/toy_judge_grpo
SEEDS=${SEEDS:-"0 1 2"}
mkdir -p "$OUT" "$RUNS"
trap 'tar -czf "$OUT/logs.tar.gz" $RUNS/*.log $RUNS/*.json $RUNS/*/seed_*.log $RUNS/*/seed_*/metrics.jsonl \
  2>/dev/null || true' EXIT  # also on failure
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
for scoring in binary choice; do
  for seed in $SEEDS; do
    python benchmarks/toy_learning.py --recipe recipes/toy_nsp_grpo_judge.yaml --seeds "$seed" \
      --out-dir "$RUNS/$scoring" --json "$RUNS/${scoring}_$seed.json" \
      --overrides rewards.0.kwargs.scoring=$scoring ${EXTRA:-} > "$RUNS/${scoring}_$seed.log" 2>&1 &
  done
done
wait
python - "$RUNS" "$OUT/judge_grpo.json" $SEEDS <<'PY'
import json, sys
runs, out, seeds = sys.argv[1], sys.argv[2], sys.argv[3:]
merged = {s: [json.load(open(f"{runs}/{s}_{seed}.json"))["runs"][0] for seed in seeds] for s in ("binary", "choice")}
for scoring, rows in merged.items():
    for r in rows:
        print(scoring, r["seed"], round(r["base"]["mean"], 3), round(r["grpo"]["mean"], 3), f"{r['gain']:+.3f}", f"{r['seconds']:.0f} s")
json.dump({"recipe": "recipes/toy_nsp_grpo_judge.yaml", "reward": "toyworld_verifiable (weight 0)", **merged}, open(out, "w"), indent=2)
PY
