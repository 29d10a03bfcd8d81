"""DiffusionNFT (``trainer.algorithm: nft``): its loss against closed forms, the trainer's loss and
gradient against the policy's own flow-matching loss, an exact resume that restores the sampling
policy, and its one-line errors."""

import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file

import rewards
from grpo.checkpoint import SAMPLER_FILE
from grpo.config import ConfigError, GRPOConfig
from grpo.evaluation import eval_sampling
from grpo.nft import nft_loss, optimality
from grpo.recipe import load_recipe
from grpo.tracking import read_metrics
from grpo.train import run
from grpo.trainer import GRPOTrainer
from policies import LTX2Policy, LTXPolicy
from policies.errors import InputError
from policies.tiny import build_tiny_ltx
from policies.tiny_ltx2 import build_tiny_ltx2


@rewards.register("test_nft_redness")
def redness(videos, prompts, contexts, **metadata):
    return [float((v[..., 0] - 0.5 * (v[..., 1] + v[..., 2])).mean()) for v in videos]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_ltx(tmp_path_factory.mktemp("tiny_ltx"))


def test_optimality_maps_clipped_advantages_onto_zero_one():
    advantages = torch.tensor([-3.0, -1.0, -0.5, 0.0, 0.5, 2.0])
    assert optimality(advantages).tolist() == [0.0, 0.0, 0.25, 0.5, 0.75, 1.0]


def test_nft_loss_minimum_gradient_and_flow_matching_limit_are_the_closed_forms():
    g = torch.Generator().manual_seed(0)
    b, s, c = 5, 7, 3
    old, target = torch.randn(b, s, c, generator=g), torch.randn(b, s, c, generator=g)
    r = torch.tensor([0.0, 0.2, 0.5, 0.8, 1.0])
    generated = torch.ones(b, s, dtype=torch.bool)
    generated[:, :2] = False  # clean conditioning tokens: outside the loss
    for beta in (0.5, 1.0, 2.0):
        # the minimum: v* = v_old + (2r - 1) / beta (u - v_old) on the generated tokens
        star = old + ((2 * r - 1) / beta)[:, None, None] * (target - old)
        v = star.clone().requires_grad_(True)
        best = nft_loss(v, old, target, r, beta, generated)
        best.sum().backward()
        assert v.grad.abs().max() < 1e-6
        for _ in range(3):
            bump = 0.1 * torch.randn(b, s, c, generator=g)
            assert (nft_loss(star + bump, old, target, r, beta, generated) > best.detach()).all()
            conditioning_only = bump * (~generated)[..., None]
            torch.testing.assert_close(
                nft_loss(star + conditioning_only, old, target, r, beta, generated), best.detach()
            )
        # at v = v_old: the advantage-weighted flow-matching gradient 2 beta (2r - 1) (v_old - u)
        v = old.clone().requires_grad_(True)
        nft_loss(v, old, target, r, beta, generated).sum().backward()
        per_element = 1 / (c * generated[0].sum())
        expected = 2 * beta * (2 * r - 1)[:, None, None] * (old - target) * per_element * generated[..., None]
        torch.testing.assert_close(v.grad, expected)
    # r = 1, beta = 1: plain flow matching on the generated tokens
    v = torch.randn(b, s, c, generator=g)
    plain = ((v - target) ** 2).mean(-1)[:, 2:].mean(1)
    torch.testing.assert_close(nft_loss(v, old, target, torch.ones(b), 1.0, generated), plain)


def _nft_args(tmp_path, **changes):
    values = dict(
        output_dir=str(tmp_path / "run"),
        algorithm="nft",
        beta=0.0,
        num_generations=4,
        num_prompts_per_iteration=1,
        num_inference_steps=3,
        nft_beta=0.7,
        nft_sigma_min=0.2,
        seed=0,
    )
    values.update(changes)
    return GRPOConfig(**values)


def test_the_trainers_loss_is_the_policys_flow_matching_loss_weighted_by_advantage(tmp_path, tiny_dir):
    """Fresh, the sampling policy's weights are the trained ones, so both implicit policies are v_old:
    the loss is the plain flow-matching loss of the same samples, levels and noise (computed by the
    policy's `flow_matching_loss`, an independent path), and its gradient that of
    ``mean(beta (2r - 1) FM)``."""
    trainer = GRPOTrainer(
        LTXPolicy.from_pretrained(tiny_dir), [redness], _nft_args(tmp_path), [{"prompt": "a"}]
    )
    rollout, scores, _ = trainer._rollout_and_score(trainer._rows_for(0), 0)
    assert rollout.latents.shape[1] == 0  # an ODE rollout: no step recorded, no log-prob needed
    advantages, _ = trainer._advantages(scores)
    r = optimality(advantages)
    assert r.min() < r.max()  # the samples' weights differ, so the gradient check below can fail
    sigmas, noise = trainer._nft_draws(rollout, 0, 0, rollout.num_samples)
    assert sigmas.min() >= 0.2 and sigmas.max() < 1
    loss, stats = trainer._nft_loss(rollout, r, sigmas, noise)
    assert stats["velocity_shift"] == 0
    params = list(trainer.state.trainable.values())
    grads = torch.autograd.grad(loss, params)

    condition = {k: v[rollout.condition_index] for k, v in rollout.condition.items()}
    fm = trainer.policy.flow_matching_loss(
        condition, rollout.final_latents, sigmas, noise, rollout.latent_shape, rollout.frame_rate
    )
    assert loss.item() == pytest.approx(fm.mean().item(), rel=1e-6)
    expected = torch.autograd.grad((0.7 * (2 * r - 1) * fm).mean(), params)
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-8)


def test_draws_come_from_each_samples_seed_not_from_the_micro_batch(tmp_path, tiny_dir):
    trainer = GRPOTrainer(
        LTXPolicy.from_pretrained(tiny_dir), [redness], _nft_args(tmp_path), [{"prompt": "a"}]
    )
    rollout, _, _ = trainer._rollout_and_score(trainer._rows_for(0), 0)
    sigmas, noise = trainer._nft_draws(rollout, 0, 0, rollout.num_samples)
    part = rollout.select([2, 3])
    part_sigmas, part_noise = trainer._nft_draws(part, 0, 0, 2)
    assert torch.equal(part_sigmas, sigmas[2:]) and torch.equal(part_noise, noise[2:])
    twice = rollout.select([1, 1])  # nft_noise_draws 2: the second copy is a new draw
    twice_sigmas, twice_noise = trainer._nft_draws(twice, 0, 0, 1)
    assert twice_sigmas[0] == sigmas[1] and twice_sigmas[1] != sigmas[1]
    assert not torch.equal(twice_noise[0], twice_noise[1])


@pytest.mark.parametrize("algorithm", ["nft", "grpo"])
def test_rollouts_and_held_out_evaluation_take_their_own_step_counts(tmp_path, tiny_dir, algorithm):
    """``eval_num_inference_steps``: held-out evaluation denoises with it, rollouts (DiffusionNFT's ODE,
    PPO's SDE) with ``num_inference_steps``; unset, both take ``num_inference_steps``; 0 is refused."""
    ppo = {"algorithm": "grpo", "beta": 0.004} if algorithm == "grpo" else {}
    args = _nft_args(tmp_path, eval_num_inference_steps=5, save_eval_videos=0, **ppo)
    trainer = GRPOTrainer(
        LTXPolicy.from_pretrained(tiny_dir), [redness], args, [{"prompt": "a"}], [{"prompt": "b"}]
    )
    forwards = []
    hook = trainer.policy.transformer.register_forward_hook(lambda *_: forwards.append(1))
    try:
        rollout, _, _ = trainer._rollout_and_score(trainer._rows_for(0), 0)
        assert len(forwards) == 3 and rollout.timesteps.numel() == 3  # one batched forward a step
        forwards.clear()
        trainer.evaluate()
        assert len(forwards) == 5
    finally:
        hook.remove()
    assert eval_sampling(_nft_args(tmp_path)).num_inference_steps == 3
    with pytest.raises(ConfigError, match="eval_num_inference_steps"):
        _nft_args(tmp_path, eval_num_inference_steps=0)


def _recipe(tmp_path, tiny_dir):
    recipe = {
        "name": "test-nft",
        "stage": "grpo",
        "policy": {"type": "ltx", "path": str(tiny_dir)},
        "data": {"type": "prompts", "prompts": ["a ball", "two balls", "a square", "red things"]},
        "rewards": [{"name": "test_nft_redness", "weight": 1.0}],
        "trainer": {
            "output_dir": str(tmp_path / "run"),
            "algorithm": "nft",
            "beta": 0.0,
            "nft_old_decay": 0.5,
            "nft_noise_draws": 2,
            "per_device_train_batch_size": 2,
            "num_generations": 2,
            "num_prompts_per_iteration": 2,
            "num_inference_steps": 3,
            "learning_rate": 3e-3,
            "max_iterations": 4,
            "save_steps": 2,
            "ema_decay": 0.9,
        },
    }
    path = tmp_path / "recipe.yaml"
    tmp_path.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe))
    return path


def _final(run_dir):
    return load_file(str(run_dir / "final" / "transformer" / "diffusion_pytorch_model.safetensors"))


def test_an_nft_run_resumes_exactly_with_its_sampling_policy(tmp_path, tiny_dir):
    """Resumed from the iteration-2 checkpoint of a straight run, the run ends bitwise where the
    straight one did: the soft-updated sampling policy (which draws the rollouts and anchors the loss)
    is saved and restored. Without it the rollouts of iterations 2-3 would differ."""
    straight = tmp_path / "a"
    run(load_recipe(_recipe(straight, tiny_dir)))
    checkpoint = straight / "run" / "checkpoint-00000002"
    assert (checkpoint / SAMPLER_FILE).is_file()
    sampler, model = (
        load_file(str(checkpoint / SAMPLER_FILE)),
        load_file(str(checkpoint / "model.safetensors")),
    )
    assert sampler.keys() == model.keys() and any(not torch.equal(sampler[k], model[k]) for k in model)

    resumed = tmp_path / "b"
    (resumed / "run").mkdir(parents=True)
    shutil.copytree(checkpoint, resumed / "run" / checkpoint.name)
    run(load_recipe(_recipe(resumed, tiny_dir), ["trainer.resume_from_checkpoint=auto"]))
    a, b = _final(straight / "run"), _final(resumed / "run")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rewards_a = [m["reward/mean"] for m in read_metrics(straight / "run" / "metrics.jsonl")][2:]
    rewards_b = [m["reward/mean"] for m in read_metrics(resumed / "run" / "metrics.jsonl")]
    assert rewards_a == rewards_b and len(rewards_b) == 2


def test_nft_refuses_cfg_a_kl_term_and_families_it_does_not_support(tmp_path):
    with pytest.raises(InputError, match="beta: must be 0 with algorithm nft"):
        GRPOConfig(output_dir=str(tmp_path), algorithm="nft")
    with pytest.raises(InputError, match="guidance_scale: must be 1 with algorithm nft"):
        GRPOConfig(output_dir=str(tmp_path), algorithm="nft", beta=0.0, guidance_scale=3.0)
    with pytest.raises(InputError, match="nft_sigma_min: must be in"):
        GRPOConfig(output_dir=str(tmp_path), algorithm="nft", beta=0.0, nft_sigma_min=1.0)
    policy = LTX2Policy.from_pretrained(build_tiny_ltx2(tmp_path / "ltx2"))
    with pytest.raises(NotImplementedError, match="trainer.algorithm nft: .*LTX-2"):
        GRPOTrainer(policy, [redness], _nft_args(tmp_path), [{"prompt": "a"}])
