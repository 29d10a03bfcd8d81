"""Run under `torchrun --nproc_per_node 2`: a tiny GRPO run that writes, after every optimizer step,
a digest of this rank's (full) trainable weights and the dtypes the transformer stores its base and
LoRA weights in to OUT/rank<r>.jsonl (used by tests/test_grpo_trainer.py).

Usage: ddp_worker.py CHECKPOINT OUT [field=value ...]   (GRPOConfig overrides, e.g. fsdp=true; and
torch_dtype=bfloat16 to load the policy in bf16)"""

import hashlib
import json
import os
import sys
from pathlib import Path

import torch
import yaml

from grpo.config import GRPOConfig
from grpo.ema import full_tensor
from grpo.trainer import GRPOTrainer
from policies import LTXPolicy


def redness(videos, prompts, contexts, **metadata):
    return [float((v[..., 0] - 0.5 * (v[..., 1] + v[..., 2])).mean()) for v in videos]


class WeightDigest:
    def __init__(self, path: Path) -> None:
        self.path = path

    def on_optimizer_step(self, trainer, step):
        digest = hashlib.sha256()
        for name in sorted(trainer.state.trainable):
            digest.update(full_tensor(trainer.state.trainable[name]).detach().float().cpu().numpy().tobytes())
        named = trainer.policy.transformer.named_parameters()
        dtypes = sorted({f"{'lora' if 'lora_' in n else 'base'}:{p.dtype}" for n, p in named})
        with self.path.open("a") as handle:
            handle.write(json.dumps({"step": step, "sha256": digest.hexdigest(), "dtypes": dtypes}) + "\n")


def main(checkpoint: str, out: str, overrides: list[str]) -> None:
    settings = {key: yaml.safe_load(value) for key, value in (item.split("=", 1) for item in overrides)}
    dtype = getattr(torch, settings.pop("torch_dtype", "float32"))
    defaults = dict(
        output_dir=out,
        num_generations=2,
        num_prompts_per_iteration=2,
        max_iterations=2,
        num_inference_steps=3,
        learning_rate=1e-3,
        per_device_train_batch_size=1,
        gradient_accumulation_steps=1,
        save_steps=0,
        seed=3,
    )
    args = GRPOConfig(**{**defaults, **settings})
    policy = LTXPolicy.from_pretrained(checkpoint, torch_dtype=dtype)
    prompts = [{"prompt": p} for p in ["a ball", "two balls", "a cube", "a red cube"]]
    trainer = GRPOTrainer(
        policy,
        [redness],
        args,
        prompts,
        callbacks=[WeightDigest(Path(out) / f"rank{os.environ['RANK']}.jsonl")],
    )
    trainer.train()
    trainer.accelerator.end_training()  # leave the process group: a rank exiting inside it can abort


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
