"""Best-of-N group selection (the NSP paper's: of 24 samples keep the 4 best and the 4 worst): which
samples are kept, the advantages over them, the update that trains exactly them, and bad settings."""

import math

import pytest
import torch
import yaml

from grpo.advantages import best_of_n_indices, compute_advantages
from grpo.cli import main
from grpo.config import ConfigError, GRPOConfig
from grpo.trainer import GRPOTrainer
from policies import LTXPolicy, NextClipPolicy
from policies.errors import InputError
from policies.nextclip_tiny import build_tiny_nextclip
from policies.tiny import build_tiny_ltx
from rewards.types import RewardOutput

PAPER_EXAMPLE = [0.1, 0.9, 0.5, 0.5, 0.0, 0.7]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_ltx(tmp_path_factory.mktemp("tiny_ltx"))


def redness(videos, prompts, contexts, **metadata):
    return [float((v[..., 0] - 0.5 * (v[..., 1] + v[..., 2])).mean()) for v in videos]


def test_keep_two_best_and_two_worst_by_hand():
    kept = best_of_n_indices(PAPER_EXAMPLE, 6, 2, 2)
    # best: 0.9 (1), 0.7 (5); worst of the rest: 0.0 (4), 0.1 (0); in the rollout's order
    assert kept.tolist() == [0, 1, 4, 5]
    advantages, stats = compute_advantages([[PAPER_EXAMPLE[i] for i in kept]], [0, 0, 0, 0])
    # kept rewards 0.1, 0.9, 0.0, 0.7: mean 0.425, population variance
    # (0.325^2 + 0.475^2 + 0.425^2 + 0.275^2) / 4 = 0.5875 / 4 = 0.146875
    std = math.sqrt(0.146875)
    expected = [d / (std + 1e-4) for d in (-0.325, 0.475, -0.425, 0.275)]
    assert expected[1] == pytest.approx(1.2391, abs=1e-4)  # 0.475 / 0.38334
    torch.testing.assert_close(advantages, torch.tensor(expected), rtol=0, atol=1e-6)
    assert stats["reward/mean"] == pytest.approx(0.425)


@pytest.mark.parametrize(
    "scores,group_size,keep,expected",
    [
        # equal scores go to the lower index: 0.5 at 2 and 3, the third best is 2 ...
        (PAPER_EXAMPLE, 6, (3, 1), [1, 2, 4, 5]),
        # ... and the third worst is 2 as well
        (PAPER_EXAMPLE, 6, (1, 3), [0, 1, 2, 4]),
        (PAPER_EXAMPLE, 6, (0, 2), [0, 4]),
        (PAPER_EXAMPLE, 6, (6, 0), [0, 1, 2, 3, 4, 5]),
        # binary verdicts: the first two yes and the first two no
        ([1.0, 0.0, 1.0, 1.0, 0.0, 0.0], 6, (2, 2), [0, 1, 2, 4]),
        # unscored samples rank after every scored one, in both directions
        ([None, 1.0, 0.0, None], 4, (1, 1), [1, 2]),
        ([None, 1.0, None, None], 4, (2, 1), [0, 1, 2]),
        # two groups of 3: each selected on its own
        ([0.2, 0.1, 0.3, 5.0, 7.0, 6.0], 3, (1, 1), [1, 2, 3, 4]),
    ],
)
def test_selection_rule_is_deterministic_on_ties_and_unscored(scores, group_size, keep, expected):
    assert best_of_n_indices(scores, group_size, *keep).tolist() == expected


def test_selection_rejects_impossible_arguments():
    with pytest.raises(InputError, match="keeps 4 \\+ 3 of groups of 6"):
        best_of_n_indices(PAPER_EXAMPLE, 6, 4, 3)
    with pytest.raises(InputError, match="multiple of group_size 4"):
        best_of_n_indices(PAPER_EXAMPLE, 4, 1, 1)


@pytest.mark.parametrize(
    "keep,message",
    [
        ([5, 4], "best_of_n_keep: [5, 4] keeps 9 of num_generations 8; keep at most 8"),
        ([-1, 3], "best_of_n_keep: [-1, 3] must keep >= 0 best and >= 0 worst samples"),
        ([1, 0], "at least 2 in all to form a group"),
        ([2], "must be [k_top, k_bottom] (two numbers) or null, got [2]"),
    ],
)
def test_config_rejects_bad_keeps_with_one_line(keep, message):
    with pytest.raises(ConfigError) as err:
        GRPOConfig(output_dir="/tmp/x", num_generations=8, best_of_n_keep=keep)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert GRPOConfig(output_dir="/tmp/x", num_generations=8, best_of_n_keep=[4, 4]).trained_group_size == 8


def test_recipe_with_a_bad_keep_fails_fast_on_the_command_line(tmp_path, tiny_dir, capsys):
    recipe = {
        "name": "bad-keep",
        "stage": "grpo",
        "policy": {"type": "ltx", "path": str(tiny_dir)},
        "data": {"type": "prompts", "prompts": ["a ball"]},
        "rewards": [{"name": "temporal_smoothness"}],
        "trainer": {"output_dir": str(tmp_path / "run"), "num_generations": 8},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["train", str(path), "trainer.best_of_n_keep=[5, 4]"]) == 2
    err = capsys.readouterr().err.strip()
    assert "best_of_n_keep: [5, 4] keeps 9 of num_generations 8" in err and "\n" not in err, err
    assert not (tmp_path / "run").exists()


def test_an_iteration_updates_on_exactly_the_kept_samples(tmp_path, tiny_dir):
    """6 videos for each of 2 prompts, keep the 2 best and the worst of each: the update's losses see
    those 6 samples (by their noise seeds), each once per trained step, with the advantages of a
    3-sample group; the metrics give the reward mean over all 12 and over the kept 6."""
    args = GRPOConfig(
        output_dir=str(tmp_path / "run"),
        num_generations=6,
        num_prompts_per_iteration=2,
        num_inference_steps=2,
        max_iterations=1,
        best_of_n_keep=[2, 1],
        per_device_train_batch_size=4,
        beta=0.0,
        learning_rate=1e-4,
        sample_every=0,
        save_steps=0,
        seed=0,
    )
    data = [{"prompt": "a ball"}, {"prompt": "a red cube"}]
    trainer = GRPOTrainer(LTXPolicy.from_pretrained(tiny_dir), [redness], args, data)
    # optimizer steps per epoch: the 6 kept samples in micro-batches of 4 and 2 (all 12: 3 steps)
    assert trainer._accumulation_groups() == [1, 1]
    rolled: dict = {}
    real_rollout, real_step_loss = trainer._rollout_and_score, trainer._step_loss

    def rollout_spy(rows, iteration, meanwhile=None):
        rolled["rollout"], rolled["scores"], timing = real_rollout(rows, iteration, meanwhile)
        return rolled["rollout"], rolled["scores"], timing

    seen: list[tuple[int, float]] = []  # (seed, advantage) of every sample of every loss

    def loss_spy(sub, adv, steps, **kwargs):
        for column in adv.T:  # [b, n]: n trained steps of every sample
            seen.extend(zip(sub.seeds.tolist(), column.tolist(), strict=True))
        return real_step_loss(sub, adv, steps, **kwargs)

    trainer._rollout_and_score, trainer._step_loss = rollout_spy, loss_spy
    (metrics,) = trainer.train()

    scores = rolled["scores"].columns["redness"]
    seeds = rolled["rollout"].seeds.tolist()
    assert len(scores) == 12 and len(set(scores)) == 12  # continuous rewards: no ties
    expected: dict[int, float] = {}
    for start in (0, 6):
        group = list(range(start, start + 6))
        by_reward = sorted(group, key=lambda i: scores[i])
        kept = [by_reward[-1], by_reward[-2], by_reward[0]]  # two best, one worst
        values = [scores[i] for i in kept]
        mean = sum(values) / 3
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / 3)
        expected.update({seeds[i]: (scores[i] - mean) / (std + 1e-4) for i in kept})
    assert sorted({seed for seed, _ in seen}) == sorted(expected)
    assert len(seen) == 6 * 2  # every kept sample once per trained step (2 steps), nothing else
    for seed, advantage in seen:
        assert advantage == pytest.approx(expected[seed], abs=1e-5)
    assert metrics["best_of_n/reward_mean_all"] == pytest.approx(sum(scores) / 12, abs=1e-6)
    kept_scores = [scores[seeds.index(seed)] for seed in expected]
    assert metrics["best_of_n/reward_mean_kept"] == pytest.approx(sum(kept_scores) / 6, abs=1e-6)
    assert metrics["reward/redness/mean"] == pytest.approx(sum(kept_scores) / 6, abs=1e-6)


CLIP = 9


def clip2_redness(videos, prompts, contexts, **metadata):
    """Per clip: 0 for clips 0 and 1, the redness of clip 2; the video's score is the clips' mean."""
    clips = [[0.0, 0.0, redness([v[2 * CLIP : 3 * CLIP]], None, None)[0]] for v in videos]
    return RewardOutput(scores=[sum(c) / 3 for c in clips], metadata={"clip_scores": clips})


def test_next_clip_per_clip_advantages_over_the_kept_samples(tmp_path_factory, tmp_path):
    """Next-clip videos are ranked by their video score; each clip's advantage is normalised over the
    kept samples: keeping the best and the worst of 5, clip 2 gets +-d/2 / (d/2 + 1e-4) for the two
    kept clip-2 rewards d apart, and the constant clips 0 and 1 get 0."""
    args = GRPOConfig(
        output_dir=str(tmp_path / "run"),
        num_frames=3 * CLIP,
        num_generations=5,
        num_prompts_per_iteration=1,
        num_inference_steps=2,
        best_of_n_keep=[1, 1],
        beta=0.0,
        sample_every=0,
        save_steps=0,
        seed=0,
    )
    policy = NextClipPolicy.from_pretrained(build_tiny_nextclip(tmp_path_factory.mktemp("tiny_nextclip")))
    context = torch.rand(CLIP, 32, 32, 3, generator=torch.Generator().manual_seed(0))
    trainer = GRPOTrainer(policy, [clip2_redness], args, [{"context": context}])
    rollout, scores, _ = trainer._rollout_and_score(trainer._rows_for(0), 0)
    kept_rollout, kept_scores, stats = trainer._best_of_n(rollout, scores)
    video = scores.columns["clip2_redness"]
    best, worst = max(range(5), key=video.__getitem__), min(range(5), key=video.__getitem__)
    assert kept_rollout.seeds.tolist() == [rollout.seeds[i].item() for i in sorted([best, worst])]
    assert kept_rollout.extras == rollout.extras
    advantages, _ = trainer._advantages(kept_scores)
    clip2 = [scores.metadata["clip2_redness/clip_scores"][i][2] for i in sorted([best, worst])]
    half = abs(clip2[0] - clip2[1]) / 2
    sign = 1.0 if clip2[0] > clip2[1] else -1.0
    expected = torch.tensor([[0.0, 0.0, sign], [0.0, 0.0, -sign]]) * half / (half + 1e-4)
    torch.testing.assert_close(advantages.cpu(), expected, rtol=0, atol=1e-6)
    assert stats["best_of_n/reward_mean_all"] == pytest.approx(sum(video) / 5, abs=1e-6)
    trainer._update(kept_rollout, advantages, 0)  # the per-clip update runs on the kept samples
