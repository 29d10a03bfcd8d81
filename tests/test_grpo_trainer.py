"""GRPOTrainer end to end on a tiny LTX policy: it learns, resumes exactly, survives SIGTERM,
keeps ranks in sync, and rejects bad recipes fast."""

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import rewards
from grpo.checkpoint import latest_checkpoint, load_checkpoint
from grpo.cli import main
from grpo.recipe import load_recipe
from grpo.tracking import read_metrics
from grpo.train import run
from policies.tiny import build_tiny_ltx

REPO = Path(__file__).resolve().parents[1]


@rewards.register("test_redness")
def redness(videos, prompts, contexts, **metadata):
    """Mean of R - (G + B) / 2: a reward the tiny policy can reach."""
    return [float((v[..., 0] - 0.5 * (v[..., 1] + v[..., 2])).mean()) for v in videos]


@rewards.register("test_blueness")
def blueness(videos, prompts, contexts, **metadata):
    return [float((v[..., 2] - 0.5 * (v[..., 0] + v[..., 1])).mean()) for v in videos]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_ltx(tmp_path_factory.mktemp("tiny_ltx"))


def _recipe(tmp_path, tiny_dir, **trainer):
    recipe = {
        "name": "test-grpo",
        "stage": "grpo",
        "policy": {"type": "ltx", "path": str(tiny_dir)},
        "data": {
            "type": "prompts",
            "prompts": ["a ball", "two balls", "a square", "red things"],
            "eval_prompts": ["a ball", "a cube", "a red square", "two cubes"],
        },
        "rewards": [{"name": "test_redness", "weight": 1.0}, {"name": "test_blueness", "weight": 0.0}],
        "trainer": {
            "output_dir": str(tmp_path / "run"),
            "num_generations": 4,
            "num_prompts_per_iteration": 2,
            "num_inference_steps": 6,
            "learning_rate": 3e-3,
            "epsilon": 1e-3,
            "beta": 0.004,
            **trainer,
        },
    }
    path = tmp_path / "recipe.yaml"
    tmp_path.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.mark.slow
def test_grpo_raises_a_reachable_reward_and_kl_grows_from_zero(tmp_path, tiny_dir):
    recipe = load_recipe(_recipe(tmp_path, tiny_dir, max_iterations=24, eval_every=12))
    run(recipe)
    metrics = read_metrics(tmp_path / "run" / "metrics.jsonl")
    evals = [m["eval/test_redness/mean"] for m in metrics if "eval/test_redness/mean" in m]
    first, last = metrics[0], [m for m in metrics if "train/kl" in m][-1]
    within_group_std = first["reward/test_redness/std"]
    print(
        f"held-out redness {evals[0]:.5f} -> {evals[-1]:.5f} (group std {within_group_std:.5f}); "
        f"KL {first['train/kl']:.2e} -> {last['train/kl']:.2e}"
    )
    assert len(evals) == 3  # iterations 0 and 12, and after the last
    assert evals[-1] - evals[0] > 3 * within_group_std
    assert first["train/kl"] < 1e-8 < 1e-4 < last["train/kl"]
    for m in metrics:
        if "train/ratio_first_step" in m:  # on-policy: the first inner step has ratio 1
            assert m["train/ratio_first_step"] == pytest.approx(1.0, abs=1e-5)
            assert m["train/logprob_drift"] < 1e-4  # the rollout recorded what training recomputes
    # per-reward columns are logged; the weight-0 reward is logged but not trained on
    assert "reward/test_blueness/mean" in first
    assert first["reward/mean"] == pytest.approx(first["reward/test_redness/mean"], abs=1e-6)
    assert (tmp_path / "run" / "resolved_recipe.yaml").is_file()
    assert (tmp_path / "run" / "final" / "transformer").is_dir()


def _cli(*argv, **popen):
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'tests'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, test_grpo_trainer; from grpo.cli import main; sys.exit(main(sys.argv[1:]))",
            *argv,
        ],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **popen,
    )


def _final_weights(run_dir):
    return load_file(str(run_dir / "final" / "transformer" / "diffusion_pytorch_model.safetensors"))


@pytest.mark.slow
def test_resume_after_sigkill_is_exact(tmp_path, tiny_dir):
    settings = [
        "trainer.max_iterations=24",
        "trainer.save_steps=6",
        "trainer.num_generations=2",
        "trainer.num_inference_steps=4",
        "data.eval_prompts=null",
    ]
    straight = _recipe(tmp_path / "a", tiny_dir)
    assert _cli("train", str(straight), *settings).wait(timeout=600) == 0

    resumed = _recipe(tmp_path / "b", tiny_dir)
    proc = _cli("train", str(resumed), *settings)
    run_dir = tmp_path / "b" / "run"
    deadline = time.time() + 300
    while latest_checkpoint(run_dir) is None and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert latest_checkpoint(run_dir) is not None
    time.sleep(random.uniform(0.0, 0.5))  # a random point after the checkpoint, mid-training
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert not (run_dir / "final").exists()  # killed before the end
    assert (
        _cli("train", str(resumed), *settings, "trainer.resume_from_checkpoint=auto").wait(timeout=600) == 0
    )

    a, b = _final_weights(tmp_path / "a" / "run"), _final_weights(run_dir)
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    ma, mb = read_metrics(tmp_path / "a" / "run" / "metrics.jsonl"), read_metrics(run_dir / "metrics.jsonl")
    assert [m["step"] for m in ma] == [m["step"] for m in mb] == list(range(24))
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(24))  # re-run steps logged once
    for x, y in zip(ma, mb):
        assert abs(x["reward/mean"] - y["reward/mean"]) <= 1e-6


@pytest.mark.slow
def test_sigterm_leaves_a_complete_loadable_checkpoint(tmp_path, tiny_dir):
    recipe = _recipe(tmp_path, tiny_dir)
    proc = _cli(
        "train",
        str(recipe),
        "trainer.max_iterations=50",
        "trainer.save_steps=0",
        "trainer.num_generations=2",
        "trainer.num_inference_steps=4",
        "data.eval_prompts=null",
    )
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.is_file() and metrics.read_text().strip()) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output
    ckpt_path = latest_checkpoint(tmp_path / "run")
    assert ckpt_path is not None
    ckpt = load_checkpoint(ckpt_path, restore_rng=False)
    assert 1 <= ckpt.step < 50 and ckpt.optimizer_state and ckpt.model_state
    assert len(read_metrics(metrics)) == ckpt.step


def torchrun_worker(script, *args, port, nproc=2, timeout=600):
    """Run ``tests/scripts/<script>`` as ``nproc`` torchrun ranks and assert they all succeed."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(nproc),
            "--master_port",
            str(port),
            str(REPO / "tests" / "scripts" / script),
            *map(str, args),
        ],
        # CPU (gloo) ranks even on a machine with one GPU, which two NCCL ranks cannot share
        env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def _torchrun(tiny_dir, out, *overrides, port, nproc=2):
    torchrun_worker("ddp_worker.py", tiny_dir, out, *overrides, port=port, nproc=nproc)
    return [
        [json.loads(line) for line in (out / f"rank{r}.jsonl").read_text().splitlines()] for r in range(nproc)
    ]


@pytest.mark.slow
def test_two_gloo_processes_keep_identical_weights(tmp_path, tiny_dir):
    ranks = _torchrun(tiny_dir, tmp_path / "ddp", port=29517)
    assert len(ranks[0]) == len(ranks[1]) >= 4  # 2 iterations x 2 micro-batches
    assert ranks[0] == ranks[1]
    assert len({row["sha256"] for row in ranks[0]}) == len(ranks[0])  # the weights do move


@pytest.mark.slow
def test_two_gloo_processes_stay_identical_with_the_update_overlapped(tmp_path, tiny_dir):
    """overlap_update over two ranks: each iteration's update (of the previous batch) and its
    gradient all-reduce run while the scorer thread decodes; the ranks stay identical."""
    ranks = _torchrun(tiny_dir, tmp_path / "ddp", "overlap_update=true", "max_iterations=3", port=29541)
    assert len(ranks[0]) == 6  # 3 batches x 2 micro-batches, the last two drained at the end
    assert ranks[0] == ranks[1]
    assert len({row["sha256"] for row in ranks[0]}) == len(ranks[0])


@pytest.mark.slow
def test_best_of_n_keeps_whole_groups_on_each_rank(tmp_path, tiny_dir):
    """Each rank holds whole groups, so best-of-N selects locally: keeping 1 + 1 of 3 samples per
    prompt, each rank trains 2 samples (2 micro-batches of 1, not 3) and the ranks stay identical."""
    out = tmp_path / "ddp"
    ranks = _torchrun(tiny_dir, out, "num_generations=3", "best_of_n_keep=[1, 1]", port=29521)
    assert len(ranks[0]) == 2 * 2  # 2 iterations x 2 kept samples per rank
    assert ranks[0] == ranks[1]
    metrics = read_metrics(out / "metrics.jsonl")
    assert all("best_of_n/reward_mean_all" in m and "best_of_n/reward_mean_kept" in m for m in metrics)


@pytest.mark.slow
def test_fsdp2_with_a_resume_matches_ddp(tmp_path, tiny_dir):
    """Full fine-tuning sharded with FSDP2 over two gloo ranks, checkpointed and resumed midway,
    ends with the weights of the same run under DDP."""
    # Adam with a large epsilon updates linearly in the gradient (lr * m / eps): all-reduce vs
    # reduce-scatter rounding then stays rounding, instead of flipping the sign of near-zero steps
    linear = ("adam_epsilon=1.0", "learning_rate=1.0")
    _torchrun(tiny_dir, tmp_path / "ddp", "max_iterations=3", *linear, port=29518)
    _torchrun(
        tiny_dir, tmp_path / "fsdp", "fsdp=true", "max_iterations=2", "save_steps=1", *linear, port=29519
    )
    assert latest_checkpoint(tmp_path / "fsdp").name == "checkpoint-00000002"
    ranks = _torchrun(
        tiny_dir,
        tmp_path / "fsdp",
        "fsdp=true",
        "max_iterations=3",
        "save_steps=1",
        "resume_from_checkpoint=auto",
        port=29520,
    )
    assert ranks[0] == ranks[1]  # full weights gathered from the shards agree on both ranks
    ddp, fsdp = _final_weights(tmp_path / "ddp"), _final_weights(tmp_path / "fsdp")
    start = load_file(str(tiny_dir / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert ddp.keys() == fsdp.keys()
    diff = max((ddp[k] - fsdp[k]).abs().max().item() for k in ddp)
    moved = max((ddp[k] - start[k]).abs().max().item() for k in ddp)
    print(f"FSDP2 (with resume) vs DDP: max abs weight difference {diff:.2e} (weights moved {moved:.2e})")
    assert moved > 1e-3 and diff <= 1e-5


@pytest.mark.slow
def test_fsdp2_bf16_matches_one_process_and_resumes_across_world_sizes(tmp_path, tiny_dir):
    """FSDP2 with bf16 compute (fp32 master weights and reduction): one process, two processes
    resumed by one (2 -> 1), and one process resumed by two (1 -> 2) end with the same weights."""
    import shutil

    # one optimizer step per iteration over all of its samples, whatever the number of ranks; Adam
    # with a large epsilon updates linearly in the gradient (see test_fsdp2_with_a_resume_matches_ddp)
    common = ("fsdp=true", "fsdp_param_dtype=bf16", "per_device_train_batch_size=null", "save_steps=1")
    common += ("adam_epsilon=1.0", "learning_rate=1.0")
    one, two_one, one_two = tmp_path / "one", tmp_path / "two_one", tmp_path / "one_two"
    _torchrun(tiny_dir, one, *common, "max_iterations=2", port=29522, nproc=1)
    _torchrun(tiny_dir, two_one, *common, "max_iterations=1", port=29523)
    resume = (*common, "max_iterations=2", "resume_from_checkpoint=auto")
    _torchrun(tiny_dir, two_one, *resume, port=29524, nproc=1)
    shutil.copytree(one / "checkpoint-00000001", one_two / "checkpoint-00000001")
    ranks = _torchrun(tiny_dir, one_two, *resume, port=29525)
    assert ranks[0] == ranks[1]  # full weights gathered from the shards agree on both ranks
    start = load_file(str(tiny_dir / "transformer" / "diffusion_pytorch_model.safetensors"))
    ref = _final_weights(one)
    moved = max((ref[k] - start[k]).abs().max().item() for k in ref)
    for run_dir in (two_one, one_two):
        weights = _final_weights(run_dir)
        assert weights.keys() == ref.keys()
        diff = max((weights[k] - ref[k]).abs().max().item() for k in ref)
        print(f"FSDP2 bf16 {run_dir.name} vs one process: max abs weight diff {diff:.2e} (moved {moved:.2e})")
        # bf16 has 8 significant bits (relative rounding 2^-9): the 2-rank and 1-rank forwards batch
        # differently, so their bf16 gradients differ by rounding, ~0.4% of the update (fp32: 1e-5 above)
        assert moved > 1e-3 and diff <= 0.01 * moved


@pytest.mark.slow
@pytest.mark.parametrize("dtype,tolerance", [("fp32", 1e-5), ("bf16", 2e-3)])
def test_fsdp2_rollout_keeps_weights_gathered_without_changing_samples(tmp_path, tiny_dir, dtype, tolerance):
    """Inside `TrainingState.rollout_weights` the blocks stay gathered between forwards and are
    resharded at the end; the rollout is bitwise the one without it, and recomputation outside it
    gives its log-probs back (fp32: rounding; bf16 on CPU: bf16 rounding, as bf16 autocast without FSDP)."""
    out = tmp_path / "rollout.json"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29526"]
        + [str(REPO / "tests" / "scripts" / "fsdp_rollout_worker.py"), str(tiny_dir), str(out), dtype],
        env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    seen = json.loads(out.read_text())
    print(f"FSDP2 {dtype} rollout: {seen}")
    assert seen["after_plain"] == [True]  # without it: resharded after every forward
    assert seen["inside"] == [False] and seen["after"] == [True]
    assert seen["latents_equal"] and seen["log_probs_equal"]
    assert seen["recompute_max_abs"] <= tolerance


def _adapter(run_dir):
    return load_file(str(run_dir / "final" / "transformer_lora" / "pytorch_lora_weights.safetensors"))


@pytest.mark.slow
def test_fsdp2_lora_matches_ddp_resumes_across_world_sizes_and_exports_its_adapter(tmp_path, tiny_dir):
    """LoRA sharded with FSDP2, one process checkpointed after an iteration and resumed by two
    (1 -> 2), ends with the LoRA weights of the two-rank DDP run; checkpoints hold only the adapters;
    the exported adapter (gathered from the shards) loads into a fresh policy that samples as DDP's."""
    from policies import LTXPolicy, SamplingConfig

    # one optimizer step per iteration whatever the ranks; Adam linear in the gradient (see above)
    common = ("use_lora=true", "lora_rank=4", "lora_alpha=8", "per_device_train_batch_size=null")
    common += ("adam_epsilon=1.0", "learning_rate=1.0")
    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    _torchrun(tiny_dir, ddp, *common, "max_iterations=2", port=29527)
    _torchrun(tiny_dir, fsdp, *common, "fsdp=true", "max_iterations=1", "save_steps=1", port=29528, nproc=1)
    resume = ("fsdp=true", "max_iterations=2", "save_steps=1", "resume_from_checkpoint=auto")
    ranks = _torchrun(tiny_dir, fsdp, *common, *resume, port=29529)
    assert ranks[0][-1] == ranks[1][-1]  # the full LoRA weights gathered from the shards agree
    ckpt = load_checkpoint(fsdp / "checkpoint-00000002", restore_rng=False)
    assert ckpt.model_state and all("lora_" in name for name in ckpt.model_state)  # no frozen base
    ours, theirs = _adapter(fsdp), _adapter(ddp)
    assert ours.keys() == theirs.keys() and len(ours) == len(ckpt.model_state)
    for name, tensor in ckpt.model_state.items():  # the export is the trained (checkpointed) weights
        assert torch.equal(ours[name.replace(".nextscene_lora", "")], tensor)
    diff = max((ours[k] - theirs[k]).abs().max().item() for k in ours)
    moved = max(ours[k].abs().max().item() for k in ours if "lora_B" in k)  # lora_B starts at zero
    print(f"FSDP2 LoRA (1 -> 2 ranks) vs DDP: max abs LoRA weight difference {diff:.2e} (moved {moved:.2e})")
    assert moved > 1e-3 and diff <= 1e-5
    start = load_file(str(tiny_dir / "transformer" / "diffusion_pytorch_model.safetensors"))
    base = _final_weights(fsdp)
    assert base.keys() == start.keys() and all(torch.equal(base[k], start[k]) for k in start)

    sampling = SamplingConfig(num_inference_steps=3)
    videos = {}
    for run_dir in (ddp / "final", fsdp / "final", tiny_dir):
        policy = LTXPolicy.from_pretrained(run_dir)
        with torch.no_grad():
            condition = policy.encode_prompt(["a red cube"])
            videos[run_dir] = policy.rollout(condition, sampling=sampling, seeds=[7]).final_latents
    gap = (videos[fsdp / "final"] - videos[ddp / "final"]).abs().max().item()
    trained = (videos[fsdp / "final"] - videos[tiny_dir]).abs().max().item()
    print(f"sampled from the exported adapters: FSDP2 vs DDP {gap:.2e}, vs the base {trained:.2e}")
    assert gap <= 1e-5 and trained > 100 * max(gap, 1e-7)


@pytest.mark.slow
def test_fsdp2_lora_keeps_a_bf16_base_in_bf16_with_fp32_adapters(tmp_path, tiny_dir):
    ranks = _torchrun(
        tiny_dir,
        tmp_path / "bf16",
        "torch_dtype=bfloat16",
        "use_lora=true",
        "fsdp=true",
        "mixed_precision=bf16",
        "ema_decay=0.5",  # the export gathers the EMA adapters swapped into the shards
        "max_iterations=1",
        port=29530,
    )
    assert ranks[0] == ranks[1]
    assert ranks[0][0]["dtypes"] == ["base:torch.bfloat16", "lora:torch.float32"]
    base = _final_weights(tmp_path / "bf16")
    assert {t.dtype for t in base.values()} == {torch.bfloat16}
    assert {t.dtype for t in _adapter(tmp_path / "bf16").values()} == {torch.float32}


@pytest.mark.parametrize(
    "override,message",
    [
        ("trainer.lerning_rate=1e-3", "did you mean 'trainer.learning_rate'"),
        ("trainer.num_generations=two", "trainer.num_generations"),
        ("data.path=/nonexistent/prompts.txt", "does not exist"),
        ("rewards.0.name=no_such_reward", "unknown reward 'no_such_reward'"),
        ("policy.path=/nonexistent/ltx", "does not exist"),
    ],
)
def test_bad_recipe_fails_fast_with_one_line(tmp_path, tiny_dir, capsys, override, message):
    recipe = _recipe(tmp_path, tiny_dir)
    extra = ["data.prompts=null"] if override.startswith("data.path") else []
    start = time.perf_counter()
    assert main(["train", str(recipe), override, *extra]) == 2
    elapsed = time.perf_counter() - start
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err, err
    assert elapsed < 3.0
    assert not (tmp_path / "run").exists()


def test_trainer_rejects_prompts_that_do_not_split_over_ranks(tiny_dir):
    from grpo.config import GRPOConfig
    from grpo.trainer import GRPOTrainer
    from policies import LTXPolicy
    from policies.errors import InputError

    policy = LTXPolicy.from_pretrained(tiny_dir)
    with pytest.raises(InputError, match="train_dataset is empty"):
        GRPOTrainer(policy, [redness], GRPOConfig(output_dir="/tmp/x"), [])
    with pytest.raises(InputError, match="num_frames=10 is not 8k\\+1"):
        GRPOTrainer(policy, [redness], GRPOConfig(output_dir="/tmp/x", num_frames=10), [{"prompt": "a"}])
    assert torch.is_tensor(next(policy.parameters()))


@pytest.mark.parametrize("num_iterations", [1, 2])
def test_one_update_per_rollout_is_exactly_on_policy_despite_logprob_drift(
    tmp_path, tiny_dir, num_iterations
):
    """With one optimizer step per rollout the PPO ratio is exactly 1 even when the rollout recorded
    slightly different log-probs (compiled / bf16 kernels); with more epochs the recorded ones count."""
    from grpo.config import GRPOConfig
    from grpo.trainer import GRPOTrainer
    from policies import LTXPolicy

    args = GRPOConfig(
        output_dir=str(tmp_path / "run"),
        num_generations=4,
        num_prompts_per_iteration=1,
        num_inference_steps=3,
        num_iterations=num_iterations,
        epsilon=1e-4,
        beta=0.0,
        learning_rate=1e-12,  # the weights stay (all but) the rollout's in every epoch
        seed=0,
    )
    trainer = GRPOTrainer(LTXPolicy.from_pretrained(tiny_dir), [redness], args, [{"prompt": "a ball"}])
    rollout, scores, _ = trainer._rollout_and_score(trainer._rows_for(0), 0)
    advantages, _ = trainer._advantages(scores)
    rollout.log_probs = rollout.log_probs + 0.01  # what a numerically different sampling forward records
    stats = trainer._update(rollout, advantages, 0)
    assert stats["train/logprob_drift"] == pytest.approx(0.01, abs=1e-4)
    if num_iterations == 1:
        assert stats["train/ratio_min"] == stats["train/ratio_max"] == 1.0 and stats["train/clip_frac"] == 0
    else:  # the recorded log-probs are the old policy's: exp(-0.01) is outside 1 +- 1e-4, so clipped
        assert stats["train/ratio_mean"] == pytest.approx(math.exp(-0.01), abs=1e-4)
        assert stats["train/clip_frac"] > 0


def test_the_kl_reference_runs_once_per_iteration_over_several_epochs(tmp_path, tiny_dir):
    """With num_iterations 2 the reference forward of the KL term runs in the first epoch only (its
    means depend on the rollout, not on the trained weights); the update's statistics and the trained
    weights are those of recomputing it in every epoch, up to float32 rounding (the second epoch's
    micro-batches hold other samples, and a batched forward may round differently: 1.4e-7 relative
    seen on the KL with transformers 5.24)."""
    from grpo.config import GRPOConfig
    from grpo.trainer import GRPOTrainer
    from policies import LTXPolicy

    def update(cached: bool) -> tuple[dict, dict, int]:
        args = GRPOConfig(
            output_dir=str(tmp_path / f"run_{cached}"),
            num_generations=3,
            num_prompts_per_iteration=2,
            num_inference_steps=3,  # 3 stochastic, trained steps: 3 columns, one forward each
            num_iterations=2,
            use_lora=True,
            lora_rank=4,
            beta=0.05,
            learning_rate=1e-3,
            sample_every=0,
            save_steps=0,
            seed=3,
        )
        rows = [{"prompt": "a ball"}, {"prompt": "a cube"}]
        trainer = GRPOTrainer(LTXPolicy.from_pretrained(tiny_dir), [redness], args, rows)
        rollout, scores, _ = trainer._rollout_and_score(rows, 0)
        advantages, _ = trainer._advantages(scores)
        policy, forwards = trainer.policy, [0]
        reference = policy.reference

        def counted():
            forwards[0] += 1
            return reference()

        policy.reference = counted
        if not cached:  # every call computes its own reference means, as before the cache
            compute = trainer._reference_mean
            trainer._reference_mean = lambda entries, steps, guidance, keys, cache: compute(
                entries, steps, guidance, None, None
            )
        stats = trainer._update(rollout, advantages, 0)
        weights = {n: p.detach().clone() for n, p in policy.transformer.named_parameters() if "lora_" in n}
        return stats, weights, forwards[0]

    stats, weights, forwards = update(cached=True)
    stats_every_epoch, weights_every_epoch, forwards_every_epoch = update(cached=False)
    assert (forwards, forwards_every_epoch) == (3, 6)  # 3 columns, in 1 epoch instead of 2
    assert stats["train/kl"] > 0 and stats.keys() == stats_every_epoch.keys()
    assert stats == pytest.approx(stats_every_epoch, rel=1e-5, abs=1e-9)
    assert weights.keys() == weights_every_epoch.keys() and weights
    for n in weights:
        torch.testing.assert_close(weights[n], weights_every_epoch[n], rtol=1e-5, atol=1e-8)
    assert any(w.abs().sum() > 0 for n, w in weights.items() if "lora_B" in n)  # the update moved them


def test_loss_types_weigh_samples_that_train_different_numbers_of_steps(tmp_path, tiny_dir):
    """With 'cps' the last of the 4 steps is deterministic (not recorded), so a sample whose random
    half of the steps holds it trains 1 step instead of 2. On policy with beta 0 every trained entry's
    loss is -A_i, so the update's loss is, for n_i trained steps of sample i (TRL's definitions with
    trained steps for tokens): grpo mean_i(-A_i); bnpo sum_i n_i (-A_i) / sum_i n_i; dr_grpo
    sum_i n_i (-A_i) / (B * 2), 2 being the most steps a sample can train."""
    from dataclasses import replace

    from grpo.config import GRPOConfig
    from grpo.trainer import GRPOTrainer, derived_seed
    from policies import LTXPolicy

    args = GRPOConfig(
        output_dir=str(tmp_path / "run"),
        num_generations=4,
        num_prompts_per_iteration=1,
        num_inference_steps=4,
        sde_kind="cps",
        noise_level=0.5,
        timestep_selection="fraction",
        timestep_fraction=0.5,
        beta=0.0,
        learning_rate=1e-12,
        seed=0,
    )
    rng = random.Random(derived_seed(0, 0, 1))  # the trainer's draw of each sample's trained steps
    draws = [args.trained_steps(0, rng) for _ in range(4)]
    assert draws == [[2, 3], [2, 3], [0, 2], [1, 2]]  # trained: n = [1, 1, 2, 2] (step 3 is not)
    advantages = torch.tensor([1.0, -2.0, 0.5, 3.0])
    expected = {
        "grpo": -(1.0 - 2.0 + 0.5 + 3.0) / 4,  # -0.625
        "bnpo": -(1 * 1.0 + 1 * -2.0 + 2 * 0.5 + 2 * 3.0) / 6,  # -1.0
        "dr_grpo": -(1 * 1.0 + 1 * -2.0 + 2 * 0.5 + 2 * 3.0) / (4 * 2),  # -0.75
    }
    trainer = GRPOTrainer(LTXPolicy.from_pretrained(tiny_dir), [redness], args, [{"prompt": "a ball"}])
    rollout, _, _ = trainer._rollout_and_score(trainer._rows_for(0), 0)
    real_step_loss = trainer._step_loss
    losses: list[float] = []

    def spy(*call_args, **kwargs):
        loss, step_stats = real_step_loss(*call_args, **kwargs)
        losses.append(float(loss))  # what the update backpropagates
        return loss, step_stats

    trainer._step_loss = spy
    for loss_type, value in expected.items():
        trainer.args = replace(args, loss_type=loss_type)
        losses.clear()
        stats = trainer._update(rollout, advantages, 0)
        assert sum(losses) == pytest.approx(value, abs=1e-6), loss_type
        assert stats["train/trained_steps_per_sample"] == 1.5
