"""Run under `torchrun --nproc_per_node 2`: a tiny LTX rollout under FSDP2 with and
without `TrainingState.rollout_weights`; rank 0 writes what it saw to OUT (JSON; used by
tests/test_grpo_trainer.py).

Usage: fsdp_rollout_worker.py CHECKPOINT OUT DTYPE   (fsdp_param_dtype: bf16 or fp32)"""

import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from torch.distributed.tensor import DTensor

from grpo.config import GRPOConfig
from grpo.training_state import TrainingState
from policies import LTXPolicy, SamplingConfig


def main(checkpoint: str, out: str, dtype: str) -> None:
    accelerator = Accelerator(cpu=True)
    policy = LTXPolicy.from_pretrained(checkpoint)
    policy.transformer.requires_grad_(True)
    args = GRPOConfig(
        output_dir=str(Path(out).parent / "run"), fsdp=True, fsdp_param_dtype=dtype, use_lora=False
    )
    state = TrainingState(policy, args, accelerator, total_steps=1)
    cond = policy.prepare_condition([{"prompt": "a red ball"}])
    sampling = SamplingConfig(num_frames=9, height=32, width=32, num_inference_steps=4, kind="sde")

    def sharded() -> list[bool]:  # FSDP2 registers sharded parameters as DTensors, gathered ones as tensors
        # (the blocks': FSDP2 never reshards the root module's own after a forward)
        return sorted({isinstance(p, DTensor) for p in policy.transformer.transformer_blocks.parameters()})

    with torch.no_grad():
        plain = policy.rollout(cond, num_generations=2, sampling=sampling, seeds=[1, 2])
        after_plain = sharded()
        with state.rollout_weights():
            gathered = policy.rollout(cond, num_generations=2, sampling=sampling, seeds=[1, 2])
            inside = sharded()
        after = sharded()
        recomputed = torch.stack([policy.log_prob(gathered, k).log_prob for k in range(4)], dim=1)
    if accelerator.is_main_process:
        result = {
            "after_plain": after_plain,
            "inside": inside,
            "after": after,
            "latents_equal": bool(torch.equal(plain.next_latents, gathered.next_latents)),
            "log_probs_equal": bool(torch.equal(plain.log_probs, gathered.log_probs)),
            "recompute_max_abs": (recomputed - gathered.log_probs).abs().max().item(),
        }
        Path(out).write_text(json.dumps(result))
    accelerator.end_training()  # leave the process group: a rank exiting inside it can abort


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3])
