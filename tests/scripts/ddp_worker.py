"""Run under `torchrun --nproc_per_node 2`: a tiny GRPO run that writes, after every optimizer step,
a digest of this rank's (full) trainable weights to OUT/rank<r>.jsonl (used by tests/test_grpo_trainer.py).

Usage: ddp_worker.py CHECKPOINT OUT [field=value ...]   (GRPOConfig overrides, e.g. fsdp=true)"""

import hashlib
import json
import os
import sys
from pathlib import Path

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
            digest.update(full_tensor(trainer.state.trainable[name]).detach().cpu().numpy().tobytes())
        with self.path.open("a") as handle:
            handle.write(json.dumps({"step": step, "sha256": digest.hexdigest()}) + "\n")


def main(checkpoint: str, out: str, overrides: list[str]) -> None:
    settings = {key: yaml.safe_load(value) for key, value in (item.split("=", 1) for item in overrides)}
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
    policy = LTXPolicy.from_pretrained(checkpoint)
    prompts = [{"prompt": p} for p in ["a ball", "two balls", "a cube", "a red cube"]]
    trainer = GRPOTrainer(
        policy,
        [redness],
        args,
        prompts,
        callbacks=[WeightDigest(Path(out) / f"rank{os.environ['RANK']}.jsonl")],
    )
    trainer.train()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
