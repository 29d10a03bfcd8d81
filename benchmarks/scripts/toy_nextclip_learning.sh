#!/usr/bin/env bash
# Next-clip GRPO on the toy world: does a next-clip GRPO recipe (RECIPE, default
# recipes/toy_nextclip_grpo.yaml) raise the held-out per-clip verifiable reward over its pretrained
# base on seeds 0 1 2? One call, one GPU host (>= 12 cores): every (variant, seed) run is its own
# `benchmarks/toy_learning.py` process, all side by side on the one GPU, each pinned to CORES_PER_RUN
# CPU cores and as many threads, at most 4 (default 2; the tiny model is CPU-bound: one H200
# iteration of the previous recipe took 3.3 s with 2 cores, one on 2 CPU cores alone ~80 s).
#
#   bash benchmarks/scripts/toy_nextclip_learning.sh                       # the recipe + "video"
#   VARIANTS="recipe" bash benchmarks/scripts/toy_nextclip_learning.sh     # the recipe only
#   nextscene train recipes/toy_nextclip_deep_pretrain.yaml                # the deeper base, then:
#   RECIPE=recipes/toy_nextclip_deep_grpo.yaml VARIANTS=recipe CORES_PER_RUN=5 LIMIT=600 \
#     EXTRA="trainer.sample_every=0 trainer.save_eval_videos=0" \
#     bash benchmarks/scripts/toy_nextclip_learning.sh                     # (its 3 runs: ~6.5 min)
#
# Results go to benchmarks/results/<prefix>_learning[_<variant>].json, <prefix> the recipe's name
# without "_grpo" (toy_nextclip, toy_nextclip_deep).
#
# Variants (VARIANTS, default "recipe video"):
#   recipe  the recipe as shipped          -> benchmarks/results/<prefix>_learning.json
#   video   trainer.nextclip_groups=video  -> benchmarks/results/<prefix>_learning_video.json
#           (whole-video groups, all else equal: what the branched groups add)
#   group   trainer.scale_rewards=group    -> benchmarks/results/<prefix>_learning_group.json
#   allsde  every step stochastic and trained (timestep_selection=all)
#                                          -> benchmarks/results/<prefix>_learning_allsde.json
#   full    full fine-tuning (use_lora=false) at 5e-4 -> ..._full.json
#   full_beta0  the same without the KL term          -> ..._full_beta0.json
#   loraff  LoRA rank 32 on attention and feed-forward -> ..._loraff.json
#   seen    the trained reward scores seen balls only (seen_only: an empty video earns nothing)
#                                          -> ..._seen.json
#   nft     DiffusionNFT instead of PPO (trainer.algorithm nft, no KL term, lr NFT_LR or 5e-3; each
#           clip noised at its own level under its clean history, weighted by its clip's advantage)
#                                          -> ..._nft.json
#   nft_video   nft with whole-video groups -> ..._nft_video.json
#   nft_seen    nft with the seen_only trained reward -> ..._nft_seen.json
# EXTRA: overrides for every run (a dry run: EXTRA="trainer.max_iterations=1 trainer.eval_every=1").
# A run longer than LIMIT seconds (default 470) is stopped and its variant is not merged. The merged
# JSONs, each run's log, metrics.jsonl and held-out scores (one tar) are copied to $OUT. On a host
# with fewer than CORES_PER_RUN cores per run, every run shares all cores.
set -euo pipefail

RUNS=$(realpath -m "${RUNS:-runs}")
OUT=${OUT:-$RUNS/out}
LIMIT=${LIMIT:-470}
VARIANTS=${VARIANTS:-recipe video}
EXTRA=${EXTRA:-}
mkdir -p "$RUNS" "$OUT"
export PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
recipe=${RECIPE:-recipes/toy_nextclip_grpo.yaml}
prefix=$(basename "$recipe" .yaml)
prefix=${prefix%_grpo}
per_run=${CORES_PER_RUN:-2}
if ! [[ $per_run =~ ^[1-9][0-9]*$ ]]; then
  echo "CORES_PER_RUN=$per_run: expected a positive number of CPU cores per run, e.g. 2" >&2
  exit 2
fi
threads=$((per_run > 4 ? 4 : per_run))  # OMP_NUM_THREADS of a run: its cores, at most 4
# the recipe's base, with EXTRA applied (EXTRA may point policy.path elsewhere)
# shellcheck disable=SC2086
base=$(python -c "import sys; from grpo.recipe import load_recipe as load
print(load(sys.argv[1], sys.argv[2:]).policy.get('path') or '')" "$recipe" $EXTRA)
if [[ -n $base && ! -d $base ]]; then
  echo "$recipe starts from $base, which does not exist: train its base first (see the recipe's header)" >&2
  exit 2
fi

nft="trainer.algorithm=nft trainer.beta=0 trainer.learning_rate=${NFT_LR:-5e-3}"
overrides() {  # the recipe overrides of a variant, then EXTRA
  echo -n "$EXTRA "
  case $1 in
  recipe) ;;
  video) echo trainer.nextclip_groups=video ;;
  group) echo trainer.scale_rewards=group ;;
  allsde) echo trainer.timestep_selection=all ;;
  full) echo trainer.use_lora=false trainer.learning_rate=5e-4 ;;
  full_beta0) echo trainer.use_lora=false trainer.learning_rate=5e-4 trainer.beta=0 ;;
  loraff) echo "trainer.lora_target_modules=[to_q,to_k,to_v,to_out.0,ff.net.0.proj,ff.net.2]" \
    trainer.lora_rank=32 trainer.lora_alpha=64 ;;
  seen) echo rewards.0.kwargs.seen_only=true ;;
  nft) echo "$nft" ;;
  nft_video) echo "$nft" trainer.nextclip_groups=video ;;
  nft_seen) echo "$nft" rewards.0.kwargs.seen_only=true ;;
  *) echo "unknown variant $1 (recipe, video, group, allsde, full, full_beta0, loraff, seen, nft, nft_video," \
    "nft_seen)" >&2; exit 2 ;;
  esac
}

for variant in $VARIANTS; do overrides "$variant" >/dev/null; done  # unknown names stop here
slot=0
pids=()
for variant in $VARIANTS; do
  read -ra extra <<<"$(overrides "$variant")"
  for seed in 0 1 2; do
    cores=$((per_run * slot))-$((per_run * slot + per_run - 1))
    [[ $(nproc) -ge $((per_run * slot + per_run)) ]] || cores=0-$(($(nproc) - 1))
    OMP_NUM_THREADS=$threads timeout "$LIMIT" taskset -c "$cores" \
      python benchmarks/toy_learning.py \
      --recipe "$recipe" --seeds "$seed" --out-dir "$RUNS/${prefix}_$variant" \
      --json "$RUNS/${prefix}_${variant}_seed$seed.json" --overrides "${extra[@]}" \
      >"$RUNS/${prefix}_${variant}_seed$seed.log" 2>&1 &
    pids+=($!)
    slot=$((slot + 1))
  done
done
start=$SECONDS
for pid in "${pids[@]}"; do wait "$pid" || true; done
echo "all runs ended after $((SECONDS - start)) s"

for variant in $VARIANTS; do
  read -ra extra <<<"$(overrides "$variant")"
  json=benchmarks/results/${prefix}_learning.json
  [[ $variant == recipe ]] || json=benchmarks/results/${prefix}_learning_$variant.json
  if ls "$RUNS/${prefix}_$variant"/seed_{0,1,2}/final >/dev/null 2>&1; then
    python benchmarks/toy_learning.py --recipe "$recipe" --seeds 0 1 2 --reuse \
      --out-dir "$RUNS/${prefix}_$variant" --json "$json" --overrides "${extra[@]}"
    cp "$json" "$OUT/"
  else
    echo "variant $variant: not every seed finished within $LIMIT s; see its logs" >&2
    tail -n 5 "$RUNS/${prefix}_${variant}"_seed*.log >&2
  fi
done
# logs, metrics and held-out scores only (checkpoints and videos stay: the tar must stay small to come back)
# (this call's variants only: not the base's folder, nor another recipe's runs under the same prefix)
(
  cd "$RUNS"
  shopt -s nullglob
  ran=()
  for variant in $VARIANTS; do ran+=("${prefix}_$variant" "${prefix}_${variant}"_seed*); done
  find "${ran[@]}" \( -name '*.log' -o -name '*.json*' \) -print0 2>/dev/null |
    tar -czf "$OUT/${prefix}_runs.tgz" --null -T -
)
