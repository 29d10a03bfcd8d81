#!/usr/bin/env bash
# GRPO driven by the toy judge in one GPU call: recipes/toy_nsp_grpo_judge.yaml (the judge, in-process,
# as the only training reward; toyworld_verifiable logged with weight 0) for seeds 0, 1, 2 in three
# settings, nine processes side by side, each through benchmarks/toy_learning.py (held-out verifiable
# reward of the base and of the GRPO policy, and the judge's own held-out score, every 20 iterations):
#   choice     the recipe: P(yes) as the reward, KL weight 0.04, learning rate 1e-3
#   binary     the thresholded verdict (the NSP paper's), the Quickstart's KL 0.004 and 3e-3
#   choice_kl_low  P(yes) with the Quickstart's KL 0.004 and 3e-3 (where the judge is exploited)
# Needs checkpoints/toy_judge (benchmarks/toy_judge_gpu.sh). About 7 minutes on one H200 with 16 CPU
# cores (2026-12-01). $OUT gets judge_grpo.json (every setting and seed: base, GRPO, gain, wall time)
# and logs.tar.gz (logs and each run's metrics.jsonl).
#   OUT=/some/dir bash benchmarks/toy_judge_grpo_gpu.sh
# Smoke test on CPU: EXTRA="trainer.max_iterations=1 trainer.num_prompts_per_iteration=1 data.num_eval=1" SEEDS=0
set -euo pipefail
OUT=${OUT:-runs/toy_judge_grpo}
RUNS=${RUNS:-runs/toy_judge_grpo}
SEEDS=${SEEDS:-"0 1 2"}
declare -A SETTINGS=(
  [choice]=""
  [binary]="rewards.0.kwargs.scoring=binary trainer.beta=0.004 trainer.learning_rate=3e-3"
  [choice_kl_low]="trainer.beta=0.004 trainer.learning_rate=3e-3"
)
mkdir -p "$OUT" "$RUNS"
trap 'tar -czf "$OUT/logs.tar.gz" $RUNS/*.log $RUNS/*.json $RUNS/*/seed_*.log $RUNS/*/seed_*/metrics.jsonl \
  2>/dev/null || true' EXIT  # also on failure
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
for name in "${!SETTINGS[@]}"; do
  for seed in $SEEDS; do
    python benchmarks/toy_learning.py --recipe recipes/toy_nsp_grpo_judge.yaml --seeds "$seed" \
      --out-dir "$RUNS/$name" --json "$RUNS/${name}_$seed.json" \
      --overrides ${SETTINGS[$name]} trainer.eval_every=20 trainer.save_steps=0 trainer.sample_every=0 \
      trainer.save_eval_videos=0 ${EXTRA:-} > "$RUNS/${name}_$seed.log" 2>&1 &
  done
done
wait
python - "$RUNS" "$OUT/judge_grpo.json" $SEEDS <<'PY'
import json, sys
runs, out, seeds = sys.argv[1], sys.argv[2], sys.argv[3:]
names = ("choice", "binary", "choice_kl_low")
merged = {n: [json.load(open(f"{runs}/{n}_{seed}.json"))["runs"][0] for seed in seeds] for n in names}
for name, rows in merged.items():
    for r in rows:
        print(name, r["seed"], round(r["base"]["mean"], 3), round(r["grpo"]["mean"], 3), f"{r['gain']:+.3f}", f"{r['seconds']:.0f} s")
json.dump({"recipe": "recipes/toy_nsp_grpo_judge.yaml", "reward": "toyworld_verifiable (weight 0)", **merged}, open(out, "w"), indent=2)
PY
