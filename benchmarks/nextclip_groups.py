"""What a next-clip GRPO group compares: whole-video vs branched groups, all-SDE vs an early SDE window.

Two measurements on the base policy (``checkpoints/toy_nextclip``), CPU-cheap, no training:

``spread``: rolls out ``--contexts`` training contexts x G 8 with the recipe's sampler (6 steps, SDE
noise 1.0) in four settings (whole videos / branched, all steps / steps 0-2 stochastic), scores every
clip with the dense per-clip verifiable reward and reports per clip the mean, the within-cell std
(spread among the G samples of a context), the between-context std, the share of near-tied cells and
the within-group R^2 of a sample's clip k score on its clip k-1 score.

``gradients``: builds the GRPO trainer of ``recipes/toy_nextclip_grpo.yaml`` (with ``--overrides``,
beta 0) and for ``--batches`` iterations rolls out and scores a batch, then computes every (sample,
clip) term ``sum_steps grad log p`` of the LoRA parameters at their initialisation. The on-policy GRPO
gradient of a batch is ``sum A * term`` with the per-clip advantages under group or batch std
scaling; the cosine between the gradients of independent batches says how much the batches agree
on the direction to move (signal), whatever the learning rate.

``floors``: on the recipe's held-out contexts, the thresholded per-clip verifiable reward (what
held-out evaluation reports) of videos that need no model: the true continuation, the same through
the policy's VAE, a blank one (the context's median colour everywhere: every ball "gone"), the
context's last frame frozen; and of the base's held-out samples (the evaluation's ODE sampler,
``--generations`` a context, of ``--policy``, default ``checkpoints/toy_nextclip``). Where the base
stands between blank and true says what GRPO can gain without learning to draw the balls.
``base_true_history``: the base's clips 1, 2, ... each sampled after the true clips before it (clip
0 is the base's own): how much its later clips lose to its own history (exposure bias).

    python benchmarks/nextclip_groups.py floors --json runs/floors.json
    python benchmarks/nextclip_groups.py floors --policy runs/toy_nextclip_pretrain/final --json runs/f.json
    python benchmarks/nextclip_groups.py spread --contexts 12 --json runs/groups_spread.json
    python benchmarks/nextclip_groups.py gradients --name branch_win3 --batches 3 --json runs/g.json \
        --overrides trainer.nextclip_groups=branch trainer.timestep_selection=window \
        trainer.sde_window_start=0 trainer.sde_window_size=3
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from grpo.advantages import compute_advantages
from grpo.recipe import load_recipe
from grpo.schema import build_rewards
from grpo.train import ToyWorldClipsDataSpec, build_datasets, build_policy, validate
from grpo.trainer import GRPOTrainer
from policies import NextClipPolicy, SamplingConfig
from policies.seeding import derived_seed
from rewards.verifiable import ToyWorldVerifiableReward

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "toy_nextclip_grpo.yaml"
SETTINGS = {  # name: (branched groups, stochastic steps; None = all)
    "video_all": (False, None),
    "branch_all": (True, None),
    "video_win3": (False, [0, 1, 2]),
    "branch_win3": (True, [0, 1, 2]),
}


def spread(args: argparse.Namespace) -> dict:
    """Per-clip reward statistics of the base's rollouts in every setting of `SETTINGS`."""
    generations = 8
    train, _ = build_datasets(ToyWorldClipsDataSpec())
    policy = NextClipPolicy.from_pretrained(REPO / "checkpoints" / "toy_nextclip")
    dense = ToyWorldVerifiableReward(per_clip=True, dense=True)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(derived_seed(0, 0)))
    out = {}
    for name, (branch, steps) in SETTINGS.items():
        sampling = SamplingConfig(
            num_frames=27, height=32, width=32, num_inference_steps=6, kind="sde", noise_level=1.0,
            sde_steps=steps,
        )  # fmt: skip
        tick = time.perf_counter()
        scores = []
        for g, index in enumerate(order[: args.contexts].tolist()):
            row = train[index]
            condition = policy.prepare_condition([{"context": row["context"]}])
            seeds = [derived_seed(0, 1, g * generations + i) for i in range(generations)]
            rollout = policy.rollout(
                condition, num_generations=generations, sampling=sampling, seeds=seeds, branch=branch
            )
            videos = policy.decode(rollout.final_latents, rollout.latent_shape)
            scores += [dense.score_clips(v, row["world"], 9) for v in videos]
        table = np.array(scores).reshape(args.contexts, generations, 3)
        centred = table - table.mean(1, keepdims=True)
        r2 = [
            float(np.corrcoef(centred[:, :, k - 1].ravel(), centred[:, :, k].ravel())[0, 1] ** 2)
            for k in (1, 2)
        ]
        out[name] = {
            "seconds": time.perf_counter() - tick,
            "per_clip_mean": table.mean((0, 1)).round(4).tolist(),
            "within_cell_std": table.std(1).mean(0).round(4).tolist(),
            "between_group_std": table.mean(1).std(0).round(4).tolist(),
            "r2_clip_k_on_k-1_within_group": np.round(r2, 3).tolist(),
            "near_ties": float(((table.max(1) - table.min(1)) < 0.01).mean()),
        }
        print(name, json.dumps(out[name]), flush=True)
    return out


def gradients(args: argparse.Namespace) -> dict:
    """Cosines between the on-policy GRPO gradients of ``args.batches`` independent batches."""
    recipe = load_recipe(RECIPE, [f"trainer.output_dir={args.output_dir}", "trainer.beta=0", *args.overrides])
    policy_spec, data_spec = validate(recipe)
    train, _ = build_datasets(data_spec)
    trainer = GRPOTrainer(
        build_policy(policy_spec, Path(recipe.args.output_dir)),
        build_rewards(recipe.rewards),
        recipe.args,
        train,
    )
    params = [p for p in trainer.policy.transformer.parameters() if p.requires_grad]
    generations = recipe.args.num_generations
    result: dict = {"name": args.name, "overrides": args.overrides, "batches": []}
    grads: dict[str, list[torch.Tensor]] = {"group": [], "batch": []}
    for iteration in range(args.batches):
        tick = time.perf_counter()
        rollout, scores, _ = trainer._rollout_and_score(trainer._rows_for(iteration), iteration)
        clip = torch.tensor(scores.metadata["clip_rewards/toyworld_verifiable_dense"], dtype=torch.float64)
        batch, clips = clip.shape
        terms = torch.zeros(batch, clips, sum(p.numel() for p in params), dtype=torch.float64)
        for b in range(batch):
            for k in range(clips):
                steps = [j for j, c in enumerate(rollout.step_clips) if c == k]
                out = trainer.policy.log_prob(rollout.select([b] * len(steps)), torch.tensor(steps))
                terms[b, k] = torch.cat(
                    [g.flatten() for g in torch.autograd.grad(out.log_prob.sum(), params)]
                ).double()
        ids = torch.arange(batch // generations).repeat_interleave(generations)
        for scale, found in grads.items():
            advantages, _ = compute_advantages(clip[None], ids, scale_rewards=scale, adv_clip=5.0)
            found.append((advantages.double()[..., None] * terms).sum((0, 1)))
        result["batches"].append(
            {
                "seconds": time.perf_counter() - tick,
                "clip_mean": clip.mean(0).tolist(),
                "within_cell_std": clip.reshape(-1, generations, clips)
                .std(1, unbiased=False)
                .mean(0)
                .tolist(),
            }
        )
        print(args.name, iteration, result["batches"][-1], flush=True)
    for scale, found in grads.items():
        cos = [
            float(torch.nn.functional.cosine_similarity(found[i], found[j], dim=0))
            for i in range(len(found))
            for j in range(i + 1, len(found))
        ]
        mean = torch.stack(found).mean(0)
        agreement = float(mean.norm() ** 2 / torch.stack([g.norm() ** 2 for g in found]).mean())
        result[scale] = {
            "pairwise_cos": cos,
            "mean_cos": sum(cos) / len(cos),
            "mean_norm2_over_norm2": agreement,
        }
        print(args.name, scale, result[scale], flush=True)
    return result


def floors(args: argparse.Namespace) -> dict:
    """Held-out per-clip verifiable reward of model-free videos and of the base's samples (`__doc__`)."""
    recipe = load_recipe(RECIPE, [])
    _, data_spec = validate(recipe)
    _, held_out = build_datasets(data_spec)
    policy = NextClipPolicy.from_pretrained(args.policy)
    reward = ToyWorldVerifiableReward(per_clip=True)
    sampling = SamplingConfig(num_frames=27, height=32, width=32, num_inference_steps=6, kind="ode")
    frames = policy.clip_config.clip_frames
    one_clip = replace(sampling, num_frames=frames)
    scores: dict[str, list[list[float]]] = {
        name: [] for name in ("true", "true_vae", "blank", "frozen", "base", "base_true_history")
    }
    for index in range(len(held_out)):
        row = held_out[index]
        context = row["context"]
        true = row["video"][len(context) :]  # the clips after the context
        with torch.no_grad():
            both = torch.cat([context, true])[None]
            latents = policy.encode_video(both)
            true_vae = policy.decode(latents, policy.latent_shape(both.shape[1], 32, 32))[0, len(context) :]
            condition = policy.prepare_condition([{"context": context}])
            seeds = [derived_seed(0, 2, index * args.generations + i) for i in range(args.generations)]
            rollout = policy.rollout(
                condition, num_generations=args.generations, sampling=sampling, seeds=seeds
            )
            samples = policy.decode(rollout.final_latents, rollout.latent_shape)
            # clip k (k >= 1) sampled again after the TRUE clips < k instead of the base's own
            spliced = samples.clone()
            for k in range(1, true.shape[0] // frames):
                start, end = k * frames, (k + 1) * frames
                history = policy.prepare_condition([{"context": torch.cat([context, true[:start]])}])
                clip = policy.rollout(
                    history, num_generations=args.generations, sampling=one_clip, seeds=seeds
                )
                spliced[:, start:end] = policy.decode(clip.final_latents, clip.latent_shape)
        videos = {
            "true": [true],
            "true_vae": [true_vae],
            "blank": [context.reshape(-1, 3).median(0).values.expand_as(true).clone()],
            "frozen": [context[-1:].expand_as(true).clone()],
            "base": list(samples),
            "base_true_history": list(spliced),
        }
        for name, found in videos.items():
            for video in found:
                result = reward.score_video(video, row["world"])
                scores[name].append(result["clip_scores"])
    out = {
        name: {"per_clip": np.mean(found, 0).round(4).tolist(), "mean": round(float(np.mean(found)), 4)}
        for name, found in scores.items()
    }
    out["contexts"], out["base_samples_per_context"] = len(held_out), args.generations
    print(json.dumps(out, indent=1))
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="what", required=True)
    one = sub.add_parser("spread", help="per-clip reward spread of the base's rollouts, 4 settings")
    one.add_argument("--contexts", type=int, default=12)
    two = sub.add_parser("gradients", help="agreement of independent batches' GRPO gradients")
    two.add_argument("--name", required=True, help="the setting's name in the output")
    two.add_argument("--batches", type=int, default=3)
    two.add_argument("--output-dir", type=Path, default=REPO / "runs" / "nextclip_groups")
    two.add_argument("--overrides", nargs="*", default=[], help="recipe overrides (key=value)")
    three = sub.add_parser("floors", help="held-out reward of true / blank / frozen videos and the base's")
    three.add_argument("--generations", type=int, default=4, help="base samples per held-out context")
    three.add_argument(
        "--policy",
        type=Path,
        default=REPO / "checkpoints" / "toy_nextclip",
        help="the base scored",
    )
    for p in (one, two, three):
        p.add_argument("--json", type=Path, required=True)
    args = parser.parse_args(argv)
    result = {"spread": spread, "gradients": gradients, "floors": floors}[args.what](args)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
