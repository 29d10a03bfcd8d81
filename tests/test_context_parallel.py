"""Context parallelism of the LTX-2 denoiser (`LTX2Policy.enable_context_parallel`, and GRPO's
``trainer.context_parallel``) over two gloo processes against one process, on the tiny LTX-2."""

import json

import pytest
from safetensors.torch import load_file
from test_distributed_training import torchrun_worker

from grpo.tracking import read_metrics
from policies.tiny_ltx2 import build_tiny_ltx2


def _torchrun(script, *args, port, nproc=2):
    torchrun_worker(script, *args, port=port, nproc=nproc, timeout=300)


@pytest.mark.slow
def test_context_parallel_matches_one_process_in_rollout_recompute_and_gradients(tmp_path):
    checkpoint = build_tiny_ltx2(tmp_path / "tiny_ltx2")
    out = tmp_path / "cp.json"
    _torchrun("cp_worker.py", checkpoint, out, port=29531)
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


@pytest.mark.slow
def test_grpo_with_context_parallel_matches_one_process(tmp_path):
    """`trainer.context_parallel` over two gloo ranks (they share samples, each takes half of every
    forward's tokens) ends a tiny LTX-2 GRPO run with the one-process run's weights."""
    checkpoint = build_tiny_ltx2(tmp_path / "tiny_ltx2")
    _torchrun("cp_grpo_worker.py", checkpoint, tmp_path / "one", port=29532, nproc=1)
    _torchrun("cp_grpo_worker.py", checkpoint, tmp_path / "two", port=29533)
    weights = "final/transformer/diffusion_pytorch_model.safetensors"
    one, two = load_file(str(tmp_path / "one" / weights)), load_file(str(tmp_path / "two" / weights))
    start = load_file(str(checkpoint / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert one.keys() == two.keys() == start.keys()
    diff = max((one[k] - two[k]).abs().max().item() for k in one)
    moved = max((one[k] - start[k]).abs().max().item() for k in one)
    print(
        f"GRPO, context parallel on 2 ranks vs 1 process: max abs weight diff {diff:.2e} (moved {moved:.2e})"
    )
    assert moved > 1e-3 and diff <= 1e-6  # fp32: only the order of the attention sums differs
    runs = read_metrics(tmp_path / "one" / "metrics.jsonl"), read_metrics(tmp_path / "two" / "metrics.jsonl")
    assert len(runs[0]) == len(runs[1]) == 2
    for a, b in zip(*runs, strict=True):
        assert b["train/grad_norm"] == pytest.approx(a["train/grad_norm"], rel=1e-5)  # the ranks' sum
        assert b["train/logprob_drift"] <= 1e-6  # recomputation under context parallelism
