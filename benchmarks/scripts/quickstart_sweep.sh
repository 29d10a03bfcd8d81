#!/usr/bin/env bash
# Does a faster Quickstart still learn? Runs recipe variants of the Quickstart job
# (recipes/toy_nsp_grpo.yaml) x seeds 0, 1, 2 side by side, each as a user's 2-core machine: pinned
# to two cores (taskset -c 2i,2i+1), OMP_NUM_THREADS=2, no GPU (CUDA_VISIBLE_DEVICES=). Each run is
# benchmarks/toy_learning.py for one seed (the `nextscene train` CLI in a subprocess), which writes
# its held-out base / final verifiable reward, gain, median iteration time and median x iterations
# (the issue's "training time") to <variant>_seed<S>.json; the runs' logs and metrics.jsonl go next to
# them, all of it packed into one tar, $OUT/quickstart_sweep.tar, and $OUT/quickstart_sweep.json sums
# up every variant (per seed: base, final, gain, median iteration seconds, training seconds; seeds
# passing +0.10; the slowest seed's training time and whether it is <= 300 s). Two files in $OUT, so
# they come back from a device call.
#
#   benchmarks/scripts/quickstart_sweep.sh VARIANT...      (at most 6 runs: 2 variants x 3 seeds)
#   OUT=/tmp/sweep SEEDS="0 1 2" benchmarks/scripts/quickstart_sweep.sh it60_bon8 it60_bon16
#
# Needs 2 x (variants x seeds) cores, from core FIRST_CORE (default 0) on. Why 60 iterations: most of the shipped recipe's held-out gain is
# there by iteration 60 (the evaluations at 60 of its 120-iteration runs: +0.086 / +0.063 / +0.060 in
# benchmarks/results/toy_learning.json, +0.069 / +0.102 / +0.106 in best_of_n_vs_group.json's plain
# groups, against +0.071 / +0.107 / +0.082 and +0.065 / +0.110 / +0.104 at 120), and an iteration of
# the same trajectory is the same whether the run stops at 60 or 120 (constant learning rate), so
# `it60`'s gains are those. Its time is not: 60 x ~5 s is at the 300 s limit. The it60 variants
# evaluate only the base and the final policy and save only `final`; the KL term stays (without it the
# it60_lr* variants below unlearned, and a 240-iteration run without it collapsed:
# toy_ablations_recorded.json). Variants: recipe overrides on top of the shipped recipe:
#   shipped             the recipe as it is: 120 iterations (~11 min, over the limit:
#                       benchmarks/results/toy_learning.json holds its before-number)
#   it60                60 iterations of the shipped recipe
#   it60_bon8           60 iterations, each group's 2 best and 2 worst of its 8 samples trained
#                       (best_of_n_keep [2, 2]): the same rollouts and held-out evaluation as the shipped
#                       recipe, half the update (16 of the 32 samples); 20 iterations on a shared CPU
#                       (seed 0, one thread): +0.033 against +0.058 for the shipped settings, at 0.77x
#                       their median iteration (0.71x of their CPU time)
#   it60_bon16          60 iterations, 2 contexts x 16 samples, the 4 best and 4 worst trained: the same
#                       32 rolled-out samples, half the update; best_of_n_vs_group.json measured it at
#                       +0.073 / +0.104 / +0.098 by iteration 60 (plain groups +0.069 / +0.102 / +0.106);
#                       its held-out evaluation draws 16 samples per context (twice the shipped one's)
#   it60_bon16_lr5e-3   it60_bon16 at learning rate 5e-3 (KL kept)
#   it80_bon16_lr4e-3   it60_bon16 for 80 iterations at 4e-3 (~240 s on the lent host's cores)
#   it60_bon16_ema0.9   it60_bon16 with an EMA of decay 0.9 (raw: none, the trained weights evaluated):
#   it60_bon16_raw      the training trajectory is the same, the evaluated average lags less behind it
#   it60_bon16_mu2      it60_bon16 with two PPO epochs over each rollout batch (num_iterations 2)
#   it60_bon16_noise1   it60_bon16 with SDE noise level 1.0 (1.3) instead of 0.7: more exploration
#   it60_bon16_noise1.3
#   it60_bon16_noise1_w4  noise 1.0 and 4 of the 8 denoising steps stochastic and trained (not 3)
#   it60_bon16_beta1e-3 it60_bon16 with a quarter of the KL weight (beta 0.001)
#   it60_bon16_noise1_beta1e-3  both: noise level 1.0 and beta 0.001
#   it60_bon16_beta0    it60_bon16 without the KL term (the EMA kept)
#   it60_nft16          DiffusionNFT (trainer.algorithm nft, no KL term): 60 iterations, 2 contexts x 16
#                       ODE samples by the soft-updated sampling policy, every sample trained, one
#                       forward-noised copy each at a level in [0.5, 1) (the defaults)
#   it60_nft16_lr5e-3   it60_nft16 at learning rate 5e-3
#   it100_nft16_lr5e-3  the same for 100 iterations, evaluated every 20 (recipes/toy_nsp_nft.yaml)
#   it100_nft16_lr5e-3_cosine  the same with the learning rate decayed to 0 on a cosine
#   it100_nft16_lr5e-3_draws2  it100_nft16_lr5e-3 with two forward-noised copies of each sample
#   it100_nft24_lr5e-3  it100_nft16_lr5e-3 with 24 samples per context
#   it100_nft16_lr5e-3_beta0.5  it100_nft16_lr5e-3 with nft_beta 0.5
#   it100_nft16_full_lr5e-4  it100_nft16 with full fine-tuning (no LoRA) at learning rate 5e-4
#   it140_nft16_full_lr5e-4  the same for 140 iterations
#   it60_lr6e-3         60 iterations without the KL term, constant 6e-3
#   it60_lr6e-3_linear  60 iterations without the KL term, 6e-3 decayed linearly to 0 (unlearned:
#                       benchmarks/results/quickstart_sweep.json)
#   it60_lr1e-2_linear  60 iterations without the KL term, 1e-2 decayed linearly to 0 (unlearned)
# and, for the iteration time alone (30 iterations, one held-out row: their gains mean nothing;
# ~3 minutes), the shipped settings as they are and without the KL term:
#   speed_shipped       compare with benchmarks/results/rollout_batching_quickstart.json's base
#   speed_beta0
set -euo pipefail -o noglob  # noglob: overrides such as best_of_n_keep=[2,2] stay words
cd "$(dirname "$0")/../.."
OUT=${OUT:-runs/quickstart_sweep/out}
RUNS=${RUNS:-runs/quickstart_sweep}
SEEDS=${SEEDS:-0 1 2}
PYTHON=${PYTHON:-python}
LIMIT_S=${LIMIT_S:-480}  # one run's wall-clock limit: the whole call within 8.5 minutes (10 per call, less start-up)
FIRST_CORE=${FIRST_CORE:-0}  # the first pinned core (other jobs on the host keep the cores below it)
EXTRA=${EXTRA:-}  # overrides after the variant's, e.g. a smoke test: "trainer.max_iterations=1 trainer.eval_every=1"

overrides() {
  local it60="trainer.save_steps=0 trainer.max_iterations=60 trainer.eval_every=60"
  local fast="$it60 trainer.beta=0"
  local speed="trainer.save_steps=0 trainer.max_iterations=30 trainer.eval_every=30 data.num_eval=1"
  local bon16="trainer.num_generations=16 trainer.num_prompts_per_iteration=2 trainer.best_of_n_keep=[4,4]"
  local it80="trainer.save_steps=0 trainer.max_iterations=80 trainer.eval_every=80"
  local it100="trainer.save_steps=0 trainer.max_iterations=100 trainer.eval_every=20"
  local nft16="trainer.num_generations=16 trainer.num_prompts_per_iteration=2 trainer.algorithm=nft trainer.beta=0"
  case "$1" in
    shipped) echo "" ;;
    it60) echo "$it60" ;;
    it60_bon8) echo "$it60 trainer.best_of_n_keep=[2,2]" ;;
    it60_bon16) echo "$it60 $bon16" ;;
    it60_nft16) echo "$it60 $nft16" ;;
    it60_nft16_lr5e-3) echo "$it60 $nft16 trainer.learning_rate=5e-3" ;;
    it100_nft16_lr5e-3) echo "$it100 $nft16 trainer.learning_rate=5e-3" ;;
    it100_nft16_lr5e-3_cosine) echo "$it100 $nft16 trainer.learning_rate=5e-3 trainer.lr_scheduler_type=cosine" ;;
    it100_nft16_lr5e-3_draws2) echo "$it100 $nft16 trainer.learning_rate=5e-3 trainer.nft_noise_draws=2" ;;
    it100_nft24_lr5e-3) echo "$it100 $nft16 trainer.learning_rate=5e-3 trainer.num_generations=24" ;;
    it100_nft16_lr5e-3_beta0.5) echo "$it100 $nft16 trainer.learning_rate=5e-3 trainer.nft_beta=0.5" ;;
    it100_nft16_full_lr5e-4) echo "$it100 $nft16 trainer.use_lora=false trainer.learning_rate=5e-4" ;;
    it140_nft16_full_lr5e-4) echo "$it100 $nft16 trainer.use_lora=false trainer.learning_rate=5e-4 trainer.max_iterations=140" ;;
    it60_bon16_lr5e-3) echo "$it60 $bon16 trainer.learning_rate=5e-3" ;;
    it80_bon16_lr4e-3) echo "$it80 $bon16 trainer.learning_rate=4e-3" ;;
    it60_bon16_ema0.9) echo "$it60 $bon16 trainer.ema_decay=0.9" ;;
    it60_bon16_raw) echo "$it60 $bon16 trainer.ema_decay=0" ;;
    it60_bon16_mu2) echo "$it60 $bon16 trainer.num_iterations=2" ;;
    it60_bon16_noise1) echo "$it60 $bon16 trainer.noise_level=1.0" ;;
    it60_bon16_noise1.3) echo "$it60 $bon16 trainer.noise_level=1.3" ;;
    it60_bon16_noise1_w4) echo "$it60 $bon16 trainer.noise_level=1.0 trainer.sde_window_size=4" ;;
    it60_bon16_beta1e-3) echo "$it60 $bon16 trainer.beta=0.001" ;;
    it60_bon16_noise1_beta1e-3) echo "$it60 $bon16 trainer.noise_level=1.0 trainer.beta=0.001" ;;
    it60_bon16_beta0) echo "$it60 $bon16 trainer.beta=0" ;;
    it60_lr6e-3) echo "$fast trainer.learning_rate=6e-3" ;;
    it60_lr6e-3_linear) echo "$fast trainer.learning_rate=6e-3 trainer.lr_scheduler_type=linear" ;;
    it60_lr1e-2_linear) echo "$fast trainer.learning_rate=1e-2 trainer.lr_scheduler_type=linear" ;;
    speed_shipped) echo "$speed" ;;
    speed_beta0) echo "$speed trainer.beta=0" ;;
    *)
      echo "unknown variant '$1' (shipped it60 it60_bon8 it60_bon16 it60_bon16_lr5e-3 it80_bon16_lr4e-3 it60_bon16_ema0.9" \
        "it60_bon16_raw it60_bon16_mu2 it60_bon16_noise1 it60_bon16_noise1.3 it60_bon16_noise1_w4 it60_bon16_beta1e-3" \
        "it60_bon16_noise1_beta1e-3 it60_bon16_beta0 it60_nft16 it60_nft16_lr5e-3 it100_nft16_lr5e-3" \
        "it100_nft16_lr5e-3_cosine it100_nft16_lr5e-3_draws2 it100_nft24_lr5e-3 it100_nft16_lr5e-3_beta0.5" \
        "it100_nft16_full_lr5e-4 it140_nft16_full_lr5e-4 it60_lr6e-3 it60_lr6e-3_linear" \
        "it60_lr1e-2_linear speed_shipped speed_beta0)" >&2
      return 2
      ;;
  esac
}

[ $# -ge 1 ] || { echo "usage: $0 VARIANT..." >&2; exit 2; }
for variant in "$@"; do overrides "$variant" >/dev/null; done  # every name checked before any run
FILES=$RUNS/files  # what is packed into $OUT/quickstart_sweep.tar
mkdir -p "$OUT" "$RUNS" "$FILES"
slot=0
pids=()
for variant in "$@"; do
  for seed in $SEEDS; do
    # shellcheck disable=SC2046  # the overrides are words
    CUDA_VISIBLE_DEVICES= OMP_NUM_THREADS=2 timeout "$LIMIT_S" taskset -c "$((FIRST_CORE + 2 * slot)),$((FIRST_CORE + 2 * slot + 1))" \
      "$PYTHON" benchmarks/toy_learning.py --seeds "$seed" --out-dir "$RUNS/$variant" \
      --json "$FILES/${variant}_seed${seed}.json" --overrides $(overrides "$variant") $EXTRA \
      >"$FILES/${variant}_seed${seed}.log" 2>&1 &
    pids+=($!)
    slot=$((slot + 1))
  done
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
for variant in "$@"; do
  for seed in $SEEDS; do
    cp "$RUNS/$variant/seed_$seed/metrics.jsonl" "$FILES/${variant}_seed${seed}_metrics.jsonl" 2>/dev/null || true
  done
done
"$PYTHON" - "$FILES" "$@" <<'PY'
import json, sys
from pathlib import Path

files, variants = Path(sys.argv[1]), sys.argv[2:]
summary = {}
for variant in variants:
    runs = []
    for path in sorted(files.glob(f"{variant}_seed*.json")):
        runs += json.loads(path.read_text())["runs"]
    if not runs:
        summary[variant] = {"runs": 0}
        continue
    slowest = max(r["training_seconds"] for r in runs)
    summary[variant] = {
        "runs": len(runs),
        "seeds": {
            r["seed"]: {
                "base": round(r["base"]["mean"], 4),
                "final": round(r["grpo"]["mean"], 4),
                "gain": round(r["gain"], 4),
                "evaluations": {step: round(mean, 4) for step, mean in r["evaluations"].items()},
                "iterations": r["iterations"],
                "median_iteration_seconds": round(r["median_iteration_seconds"], 3),
                "training_seconds": round(r["training_seconds"], 1),
                "wall_seconds": round(r["seconds"], 1),
            }
            for r in runs
        },
        "seeds_passing_0.10": sum(r["gain"] >= 0.10 for r in runs),
        "training_seconds_max": round(slowest, 1),
        "within_300_s": slowest <= 300,
    }
(files / "quickstart_sweep.json").write_text(json.dumps(summary, indent=1))
print(json.dumps(summary, indent=1))
PY
cp "$FILES/quickstart_sweep.json" "$OUT/" 2>/dev/null || true
tar -cf "$OUT/quickstart_sweep.tar" -C "$FILES" .
exit "$status"
