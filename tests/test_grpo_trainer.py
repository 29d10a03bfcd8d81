"""GRPOTrainer end to end on a tiny LTX policy: it learns, resumes exactly, survives SIGTERM, and
rejects bad recipes fast (over several processes: `test_distributed_training.py`)."""

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
