"""FP8 rollout forwards (`policies.fp8`, ``trainer.rollout_fp8``): the layer against an independent
dequantized product, the layer is `nn.Linear` outside its context, LoRA over an FP8 base, and the
trainer's on-policy update reading its old log-probs from the training forward."""

import pytest
import torch
from torch import nn

from grpo.config import ConfigError, GRPOConfig
from grpo.trainer import GRPOTrainer
from policies import LTXPolicy
from policies.errors import InputError
from policies.fp8 import STATIC_MARGIN, FP8RolloutLinear, FP8Scaling, fp8_forwards, fp8_linears
from policies.ltx import LORA_ADAPTER
from policies.tiny import build_tiny_ltx

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # float8 matmuls: CUDA's, else torch's CPU ones
BF16_ULP = 2.0**-7  # relative spacing of bf16 values, the FP8 product's output precision


def _dequantized_product(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    """Row-wise e4m3 by hand, in float64: scale each row to 448 at its largest magnitude, round to
    e4m3, multiply the rounded values back, add the bias (bf16), round to bf16 as the FP8 matmul writes."""

    def rows(t: torch.Tensor) -> torch.Tensor:
        t = t.double().reshape(-1, t.shape[-1])
        scale = t.abs().amax(-1, keepdim=True) / 448.0
        return (t / scale).to(torch.float8_e4m3fn).double() * scale

    out = rows(x) @ rows(layer.weight).T + layer.bias.double().bfloat16().double()  # float64: CPU and CUDA
    return out.to(torch.bfloat16).double().reshape(*x.shape[:-1], -1)  # the bias added before rounding


def _static_product(x: torch.Tensor, amax: float, layer: nn.Linear) -> torch.Tensor:
    """The static-scale product by hand, in float64: the whole input at one scale, STATIC_MARGIN times
    ``amax`` mapped to 448 (larger values saturate at 448), the weight row-wise as before."""
    scale = amax * STATIC_MARGIN / 448.0
    t = (x.double().reshape(-1, x.shape[-1]) / scale).clamp(-448.0, 448.0)
    w = layer.weight.double()
    w_scale = w.abs().amax(-1, keepdim=True) / 448.0
    w = (w / w_scale).to(torch.float8_e4m3fn).double() * w_scale
    out = (t.to(torch.float8_e4m3fn).double() * scale) @ w.T + layer.bias.double().bfloat16().double()
    return out.to(torch.bfloat16).double().reshape(*x.shape[:-1], -1)


def _fp8(layer: nn.Linear) -> FP8RolloutLinear:
    layer.__class__ = FP8RolloutLinear
    return layer


def test_fp8_layer_is_the_dequantized_product_and_nn_linear_outside_its_context():
    torch.manual_seed(0)
    layer = _fp8(nn.Linear(64, 48).to(DEVICE))
    x = torch.randn(3, 7, 64, device=DEVICE)
    exact = nn.functional.linear(x, layer.weight, layer.bias)
    with fp8_forwards([layer]):
        with torch.no_grad():
            fast = layer(x)
        assert torch.equal(layer(x), exact)  # a forward that records gradients stays exact
    assert layer.fp8_weight is None and torch.equal(layer(x), exact)
    reference = _dequantized_product(x, layer)
    assert (fast.double() - reference).abs().max() <= BF16_ULP * reference.abs().max()
    rel = float((fast - exact.detach()).norm() / exact.detach().norm())
    assert 1e-3 < rel < 0.06, rel  # quantized (not the fp32 product), at e4m3's ~3 % per element
    with torch.no_grad():  # entering again quantizes the weights as they are now
        layer.weight.mul_(-2.0)
    with fp8_forwards([layer]), torch.no_grad():
        again = layer(x)
    assert (again.double() - _dequantized_product(x, layer)).abs().max() <= BF16_ULP * again.abs().max()
    assert set(layer.state_dict()) == {"weight", "bias"}


def test_static_scaling_calibrates_on_the_first_forward_then_casts_per_tensor():
    """`FP8Scaling` static: the model's first forward in `calibrating` is the row-wise product and
    records the input's largest magnitude; later forwards cast the whole input at that amax times the
    margin (values past it saturate); leaving the context forgets the scales."""
    torch.manual_seed(0)
    layer = _fp8(nn.Linear(64, 48).to(DEVICE))
    model = nn.Sequential(layer)  # the transformer whose forwards the scaling counts
    scaling = FP8Scaling(static=True)
    first = torch.randn(3, 7, 64, device=DEVICE)
    later = torch.randn(3, 7, 64, device=DEVICE) * 0.5
    amax = float(first.abs().amax())
    later[0, 0, :4] = amax * STATIC_MARGIN * torch.tensor([2.0, -3.0, 0.9, 1e-4])  # two saturate
    with fp8_forwards([layer], scaling), scaling.calibrating(model), torch.no_grad():
        assert not scaling.use_static and scaling.records
        calibrating = model(first)
        assert scaling.use_static and not scaling.records
        torch.testing.assert_close(
            layer.input_amax, torch.full((1, 1), amax, device=DEVICE), rtol=1e-6, atol=0
        )
        static = model(later)
    assert not scaling.calibrated and layer.input_amax is None and layer.scaling is None
    reference = _dequantized_product(first, layer)
    assert (calibrating.double() - reference).abs().max() <= BF16_ULP * reference.abs().max()
    reference = _static_product(later, amax, layer)
    assert (static.double() - reference).abs().max() <= BF16_ULP * reference.abs().max()
    assert (static.double() - _dequantized_product(later, layer)).abs().max() > 1e-3  # not row-wise
    dynamic = FP8Scaling(static=False)
    with fp8_forwards([layer], dynamic), dynamic.calibrating(model), torch.no_grad():
        again = model(first), model(later)
        assert layer.input_amax is None and not dynamic.use_static
    assert torch.equal(again[0], calibrating)
    assert (again[1].double() - _dequantized_product(later, layer)).abs().max() <= BF16_ULP * again[
        1
    ].abs().max()


def test_fp8_gelu_is_diffusers_tanh_gelu_in_its_sigmoid_form(tmp_path):
    """The blocks' tanh-GELU computes ``x * sigmoid(2z)`` while its linear is in FP8 (the same function
    as torch's tanh form to float32 rounding), and is diffusers' own module otherwise."""
    from diffusers.models.activations import GELU

    policy = LTXPolicy.from_pretrained(build_tiny_ltx(tmp_path / "tiny")).to(DEVICE)
    layers = fp8_linears(policy.transformer)
    act = policy.transformer.transformer_blocks[0].ff.net[0]
    assert type(act).__name__ == "FP8RolloutGELU" and isinstance(act, GELU) and act.proj in layers
    x = torch.randn(2, 5, act.proj.in_features, device=DEVICE) * 3
    with torch.no_grad():
        assert torch.equal(act(x), torch.nn.functional.gelu(act.proj(x), approximate="tanh"))
        with fp8_forwards(layers):
            pre = act.proj(x)
            fast = act(x)
    torch.testing.assert_close(fast, torch.nn.functional.gelu(pre, approximate="tanh"), rtol=1e-5, atol=1e-6)


def test_fp8_linears_converts_block_layers_and_leaves_lora_adapters(tmp_path):
    policy = LTXPolicy.from_pretrained(build_tiny_ltx(tmp_path / "tiny")).to(DEVICE)
    policy.add_lora(rank=4)
    keys = set(policy.transformer.state_dict())
    layers = fp8_linears(policy.transformer)
    names = {m: n for n, m in policy.transformer.named_modules()}
    converted = sorted(names[m] for m in layers)
    assert converted and all(n.startswith("transformer_blocks.") for n in converted)
    assert all("lora_" not in n for n in converted) and any(n.endswith("to_q.base_layer") for n in converted)
    assert set(policy.transformer.state_dict()) == keys  # checkpoints and adapters see the same model
    # the adapted layer: FP8 base + the adapter's own product in the model's precision
    lora = policy.transformer.transformer_blocks[0].attn1.to_q
    torch.nn.init.normal_(lora.lora_B[LORA_ADAPTER].weight)
    x = torch.randn(2, 5, lora.in_features, device=DEVICE)
    with fp8_forwards(layers), torch.no_grad():
        base, adapted = lora.base_layer(x), lora(x)
    delta = lora.lora_B[LORA_ADAPTER](lora.lora_A[LORA_ADAPTER](x)) * lora.scaling[LORA_ADAPTER]
    assert torch.allclose(adapted, base + delta, atol=1e-6)
    assert (
        base.double() - _dequantized_product(x, lora.base_layer)
    ).abs().max() <= BF16_ULP * base.abs().max()
    with pytest.raises(InputError, match="declares no _repeated_blocks"):
        fp8_linears(nn.Sequential(nn.Linear(16, 16)))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_ltx(tmp_path_factory.mktemp("tiny_ltx"))


def _redness(videos, prompts, contexts, **metadata):
    return [float((v[..., 0] - 0.5 * (v[..., 1] + v[..., 2])).mean()) for v in videos]


def _trainer(tmp_path, tiny_dir, name, **overrides):
    args = GRPOConfig(
        output_dir=str(tmp_path / name),
        num_generations=4,
        num_prompts_per_iteration=1,
        num_inference_steps=3,
        epsilon=1e-4,
        beta=0.0,
        seed=0,
        **overrides,
    )
    return GRPOTrainer(LTXPolicy.from_pretrained(tiny_dir), [_redness], args, [{"prompt": "a ball"}])


@pytest.mark.parametrize("scaling", ["static", "dynamic"])
def test_fp8_rollout_trains_on_policy_from_the_full_precision_forward(tmp_path, tiny_dir, scaling):
    """The FP8 rollout samples close to (not as) the model; the update's ratio is exactly 1, its
    ``logprob_drift`` is how far the recorded log-probs are from the full-precision recompute."""
    plain, fast = (
        _trainer(tmp_path, tiny_dir, n + scaling, rollout_fp8=n == "fp8", rollout_fp8_scaling=scaling)
        for n in ("plain", "fp8")
    )
    ref, _, _ = plain._rollout_and_score(plain._rows_for(0), 0)
    rollout, scores, _ = fast._rollout_and_score(fast._rows_for(0), 0)
    moved = float((rollout.final_latents - ref.final_latents).norm() / ref.final_latents.norm())
    assert 1e-4 < moved < 0.1, moved
    assert all(layer.fp8_weight is None for layer in fast.fp8_layers)
    with torch.no_grad():  # out of the rollout the model is its own again: it recomputes the plain record
        same = fast.policy.log_prob(ref, 1).log_prob
        recomputed = torch.stack([fast.policy.log_prob(rollout, j).log_prob for j in range(3)], 1)
    assert torch.allclose(same, ref.log_probs[:, 1], atol=1e-5)
    drift = float((recomputed - rollout.log_probs).abs().max())
    assert drift > 1e-4  # the FP8 record is not what training computes ...
    advantages, _ = fast._advantages(scores)
    stats = fast._update(rollout, advantages, 0)
    # ... yet with the old log-prob taken from the training forward nothing is clipped
    assert stats["train/ratio_min"] == stats["train/ratio_max"] == 1.0 and stats["train/clip_frac"] == 0
    assert 1e-4 < stats["train/logprob_drift"] <= drift * (1 + 1e-4)  # over the trained steps only


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"overlap_update": True}, "overlap_update false"),
        ({"num_iterations": 2}, "num_iterations 1"),
        ({"guidance_scale": 3.0, "cfg_in_training": False}, "cfg_in_training true"),
        ({"fsdp": True}, "fsdp false"),
    ],
)
def test_fp8_rollout_refuses_an_update_that_would_read_its_log_probs(overrides, match):
    with pytest.raises(ConfigError, match=match) as error:
        GRPOConfig(output_dir="/tmp/x", rollout_fp8=True, **overrides)
    assert error.value.field == "rollout_fp8"


def test_fp8_rollout_refuses_several_optimizer_steps_and_takes_nft(tmp_path, tiny_dir):
    with pytest.raises(InputError, match="makes 2 optimizer steps per rollout"):
        _trainer(tmp_path, tiny_dir, "steps", rollout_fp8=True, per_device_train_batch_size=2)
    nft = _trainer(
        tmp_path, tiny_dir, "nft", rollout_fp8=True, algorithm="nft", overlap_update=True, max_iterations=1
    )  # DiffusionNFT reads no log-prob: FP8 samples are just samples
    nft.train()
    assert nft.fp8_layers and all(layer.fp8_weight is None for layer in nft.fp8_layers)
