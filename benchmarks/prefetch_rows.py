"""What loading GRPO rows ahead of time (``trainer.prefetch_iterations``) saves when rows are MP4s.

A manifest of ``--videos`` synthetic MP4s (``--frames`` frames at ``--height`` x ``--width``, written
with the project's `policies.video_io.write_video`; row i is (video i, video i+1) as context and next
scene) is read through the GRPO trainer's own loop (`grpo.engine.Engine`, `GRPOTrainer._rows_for`,
the data spec the CLI builds), with the iteration's GPU work replaced by ``--step-s`` seconds of
sleep. For ``prefetch_iterations`` 0 (decoded in the loop) and each ``--ahead`` value it records per
iteration the wall time and the time ``_rows_for`` waited for its rows; the summary is the median
over iterations >= 1 (iteration 0 has nothing loaded ahead, with or without prefetch).

    python benchmarks/prefetch_rows.py            # writes benchmarks/results/prefetch_rows_cpu.json

Times depend on the machine and its load (the JSON records the CPU count and load average).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from grpo.config import GRPOConfig
from grpo.data.nsp_dataset import write_manifest
from grpo.train import ManifestDataSpec
from grpo.trainer import GRPOTrainer
from policies import LTXPolicy
from policies.tiny import build_tiny_ltx
from policies.video_io import write_video


def synthetic_video(index: int, frames: int, height: int, width: int) -> np.ndarray:
    """A moving colour gradient with a drifting square and mild noise (so H.264 has real work)."""
    rng = np.random.default_rng(index)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    video = np.empty((frames, height, width, 3), dtype=np.float32)
    for f in range(frames):
        phase = 2 * np.pi * (f / frames + index / 8)
        video[f, ..., 0] = 0.5 + 0.5 * np.sin(x / width * 6 + phase)
        video[f, ..., 1] = 0.5 + 0.5 * np.cos(y / height * 4 - phase)
        video[f, ..., 2] = (x + y + 4 * f) % 64 / 64
        side = min(height, width) // 5
        top, left = (f * 5 + 40 * index) % (height - side), (f * 9 + 60 * index) % (width - side)
        video[f, top : top + side, left : left + side] = (1.0, 1.0, 1.0)
    video += rng.normal(0, 0.03, video.shape).astype(np.float32)
    return video.clip(0, 1)


def write_dataset(folder: Path, videos: int, frames: int, height: int, width: int, fps: float) -> Path:
    paths = []
    for i in range(videos):
        paths.append(write_video(folder / f"clip{i:02d}.mp4", synthetic_video(i, frames, height, width), fps))
    rows = [
        {
            "context_video": paths[i].name,
            "next_video": paths[(i + 1) % videos].name,
            "next_caption": f"clip {i}",
        }
        for i in range(videos)
    ]
    return write_manifest(rows, folder / "manifest.jsonl")


class FakeStepTrainer(GRPOTrainer):
    """The GRPO trainer with the iteration's work after reading its rows replaced by a sleep."""

    step_s = 0.0

    def train_step(self, iteration: int, started: float) -> dict[str, Any]:
        tick = time.perf_counter()
        rows = self._rows_for(iteration)
        waited = time.perf_counter() - tick
        time.sleep(self.step_s)
        assert all(row["video"].shape[0] > 0 for row in rows)
        return {"rows_wait_s": waited, "iteration_s": time.perf_counter() - started}


def run(
    manifest: Path, tiny: Path, out: Path, args: argparse.Namespace, step_s: float, ahead: int
) -> dict[str, Any]:
    spec = ManifestDataSpec(
        path=str(manifest),
        context_frames=args.frames,
        next_frames=args.frames,
        fps=args.fps,
        height=args.height,
        width=args.width,
    )
    rows, _ = spec.build()
    config = GRPOConfig(
        output_dir=str(out),
        num_prompts_per_iteration=args.rows,
        max_iterations=args.iterations,
        prefetch_iterations=ahead,
        save_steps=0,
        sample_every=0,
        seed=0,
        compile=False,
        report_to=[],
    )
    trainer = FakeStepTrainer(LTXPolicy.from_pretrained(tiny), ["redness"], config, rows)
    trainer.step_s = step_s
    history = trainer.train()
    steady = history[1:]
    return {
        "prefetch_iterations": ahead,
        "iteration_s_median": round(statistics.median(m["iteration_s"] for m in steady), 3),
        "rows_wait_s_median": round(statistics.median(m["rows_wait_s"] for m in steady), 3),
        "rows_wait_s_first": round(history[0]["rows_wait_s"], 3),
        "iteration_s": [round(m["iteration_s"], 3) for m in history],
        "rows_wait_s": [round(m["rows_wait_s"], 3) for m in history],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=8)
    parser.add_argument("--frames", type=int, default=49)
    parser.add_argument("--height", type=int, default=320)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--fps", type=float, default=24.0)
    parser.add_argument("--rows", type=int, default=4, help="rows (prompts) per iteration")
    parser.add_argument("--iterations", type=int, default=6)
    parser.add_argument(
        "--step-s", type=float, nargs="+", default=[2.0, 4.0], help="sleeps standing in for the GPU's work"
    )
    parser.add_argument("--ahead", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--json", default="benchmarks/results/prefetch_rows_cpu.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        manifest = write_dataset(tmp / "data", args.videos, args.frames, args.height, args.width, args.fps)
        tiny = build_tiny_ltx(tmp / "tiny")
        load_before = os.getloadavg()
        steps = []
        for step_s in args.step_s:
            runs = [run(manifest, tiny, tmp / f"run{step_s}_{a}", args, step_s, a) for a in [0, *args.ahead]]
            for r in runs:
                r["saved_s_per_iteration"] = round(runs[0]["iteration_s_median"] - r["iteration_s_median"], 3)
                print(
                    f"step {step_s} s, prefetch_iterations {r['prefetch_iterations']}: iteration "
                    f"{r['iteration_s_median']:.3f} s, _rows_for waited {r['rows_wait_s_median']:.3f} s"
                )
            steps.append({"fake_step_s": step_s, "runs": runs})
        load_after = os.getloadavg()
    result = {
        "what": "GRPO iteration time and _rows_for wait, rows decoded in the loop vs prefetched",
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, shared with other jobs",
        "load_average_1min": [round(load_before[0], 2), round(load_after[0], 2)],
        "manifest": {
            "videos": args.videos,
            "frames": args.frames,
            "height": args.height,
            "width": args.width,
            "fps": args.fps,
            "row": "context = video i, next = video i+1 (both decoded, all frames)",
        },
        "rows_per_iteration": args.rows,
        "iterations": args.iterations,
        "summary": "medians over iterations >= 1",
        "command": "python benchmarks/prefetch_rows.py",
        "steps": steps,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
