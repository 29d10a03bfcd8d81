"""The stochastic step against independent computations: torch's Normal, float64 re-derivations of
the samplers' formulas (Flow-GRPO's SDE, coefficients-preserving sampling, DanceGRPO), and closed-form
Gaussian marginals."""

import math

import numpy as np
import pytest
import torch

from policies import sde
from policies.errors import InputError

STOCHASTIC = ["sde", "cps", "dance"]
NOISE = {"sde": 0.7, "cps": 0.8, "dance": 0.3}


def _inputs(dtype=torch.float32, shape=(3, 5, 4), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(dtype)
    v = torch.randn(shape, generator=g).to(dtype)
    return x, v


def _reference_mean_std(kind, x, v, s, s_next, a):
    """The published sde / cps / dance updates written out again in float64 numpy, not via policies.sde."""
    x, v = x.astype(np.float64), v.astype(np.float64)
    d = s_next - s
    if kind == "sde":
        std_t = a * math.sqrt(s / (1 - s))
        mean = x + (v + std_t**2 / (2 * s) * (x + (1 - s) * v)) * d
        return mean, std_t * math.sqrt(-d)
    if kind == "cps":
        x0, x1 = x - s * v, x + (1 - s) * v
        n = s_next * math.sin(a * math.pi / 2)
        return (1 - s_next) * x0 + math.sqrt(s_next**2 - n**2) * x1, n
    if kind == "dance":
        x0 = x - s * v
        score = -(x - (1 - s) * x0) / s**2
        return x + d * v - 0.5 * a**2 * score * d, a * math.sqrt(s - s_next)
    return x + d * v, 0.0


@pytest.mark.parametrize("kind", STOCHASTIC)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_log_prob_equals_torch_normal(kind, dtype, reduction):
    x, v = _inputs(dtype)
    out = sde.step(
        kind, x, v, 0.7, 0.6, NOISE[kind], generator=torch.Generator().manual_seed(1), reduction=reduction
    )
    assert out.log_prob.dtype == torch.float32 and out.log_prob.shape == (3,)
    assert out.next_sample.dtype == dtype
    # scored on the sample as returned (after casting to the input dtype)
    expected = torch.distributions.Normal(out.mean, out.std).log_prob(out.next_sample.float())
    expected = expected.mean(dim=(1, 2)) if reduction == "mean" else expected.sum(dim=(1, 2))
    torch.testing.assert_close(out.log_prob, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", STOCHASTIC + ["ode"])
def test_mean_and_std_match_float64_formulas(kind):
    x, v = _inputs()
    s, s_next = 0.83, 0.71
    out = sde.step(kind, x, v, s, s_next, NOISE.get(kind, 0.0), noise=torch.zeros_like(x))
    mean, std = _reference_mean_std(kind, x.numpy(), v.numpy(), s, s_next, NOISE.get(kind, 0.0))
    np.testing.assert_allclose(out.mean.numpy(), mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.std.numpy(), np.full_like(mean, std), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(out.next_sample.numpy(), mean, rtol=1e-5, atol=1e-6)  # zero noise -> mean


def test_ode_is_euler_with_zero_log_prob():
    x, v = _inputs()
    out = sde.step("ode", x, v, 0.5, 0.25, 0.0)
    torch.testing.assert_close(out.next_sample, x + (0.25 - 0.5) * v)
    assert torch.all(out.log_prob == 0)


def test_prev_sample_is_scored_not_redrawn():
    x, v = _inputs()
    first = sde.step("sde", x, v, 0.9, 0.8, 0.7, generator=torch.Generator().manual_seed(3))
    again = sde.step("sde", x, v, 0.9, 0.8, 0.7, prev_sample=first.next_sample)
    assert torch.equal(again.next_sample, first.next_sample)
    torch.testing.assert_close(again.log_prob, first.log_prob, rtol=0, atol=1e-6)
    other = sde.step("sde", x, v, 0.9, 0.8, 0.7, prev_sample=first.next_sample + 0.5)
    assert torch.all(other.log_prob < first.log_prob - 1e-3)


def test_per_sample_sigmas_equal_separate_calls():
    x, v = _inputs()
    s = torch.tensor([0.9, 0.5, 0.3])
    s_next = torch.tensor([0.8, 0.45, 0.1])
    noise = torch.randn_like(x)
    batched = sde.step("sde", x, v, s, s_next, 0.7, noise=noise)
    for b in range(3):
        single = sde.step(
            "sde", x[b : b + 1], v[b : b + 1], float(s[b]), float(s_next[b]), 0.7, noise=noise[b : b + 1]
        )
        torch.testing.assert_close(batched.next_sample[b : b + 1], single.next_sample)
        torch.testing.assert_close(batched.log_prob[b : b + 1], single.log_prob)


@pytest.mark.parametrize("kind", STOCHASTIC)
def test_per_token_sigmas_freeze_clean_tokens_and_exclude_them(kind):
    """Conditioning tokens at sigma 0 -> 0 stay unchanged and do not count in the log-prob."""
    x, v = _inputs(shape=(2, 6, 4))
    generated = torch.tensor([[0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1]], dtype=torch.float32).unsqueeze(-1)
    s, s_next = 0.6 * generated, 0.5 * generated
    out = sde.step(kind, x, v, s, s_next, NOISE[kind], generator=torch.Generator().manual_seed(0))
    frozen = generated.squeeze(-1) == 0
    assert torch.equal(out.next_sample[frozen], x[frozen])
    assert torch.isfinite(out.log_prob).all()
    for b in range(2):
        keep = ~frozen[b]
        expected = torch.distributions.Normal(out.mean[b, keep], out.std[b, keep]).log_prob(
            out.next_sample[b, keep]
        )
        torch.testing.assert_close(out.log_prob[b], expected.mean(), rtol=1e-5, atol=1e-6)


def test_log_prob_gradient_flows_to_velocity_only_through_mean():
    x, v = _inputs()
    v = v.clone().requires_grad_(True)
    drawn = sde.step("sde", x, v.detach(), 0.7, 0.6, 0.7, generator=torch.Generator().manual_seed(0))
    out = sde.step("sde", x, v, 0.7, 0.6, 0.7, prev_sample=drawn.next_sample)
    out.log_prob.sum().backward()
    assert v.grad is not None and torch.isfinite(v.grad).all() and v.grad.abs().sum() > 0


def _gaussian_velocity(x, s, c):
    """Exact v = E[eps - x0 | x_s] for data x0 ~ N(0, c^2)."""
    var = (1 - s) ** 2 * c**2 + s**2
    return (s - (1 - s) * c**2) / var * x


@pytest.mark.parametrize("kind,a", [("sde", 1.0), ("dance", 0.8), ("ode", 0.0)])
def test_exact_velocity_preserves_gaussian_marginals(kind, a):
    """With the exact velocity of Gaussian data, one small step maps N(0, var_s) to N(0, var_s')."""
    c, s, s_next, n = 0.5, 0.5, 0.47, 2_000_000
    var = lambda t: (1 - t) ** 2 * c**2 + t**2  # noqa: E731
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, generator=g) * math.sqrt(var(s))
    out = sde.step(kind, x, _gaussian_velocity(x, s, c), s, s_next, a, generator=g)
    got = out.next_sample.double().var().item()
    assert got == pytest.approx(var(s_next), rel=4e-3)
    if kind != "ode":  # the noise this step injects is far larger than the tolerance: the test has teeth
        assert out.std.max().item() ** 2 > 0.03 * var(s_next)


@pytest.mark.parametrize("kind", STOCHASTIC)
def test_empirical_noise_matches_reported_std(kind):
    x = torch.zeros(400_000, 1)
    v = torch.ones_like(x)
    out = sde.step(kind, x, v, 0.8, 0.6, NOISE[kind], generator=torch.Generator().manual_seed(0))
    residual = out.next_sample - out.mean
    assert residual.std().item() == pytest.approx(out.std[0, 0].item(), rel=1e-2)
    assert residual.mean().abs().item() < 5 / math.sqrt(x.shape[0]) * out.std[0, 0].item()  # 5 sigma


def test_kl_matches_torch_kl_divergence():
    x, v = _inputs()
    a = sde.step("sde", x, v, 0.7, 0.6, 0.7, noise=torch.zeros_like(x))
    b = sde.step("sde", x, v * 1.1, 0.7, 0.6, 0.7, noise=torch.zeros_like(x))
    kl = sde.kl_divergence(a.mean, b.mean, a.std, reduction="sum")
    expected = torch.distributions.kl_divergence(
        torch.distributions.Normal(a.mean, a.std), torch.distributions.Normal(b.mean, a.std)
    ).sum(dim=(1, 2))
    torch.testing.assert_close(kl, expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(sde.kl_divergence(a.mean, b.mean, a.std), expected / 20, rtol=1e-5, atol=1e-7)
    assert torch.all(sde.kl_divergence(a.mean, a.mean, a.std) == 0)


@pytest.mark.parametrize(
    "kind,noise,match",
    [
        ("langevin", 0.7, "unknown SDE kind"),
        ("sde", -0.1, "out of range"),
        ("cps", 1.5, "out of range"),
        ("sde", float("nan"), "finite"),
        ("dance", 70.0, "out of range"),
        ("sde", 0.0, "kind='ode'"),
    ],
)
def test_bad_kind_or_noise_is_a_one_line_error(kind, noise, match):
    x, v = _inputs()
    with pytest.raises(InputError, match=match) as info:
        sde.step(kind, x, v, 0.7, 0.6, noise)
    assert "\n" not in str(info.value)


def test_bad_reduction_and_shapes():
    x, v = _inputs()
    with pytest.raises(InputError, match="reduction"):
        sde.step("sde", x, v, 0.7, 0.6, 0.7, reduction="max")
    with pytest.raises(InputError, match="velocity shape"):
        sde.step("sde", x, v[:, :2], 0.7, 0.6, 0.7)
