"""GRPO on next-clip policies: per-clip rewards give per-clip advantages that reach only the steps of
their clip, whole-video rewards still work, and the toy-world recipes run."""

import pytest
import torch
from test_nextclip_policy import clip_by_clip_velocity

import rewards
from grpo.advantages import compute_advantages
from grpo.config import ConfigError, GRPOConfig
from grpo.nft import optimality
from grpo.trainer import GRPOTrainer
from policies import NextClipPolicy
from policies.errors import InputError
from policies.nextclip_tiny import build_tiny_nextclip
from rewards.types import RewardOutput

CLIP = 9


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_nextclip(tmp_path_factory.mktemp("tiny_nextclip"))


def _redness(video):
    return float((video[..., 0] - 0.5 * (video[..., 1] + video[..., 2])).mean())


@rewards.register("test_clip2_redness")
def clip2_redness(videos, prompts, contexts, **metadata):
    """Per clip: 0 for clips 0 and 1 whatever they show, the redness of clip 2 (a reachable reward)."""
    clips = [[0.0, 0.0, _redness(v[2 * CLIP : 3 * CLIP])] for v in videos]
    return RewardOutput(scores=[sum(c) / 3 for c in clips], metadata={"clip_scores": clips})


@rewards.register("test_video_redness")
def video_redness(videos, prompts, contexts, **metadata):
    return [_redness(v) for v in videos]


@rewards.register("test_two_clip_scores")
def two_clip_scores(videos, prompts, contexts, **metadata):
    return RewardOutput(scores=[0.0] * len(videos), metadata={"clip_scores": [[0.0, 1.0]] * len(videos)})


@rewards.register("test_clip_redness")
def clip_redness(videos, prompts, contexts, **metadata):
    """Per clip: its redness, judged on the clip alone (as the toy world's per-clip reward is)."""
    clips = [[_redness(v[c * CLIP : (c + 1) * CLIP]) for c in range(len(v) // CLIP)] for v in videos]
    return RewardOutput(scores=[sum(c) / len(c) for c in clips], metadata={"clip_scores": clips})


def _trainer(tiny_dir, tmp_path, reward, contexts=1, **overrides):
    args = GRPOConfig(
        output_dir=str(tmp_path / "run"),
        num_frames=3 * CLIP,
        num_generations=4,
        num_prompts_per_iteration=contexts,
        num_inference_steps=2,
        beta=0.0,
        learning_rate=1e-3,
        sample_every=0,
        save_steps=0,
        seed=0,
        **overrides,
    )
    context = torch.rand(contexts, CLIP, 32, 32, 3, generator=torch.Generator().manual_seed(0))
    return GRPOTrainer(
        NextClipPolicy.from_pretrained(tiny_dir), reward, args, [{"context": c} for c in context]
    )


def test_a_reward_on_clip_2_only_moves_clip_2_steps(tiny_dir, tmp_path):
    # eager on a GPU too (trainer.compile auto compiles the blocks on CUDA): the spy backpropagates each
    # loss twice (retain_graph), which a compiled backward with donated buffers refuses
    trainer = _trainer(tiny_dir, tmp_path, "test_clip2_redness", compile=False)
    rows = trainer._rows_for(0)
    rollout, scores, _ = trainer._rollout_and_score(rows, 0)
    advantages, stats = trainer._advantages(scores)
    assert advantages.shape == (4, 3)
    assert advantages[:, :2].abs().max() == 0 and advantages[:, 2].abs().min() > 0.1
    assert stats["reward/test_clip2_redness/clip0/mean"] == 0.0

    params = [p for p in trainer.policy.transformer.parameters() if p.requires_grad]
    real_step_loss = trainer._step_loss
    seen = []  # (clip of the step, advantages, gradient norm) of every loss the update backpropagates

    def spy(sub, adv, steps, **kwargs):
        loss, step_stats = real_step_loss(sub, adv, steps, **kwargs)
        clips = {sub.step_clips[j] for j in steps.flatten().tolist()}
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        norm = torch.sqrt(sum((g**2).sum() for g in grads if g is not None))
        seen.append((clips, adv.clone(), float(norm)))
        return loss, step_stats

    trainer._step_loss = spy
    trainer._update(rollout, advantages, 0)
    assert sorted(next(iter(c)) for c, _, _ in seen) == [0, 0, 1, 1, 2, 2]  # 3 clips x 2 steps
    for clips, adv, norm in seen:
        assert len(clips) == 1  # a call trains one clip for every sample
        if clips == {2}:
            assert adv.abs().min() > 0.1 and norm > 0
        else:
            assert adv.abs().max() == 0 and norm == 0


def test_whole_video_rewards_give_every_clip_the_video_advantage(tiny_dir, tmp_path):
    trainer = _trainer(tiny_dir, tmp_path, "test_video_redness")
    rollout, scores, _ = trainer._rollout_and_score(trainer._rows_for(0), 0)
    advantages, _ = trainer._advantages(scores)
    expected, _ = compute_advantages([scores.columns["test_video_redness"]], [0, 0, 0, 0])
    assert advantages.shape == (4, 3)
    for clip in range(3):  # the trainer's advantages live on its device (the GPU when there is one)
        torch.testing.assert_close(advantages[:, clip].cpu(), expected, rtol=0, atol=1e-6)


def test_clip_scores_must_cover_every_generated_clip(tiny_dir, tmp_path):
    trainer = _trainer(tiny_dir, tmp_path, "test_two_clip_scores")
    with pytest.raises(InputError, match="clip_scores of lengths \\[2\\] for 3 generated clips"):
        trainer._rollout_and_score(trainer._rows_for(0), 0)


def test_branch_groups_compare_clips_of_one_history(tiny_dir, tmp_path):
    """``nextclip_groups: branch``: each group is one tree rollout (every sample's clip k continues the
    group's first video's clips < k), the advantages of clip k are its G branches' scores normalised
    among themselves (checked by hand), and the update recomputes the rollout's log-probs exactly."""
    trainer = _trainer(
        tiny_dir,
        tmp_path,
        "test_clip_redness",
        contexts=2,
        nextclip_groups="branch",
    )
    rollout, scores, _ = trainer._rollout_and_score(trainer._rows_for(0), 0)
    shared = rollout.condition["branch_history_latents"]
    assert shared.shape[0] == 2 and torch.equal(shared, rollout.final_latents[[0, 4]])
    advantages, stats = trainer._advantages(scores)
    clip_scores = scores.metadata["clip_rewards/test_clip_redness"]
    assert advantages.shape == (8, 3)
    for group in range(2):
        for clip in range(3):
            values = [clip_scores[group * 4 + i][clip] for i in range(4)]
            mean = sum(values) / 4
            std = (sum((v - mean) ** 2 for v in values) / 4) ** 0.5
            for i, value in enumerate(values):
                expected = max(-5.0, min(5.0, (value - mean) / (std + 1e-4)))
                assert abs(float(advantages[group * 4 + i, clip]) - expected) <= 1e-4
    assert stats["reward/test_clip_redness/zero_std_frac"] == 0.0
    metrics = trainer._update(rollout, advantages, 0)
    assert metrics["train/logprob_drift"] <= 1e-5  # recomputed under the shared history, before the step


def test_branch_groups_refuse_what_they_cannot_do(tiny_dir, tmp_path):
    common = {"output_dir": str(tmp_path), "num_generations": 4, "nextclip_groups": "branch"}
    with pytest.raises(ConfigError, match="best-of-N cannot select"):
        GRPOConfig(best_of_n_keep=[1, 1], **common)
    with pytest.raises(ConfigError, match="splits each group over several rollout calls"):
        GRPOConfig(rollout_batch_size=2, **common)
    with pytest.raises(InputError, match="needs a next-clip policy, got object"):
        GRPOTrainer(object(), "test_clip_redness", GRPOConfig(**common), [{"prompt": "a"}])
    trainer = _trainer(tiny_dir, tmp_path, "test_video_redness", nextclip_groups="branch")
    with pytest.raises(InputError, match="'test_video_redness' gives no per-clip scores"):
        trainer._rollout_and_score(trainer._rows_for(0), 0)


@pytest.mark.slow
def test_grpo_with_per_clip_rewards_raises_the_held_out_reward(tiny_dir, tmp_path):
    from grpo.data import ToyWorld, ToyWorldConfig

    world = ToyWorld(ToyWorldConfig.for_clips(4, clip_frames=CLIP), split="train", num_samples=8)
    held_out = ToyWorld(ToyWorldConfig.for_clips(4, clip_frames=CLIP), split="validation", num_samples=4)
    args = GRPOConfig(
        output_dir=str(tmp_path / "run"),
        num_frames=3 * CLIP,
        num_generations=4,
        num_prompts_per_iteration=2,
        num_inference_steps=3,
        max_iterations=12,
        learning_rate=3e-3,
        epsilon=1e-3,
        beta=0.0,
        eval_every=12,
        sample_every=0,
        save_steps=0,
        seed=0,
    )
    trainer = GRPOTrainer(
        NextClipPolicy.from_pretrained(tiny_dir),
        "test_clip2_redness",
        args,
        [{"context": s["context"]} for s in world],
        eval_dataset=[{"context": s["context"]} for s in held_out],
    )
    history = trainer.train()
    evals = [m["eval/test_clip2_redness/mean"] for m in history if "eval/test_clip2_redness/mean" in m]
    clip2 = [m["reward/test_clip2_redness/clip2/mean"] for m in history if "train/loss" in m]
    assert all(m["reward/test_clip2_redness/clip0/mean"] == 0.0 for m in history if "train/loss" in m)
    print(f"held-out {evals[0]:.4f} -> {evals[-1]:.4f}; training clip 2 {clip2[0]:.4f} -> {clip2[-1]:.4f}")
    # the random tiny VAE decodes to nearly grey frames: redness moves by thousandths (about 3x here)
    assert len(evals) == 2 and evals[-1] > evals[0] + 1e-3
    assert sum(clip2[-3:]) / 3 > sum(clip2[:3]) / 3 + 3e-3


def test_toy_world_clip_rows_and_the_policy_spec(tmp_path):
    from grpo.train import NextClipPolicySpec, ToyWorldClipsDataSpec, build_datasets, build_policy

    train, held_out = build_datasets(ToyWorldClipsDataSpec(num_clips=3, num_train=2, num_eval=1))
    row = train[0]
    assert row["video"].shape == (27, 32, 32, 3) and row["context"].shape == (9, 32, 32, 3)
    assert torch.equal(row["video"][:9], row["context"]) and "prompt" not in row
    assert len(row["world"]["objects"][0]["next"]["positions"]) == 18  # the 2 clips to generate
    policy = build_policy(NextClipPolicySpec(tiny=True, history_sigma=0.05), tmp_path)
    assert (
        policy.clip_config.history_sigma == 0.05
        and (tmp_path / "base_tiny_nextclip" / "nextclip.json").is_file()
    )
    assert policy.latent_shape(27, 32, 32) == (27, 8, 8)  # TinyLTXSpec.toy_world: 4x4 patches, 1x in time


def test_toy_learning_reports_each_rewards_share_of_zero_advantage_cells(tmp_path):
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from toy_learning import _zero_advantage

    records = [  # an evaluation-only record (no shares), then three training iterations
        {"time": 0.0, "eval/toyworld_verifiable/mean": 0.3},
        {"time": 1.0, "reward/dense/zero_std_frac": 0.0, "reward/hard/zero_std_frac": 0.5},
        {"time": 2.0, "reward/dense/zero_std_frac": 0.25, "reward/hard/zero_std_frac": 0.75},
        {"time": 3.0, "reward/dense/zero_std_frac": 0.5, "reward/hard/zero_std_frac": 1.0, "lr": 0.1},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert _zero_advantage(tmp_path) == {
        "dense": {"first": 0.0, "last": 0.5, "mean": 0.25},
        "hard": {"first": 0.5, "last": 1.0, "mean": 0.75},
    }


@pytest.mark.parametrize("groups", ["video", "branch"])
def test_nft_trains_each_clip_by_its_own_advantage(tiny_dir, tmp_path, groups):
    """DiffusionNFT (``algorithm: nft``) on a next-clip policy with per-clip rewards. Fresh, the sampling
    policy's weights are the trained ones, so the loss is the clips' flow-matching loss and its
    gradient that of ``mean_k beta (2 r_k - 1) FM_k``: each clip weighted by its own clip's
    optimality, each FM_k computed alone by `clip_velocity` under the clip's history (the rollout's
    path, not the one forward the trainer takes). Then two iterations train and move the weights."""
    trainer = _trainer(
        tiny_dir, tmp_path, "test_clip_redness", algorithm="nft", nft_beta=0.7, compile=False,
        nextclip_groups=groups, max_iterations=2,
    )  # fmt: skip
    rollout, scores, _ = trainer._rollout_and_score(trainer._rows_for(0), 0)
    assert rollout.latents.shape[1] == 0 and rollout.num_clips == 3  # ODE clips, no step recorded
    advantages, _ = trainer._advantages(scores)
    r = optimality(advantages)
    assert r.shape == (4, 3) and (r.max(0).values > r.min(0).values).all()
    sigmas, noise = trainer._nft_draws(rollout, 0, 0, 4)
    assert sigmas.shape == (4, 3) and sigmas.min() >= trainer.args.nft_sigma_min
    loss, _ = trainer._nft_loss(rollout, r, sigmas, noise)
    params = list(trainer.state.trainable.values())
    grads = torch.autograd.grad(loss, params, materialize_grads=True)  # LTX-2: audio weights unused

    velocity = clip_by_clip_velocity(trainer.policy, rollout, sigmas, noise)
    error = ((velocity - (noise - rollout.final_latents)) ** 2).mean(-1)  # [b, K * T]
    fm = error.reshape(4, 3, -1).mean(-1)  # [b, K]
    assert loss.item() == pytest.approx(fm.mean().item(), rel=1e-5)
    expected = torch.autograd.grad((0.7 * (2 * r - 1) * fm).mean(), params, materialize_grads=True)
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)

    before = {k: v.detach().clone() for k, v in trainer.state.trainable.items()}
    history = trainer.train()
    assert len(history) == 2 and all("train/loss" in h for h in history)
    assert any(not torch.equal(before[k], v) for k, v in trainer.state.trainable.items())


def test_the_deep_recipe_is_what_its_benchmark_measured():
    """benchmarks/results/toy_nextclip_deep_learning.json records the resolved settings its runs trained
    with: the deep recipe must resolve to exactly those (with the runs' video-saving overrides), so the
    README's numbers are the recipe's. Only the LoRA sizes may differ: full fine-tuning does not use them."""
    import json
    from pathlib import Path

    from grpo.recipe import load_recipe, recipe_to_dict

    root = Path(__file__).resolve().parents[1]
    measured = json.loads((root / "benchmarks/results/toy_nextclip_deep_learning.json").read_text())
    kept = ("trainer.sample_every=", "trainer.save_eval_videos=")
    saving = [o for o in measured["overrides_of_toy_nextclip_grpo"] if o.startswith(kept)]
    assert len(saving) == 2

    def flat(tree, prefix=""):
        out = {}
        for key, value in tree.items():
            out.update(flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key: value})
        return out

    deep = flat(recipe_to_dict(load_recipe(root / "recipes/toy_nextclip_deep_grpo.yaml", saving)))
    deep = {k: v for k, v in deep.items() if k not in ("name", "output_dir", "trainer.output_dir")}
    settings = measured["settings"]
    differ = {key for key in settings.keys() | deep.keys() if settings.get(key) != deep.get(key)}
    assert differ <= {"trainer.lora_rank", "trainer.lora_alpha"}, differ
    assert settings["trainer.use_lora"] is False and settings["trainer.max_iterations"] == 150
