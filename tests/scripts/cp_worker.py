"""Run under `torchrun --nproc_per_node 2`: a tiny LTX-2 rollout and log-prob gradients on one process
and then context parallel over both, and the context-parallel log-prob recomputation; rank 0 writes
the differences to OUT (JSON; used by tests/test_context_parallel.py).

Usage: cp_worker.py CHECKPOINT OUT"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from policies.ltx2 import LTX2Policy, LTX2SamplingConfig


def main(checkpoint: str, out: str) -> None:
    dist.init_process_group("gloo")
    policy = LTX2Policy.from_pretrained(checkpoint, load_text_encoder=False)
    connectors = policy.connectors.config
    gen = torch.Generator().manual_seed(1)
    mask = torch.zeros(1, 64, dtype=torch.long)
    mask[:, -40:] = 1  # left-padded prompts: the connectors' registers fill the padding
    cond = {
        f"{prefix}prompt_{key}": value
        for prefix in ("", "negative_")
        for key, value in (
            (
                "embeds",
                torch.randn(
                    1, 64, connectors.caption_channels * connectors.text_proj_in_factor, generator=gen
                ),
            ),
            ("attention_mask", mask),
        )
    }
    # 9 frames x 64 x 64 -> 2 x 2 x 2 latent tokens, CFG: every forward batches 2 branches x 2 samples
    sampling = LTX2SamplingConfig(
        num_frames=9,
        height=64,
        width=64,
        frame_rate=24.0,
        num_inference_steps=4,
        kind="sde",
        noise_level=0.7,
        guidance_scale=3.0,
    )
    policy.transformer.requires_grad_(True)

    def gradients(rollout) -> dict[str, torch.Tensor]:
        """Of the summed log-probs of every recorded step (a forward and backward through CFG)."""
        policy.transformer.zero_grad(set_to_none=True)
        sum(policy.log_prob(rollout, k).log_prob.sum() for k in range(rollout.log_probs.shape[1])).backward()
        return {n: p.grad.clone() for n, p in policy.transformer.named_parameters() if p.grad is not None}

    with torch.no_grad():
        single = policy.rollout(cond, num_generations=2, sampling=sampling, seeds=[5, 6])
    reference = gradients(single)
    policy.enable_context_parallel()
    with torch.no_grad():
        parallel = policy.rollout(cond, num_generations=2, sampling=sampling, seeds=[5, 6])
        steps = parallel.log_probs.shape[1]
        recomputed = torch.stack([policy.log_prob(parallel, k).log_prob for k in range(steps)], dim=1)
    shares = gradients(single)  # each rank's share of the same loss's gradients
    for grad in shares.values():
        dist.all_reduce(grad)
    gathered = [None, None]
    dist.all_gather_object(gathered, parallel.final_latents)
    if dist.get_rank() == 0:
        result = {
            "steps": steps,
            "latents_max_abs": (parallel.next_latents - single.next_latents).abs().max().item(),
            "final_max_abs": (parallel.final_latents - single.final_latents).abs().max().item(),
            "final_scale": single.final_latents.abs().max().item(),
            "log_prob_max_abs": (parallel.log_probs - single.log_probs).abs().max().item(),
            "recompute_max_abs": (recomputed - parallel.log_probs).abs().max().item(),
            "ranks_max_abs": (gathered[0] - gathered[1]).abs().max().item(),
            "grad_names": sorted(shares) == sorted(reference),
            "grad_max_abs": max((shares[n] - reference[n]).abs().max().item() for n in reference),
            "grad_scale": max(g.abs().max().item() for g in reference.values()),
        }
        Path(out).write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
