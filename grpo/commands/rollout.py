"""`nextscene rollout`: sample G videos per prompt with an LTX policy, write MP4s and per-step log-probs.

The checkpoint's ``model_index.json`` picks the family: ``LTX2Pipeline`` (LTX-2 / LTX-2.3, audio +
video: `LTX2Policy`) or LTX-Video 0.9 (`LTXPolicy`). Without ``--checkpoint`` it builds the tiny
random LTX-Video checkpoint (diffusers layout) in the output directory first, so the command runs
anywhere in seconds and exercises the same loading path a real checkpoint takes.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import fields
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import torch

from grpo.train import LTX2PolicySpec, LTXPolicySpec, build_policy
from policies import SamplingConfig
from policies.errors import InputError
from policies.files import check_output_dir
from policies.ltx import latent_shape, vae_compression
from policies.ltx2 import (
    LTX2_ONLY_FIELDS,
    MODALITIES,
    LTX2SamplingConfig,
    check_ltx2_checkpoint,
    checkpoint_family,
)
from policies.tiny import TinyLTXSpec
from policies.video_io import write_video


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "rollout",
        help="sample videos with per-step log-probs from an LTX-Video or LTX-2 policy",
        description=__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="diffusers-format LTX-Video or LTX-2 directory, told apart by its model_index.json "
        "(default: build a tiny random LTX-Video one)",
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
    parser.add_argument(
        "--height", type=int, default=32, help="height in pixels (LTX-2: >= 2 latent cells, 64)"
    )
    parser.add_argument(
        "--width", type=int, default=32, help="width in pixels (LTX-2: >= 2 latent cells, 64)"
    )
    parser.add_argument("--steps", type=int, default=8, help="denoising steps")
    parser.add_argument("--kind", default="sde", help="stochastic step: sde | cps | dance | ode")
    parser.add_argument("--noise-level", type=float, default=0.7, help="noise of the stochastic steps")
    parser.add_argument(
        "--guidance-scale", type=float, default=1.0, help="CFG scale (<= 1: off; LTX-2: the video's)"
    )
    parser.add_argument(
        "--fps",
        type=float,
        default=8.0,
        help="frame rate sampled at (temporal RoPE; LTX-2: also sets the audio's length) and of the MP4s; "
        "LTX2Pipeline's default is 24",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the first video (others follow)")
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device"
    )
    _add_ltx2_options(parser)
    parser.set_defaults(func=run)


def _add_ltx2_options(parser: argparse.ArgumentParser) -> None:
    """One option per `LTX2SamplingConfig` field beyond `SamplingConfig` (``--modalities``, STG,
    modality guidance, rescale and the ``audio_*`` scales), with the field's own help and default.
    Left unset they are absent from the namespace, so giving one for an LTX-Video checkpoint is an
    error rather than silently ignored."""
    group = parser.add_argument_group(
        "LTX-2 (audio + video) checkpoints only",
        "LTX2Pipeline's modalities and guidance (names as in LTX2SamplingConfig)",
    )
    hints = get_type_hints(LTX2SamplingConfig)
    for f in fields(LTX2SamplingConfig):
        if f.name not in LTX2_ONLY_FIELDS:
            continue
        kinds = get_args(hints[f.name]) or (hints[f.name],)
        if any(get_origin(kind) is list for kind in kinds):
            kwargs: dict[str, Any] = {"nargs": "+", "type": int, "metavar": "BLOCK"}
        elif str in kinds:
            kwargs = {"metavar": "{" + ",".join(MODALITIES) + "}"}
        else:
            kwargs = {"type": float}
        default = "the video one" if f.name.startswith("audio_") else f.default
        if default is None:
            default = "none"
        group.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            default=argparse.SUPPRESS,
            help=f"{f.metadata['help'].rstrip('.')} (default: {default})",
            **kwargs,
        )


def run(args: argparse.Namespace) -> int:
    # every cheap check first: nothing is loaded or written before the arguments are known to work
    if args.checkpoint is not None and not args.checkpoint.is_dir():
        raise InputError(f"--checkpoint: checkpoint directory {str(args.checkpoint)!r} does not exist")
    family = checkpoint_family(args.checkpoint) if args.checkpoint is not None else "ltx"
    ltx2_options = {name: getattr(args, name) for name in LTX2_ONLY_FIELDS if hasattr(args, name)}
    if family == "ltx" and ltx2_options:
        given = ", ".join("--" + name.replace("_", "-") for name in ltx2_options)
        which = "--checkpoint" if args.checkpoint is not None else "the default tiny checkpoint"
        raise InputError(
            f"{given}: only for LTX-2 checkpoints (model_index.json _class_name LTX2Pipeline), and "
            f"{which} is LTX-Video: drop the option(s) or give an LTX-2 --checkpoint"
        )
    config = LTX2SamplingConfig if family == "ltx2" else SamplingConfig
    sampling = config(
        num_frames=args.frames,
        height=args.height,
        width=args.width,
        frame_rate=args.fps,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        kind=args.kind,
        noise_level=args.noise_level,
        **ltx2_options,
    )
    if args.num_generations < 1:
        raise InputError(f"--num-generations must be >= 1, got {args.num_generations}")
    check_output_dir(args.out, "--out")
    prompts = args.prompt or [
        "the red ball rolls right and hits the blue ball",
        "a green ball falls and bounces",
    ]

    if family == "ltx2":
        check_ltx2_checkpoint(args.checkpoint, sampling, modalities_option="--modalities")
        spec = LTX2PolicySpec(path=str(args.checkpoint), device=args.device)
        uses_cfg = max(sampling.guidance().cfg) > 1
    else:
        compression = vae_compression(args.checkpoint) if args.checkpoint else TinyLTXSpec().vae_compression
        latent_shape(sampling.num_frames, sampling.height, sampling.width, *compression)
        spec = LTXPolicySpec(path=args.checkpoint and str(args.checkpoint), tiny=True, device=args.device)
        uses_cfg = sampling.guidance_scale > 1

    policy = build_policy(spec, args.out)

    start = time.perf_counter()
    condition = policy.encode_prompt(prompts, negative_prompt="" if uses_cfg else None)
    seeds = [args.seed + i for i in range(len(prompts) * args.num_generations)]
    rollout = policy.rollout(condition, num_generations=args.num_generations, sampling=sampling, seeds=seeds)
    videos = policy.decode(rollout.final_latents, rollout.latent_shape)
    # the generated sound of an audio_video rollout (None for LTX-Video and LTX-2 `video` rollouts)
    sound = policy.rollout_audio(rollout) if family == "ltx2" else None
    elapsed = time.perf_counter() - start

    args.out.mkdir(parents=True, exist_ok=True)
    rollout = rollout.to("cpu")
    rollout.save(args.out / "rollout")
    summary = []
    for b, video in enumerate(videos):
        row = b // args.num_generations
        path = write_video(
            args.out / "videos" / f"prompt{row:02d}_gen{b % args.num_generations:02d}.mp4",
            video.cpu(),
            args.fps,
            **({} if sound is None else {"audio": sound[0][b], "sample_rate": sound[1]}),
        )
        log_probs = rollout.log_probs[b].tolist()
        sample = {
            "video": str(path.relative_to(args.out)),
            "prompt": prompts[row],
            "seed": seeds[b],
            "log_prob_per_step": log_probs,
            "log_prob_total": sum(log_probs),
        }
        if rollout.part_log_probs:
            sample["log_prob_per_step_by_modality"] = {
                name: values[b].tolist() for name, values in rollout.part_log_probs.items()
            }
        summary.append(sample)
    (args.out / "samples.json").write_text(json.dumps(summary, indent=2))

    modalities = f", modalities {sampling.modalities}" if family == "ltx2" else ""
    print(
        f"{len(videos)} videos ({len(prompts)} prompts x {args.num_generations}) in {elapsed:.2f}s; "
        f"stochastic steps {rollout.step_indices.tolist()} of {sampling.num_inference_steps} "
        f"({sampling.kind}{modalities})"
    )
    parts = list(rollout.part_log_probs)
    print(
        f"{'video':<34} {'seed':>6} {'sum log-prob':>13}" + "".join(f" {'sum ' + name:>13}" for name in parts)
    )
    for b, row in enumerate(summary):
        by_part = "".join(f" {rollout.part_log_probs[name][b].sum().item():>13.4f}" for name in parts)
        print(f"{row['video']:<34} {row['seed']:>6} {row['log_prob_total']:>13.4f}{by_part}")
    audio = f" (with sound, {sound[1]} Hz)" if sound is not None else ""
    print(
        f"wrote {args.out}/videos/*.mp4{audio}, {args.out}/samples.json, "
        f"{args.out}/rollout/ (recomputable record)"
    )
    return 0
