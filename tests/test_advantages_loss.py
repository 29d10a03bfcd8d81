"""Group-relative advantages and the clipped surrogate, against numbers worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from grpo.advantages import compute_advantages
from grpo.loss import grpo_loss, loss_weights
from policies.errors import InputError

EPS = 1e-4  # the std guard of A = (R - mean) / (std + 1e-4)


def close(actual: torch.Tensor, expected: list) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), rtol=1e-6, atol=1e-7)


# --- advantages ------------------------------------------------------------------------------------

# two groups of three: [1, 2, 3] (mean 2, population std sqrt(2/3)) and [10, 10, 10] (std 0)
REWARDS = [[1.0, 2.0, 3.0, 10.0, 10.0, 10.0]]
GROUPS = [0, 0, 0, 1, 1, 1]


def test_group_scaling():
    advantages, stats = compute_advantages(REWARDS, GROUPS, scale_rewards="group")
    a = 1 / (math.sqrt(2 / 3) + EPS)  # = 1.22459...
    close(advantages, [-a, 0.0, a, 0.0, 0.0, 0.0])
    assert advantages.dtype == torch.float32 and advantages.shape == (6,)
    assert stats["reward/0/zero_std_frac"] == 0.5  # one group of two has no signal
    assert stats["reward/0/mean"] == pytest.approx(36 / 6)
    assert stats["advantage/zero_frac"] == pytest.approx(4 / 6)


def test_zero_std_groups_get_exactly_zero():
    # 0.1 * 3 / 3 != 0.1 in floating point: a naive (R - mean) / (0 + 1e-4) is ~1e-13, not 0
    advantages, _ = compute_advantages([[0.1, 0.1, 0.1, 0.7, 0.7]], [3, 3, 3, 8, 8])
    assert torch.equal(advantages, torch.zeros(5))


def test_batch_scaling_uses_the_whole_batch_std():
    # batch mean 6; squared deviations 25 16 9 16 16 16 -> variance 98 / 6
    advantages, _ = compute_advantages(REWARDS, GROUPS, scale_rewards="batch")
    a = 1 / (math.sqrt(98 / 6) + EPS)
    close(advantages, [-a, 0.0, a, 0.0, 0.0, 0.0])


def test_no_scaling_only_centres():
    advantages, _ = compute_advantages(REWARDS, GROUPS, scale_rewards="none")
    close(advantages, [-1.0, 0.0, 1.0, 0.0, 0.0, 0.0])


def test_none_rewards_are_left_out_of_the_statistics():
    # scored: 1, 3, 5 -> mean 3, population std sqrt(8/3); the None sample gets 0
    advantages, stats = compute_advantages([[1.0, None, 3.0, 5.0]], [0, 0, 0, 0])
    a = 2 / (math.sqrt(8 / 3) + EPS)
    close(advantages, [-a, 0.0, 0.0, a])
    assert stats["reward/0/num_unscored"] == 1 and stats["reward/0/mean"] == pytest.approx(3.0)
    nan_tensor, _ = compute_advantages(torch.tensor([[1.0, math.nan, 3.0, 5.0]]), torch.tensor([0, 0, 0, 0]))
    assert torch.equal(nan_tensor, advantages)


def test_a_group_with_one_scored_sample_has_no_signal():
    advantages, _ = compute_advantages([[None, 4.0, None, 1.0, 2.0]], [0, 0, 0, 1, 1])
    b = 0.5 / (0.5 + EPS)
    close(advantages, [0.0, 0.0, 0.0, -b, b])
    all_unscored, stats = compute_advantages([[None, None]], [0, 0])
    assert torch.equal(all_unscored, torch.zeros(2)) and math.isnan(stats["reward/0/mean"])


# two rewards, weights (1, 0.5), groups {0, 1} and {2, 3}:
#   R1 = [0, 2, 5, 5]      group 0: mean 1, std 1; group 1 constant
#   R2 = [1, 3, None, 4]   group 0: mean 2, std 1; group 1 has one scored sample
TWO_REWARDS = [[0.0, 2.0, 5.0, 5.0], [1.0, 3.0, None, 4.0]]
PAIRS = [0, 0, 1, 1]


def test_normalize_then_sum():
    advantages, stats = compute_advantages(TWO_REWARDS, PAIRS, reward_weights=[1.0, 0.5])
    a = 1 / (1 + EPS)
    close(advantages, [-1.5 * a, 1.5 * a, 0.0, 0.0])
    assert stats["reward/1/num_unscored"] == 1 and stats["reward/0/zero_std_frac"] == 0.5
    assert stats["reward/mean"] == pytest.approx((0.5 + 3.5 + 7.0) / 3)  # samples scored by both


def test_sum_then_normalize_leaves_out_samples_missing_a_reward():
    # S = R1 + 0.5 R2 = [0.5, 3.5, (excluded), 7]; group 0: mean 2, std 1.5; group 1: only 7 -> 0
    advantages, stats = compute_advantages(
        TWO_REWARDS,
        PAIRS,
        reward_weights=[1.0, 0.5],
        aggregation="sum_then_normalize",
        reward_names=["a", "b"],
    )
    a = 1.5 / (1.5 + EPS)
    close(advantages, [-a, a, 0.0, 0.0])
    assert stats["reward/zero_std_frac"] == 0.5 and "reward/b/mean" in stats


def test_aggregation_modes_differ_when_scales_differ():
    rewards = [[0.0, 1.0, 0.0, 1.0], [0.0, 100.0, 50.0, 0.0]]
    first, _ = compute_advantages(rewards, [0, 0, 0, 0], aggregation="normalize_then_sum")
    second, _ = compute_advantages(rewards, [0, 0, 0, 0], aggregation="sum_then_normalize")
    assert not torch.allclose(first, second)


def test_clipping():
    # [0, 0, 0, 10]: mean 2.5, std sqrt(75 / 4)
    advantages, stats = compute_advantages([[0.0, 0.0, 0.0, 10.0]], [0, 0, 0, 0], adv_clip=1.0)
    low = -2.5 / (math.sqrt(75 / 4) + EPS)
    close(advantages, [low, low, low, 1.0])
    assert stats["advantage/clip_frac"] == 0.25 and stats["advantage/max"] == 1.0


def test_per_clip_rewards_are_normalised_per_clip_index():
    # [num_rewards=1, B=4, clips=2]; clip 0: [1, 3 | 2, 2]; clip 1: [5, 5 | 0, 4]
    rewards = [[[1.0, 5.0], [3.0, 5.0], [2.0, 0.0], [2.0, 4.0]]]
    advantages, _ = compute_advantages(rewards, [0, 0, 1, 1])
    a, b = 1 / (1 + EPS), 2 / (2 + EPS)
    close(advantages, [[-a, 0.0], [a, 0.0], [0.0, -b], [0.0, b]])


def test_group_ids_may_be_any_labels():
    by_label, _ = compute_advantages(REWARDS, [42, 42, 42, -7, -7, -7])
    by_index, _ = compute_advantages(REWARDS, GROUPS)
    assert torch.equal(by_label, by_index)


def test_never_nan_with_random_holes():
    generator = torch.Generator().manual_seed(0)
    rewards = torch.randn(3, 32, generator=generator)
    rewards[torch.rand(3, 32, generator=generator) < 0.3] = math.nan
    groups = torch.arange(32) // 4
    for aggregation in ("normalize_then_sum", "sum_then_normalize"):
        for scale in ("group", "batch", "none"):
            advantages, _ = compute_advantages(rewards, groups, aggregation=aggregation, scale_rewards=scale)
            assert torch.isfinite(advantages).all()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rewards": [1.0, 2.0]}, "rewards must be \\[num_rewards, B\\]"),
        ({"group_ids": [0, 0]}, "group_ids must have shape \\[4\\]"),
        ({"reward_weights": [1.0, 2.0]}, "reward_weights has 2 entries for 1 rewards"),
        ({"scale_rewards": "std"}, "scale_rewards must be"),
        ({"adv_clip": 0.0}, "adv_clip must be > 0"),
        ({"rewards": [[1.0, 2.0], [3.0]]}, "rewards must be a rectangular"),
    ],
)
def test_bad_inputs(kwargs, match):
    arguments = {"rewards": [[1.0, 2.0, 3.0, 4.0]], "group_ids": [0, 0, 1, 1], **kwargs}
    with pytest.raises(InputError, match=match):
        compute_advantages(arguments.pop("rewards"), arguments.pop("group_ids"), **arguments)


# --- clipped surrogate -----------------------------------------------------------------------------

# B = 2 samples, K = 2 steps; ratios [[1.5, 0.5], [1.1, 0.7]], advantages [+1, -1], epsilon 0.2:
#   (0,0) A>0, ratio 1.5 > 1.2: min(1.5, 1.2) = 1.2, clipped (zero gradient)
#   (0,1) A>0, ratio 0.5:       min(0.5, 0.8) = 0.5
#   (1,0) A<0, ratio 1.1:       min(-1.1, -1.1) = -1.1 (inside the range)
#   (1,1) A<0, ratio 0.7 < 0.8: min(-0.7, -0.8) = -0.8, clipped (zero gradient)
# objective mean = (1.2 + 0.5 - 1.1 - 0.8) / 4 = -0.05 -> loss 0.05
RATIOS = [[1.5, 0.5], [1.1, 0.7]]
ADVANTAGES = torch.tensor([1.0, -1.0], dtype=torch.float64)


def log_probs(ratios=RATIOS):
    old = torch.tensor([[-3.0, -1.0], [-2.0, -0.5]], dtype=torch.float64)
    new = (old + torch.log(torch.tensor(ratios, dtype=torch.float64))).requires_grad_(True)
    return new, old


def test_hand_computed_loss_stats_and_gradient():
    new, old = log_probs()
    loss, stats = grpo_loss(new, old, ADVANTAGES, epsilon=0.2)
    assert loss.item() == pytest.approx(0.05)
    assert stats["policy_loss"].item() == pytest.approx(0.05) and stats["kl"].item() == 0.0
    assert stats["ratio_mean"].item() == pytest.approx(0.95)
    assert stats["ratio_min"].item() == pytest.approx(0.5) and stats["ratio_max"].item() == pytest.approx(1.5)
    assert stats["clip_frac"].item() == 0.5
    assert stats["clip_frac_low"].item() == 0.25 and stats["clip_frac_high"].item() == 0.25
    k3 = sum(r - 1 - math.log(r) for row in RATIOS for r in row) / 4
    assert stats["approx_kl"].item() == pytest.approx(k3)
    loss.backward()
    # d/dlogp of -ratio * A / 4 = -ratio * A / 4 where unclipped, 0 where clipped
    close(new.grad, [[0.0, -0.5 / 4], [1.1 / 4, 0.0]])
    assert all(not t.requires_grad for t in stats.values())


def test_on_policy_ratio_is_one_and_the_gradient_is_the_advantage():
    old = torch.tensor([[-1.0, -2.0, -3.0], [-4.0, -5.0, -6.0]])
    new = old.clone().requires_grad_(True)
    loss, stats = grpo_loss(new, old, torch.tensor([2.0, -1.0]), epsilon=1e-4)
    assert loss.item() == pytest.approx(-(2.0 * 3 - 1.0 * 3) / 6)
    assert (
        stats["ratio_mean"].item() == 1.0
        and stats["clip_frac"].item() == 0.0
        and stats["approx_kl"].item() == 0
    )
    loss.backward()
    close(new.grad, [[-2 / 6] * 3, [1 / 6] * 3])


def test_kl_penalty():
    new, old = log_probs()
    kl = torch.tensor([[0.2, 0.4], [0.0, 0.2]], dtype=torch.float64, requires_grad=True)
    loss, stats = grpo_loss(new, old, ADVANTAGES, epsilon=0.2, beta=0.1, kl=kl)
    assert loss.item() == pytest.approx(0.05 + 0.1 * 0.2)
    assert stats["kl"].item() == pytest.approx(0.2) and stats["policy_loss"].item() == pytest.approx(0.05)
    loss.backward()
    close(kl.grad, [[0.1 / 4] * 2] * 2)
    without_beta, _ = grpo_loss(new, old, ADVANTAGES, epsilon=0.2, kl=kl)
    assert without_beta.item() == pytest.approx(0.05)  # beta 0: KL only reported


def test_asymmetric_clipping():
    # epsilon_high 0.6: ratio 1.5 at (0,0) is now inside [0.8, 1.6]; objective (1.5 + 0.5 - 1.1 - 0.8) / 4
    new, old = log_probs()
    loss, stats = grpo_loss(new, old, ADVANTAGES, epsilon=0.2, epsilon_high=0.6)
    assert loss.item() == pytest.approx(-0.025)
    assert stats["clip_frac_high"].item() == 0.0 and stats["clip_frac_low"].item() == 0.25
    loss.backward()
    close(new.grad, [[-1.5 / 4, -0.5 / 4], [1.1 / 4, 0.0]])


def test_per_step_advantages():
    new, old = log_probs()
    per_step = torch.tensor([[1.0, 1.0], [-1.0, -1.0]], dtype=torch.float64)
    assert grpo_loss(new, old, per_step, epsilon=0.2)[0].item() == pytest.approx(0.05)


def test_mask_and_loss_types():
    # mask out (0,1): per-entry objectives 1.2 | -1.1, -0.8
    new, old = log_probs()
    mask = torch.tensor([[True, False], [True, True]])
    expected = {
        "grpo": -(1.2 / 1 + (-1.1 - 0.8) / 2) / 2,  # per-sample means, then the mean over samples
        "bnpo": -(1.2 - 1.1 - 0.8) / 3,  # mean over the 3 trained entries
        "dr_grpo": -(1.2 - 1.1 - 0.8) / 4,  # sum over the constant B * K
    }
    for loss_type, value in expected.items():
        loss, stats = grpo_loss(new, old, ADVANTAGES, epsilon=0.2, mask=mask, loss_type=loss_type)
        assert loss.item() == pytest.approx(value), loss_type
        assert stats["ratio_mean"].item() == pytest.approx((1.5 + 1.1 + 0.7) / 3)
        assert stats["clip_frac"].item() == pytest.approx(2 / 3)
    unmasked = {t: grpo_loss(new, old, ADVANTAGES, epsilon=0.2, loss_type=t)[0].item() for t in expected}
    assert unmasked == pytest.approx({t: 0.05 for t in expected})


def test_loss_input_checks():
    new, old = log_probs()
    with pytest.raises(InputError, match="beta > 0 needs the per-step kl"):
        grpo_loss(new, old, ADVANTAGES, epsilon=0.2, beta=0.1)
    with pytest.raises(InputError, match="advantages must be \\[B\\] or \\[B, K\\]"):
        grpo_loss(new, old, torch.ones(3), epsilon=0.2)
    with pytest.raises(InputError, match="log_prob and old_log_prob must both be"):
        grpo_loss(new, old[:, :1], ADVANTAGES, epsilon=0.2)
    with pytest.raises(InputError, match="epsilon and epsilon_high must be > 0"):
        grpo_loss(new, old, ADVANTAGES, epsilon=0.0)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo"])
def test_per_step_calls_with_loss_weights_add_up_to_the_whole_loss(loss_type):
    """The trainer's split: one call per step column, weighted by `loss_weights` of the whole mask,
    gives the loss and gradient of one call on every entry (dr_grpo with its constant max_steps)."""
    new, old = log_probs()
    mask = torch.tensor([[True, False], [True, True]])
    whole, _ = grpo_loss(new, old, ADVANTAGES, epsilon=0.2, mask=mask, loss_type=loss_type, max_steps=3)
    (expected,) = torch.autograd.grad(whole, new)
    weights = loss_weights(mask, loss_type, max_steps=3)
    parts = [
        grpo_loss(
            new[:, k : k + 1],
            old[:, k : k + 1],
            ADVANTAGES,
            epsilon=0.2,
            mask=mask[:, k : k + 1],
            weights=weights[:, k : k + 1],
        )[0]
        for k in range(2)
    ]
    assert sum(parts).item() == pytest.approx(whole.item())
    close(torch.autograd.grad(sum(parts), new)[0], expected.tolist())
    if loss_type == "dr_grpo":
        assert whole.item() == pytest.approx(-(1.2 - 1.1 - 0.8) / (2 * 3))
