"""What the clean-history key/value cache saves in a next-clip rollout (`NextClipPolicy.rollout`).

One rollout of ``--clips`` generated clips after ``--context`` clips, ``--steps`` denoising steps a
clip, G = ``--batch`` videos, with the cache (history keys/values computed once per clip and reused
at every step) and without it (every step re-runs the whole history under the clip-causal mask).
Both give the same videos and log-probs (the max abs difference is printed). Counted, not timed:
transformer forwards, tokens through the transformer, and FLOPs (`torch.utils.flop_counter`:
matmuls and attention); wall-clock seconds are printed too (after a warm-up run) but depend on the
machine's load.

    python benchmarks/nextclip_cache.py                         # tiny model, 32 px, CPU
    python benchmarks/nextclip_cache.py --clips 8 --json benchmarks/results/nextclip_cache_8clips.json
    python benchmarks/nextclip_cache.py --checkpoint runs/toy_nextclip_pretrain/final --clips 8

Prints a table and writes JSON (``--json``, default benchmarks/results/nextclip_cache.json).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from policies import NextClipPolicy, SamplingConfig
from policies.nextclip_tiny import build_tiny_nextclip


def measure(
    policy: NextClipPolicy, condition: dict, sampling: SamplingConfig, batch: int, cache: bool
) -> dict:
    tokens: list[int] = []
    handle = policy.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: tokens.append(kwargs["hidden_states"].shape[1]), with_kwargs=True
    )
    seeds = list(range(batch))
    try:
        policy.rollout(condition, num_generations=batch, sampling=sampling, seeds=seeds, use_cache=cache)
        tokens.clear()
        tick = time.perf_counter()
        rollout = policy.rollout(
            condition, num_generations=batch, sampling=sampling, seeds=seeds, use_cache=cache
        )
        seconds = time.perf_counter() - tick
        forwards, through = len(tokens), sum(tokens)
        with FlopCounterMode(display=False) as counter:
            policy.rollout(condition, num_generations=batch, sampling=sampling, seeds=seeds, use_cache=cache)
    finally:
        handle.remove()
    return {
        "forwards": forwards,
        "tokens": through,
        "gflops": counter.get_total_flops() / 1e9,
        "seconds": seconds,
        "rollout": rollout,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, help="next-clip / LTX-Video directory (default: tiny)")
    parser.add_argument("--context", type=int, default=1, help="context clips")
    parser.add_argument("--clips", type=int, default=4, help="generated clips")
    parser.add_argument("--steps", type=int, default=8, help="denoising steps a clip")
    parser.add_argument("--batch", type=int, default=4, help="videos (G)")
    parser.add_argument("--size", type=int, default=32, help="frame height and width")
    parser.add_argument(
        "--json", type=Path, default=Path(__file__).parent / "results" / "nextclip_cache.json"
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        path = args.checkpoint or build_tiny_nextclip(Path(tmp) / "tiny")
        policy = NextClipPolicy.from_pretrained(path)
    frames = policy.clip_config.clip_frames
    context = torch.rand(
        1, args.context * frames, args.size, args.size, 3, generator=torch.Generator().manual_seed(0)
    )
    condition = policy.prepare_condition([{"context": context[0]}])
    sampling = SamplingConfig(
        num_frames=args.clips * frames, height=args.size, width=args.size, num_inference_steps=args.steps
    )
    results = {
        name: measure(policy, condition, sampling, args.batch, name == "cached")
        for name in ("cached", "uncached")
    }
    cached, uncached = results["cached"].pop("rollout"), results["uncached"].pop("rollout")
    diff = max(
        float((cached.final_latents - uncached.final_latents).abs().max()),
        float((cached.log_probs - uncached.log_probs).abs().max()),
    )
    print(f"{args.context} context + {args.clips} clips, {args.steps} steps, G={args.batch}, {args.size} px")
    print(f"{'':10}{'forwards':>10}{'tokens':>10}{'GFLOP':>10}{'seconds':>10}")
    for name, r in results.items():
        print(f"{name:10}{r['forwards']:>10}{r['tokens']:>10}{r['gflops']:>10.3f}{r['seconds']:>10.3f}")
    ratio = results["uncached"]["gflops"] / results["cached"]["gflops"]
    print(f"FLOPs saved by the cache: {ratio:.2f}x; max |cached - uncached| = {diff:.2e}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    summary = {
        "command": "python benchmarks/nextclip_cache.py " + " ".join(sys.argv[1:]),
        "settings": {k: str(v) for k, v in vars(args).items() if k != "json"},
        "results": results,
        "flops_saved_ratio": round(ratio, 2),
        "max_abs_diff": diff,
    }
    args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
