"""`nextscene rollout`: sample G videos per prompt with an LTX policy, write MP4s and per-step log-probs.

Without ``--checkpoint`` it builds the tiny random LTX-Video checkpoint (diffusers layout) in the
output directory first, so the command runs anywhere in seconds and exercises the same loading
path a real checkpoint takes.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from policies.errors import InputError
from policies.files import check_output_dir


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "rollout",
        help="sample videos with per-step log-probs from an LTX-Video policy",
        description=__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="diffusers-format LTX-Video directory (default: build a tiny random one)",
    )
    parser.add_argument(
        "--prompt",
        action="append",
        default=None,
        help="prompt text (repeat for several; default: two toy-world prompts)",
    )
    parser.add_argument("--num-generations", type=int, default=4, help="videos per prompt (the GRPO group)")
    parser.add_argument("--out", type=Path, default=Path("runs/rollout"), help="output directory")
    parser.add_argument("--frames", type=int, default=9, help="frames per video (8k+1)")
    parser.add_argument("--height", type=int, default=32, help="height in pixels")
    parser.add_argument("--width", type=int, default=32, help="width in pixels")
    parser.add_argument("--steps", type=int, default=8, help="denoising steps")
    parser.add_argument("--kind", default="sde", help="stochastic step: sde | cps | dance | ode")
    parser.add_argument("--noise-level", type=float, default=0.7, help="noise of the stochastic steps")
    parser.add_argument("--guidance-scale", type=float, default=1.0, help="CFG scale (<= 1: off)")
    parser.add_argument(
        "--fps", type=float, default=8.0, help="frame rate sampled at (temporal RoPE) and of the MP4s"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the first video (others follow)")
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from grpo.data.video import write_video
    from grpo.train import LTXPolicySpec, build_policy
    from policies import SamplingConfig
    from policies.ltx import latent_shape, vae_compression
    from policies.tiny import TinyLTXSpec

    # every cheap check first: nothing is loaded or written before the arguments are known to work
    sampling = SamplingConfig(
        num_frames=args.frames,
        height=args.height,
        width=args.width,
        frame_rate=args.fps,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        kind=args.kind,
        noise_level=args.noise_level,
    )
    if args.num_generations < 1:
        raise InputError(f"--num-generations must be >= 1, got {args.num_generations}")
    check_output_dir(args.out, "--out")
    prompts = args.prompt or [
        "the red ball rolls right and hits the blue ball",
        "a green ball falls and bounces",
    ]

    if args.checkpoint is not None:
        latent_shape(sampling.num_frames, sampling.height, sampling.width, *vae_compression(args.checkpoint))
    else:
        latent_shape(sampling.num_frames, sampling.height, sampling.width, *TinyLTXSpec().vae_compression)

    policy = build_policy(
        LTXPolicySpec(path=args.checkpoint and str(args.checkpoint), tiny=True, device=args.device), args.out
    )

    start = time.perf_counter()
    condition = policy.encode_prompt(prompts, negative_prompt="" if sampling.guidance_scale > 1 else None)
    seeds = [args.seed + i for i in range(len(prompts) * args.num_generations)]
    rollout = policy.rollout(condition, num_generations=args.num_generations, sampling=sampling, seeds=seeds)
    videos = policy.decode(rollout.final_latents, rollout.latent_shape)
    elapsed = time.perf_counter() - start

    args.out.mkdir(parents=True, exist_ok=True)
    rollout.to("cpu").save(args.out / "rollout")
    summary = []
    for b, video in enumerate(videos):
        row = b // args.num_generations
        path = write_video(
            args.out / "videos" / f"prompt{row:02d}_gen{b % args.num_generations:02d}.mp4",
            video.cpu(),
            args.fps,
        )
        log_probs = rollout.log_probs[b].tolist()
        summary.append(
            {
                "video": str(path.relative_to(args.out)),
                "prompt": prompts[row],
                "seed": seeds[b],
                "log_prob_per_step": log_probs,
                "log_prob_total": sum(log_probs),
            }
        )
    (args.out / "samples.json").write_text(json.dumps(summary, indent=2))

    print(
        f"{len(videos)} videos ({len(prompts)} prompts x {args.num_generations}) in {elapsed:.2f}s; "
        f"stochastic steps {rollout.step_indices.tolist()} of {sampling.num_inference_steps} "
        f"({sampling.kind})"
    )
    print(f"{'video':<34} {'seed':>6} {'sum log-prob':>13}")
    for row in summary:
        print(f"{row['video']:<34} {row['seed']:>6} {row['log_prob_total']:>13.4f}")
    print(
        f"wrote {args.out}/videos/*.mp4, {args.out}/samples.json, {args.out}/rollout/ (recomputable record)"
    )
    return 0
