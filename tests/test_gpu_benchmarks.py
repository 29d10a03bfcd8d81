"""The GPU benchmarks' CPU smoke modes, their FLOP count, `LTXPolicy.compile`, and the accelerate configs.

No timing is asserted: the benchmarks' numbers come from GPUs (benchmarks/results/); here their
code paths run on tiny models so that a broken benchmark fails in CI, not on a rented GPU.
"""

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_rollout  # noqa: E402
import gpu_scaling  # noqa: E402

from policies import LTXPolicy, SamplingConfig  # noqa: E402
from policies.tiny import build_tiny_ltx  # noqa: E402

ROW_KEYS = {
    "key",
    "what",
    "ms",
    "tflop",
    "peak_gib",
    "tflops",
    "pct_ceiling",
    "speedup_vs_diffusers",
    "speedup_vs_diffusers_compiled",
    "note",
}


@pytest.mark.parametrize("shape", [(3, 8, 8), (5, 16, 16)])
def test_ltx_forward_flops_match_torch_flop_counter(shape):
    """The stated FLOP formula against torch's own count of the tiny transformer's matmuls (math SDPA)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    policy = gpu_rollout.build_policy(True, torch.device("cpu"), torch.float32)
    cond = gpu_rollout.make_condition(policy, 1.0, torch.device("cpu"))
    tokens = math.prod(shape)
    text = policy.text_inputs(cond, torch.zeros(2, dtype=torch.long), 1.0)
    with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel([SDPBackend.MATH]):
        policy.velocity(torch.randn(2, tokens, 8), torch.full((2,), 500.0), text, 1.0, shape, 25.0)
    expected = gpu_rollout.ltx_forward_flops(gpu_rollout.LTX_TINY, tokens, batch=2)
    # the formula leaves out only the per-sample timestep MLPs
    assert counter.get_total_flops() == pytest.approx(expected, rel=0.01)


@pytest.mark.slow
def test_gpu_rollout_smoke_rollouts_and_checks(tmp_path):
    args = gpu_rollout.parse_args(
        [
            "--tiny",
            "--settings",
            "tiny-9x32x32",
            "--sections",
            "a,c_eager,check_eager,b,c,c_fp8,check_fp8,c_fa3,check_fp8_fa3,profile,check",
            "--json",
            str(tmp_path / "{setting}.json"),
        ]
    )
    (result,) = gpu_rollout.run(args)
    saved = json.loads((tmp_path / "tiny-9x32x32.json").read_text())
    assert saved["rows"] == result["rows"]
    rows = {r["key"]: r for r in saved["rows"]}
    assert set(rows) == {"a", "c_eager", "b", "c", "c_fp8"}
    for row in rows.values():
        assert set(row) == ROW_KEYS and row["ms"] > 0 and row["tflop"] > 0
    assert rows["a"]["speedup_vs_diffusers"] == 1.0
    assert rows["c"]["speedup_vs_diffusers"] == pytest.approx(rows["a"]["ms"] / rows["c"]["ms"])
    # both rollouts ran the same 2 videos x 3 steps with CFG: the same FLOPs
    assert rows["a"]["tflop"] == rows["b"]["tflop"] == rows["c"]["tflop"]
    # fp32: recomputation gives the rollout's log-probs back, eager and compiled, any micro-batch
    for key in ("check_eager", "check"):
        check = saved["checks"][key]
        for variant in ("same_batch", "microbatch", "microbatch_grad"):
            assert check[f"{variant}_logp_max_abs"] <= 1e-5
    assert saved["checks"]["check"]["compiled"] and not saved["checks"]["check_eager"]["compiled"]
    # the FP8 rollout: its record is off the full-precision recompute by FP8 rounding, not by more;
    # re-scored in FP8 it is its own again
    fp8 = saved["checks"]["check_fp8"]
    assert 0 < fp8["logprob_drift_max_abs"] < 1e-2 and fp8["fast_recompute_logp_max_abs"] <= 1e-5
    assert 0 < fp8["mean_rel_max"] < 0.1 and 0 < fp8["final_latents_rel_l2_vs_c"] < 0.1
    assert fp8["fp8_layers"] == 20  # 2 blocks x (attn1 q/k/v/out, attn2 q/k/v/out, ff up/down)
    # FlashAttention-3 runs on Hopper at head dims 64-256: the tiny model (16) is refused anywhere,
    # with the trainer's one-line reason, and the check of its rollout says there is none
    assert "set rollout_attention sdpa" in saved["info"]["c_fa3_skipped"]
    assert saved["checks"]["check_fp8_fa3_skipped"] == "no c_fp8_fa3 rollout"
    assert saved["info"]["profile_ms_by_class"] and saved["info"]["profile_top_kernels"]
    table = gpu_rollout.format_table(saved)
    assert "| vs diffusers | vs diffusers compiled |" in table and table.count("\n| ") == 6


@pytest.mark.slow
def test_gpu_rollout_smoke_update_training_and_nsp(tmp_path):
    args = gpu_rollout.parse_args(
        [
            "--tiny",
            "--settings",
            "tiny-9x32x32",
            "--sections",
            "c_eager,e,train,d",
            "--compile",
            "none",
            "--json",
            str(tmp_path / "{setting}.json"),
        ]
    )
    (result,) = gpu_rollout.run(args)
    rows = {r["key"]: r for r in result["rows"]}
    assert set(rows) == {"c_eager", "e_cond", "e", "train", "d"}
    assert 0 < result["info"]["nsp_vlm_share"] < 1
    assert rows["e_cond"]["ms"] / (rows["e_cond"]["ms"] + rows["e"]["ms"]) == pytest.approx(
        result["info"]["nsp_vlm_share"]
    )
    tokens = result["latent_tokens"]
    forward = gpu_rollout.ltx_forward_flops(gpu_rollout.LTX_TINY, tokens, batch=2)
    assert rows["train"]["tflop"] == pytest.approx(3 * forward / 1e12)
    # d: 2 samples x 2 steps, each a CFG-batched forward with LoRA backward (2x) + the reference (1x)
    assert rows["d"]["tflop"] == pytest.approx(2 * 2 * 3 * forward / 1e12)


@pytest.mark.slow
def test_gpu_rollout_ltx2_smoke_with_stg(tmp_path):
    stg = ["--family", "ltx2", "--tiny", "--perturbed-attn", "--stg", "1", "--stg-blocks", "1"]
    # eager: diffusers, our rollout, its recompute and the update (an update after the compiled
    # rollout traces LoRA's backward graphs too: a minute of CPU tracing, measured on the GPU instead)
    args = gpu_rollout.parse_args(
        stg + ["--sections", "a,c_eager,check_eager,d", "--json", str(tmp_path / "e.json")]
    )
    (result,) = gpu_rollout.run(args)
    assert [r["key"] for r in result["rows"]] == ["a", "c_eager", "d"]
    update = result["rows"][-1]
    assert update["ms"] > 0 and update["tflop"] == pytest.approx(3 * 2 * result["info"]["step_tflop"])
    assert result["checks"]["check_eager"]["logp_max_abs"] <= 1e-5  # recompute == rollout
    assert result["info"]["step_tflop"] > 0
    assert json.loads((tmp_path / "e.json").read_text())["rows"] == result["rows"]
    # compiled (diffusers' blocks compile by the same call as ours): recompute == rollout
    args = gpu_rollout.parse_args(stg + ["--sections", "c,check", "--json", str(tmp_path / "c.json")])
    (result,) = gpu_rollout.run(args)
    assert [r["key"] for r in result["rows"]] == ["c"]
    assert result["checks"]["check"]["logp_max_abs"] <= 1e-5


def test_gpu_rollout_rejects_unknown_sections():
    with pytest.raises(SystemExit, match="sections"):
        gpu_rollout.run(gpu_rollout.parse_args(["--tiny", "--sections", "a,warp"]))


def test_compiled_policy_recomputes_rollout_and_keeps_its_own_reference(tmp_path):
    """Under compile, recomputed log-probs equal the rollout's, and the full fine-tuning reference copy
    (deep-copied after compile) computes with the frozen weights, not the trained ones."""
    policy = LTXPolicy.from_pretrained(build_tiny_ltx(tmp_path / "tiny"))
    cond = policy.encode_prompt(["a red ball"], negative_prompt="")
    sampling = SamplingConfig(num_frames=9, height=32, width=32, num_inference_steps=3, guidance_scale=3.0)
    eager = policy.rollout(cond, num_generations=2, sampling=sampling, seeds=[0, 1])
    policy.compile(backend="aot_eager")
    policy.keep_reference_copy()
    rollout = policy.rollout(cond, num_generations=2, sampling=sampling, seeds=[0, 1])
    # aot_eager runs eager kernels: compiling the blocks changes nothing
    assert torch.equal(rollout.final_latents, eager.final_latents)
    assert torch.equal(rollout.log_probs, eager.log_probs)
    with torch.no_grad():
        for j in range(rollout.latents.shape[1]):
            out = policy.log_prob(rollout, j)
            assert (out.log_prob - rollout.log_probs[:, j]).abs().max().item() <= 1e-5
        for param in policy.transformer.parameters():
            param.add_(0.05 * torch.randn_like(param))
        tuned = policy.log_prob(rollout, 0)
        with policy.reference():
            ref = policy.log_prob(rollout, 0)
    torch.testing.assert_close(ref.log_prob, rollout.log_probs[:, 0], rtol=0, atol=1e-5)
    assert (tuned.log_prob - rollout.log_probs[:, 0]).abs().max() > 1e-3


@pytest.mark.slow
def test_gpu_scaling_smoke_one_and_two_processes(tmp_path):
    path = tmp_path / "scaling.json"
    result = gpu_scaling.main(
        ["--tiny", "--gpus", "1,2", "--modes", "lora", "--iterations", "1", "--json", str(path)]
    )
    assert json.loads(path.read_text()) == json.loads(json.dumps(result))
    one, two = result["configs"]
    assert (one["gpus"], two["gpus"]) == (1, 2) and one["scaling"] == 1.0
    for row in (one, two):
        assert row["samples_per_s"] > 0 and row["iteration_s"] > 0 and len(row["raw"]) == 2
        assert row["samples_per_s_per_gpu"] == pytest.approx(row["samples_per_s"] / row["gpus"])
        assert math.isfinite(row["reward_hidden_frac"])
    assert two["scaling"] == pytest.approx(two["samples_per_s_per_gpu"] / one["samples_per_s_per_gpu"])
    assert "| lora | - | 2 | 1 |" in gpu_scaling.format_table(result)


@pytest.mark.slow
def test_gpu_scaling_smoke_ltx2_full_fsdp_and_context_parallel(tmp_path):
    """The LTX-2 modes on two CPU processes: full fine-tuning under FSDP2 and a context-parallel rollout."""
    path = tmp_path / "scaling.json"
    args = ["--tiny", "--model", "ltx2", "--gpus", "2", "--modes", "full,cp", "--iterations", "1"]
    result = gpu_scaling.main([*args, "--json", str(path)])
    assert json.loads(path.read_text()) == json.loads(json.dumps(result))
    full, cp = result["configs"]
    assert (full["mode"], full["gpus"], cp["mode"], cp["gpus"], cp["setting"]) == (
        "full",
        2,
        "cp",
        2,
        "9x64x64",
    )
    for row in (full, cp):
        assert row["samples_per_s"] > 0 and len(row["raw"]) == 2 and row["scaling"] == 1.0
    # context parallel: both GPUs work on the same G samples (rollout, then the update's forward + backward)
    assert cp["rollout_s"] > 0 and cp["update_s"] > 0
    assert cp["samples_per_s"] == pytest.approx(result["run"]["generations"] / cp["iteration_s"])
    assert "| cp | 9x64x64 | 2 | 1 |" in gpu_scaling.format_table(result)


@pytest.mark.parametrize("name", ["multi_gpu.yaml", "multi_node.yaml"])
def test_accelerate_configs_load_with_accelerate(name):
    from accelerate.commands.config.config_args import ClusterConfig

    path = ROOT / "recipes" / "accelerate" / name
    raw = yaml.safe_load(path.read_text())
    config = ClusterConfig.from_yaml_file(str(path))
    assert str(config.distributed_type).endswith("MULTI_GPU")
    # the trainer does its own bf16 autocast; accelerate must not add another
    assert raw["mixed_precision"] == "no"
    assert raw["num_processes"] % raw["num_machines"] == 0
    if name == "multi_node.yaml":
        assert raw["num_machines"] >= 2 and raw["rdzv_backend"] == "static"
