"""How the verifiable reward ranks futures: its mean over 100 test-split scenes for the true next scene
and four wrong ones (the README's table).

Candidates per scene: the true next scene; the context's last frame, frozen; the true objects moving
the wrong way (`ToyWorld.reversed_next`); another scene's next scene; uniform noise (seeded).
`tests/test_verifiable_reward.py` asserts the same ranking with margins; this script writes the
numbers.

    python benchmarks/verifiable_reward.py   # CPU, seconds; writes benchmarks/results/verifiable_reward.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from grpo.data.toyworld import ToyWorld
from rewards.verifiable import ToyWorldVerifiableReward


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num", type=int, default=100, help="test-split scenes")
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise candidates")
    parser.add_argument(
        "--json", type=Path, default=Path(__file__).parent / "results" / "verifiable_reward.json"
    )
    args = parser.parse_args(argv)

    world = ToyWorld(split="test", num_samples=args.num)
    samples = list(world)
    noise = torch.Generator().manual_seed(args.seed)
    candidates = {
        "true next scene": [s["next"] for s in samples],
        "context's last frame, frozen": [s["context"][-1:].expand_as(s["next"]) for s in samples],
        "objects moving the wrong way": [world.reversed_next(i) for i in range(len(samples))],
        "another sample's next scene": [samples[(i + 1) % len(samples)]["next"] for i in range(len(samples))],
        "pure noise": [torch.rand(s["next"].shape, generator=noise) for s in samples],
    }
    reward = ToyWorldVerifiableReward()
    worlds = [s["world"] for s in samples]
    means = {}
    for name, videos in candidates.items():
        scores = reward(videos, None, None, world=worlds).scores
        means[name] = sum(scores) / len(scores)
        print(f"{name:32} {means[name]:.3f}")
    result = {
        "command": "python benchmarks/verifiable_reward.py",
        "scenes": args.num,
        "split": "test",
        "noise_seed": args.seed,
        "mean_score": means,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
