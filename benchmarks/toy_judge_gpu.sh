#!/usr/bin/env bash
# The toy judge in one GPU call (one H200 + ~6 CPU cores, <= 8 min): recipes/toy_judge_sft_gpu.yaml
# (verdict loss + the pair term) trained at three learning rates side by side (a tiny judge leaves the
# GPU mostly idle; each process simulates its scenes and builds its batches on 2 CPU processes), the
# one with the best held-out separation on the recipe's validation split is kept, then benchmarks/judge_auroc.py scores the untrained base and all
# three on fresh test-split scenes (true, perturbed, checkpoints/toy_nsp's own samples), writes
# benchmarks/results/judge_auroc.json and the kept judge's provenance.json, and packs that judge for
# checkpoints/toy_judge:
#   OUT=/some/dir bash benchmarks/toy_judge_gpu.sh
#   mkdir -p checkpoints/toy_judge && tar -xf $OUT/toy_judge.tar -C checkpoints/toy_judge
#   cp $OUT/judge_auroc.json benchmarks/results/
# $OUT gets 8 files: train_lr*.log (3), auroc.log and times.txt as they are written (they survive a
# timeout), then judge_auroc.json, toy_judge.tar and metrics.tar.gz (each run's metrics.jsonl).
# Smoke test on CPU: EXTRA="trainer.max_steps=2 data.num_train=4 ..." CONTEXTS=2 GENERATIONS=1.
set -euo pipefail
OUT=${OUT:-runs/toy_judge_gpu}
RECIPE=recipes/toy_judge_sft_gpu.yaml
RUNS=runs/toy-judge-sft-gpu
LRS=${LRS:-"1.5e-4 3e-4 6e-4"}  # around the recipe's 3e-4 (CPU, width 128: 3e-4 learns, 1e-3 collapses)
mkdir -p "$OUT" "$RUNS"
trap 'tar -czf "$OUT/metrics.tar.gz" $RUNS/lr*/metrics.jsonl 2>/dev/null || true' EXIT  # also on failure
start=$(date +%s)
overrides() {  # the training overrides of one learning rate (recorded in the provenance as they ran)
  echo "output_dir=$RUNS/lr$1 trainer.learning_rate=$1 data.num_workers=2 trainer.dataloader_num_workers=2 ${EXTRA:-}"
}
for lr in $LRS; do
  python -m grpo.cli train $RECIPE $(overrides $lr) > "$OUT/train_lr$lr.log" 2>&1 &
done
wait
echo "trained in $(( $(date +%s) - start )) s" | tee "$OUT/times.txt"
best=$(python - "$RUNS" $LRS <<'PY'
import json, sys
runs, lrs = sys.argv[1], sys.argv[2:]
def separation(lr):
    logged = [json.loads(line) for line in open(f"{runs}/lr{lr}/metrics.jsonl")]
    return [m["eval/separation"] for m in logged if "eval/separation" in m][-1]
print(max(lrs, key=separation))
PY
)
echo "kept learning rate $best (validation separation)" | tee -a "$OUT/times.txt"
judges=("$RUNS/lr$best/base")
for lr in $LRS; do judges+=("$RUNS/lr$lr/final"); done
python benchmarks/judge_auroc.py --recipe $RECIPE --judge "${judges[@]}" --contexts "${CONTEXTS:-64}" \
  --generations "${GENERATIONS:-4}" --seed 2 \
  --json benchmarks/results/judge_auroc.json --provenance "$RUNS/lr$best/final" \
  --train-overrides $(overrides $best) > "$OUT/auroc.log" 2>&1
echo "measured in $(( $(date +%s) - start )) s" | tee -a "$OUT/times.txt"
cp benchmarks/results/judge_auroc.json "$OUT/"
tar -C "$RUNS/lr$best/final" -cf "$OUT/toy_judge.tar" .
