"""GRPO throughput on 1..N GPUs: samples/s per GPU against one GPU, reward overlap, memory.

Each GRPO configuration runs the real `GRPOTrainer` (rollout -> decode + reward in a thread while the
next group rolls out -> advantages over all ranks -> PPO update) for a few iterations on a
random-weight transformer at a released config (``--model ltx``: LTX-Video-2B; ``--model ltx2``:
LTX-2, diffusers' defaults, ``--layers`` of its 48 blocks), launched as one process per GPU:

    lora   LoRA r=32 on bf16 base weights, DDP (accelerate) across ranks
    full   full fine-tuning, FSDP2 (trainer.fsdp, on one GPU too): fp32 master weights sharded over the
           ranks, forwards and backwards in bf16 (trainer.fsdp_param_dtype), fp32 gradient reduction
    cp     (ltx2) context parallelism: every GPU works on the same G samples of one long video, each
           denoiser forward's tokens split over all GPUs (`LTX2Policy.enable_context_parallel`);
           times a rollout and the forward + backward of its trained steps' log-probs (the update
           of trainer.context_parallel without its optimizer step) at each ``--cp-settings``
           geometry, "oom" where it does not fit

Weak scaling for lora / full: every GPU rolls out and trains the same number of prompts, so perfect
scaling keeps samples/s per GPU constant; ``scaling`` = (samples/s per GPU on N) / (samples/s per
GPU on the fewest GPUs run). Strong scaling for cp: ``scaling`` = speed-up over the fewest GPUs / GPU
ratio. The first iteration is a warm-up and not counted. ``time/reward_hidden_frac`` is the trainer's
own measure of how much of the decode + reward time ran while the next group was rolling out.

    python benchmarks/gpu_scaling.py --gpus 1,2 --modes lora,full    # accelerate launch per config
    python benchmarks/gpu_scaling.py --gpus 2 --nodes 2              # 2 "nodes" on one host
    python benchmarks/gpu_scaling.py --model ltx2 --layers 12 --gpus 1,2,4 --modes full
    python benchmarks/gpu_scaling.py --model ltx2 --gpus 1,2,4 --modes cp --cp-settings 121x512x768
    python benchmarks/gpu_scaling.py --tiny --gpus 1,2               # CPU smoke run (torchrun, gloo)
    python benchmarks/gpu_scaling.py --tiny --model ltx2 --gpus 1,2 --modes lora,full,cp

Prints a table and writes JSON (``--json``, default benchmarks/results/[tiny_]gpu_scaling[_ltx2].json).
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
RUNS = {
    ("ltx", False): dict(
        frames=49, height=320, width=512, generations=4, prompts_per_gpu=2, steps=8, trained=2
    ),
    ("ltx", True): dict(frames=9, height=32, width=32, generations=2, prompts_per_gpu=1, steps=3, trained=1),
    # LTX-2 latents: 8x frames, 32x pixels (49x512x768: 7 x 16 x 24 = 2688 video tokens)
    ("ltx2", False): dict(
        frames=49, height=512, width=768, generations=4, prompts_per_gpu=1, steps=8, trained=2
    ),
    ("ltx2", True): dict(frames=9, height=64, width=64, generations=2, prompts_per_gpu=1, steps=3, trained=1),
}
CP_SETTINGS = {False: "121x512x768,257x512x768,505x512x768", True: "9x64x64"}


# ----------------------------------------------------------------------------------------- worker
def _build(args: argparse.Namespace, device: Any, full: bool) -> tuple[Any, list[dict[str, Any]]]:
    """The random-weight policy of ``args.model`` and 16 rows of random text features for it."""
    import torch
    from gpu_rollout import LTX2_TEXT_TOKENS, TEXT_TOKENS, build_ltx2_policy, build_policy

    cuda = device.type == "cuda"
    # LoRA trains adapters on a frozen bf16 base; full fine-tuning keeps fp32 master weights
    dtype = torch.bfloat16 if cuda and not full else torch.float32
    if args.model == "ltx2":
        policy = build_ltx2_policy(args.tiny, device, dtype, perturbed_attn=False, num_layers=args.layers)
        connectors = policy.connectors.config
        width = connectors.caption_channels * connectors.text_proj_in_factor
        tokens = 64 if args.tiny else LTX2_TEXT_TOKENS
    else:
        policy = build_policy(args.tiny, device, dtype)
        width, tokens = policy.transformer.config.caption_channels, TEXT_TOKENS
    if full:
        policy.transformer.float().requires_grad_(True)
    if cuda:  # the frozen VAE decodes in bf16 (in the reward thread, overlapped with the next rollout)
        policy.vae.to(torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    mask = torch.zeros(tokens, dtype=torch.bool)
    mask[-40:] = True  # 40 prompt tokens (left padding; LTX-2's connectors fill it with registers)
    rows = [
        {
            "prompt_embeds": torch.randn(tokens, width, generator=gen).to(policy.transformer.dtype),
            "prompt_attention_mask": mask,
        }
        for _ in range(16)
    ]
    return policy, rows


def _peak_gib(device: Any) -> float:
    import torch

    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0


def worker(args: argparse.Namespace) -> None:
    """One rank of a run; rank 0 writes the per-iteration metrics to ``args.out``."""
    import torch

    sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
    from grpo.config import GRPOConfig
    from grpo.trainer import GRPOTrainer
    from grpo.training_state import leave_process_group

    run = RUNS[args.model, args.tiny]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    full = args.mode == "full"
    policy, rows = _build(args, device, full)
    if args.mode == "cp":
        context_parallel(args, policy, rows, run, world, device)
        leave_process_group()
        return
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
        fsdp=full,
        gradient_checkpointing=args.gradient_checkpointing,
        compile=args.compile,
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
    leave_process_group()


def context_parallel(
    args: argparse.Namespace,
    policy: Any,
    rows: list[dict[str, Any]],
    run: dict[str, Any],
    world: int,
    device: Any,
) -> None:
    """Rollout, then the trained steps' log-probs with their backward, of G samples at each geometry,
    the tokens split over all ranks."""
    import time

    import torch

    from policies.ltx2 import LTX2SamplingConfig

    if world > 1:
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
        policy.enable_context_parallel()
    # the update's forwards and backwards: gradients of every weight (no optimizer step)
    policy.transformer.requires_grad_(True)
    if args.gradient_checkpointing:
        policy.transformer.enable_gradient_checkpointing()
    condition = {k: v[None].to(device) for k, v in rows[0].items()}
    g = run["generations"]
    settings: dict[str, Any] = {}
    for setting in args.cp_settings.split(","):
        frames, height, width = (int(n) for n in setting.split("x"))
        sampling = LTX2SamplingConfig(
            num_frames=frames,
            height=height,
            width=width,
            frame_rate=25.0,
            num_inference_steps=run["steps"],
            kind="sde",
            noise_level=0.7,
        )
        metrics: list[dict[str, float]] = []
        try:
            for _ in range(args.iterations + 1):
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
                with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
                    with torch.no_grad():
                        rollout = policy.rollout(
                            condition, num_generations=g, sampling=sampling, seeds=list(range(g))
                        )
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    rollout_s = time.perf_counter() - start
                    for k in range(run["trained"]):
                        policy.log_prob(rollout, k).log_prob.sum().backward()
                policy.transformer.zero_grad(set_to_none=True)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                iteration_s = time.perf_counter() - start
                metrics.append(
                    {
                        "time/iteration_s": iteration_s,
                        "time/rollout_s": rollout_s,
                        "time/update_s": iteration_s - rollout_s,
                        "memory/peak_gb": _peak_gib(device),
                    }
                )
            settings[setting] = metrics
        except torch.OutOfMemoryError:  # the same shapes on every rank: all of them run out together
            settings[setting] = "oom"
            torch.cuda.empty_cache()
    if int(os.environ.get("RANK", "0")) == 0:
        Path(args.out).write_text(
            json.dumps({"mode": "cp", "world_size": world, "run": run, "settings": settings})
        )


# ----------------------------------------------------------------------------------------- launcher
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(mode: str, gpus: int, nodes: int, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Start one configuration (``gpus`` processes over ``nodes`` simulated nodes) and read its result.
    On CPU (``--tiny``, gloo) a failed launch is run once more: under a loaded CI machine a gloo rank
    has aborted mid-run ("terminate called without an active exception") in tests that pass alone."""
    for attempt in range(2 if args.tiny else 1):
        codes = _launch_once(mode, gpus, nodes, args, out)
        if not any(codes):
            return json.loads(out.read_text())
        print(f"{mode} on {gpus} process(es): exit codes {codes} (attempt {attempt + 1})", file=sys.stderr)
    raise RuntimeError(f"{mode} on {gpus} process(es) / {nodes} node(s) failed with exit codes {codes}")


def _launch_once(mode: str, gpus: int, nodes: int, args: argparse.Namespace, out: Path) -> list[int]:
    """One launch of a configuration; the launchers' exit codes."""
    script = [str(Path(__file__).resolve()), "worker", "--mode", mode, "--out", str(out)]
    script += ["--iterations", str(args.iterations), "--model", args.model, "--cp-settings", args.cp_settings]
    script += ["--tiny"] if args.tiny else []
    script += ["--layers", str(args.layers)] if args.layers else []
    script += ["--gradient-checkpointing"] if args.gradient_checkpointing else []
    script += ["--compile"] if args.compile else []
    port = str(_free_port())
    per_node = gpus // nodes
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    procs = []
    for node in range(nodes):
        if args.tiny:  # CPU: torchrun with gloo
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
    return [p.wait() for p in procs]


def summarise(raw: dict[str, Any], measured: list[dict[str, float]] | None = None) -> dict[str, Any]:
    """Median over the measured iterations (the first is a warm-up). GRPO modes: every GPU trains its
    own samples; cp: all GPUs work on the same G samples (``measured``: one geometry's iterations)."""
    iterations = measured if measured is not None else raw["iterations"]
    measured = iterations[1:] or iterations
    world = raw["world_size"]

    def median(key: str) -> float:
        values = [m[key] for m in measured if key in m]
        return statistics.median(values) if values else float("nan")

    iteration_s = median("time/iteration_s")
    if raw["mode"] == "cp":
        samples_per_s = raw["run"]["generations"] / iteration_s
    else:
        samples_per_s = raw["run"]["generations"] * raw["run"]["prompts_per_gpu"] * world / iteration_s
    return {
        "mode": raw["mode"],
        "gpus": world,
        "iteration_s": iteration_s,
        "samples_per_s": samples_per_s,
        "samples_per_s_per_gpu": samples_per_s / world,
        "rollout_s": median("time/rollout_s"),
        "update_s": median("time/update_s"),  # cp only (the trainer does not time its update apart)
        "reward_s": median("time/reward_s"),
        "reward_hidden_frac": median("time/reward_hidden_frac"),
        "peak_gib": median("memory/peak_gb"),
        "iterations_measured": len(measured),
        "raw": iterations,
    }


def rows_of(raw: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per configuration: a GRPO run, or each geometry of a cp run ("oom": did not fit)."""
    if raw["mode"] != "cp":
        return [{**summarise(raw), "setting": ""}]
    rows = []
    for setting, measured in raw["settings"].items():
        if measured == "oom":
            rows.append({"mode": "cp", "gpus": raw["world_size"], "setting": setting, "oom": True})
        else:
            rows.append({**summarise(raw, measured), "setting": setting})
    return rows


def format_table(result: dict[str, Any]) -> str:
    lines = [
        f"GRPO multi-GPU scaling on {result['device']}, {result['model']}: {result['run']}",
        "",
        "| mode | video | GPUs | nodes | iteration s | samples/s | samples/s per GPU | scaling | "
        "reward hidden | peak GiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["configs"]:
        head = f"| {r['mode']} | {r['setting'] or '-'} | {r['gpus']} | {r['nodes']} |"
        if r.get("oom"):
            lines.append(f"{head} out of memory | | | | | |")
            continue
        lines.append(
            f"{head} {r['iteration_s']:.2f} | "
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
    parser.add_argument("--model", default="ltx", choices=["ltx", "ltx2"], help="LTX-Video-2B or LTX-2")
    parser.add_argument("--layers", type=int, default=None, help="ltx2: transformer blocks (default all 48)")
    parser.add_argument("--gpus", default="1,2", help="comma-separated process counts, e.g. 1,2,4")
    parser.add_argument("--nodes", type=int, default=1, help="simulate this many nodes on one host")
    parser.add_argument("--modes", default="lora,full", help="comma-separated: lora, full, cp (ltx2)")
    parser.add_argument("--cp-settings", default=None, help="cp: FRAMESxHEIGHTxWIDTH,... videos to try")
    parser.add_argument(
        "--gradient-checkpointing", action="store_true", help="lora / full: recompute activations in backward"
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="lora / full: trainer.compile true (off by default: the recorded results are eager)",
    )
    parser.add_argument("--iterations", type=int, default=3, help="measured iterations (after 1 warm-up)")
    parser.add_argument("--mode", default="lora", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    parser.add_argument(
        "--baseline", default=None, help="earlier result JSON whose 1-GPU rows are the reference for scaling"
    )
    parser.add_argument("--json", default=None, help="output JSON path")
    args = parser.parse_args(argv)
    args.cp_settings = args.cp_settings or CP_SETTINGS[args.tiny]
    if args.role == "worker":
        worker(args)
        return None
    import torch

    modes = args.modes.split(",")
    counts = [int(n) for n in args.gpus.split(",")]
    bad = [n for n in counts if n < 1 or n % args.nodes]
    if bad:
        raise SystemExit(f"--gpus {bad}: each count must be >= 1 and a multiple of --nodes {args.nodes}")
    if "cp" in modes and args.model != "ltx2":
        raise SystemExit("--modes cp: context parallelism is LTX-2's (--model ltx2)")
    suffix = "_ltx2" if args.model == "ltx2" else ""
    json_path = Path(
        args.json
        or ROOT / "benchmarks" / "results" / f"{'tiny_' if args.tiny else ''}gpu_scaling{suffix}.json"
    )
    json_path.parent.mkdir(parents=True, exist_ok=True)
    device = "cpu" if args.tiny or not torch.cuda.is_available() else torch.cuda.get_device_name(0)
    model = args.model + (f" ({args.layers} blocks)" if args.layers else "")
    result: dict[str, Any] = {
        "device": device,
        "model": model,
        "run": RUNS[args.model, args.tiny],
        "configs": [],
    }
    baseline = {}
    if args.baseline:
        earlier = json.loads(Path(args.baseline).read_text())["configs"]
        baseline = {
            (r["mode"], r.get("setting", "")): r["samples_per_s_per_gpu"]
            for r in earlier
            if r["gpus"] == 1 and not r.get("oom")
        }
    with tempfile.TemporaryDirectory(prefix="gpu_scaling_") as tmp:
        for mode in modes:
            base: dict[str, float] = {}  # per geometry: samples/s per GPU on the fewest GPUs run
            for n in counts:
                nodes = args.nodes if n > 1 else 1
                raw = launch(mode, n, nodes, args, Path(tmp) / f"{mode}_{n}.json")
                for row in rows_of(raw):
                    row["nodes"] = nodes
                    if not row.get("oom"):
                        key = row["setting"]
                        if key not in base:  # this run on 1 GPU, else --baseline's, else this run
                            own = row["samples_per_s_per_gpu"]
                            base[key] = own if n == 1 else baseline.get((mode, key), own)
                        row["scaling"] = row["samples_per_s_per_gpu"] / base[key]
                    result["configs"].append(row)
                json_path.write_text(json.dumps(result, indent=2))
                print(format_table(result), flush=True)
    print(f"wrote {json_path}")
    return result


if __name__ == "__main__":
    main()
