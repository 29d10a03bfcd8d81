"""Run under `torchrun --nproc_per_node N`: a tiny LTX-2 GRPO run with ``context_parallel: true``
(one process: no split); the final weights land in OUT/final (used by tests/test_context_parallel.py).

Usage: cp_grpo_worker.py CHECKPOINT OUT"""

import sys

from grpo.config import GRPOConfig
from grpo.trainer import GRPOTrainer
from policies.ltx2 import LTX2Policy


def redness(videos, prompts, contexts, **metadata):
    return [float((v[..., 0] - 0.5 * (v[..., 1] + v[..., 2])).mean()) for v in videos]


def main(checkpoint: str, out: str) -> None:
    args = GRPOConfig(
        output_dir=out,
        context_parallel=True,
        num_generations=2,
        num_prompts_per_iteration=2,
        max_iterations=2,
        num_inference_steps=3,
        num_frames=9,
        height=64,  # 2 x 2 x 2 latent tokens: they split over 2 ranks
        width=64,
        beta=0.0,
        # Adam with a large epsilon updates linearly in the gradient (see tests/test_grpo_trainer.py)
        learning_rate=1.0,
        adam_epsilon=1.0,
        save_steps=0,
        seed=3,
    )
    policy = LTX2Policy.from_pretrained(checkpoint)
    policy.transformer.requires_grad_(True)
    prompts = [{"prompt": p} for p in ["a ball", "two balls", "a cube", "a red cube"]]
    trainer = GRPOTrainer(policy, [redness], args, prompts)
    trainer.train()
    trainer.accelerator.end_training()  # leave the process group: a rank exiting inside it can abort


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
