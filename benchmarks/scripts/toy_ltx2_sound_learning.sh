#!/usr/bin/env bash
# Toy LTX-2 with sound: does GRPO raise the held-out verifiable (video) reward and the audio reward?
# (recipes/toy_ltx2_pretrain.yaml, then recipes/toy_ltx2_grpo.yaml for seeds 0 1 2.)
#
# Every training process is pinned to 2 CPU cores (taskset, OMP_NUM_THREADS=2, no GPU visible), so the
# numbers are "2 CPU cores" even on a larger host; on a host with >= 8 cores the phases run what they can
# side by side. Run from the repository root, one phase per call (each ends well inside 10 minutes):
#
#   bash benchmarks/scripts/toy_ltx2_sound_learning.sh phase=base      # the fitted tiny LTX-2
#   bash benchmarks/scripts/toy_ltx2_sound_learning.sh phase=pretrain  # image-to-audio+video pretraining
#   bash benchmarks/scripts/toy_ltx2_sound_learning.sh phase=grpo      # GRPO, 3 seeds side by side
#
# base: the tiny LTX-2 the pretraining recipe builds (TinyLTX2Spec.toy_world with the recipe's
#   policy.tiny_vae_fit_steps and policy.tiny_audio_fit_steps), its video VAE fit and its audio VAE +
#   vocoder fit run side by side (4 cores each; every component is seeded on its own, so the weights are
#   those of grpo.toy_checkpoints.build_fitted_tiny_ltx2 at the same thread count, checked bitwise at
#   2 + 2 steps). This is preparation, not the measured learning. On 2 heavily shared cores of this
#   project's CPU box the video VAE fit took ~200 s and the audio fit (300 + 150 steps) ~9 min: expect
#   ~5 min here.
# pretrain: `nextscene train recipes/toy_ltx2_pretrain.yaml` on 2 cores, from base (its 800 steps took
#   266 s on 2 idle cores; ~5 min with start-up and evaluations).
# grpo: `benchmarks/toy_learning.py --recipe recipes/toy_ltx2_grpo.yaml`, one process per seed (seed s on
#   cores 2s, 2s+1; ~5.5 min each on 2 idle cores), then the same with --reuse to merge the seeds into
#   benchmarks/results/toy_ltx2_learning.json (toyworld_verifiable) and toy_ltx2_learning_audio.json
#   (toyworld_audio). Merged runs report each run's logged training time (first to last metrics record);
#   the per-seed JSONs copied to $OUT keep the wall time including start-up.
#
# Each phase writes what the next one needs as one tar in $OUT (default: $RUNS/out). If the machine was
# given back between phases, put that tar under runs/ of the next call's checkout (device calls: carry it)
# and the phase unpacks it: runs/toy_ltx2_base.tar for pretrain, runs/toy_ltx2_pretrain_final.tar for grpo.
# RUNS (default runs, git-ignored) holds the runs; the GRPO recipe reads runs/toy_ltx2_pretrain/final.
set -euo pipefail

phase=${1:-}
phase=${phase#phase=}
RUNS=$(realpath -m "${RUNS:-runs}")
OUT=${OUT:-$RUNS/out}
mkdir -p "$RUNS" "$OUT"
export CUDA_VISIBLE_DEVICES= PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
base=$RUNS/toy_ltx2_pretrain/base_tiny_ltx2
final=$RUNS/toy_ltx2_pretrain/final
cores=$(nproc)

pin() {  # pin CORES CMD...: run CMD on the given cores with as many OpenMP threads
  local list=$1 threads
  shift
  threads=$(taskset -c "$list" nproc)
  OMP_NUM_THREADS=$threads taskset -c "$list" "$@"
}

unpack() {  # unpack DIR TAR: restore DIR from TAR (written by an earlier phase) if DIR is missing
  if [[ ! -f $1/model_index.json ]]; then
    [[ -f $2 ]] || { echo "missing $1: run the previous phase first, or put its tar at $2" >&2; exit 2; }
    mkdir -p "$(dirname "$1")"
    tar -xf "$2" -C "$(dirname "$1")"
  fi
}

case $phase in
base)
  [[ -f $base/model_index.json ]] && { echo "$base exists; remove it to build again" >&2; exit 2; }
  [[ $cores -ge 8 ]] && video_cores=0-3 audio_cores=4-7 || video_cores=0-1 audio_cores=0-1
  spec="
import dataclasses, yaml
from policies.tiny_ltx2 import TinyLTX2Spec
policy = yaml.safe_load(open('recipes/toy_ltx2_pretrain.yaml'))['policy']
spec = TinyLTX2Spec.toy_world(
    vae_fit_steps=policy.get('tiny_vae_fit_steps', 0), audio_fit_steps=policy.get('tiny_audio_fit_steps', 0)
)"
  start=$SECONDS
  pin $video_cores python -c "$spec
from grpo.toy_checkpoints import build_fitted_tiny_ltx2
build_fitted_tiny_ltx2('$base', dataclasses.replace(spec, audio_fit_steps=0))" >"$RUNS/base_video.log" 2>&1 &
  video=$!
  pin $audio_cores python -c "$spec
from grpo.toy_checkpoints import fit_tiny_ltx2_audio
from policies.tiny_ltx2 import build_tiny_ltx2
path = build_tiny_ltx2('$RUNS/base_audio', dataclasses.replace(spec, vae_fit_steps=0, audio_fit_steps=0))
fit_tiny_ltx2_audio(path, spec.audio_fit_steps, spec.seed)" >"$RUNS/base_audio.log" 2>&1 &
  audio=$!
  wait $video && wait $audio || { tail -n 20 "$RUNS"/base_*.log >&2; exit 1; }
  for part in audio_vae vocoder; do
    rm -r "${base:?}/$part" && mv "$RUNS/base_audio/$part" "$base/$part"
  done
  rm -r "$RUNS/base_audio"
  python -c "$spec
import json
open('$base/tiny_spec.json', 'w').write(json.dumps(dataclasses.asdict(spec), indent=2))"
  echo "base built in $((SECONDS - start)) s"
  tail -n 3 "$RUNS"/base_*.log
  tar -cf "$OUT/toy_ltx2_base.tar" -C "$(dirname "$base")" base_tiny_ltx2
  ;;
pretrain)
  unpack "$base" "$RUNS/toy_ltx2_base.tar"
  start=$SECONDS
  pin 0-1 python -m grpo.cli train recipes/toy_ltx2_pretrain.yaml \
    "trainer.output_dir=$RUNS/toy_ltx2_pretrain" 2>&1 | tee "$OUT/toy_ltx2_pretrain.log"
  echo "pretrain took $((SECONDS - start)) s on 2 cores"
  cp "$RUNS/toy_ltx2_pretrain/metrics.jsonl" "$OUT/toy_ltx2_pretrain_metrics.jsonl"
  tar -cf "$OUT/toy_ltx2_pretrain_final.tar" -C "$(dirname "$final")" final
  ;;
grpo)
  unpack "$final" "$RUNS/toy_ltx2_pretrain_final.tar"
  learning=(python benchmarks/toy_learning.py --recipe recipes/toy_ltx2_grpo.yaml
    --out-dir "$RUNS/toy_ltx2_grpo" --overrides "policy.path=$final")
  pids=()
  for seed in 0 1 2; do  # side by side on 6 cores; one after another on 0-1 on a smaller host
    [[ $cores -ge 6 ]] && list=$((2 * seed))-$((2 * seed + 1)) || list=0-1
    pin $list "${learning[@]}" --seeds $seed --json "$OUT/toy_ltx2_learning_seed$seed.json" \
      >"$RUNS/toy_ltx2_grpo_seed$seed.log" 2>&1 &
    if [[ $cores -ge 6 ]]; then pids+=($!); else wait $! || pids+=(failed); fi
  done
  for pid in "${pids[@]}"; do
    [[ $pid != failed ]] && wait "$pid" || { tail -n 20 "$RUNS"/toy_ltx2_grpo_seed*.log >&2; exit 1; }
  done
  for reward_suffix in toyworld_verifiable: toyworld_audio:_audio; do
    json=benchmarks/results/toy_ltx2_learning${reward_suffix#*:}.json
    "${learning[@]}" --seeds 0 1 2 --reuse --reward "${reward_suffix%%:*}" --json "$json"
    cp "$json" "$OUT/"
  done
  ;;
*)
  echo "usage: $0 phase=base|pretrain|grpo" >&2
  exit 2
  ;;
esac
