#!/usr/bin/env bash
# The toy judge in one GPU job (one H200, at most 15 CPU cores; 865 s beside a second run of it, which nearly
# halves its training speed: start it detached where a call is limited to 10 min): recipes/toy_judge_sft_gpu.yaml
# (verdict loss + the pair term + cross-context reward-margin pairs; true, perturbed, synthetic-failure
# and checkpoints/toy_nsp rows labelled by the verifier) trained at each learning rate of $LRS side by
# side (default one, 3e-4: the CPU-measured setting; the CORES CPU cores are shared out between them
# for scene simulation and batch building), the one with the best held-out separation on the recipe's
# validation split kept, then benchmarks/judge_auroc.py scores the untrained base and every trained
# judge on fresh test-split scenes (true, perturbed, checkpoints/toy_nsp's own samples), writes
# judge_auroc.json (to $RESULTS, default $RUNS/results: the committed benchmarks/results/judge_auroc.json
# also holds the judges shipped before, so merge by hand) and the kept judge's provenance.json, and
# packs that judge for checkpoints/toy_judge:
#   OUT=/some/dir bash benchmarks/toy_judge_gpu.sh
#   mkdir -p checkpoints/toy_judge && tar -xf $OUT/toy_judge.tar -C checkpoints/toy_judge
# $OUT gets train_lr*.log (one per learning rate), auroc.log and times.txt as they are written (they
# survive a timeout), then judge_auroc.json, toy_judge.tar and metrics.tar.gz (each run's metrics.jsonl).
# Smoke test on CPU (about a minute on 2 cores):
#   OUT=/tmp/x RUNS=/tmp/x/runs RESULTS=/tmp/x/results CONTEXTS=2 GENERATIONS=1 CORES=2 \
#   EXTRA="trainer.max_steps=2 trainer.per_device_train_batch_size=4 trainer.warmup_steps=0 data.num_train=4 \
#   data.num_eval=2 data.policy_contexts=1 data.policy_eval_contexts=1 data.policy_generations=2" \
#   bash benchmarks/toy_judge_gpu.sh
set -euo pipefail
OUT=${OUT:-runs/toy_judge_gpu}
RECIPE=recipes/toy_judge_sft_gpu.yaml
RUNS=${RUNS:-runs/toy-judge-sft-gpu}
RESULTS=${RESULTS:-$RUNS/results}
LRS=${LRS:-"3e-4"}  # CPU, width 128: 3e-4 learns, 1e-3 collapses; e.g. LRS="1.5e-4 3e-4" to compare
CORES=${CORES:-15}
runs=$(wc -w <<< "$LRS")
workers=$(( (CORES - runs) / runs > 1 ? (CORES - runs) / runs : 1 ))  # per run, beside its main process
mkdir -p "$OUT" "$RUNS" "$RESULTS"
trap 'tar -czf "$OUT/metrics.tar.gz" $RUNS/lr*/metrics.jsonl 2>/dev/null || true' EXIT  # also on failure
start=$(date +%s)
overrides() {  # the training overrides of one learning rate (recorded in the provenance as they ran)
  echo "output_dir=$RUNS/lr$1 trainer.learning_rate=$1 data.num_workers=$workers" \
    "trainer.dataloader_num_workers=$workers ${EXTRA:-}"
}
pids=()
for lr in $LRS; do
  python -m grpo.cli train $RECIPE $(overrides $lr) > "$OUT/train_lr$lr.log" 2>&1 &
  pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done  # a failed run fails the script (set -e)
echo "trained in $(( $(date +%s) - start )) s ($workers workers a run)" | tee "$OUT/times.txt"
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
  --json "$RESULTS/judge_auroc.json" --provenance "$RUNS/lr$best/final" \
  --train-overrides $(overrides $best) > "$OUT/auroc.log" 2>&1
echo "measured in $(( $(date +%s) - start )) s" | tee -a "$OUT/times.txt"
cp "$RESULTS/judge_auroc.json" "$OUT/"
tar -C "$RUNS/lr$best/final" -cf "$OUT/toy_judge.tar" .
