"""GRPO throughput on 1..N GPUs (data parallel): samples/s per GPU against one GPU, and reward overlap.

Each configuration runs the real `GRPOTrainer` (rollout -> decode + reward in a thread while the
next group rolls out -> advantages over all ranks -> PPO update) for a few iterations on a
random-weight LTX transformer at the 2B release's config, launched as one process per GPU:

    lora   LoRA r=32 on bf16 base weights, DDP (accelerate) across ranks
    full   full fine-tuning, fp32 master weights + bf16 autocast, FSDP2 (trainer.fsdp) across ranks

Weak scaling: every GPU rolls out and trains the same number of prompts, so perfect scaling keeps
samples/s per GPU constant; ``scaling`` = (samples/s per GPU on N) / (samples/s per GPU on 1).
The first iteration is a warm-up and not counted. ``time/reward_hidden_frac`` is the trainer's
own measure of how much of the decode + reward time ran while the next group was rolling out.

    python benchmarks/gpu_scaling.py --gpus 1,2 --modes lora,full    # accelerate launch per config
    python benchmarks/gpu_scaling.py --gpus 2 --nodes 2              # 2 "nodes" on one host
    python benchmarks/gpu_scaling.py --tiny --gpus 1,2               # CPU smoke run (torchrun, gloo)

Prints a table and writes JSON (``--json``, default benchmarks/results/gpu_scaling.json).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE_CONFIG = ROOT / "recipes" / "accelerate" / "multi_gpu.yaml"
MULTI_NODE_CONFIG = ROOT / "recipes" / "accelerate" / "multi_node.yaml"
# geometry of the scaling runs: (frames, height, width, G, prompts per GPU, steps, trained steps)
GPU_RUN = dict(frames=49, height=320, width=512, generations=4, prompts_per_gpu=2, steps=8, trained=2)
TINY_RUN = dict(frames=9, height=32, width=32, generations=2, prompts_per_gpu=1, steps=3, trained=1)


# ----------------------------------------------------------------------------------------- worker
def worker(args: argparse.Namespace) -> None:
    """One rank of a GRPO run; rank 0 writes the per-iteration metrics to ``args.out``."""
    import torch

    sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
    from gpu_rollout import TEXT_TOKENS, build_policy

    from grpo.config import GRPOConfig
    from grpo.trainer import GRPOTrainer

    run = TINY_RUN if args.tiny else GPU_RUN
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    full = args.mode == "full"
    # LoRA trains adapters on a frozen bf16 base; full fine-tuning keeps fp32 master weights
    policy = build_policy(args.tiny, device, torch.bfloat16 if cuda and not full else torch.float32)
    if full:
        policy.transformer.float().requires_grad_(True)
    if cuda:  # the frozen VAE decodes in bf16 (in the reward thread, overlapped with the next rollout)
        policy.vae.to(torch.bfloat16)
    caption = policy.transformer.config.caption_channels
    gen = torch.Generator().manual_seed(0)
    mask = torch.zeros(TEXT_TOKENS, dtype=torch.bool)
    mask[:40] = True
    rows = [
        {
            "prompt_embeds": torch.randn(TEXT_TOKENS, caption, generator=gen).to(policy.transformer.dtype),
            "prompt_attention_mask": mask,
        }
        for _ in range(16)
    ]
    output_dir = Path(args.out).parent / f"run_{args.mode}_{world}"
    config = GRPOConfig(
        output_dir=str(output_dir),
        num_generations=run["generations"],
        num_prompts_per_iteration=run["prompts_per_gpu"] * world,
        max_iterations=args.iterations + 1,
        num_inference_steps=run["steps"],
        num_frames=run["frames"],
        height=run["height"],
        width=run["width"],
        frame_rate=25.0,
        guidance_scale=1.0,
        timestep_selection="fraction",
        timestep_fraction=run["trained"] / run["steps"],
        per_device_train_batch_size=2,
        mixed_precision="bf16" if cuda else "no",
        use_lora=not full,
        lora_rank=32,
        lora_alpha=64,
        fsdp=full and world > 1,
        learning_rate=1e-5,
        beta=0.004,
        save_steps=0,
        seed=0,
    )
    metrics: list[dict[str, float]] = []

    class Collect:
        def on_iteration_end(self, trainer: Any, iteration: int, logged: dict[str, Any]) -> None:
            metrics.append({k: float(v) for k, v in logged.items() if isinstance(v, (int, float))})

    trainer = GRPOTrainer(policy, ["redness"], config, rows, callbacks=[Collect()])
    # the benchmark times iterations; exporting the final weights (8 GB at 2B) is not part of them
    trainer.state.save_final = lambda: output_dir
    trainer.train()
    if trainer.rank == 0:
        Path(args.out).write_text(
            json.dumps({"mode": args.mode, "world_size": world, "run": run, "iterations": metrics})
        )


# ----------------------------------------------------------------------------------------- launcher
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(mode: str, gpus: int, nodes: int, tiny: bool, iterations: int, out: Path) -> dict[str, Any]:
    """Start one configuration (``gpus`` processes over ``nodes`` simulated nodes) and read its result."""
    script = [str(Path(__file__).resolve()), "worker", "--mode", mode, "--out", str(out)]
    script += ["--iterations", str(iterations)] + (["--tiny"] if tiny else [])
    port = str(_free_port())
    per_node = gpus // nodes
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    procs = []
    for node in range(nodes):
        if tiny:  # CPU: torchrun with gloo
            cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={per_node}"]
            cmd += [f"--nnodes={nodes}", f"--node_rank={node}", "--master_addr=127.0.0.1"]
            cmd += [f"--master_port={port}", *script]
            node_env = {**env, "CUDA_VISIBLE_DEVICES": ""}  # CPU even where GPUs exist (fewer than ranks)
        elif gpus == 1:
            cmd, node_env = [sys.executable, *script], env
        else:
            config = MULTI_NODE_CONFIG if nodes > 1 else ACCELERATE_CONFIG
            cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
            cmd += ["--num_processes", str(gpus), "--main_process_port", port]
            if nodes > 1:  # every simulated node gets its own GPUs, as separate hosts would
                cmd += ["--num_machines", str(nodes), "--machine_rank", str(node)]
                cmd += ["--main_process_ip", "127.0.0.1"]
            cmd += script
            visible = ",".join(str(node * per_node + i) for i in range(per_node))
            node_env = {**env, "CUDA_VISIBLE_DEVICES": visible} if nodes > 1 else env
        procs.append(subprocess.Popen(cmd, env=node_env, cwd=ROOT))
    codes = [p.wait() for p in procs]
    if any(codes):
        raise RuntimeError(f"{mode} on {gpus} process(es) / {nodes} node(s) failed with exit codes {codes}")
    return json.loads(out.read_text())


def summarise(raw: dict[str, Any]) -> dict[str, Any]:
    """Median over the measured iterations (the first is a warm-up)."""
    measured = raw["iterations"][1:] or raw["iterations"]
    world = raw["world_size"]

    def median(key: str) -> float:
        return statistics.median(m[key] for m in measured if key in m)

    samples = raw["run"]["generations"] * raw["run"]["prompts_per_gpu"]
    iteration_s = median("time/iteration_s")
    return {
        "mode": raw["mode"],
        "gpus": world,
        "iteration_s": iteration_s,
        "samples_per_s": samples * world / iteration_s,
        "samples_per_s_per_gpu": samples / iteration_s,
        "rollout_s": median("time/rollout_s"),
        "reward_s": median("time/reward_s"),
        "reward_hidden_frac": median("time/reward_hidden_frac"),
        "peak_gib": median("memory/peak_gb"),
        "iterations_measured": len(measured),
    }


def format_table(result: dict[str, Any]) -> str:
    lines = [
        f"GRPO data-parallel scaling on {result['device']}: {result['run']}",
        "",
        "| mode | GPUs | nodes | iteration s | samples/s | samples/s per GPU | scaling | reward hidden | "
        "peak GiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["configs"]:
        lines.append(
            f"| {r['mode']} | {r['gpus']} | {r['nodes']} | {r['iteration_s']:.2f} | "
            f"{r['samples_per_s']:.2f} | {r['samples_per_s_per_gpu']:.2f} | {r['scaling']:.3f} | "
            f"{r['reward_hidden_frac']:.2f} | "
            f"{r['peak_gib']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("role", nargs="?", default="run", choices=["run", "worker"], help=argparse.SUPPRESS)
    parser.add_argument("--tiny", action="store_true", help="tiny model on the CPU (smoke run)")
    parser.add_argument("--gpus", default="1,2", help="comma-separated process counts, e.g. 1,2,4")
    parser.add_argument("--nodes", type=int, default=1, help="simulate this many nodes on one host")
    parser.add_argument("--modes", default="lora,full", help="comma-separated: lora, full")
    parser.add_argument("--iterations", type=int, default=3, help="measured iterations (after 1 warm-up)")
    parser.add_argument("--mode", default="lora", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    parser.add_argument(
        "--baseline", default=None, help="earlier result JSON whose 1-GPU rows are the reference for scaling"
    )
    parser.add_argument("--json", default=None, help="output JSON path")
    args = parser.parse_args(argv)
    if args.role == "worker":
        worker(args)
        return None
    import torch

    counts = [int(n) for n in args.gpus.split(",")]
    bad = [n for n in counts if n < 1 or n % args.nodes]
    if bad:
        raise SystemExit(f"--gpus {bad}: each count must be >= 1 and a multiple of --nodes {args.nodes}")
    json_path = Path(
        args.json or ROOT / "benchmarks" / "results" / f"{'tiny_' if args.tiny else ''}gpu_scaling.json"
    )
    json_path.parent.mkdir(parents=True, exist_ok=True)
    device = "cpu" if args.tiny or not torch.cuda.is_available() else torch.cuda.get_device_name(0)
    result: dict[str, Any] = {"device": device, "run": TINY_RUN if args.tiny else GPU_RUN, "configs": []}
    baseline = {}
    if args.baseline:
        earlier = json.loads(Path(args.baseline).read_text())["configs"]
        baseline = {r["mode"]: r["samples_per_s_per_gpu"] for r in earlier if r["gpus"] == 1}
    with tempfile.TemporaryDirectory(prefix="gpu_scaling_") as tmp:
        for mode in args.modes.split(","):
            base = baseline.get(mode)
            for n in counts:
                nodes = args.nodes if n > 1 else 1
                raw = launch(mode, n, nodes, args.tiny, args.iterations, Path(tmp) / f"{mode}_{n}.json")
                row = {**summarise(raw), "nodes": nodes, "raw": raw["iterations"]}
                base = row["samples_per_s_per_gpu"] if n == 1 else base
                row["scaling"] = row["samples_per_s_per_gpu"] / base if base else float("nan")
                result["configs"].append(row)
                json_path.write_text(json.dumps(result, indent=2))
                print(format_table(result), flush=True)
    print(f"wrote {json_path}")
    return result


if __name__ == "__main__":
    main()
