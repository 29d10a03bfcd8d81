"""Context parallelism of the LTX-2 denoiser (`LTX2Policy.enable_context_parallel`) over two gloo
processes against one process, on the tiny LTX-2."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from policies.tiny_ltx2 import build_tiny_ltx2

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_context_parallel_matches_one_process_in_rollout_recompute_and_gradients(tmp_path):
    checkpoint = build_tiny_ltx2(tmp_path / "tiny_ltx2")
    out = tmp_path / "cp.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            "29531",
            str(REPO / "tests" / "scripts" / "cp_worker.py"),
            str(checkpoint),
            str(out),
        ],
        # two CPU (gloo) ranks even on a machine with one GPU
        env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    diffs = json.loads(out.read_text())
    print(f"context parallel (2 ranks) vs one process: {diffs}")
    assert diffs["steps"] >= 3 and diffs["final_scale"] > 0.1
    # fp32: splitting the tokens changes only the order of the attention sums
    assert diffs["latents_max_abs"] <= 1e-5 and diffs["final_max_abs"] <= 1e-5
    assert diffs["log_prob_max_abs"] <= 1e-5
    # recomputation under context parallelism gives back the rollout's own log-probs exactly
    assert diffs["recompute_max_abs"] == 0.0
    assert diffs["ranks_max_abs"] == 0.0  # every rank holds the whole gathered output
    # training through it: the ranks' gradient shares sum to the one-process gradients (fp32 rounding)
    assert diffs["grad_names"] and diffs["grad_scale"] > 1e-3
    assert diffs["grad_max_abs"] <= 1e-5 * diffs["grad_scale"]
