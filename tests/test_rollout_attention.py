"""FlashAttention-3 rollouts (`policies.rollout_attention`, ``trainer.rollout_attention``).

The processors that carry the kernel are diffusers' own computation otherwise (LTX-Video, and LTX-2
with spatio-temporal guidance and per-head gates); the kernel runs only inside its context and only
for no-grad forwards; the trainer's update reads its old log-probs from the training forward.

FlashAttention-3 is a Hopper kernel. On a Hopper GPU with ``fa3-fwd`` installed these tests run it;
elsewhere they run its independent emulation below (e4m3 per (sample, head) rounded and multiplied
back, then exact attention), so the wiring is tested on every machine, and the kernel itself is
checked against the emulation where it exists.
"""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from test_nextclip_ltx2 import transformer_inputs

import policies.rollout_attention as rollout_attention_module
from grpo.config import ConfigError, GRPOConfig
from grpo.trainer import GRPOTrainer
from policies import LTXPolicy
from policies.errors import InputError
from policies.fp8 import STATIC_MARGIN, FP8Scaling
from policies.rollout_attention import (
    FlashKernel,
    check_rollout_attention,
    fa3_attention,
    quantize_heads,
    rollout_attention,
    rollout_attention_processors,
)
from policies.tiny import TinyLTXSpec, build_tiny_ltx
from policies.tiny_ltx2 import build_tiny_ltx2


def _has_fa3() -> bool:
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
        return False
    try:
        rollout_attention_module.find_flash_attention()
    except InputError:
        return False
    return True


HAS_FA3 = _has_fa3()
DEVICE = "cuda" if HAS_FA3 else "cpu"


def _flash_emulated(q, k, v, q_descale=None, k_descale=None, v_descale=None):
    """FlashAttention-3's ``flash_attn_func`` by hand: e4m3 inputs multiplied back by their descales
    ``[B, H]``, then exact attention in float32, written in bf16. ``[B, S, H, D]`` in and out."""
    if q.dtype == torch.float8_e4m3fn:
        q, k, v = (
            x.float() * d[:, None, :, None] for x, d in ((q, q_descale), (k, k_descale), (v, v_descale))
        )
    out = F.scaled_dot_product_attention(*(x.float().transpose(1, 2) for x in (q, k, v)))
    return out.transpose(1, 2).to(torch.bfloat16)


def _emulated(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fp8: bool = False) -> torch.Tensor:
    """What the kernel computes with dynamic scales, by hand: q/k/v rounded to e4m3 with one scale per
    (sample, head) and multiplied back (if ``fp8``), then exact attention in float32."""

    def rounded(x: torch.Tensor) -> torch.Tensor:
        if not fp8:
            return x.float()
        scale = x.float().abs().amax(dim=(1, 3), keepdim=True) / 448.0
        return (x.float() / scale).to(torch.float8_e4m3fn).float() * scale

    out = F.scaled_dot_product_attention(*(rounded(x).transpose(1, 2) for x in (q, k, v)))
    return out.transpose(1, 2).to(q.dtype)


@pytest.fixture
def kernel(monkeypatch):
    """The real kernel on Hopper with fa3-fwd, else its emulation (and no device check); the list
    records, per call, whether its inputs were e4m3."""
    calls = []
    real = rollout_attention_module.find_flash_attention() if HAS_FA3 else _flash_emulated

    def counted(q, k, v, **descales):
        calls.append(q.dtype == torch.float8_e4m3fn)
        return real(q, k, v, **descales)

    monkeypatch.setattr(rollout_attention_module, "find_flash_attention", lambda: counted)
    if not HAS_FA3:
        monkeypatch.setattr("grpo.trainer.check_rollout_attention", lambda *args: None)
    return calls


def _ltx2_transformer(tmp_path):
    """A tiny LTX-2.3-layout transformer: perturbed attention (STG) and per-head gates, random weights."""
    from diffusers import LTX2VideoTransformer3DModel

    path = build_tiny_ltx2(tmp_path / "ltx2")
    config = json.loads((path / "transformer" / "config.json").read_text())
    config.update(perturbed_attn=True, gated_attn=True, audio_gated_attn=True)
    torch.manual_seed(0)
    model = LTX2VideoTransformer3DModel.from_config(config)
    with torch.no_grad():
        for block in model.transformer_blocks:  # gates away from their zero init, so they act
            torch.nn.init.normal_(block.attn1.to_gate_logits.weight, std=0.5)
    return model


@pytest.mark.parametrize("mask", [[1.0, 0.0], [0.0, 0.0], [1.0, 1.0]], ids=["mixed", "all_stg", "no_stg"])
def test_ltx2_processors_are_diffusers_own_with_stg_and_gates(tmp_path, mask):
    stock = _ltx2_transformer(tmp_path)
    ours = copy.deepcopy(stock)
    processors = rollout_attention_processors(ours)
    assert len(processors) == len(ours.transformer_blocks)
    assert type(stock.transformer_blocks[0].attn1.processor).__name__ == "LTX2PerturbedAttnProcessor"
    kwargs = transformer_inputs(
        stock, spatio_temporal_guidance_blocks=[0], perturbation_mask=torch.tensor(mask)
    )
    with torch.no_grad():
        for a, b in zip(ours(**kwargs), stock(**kwargs), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    if mask == [1.0, 0.0]:  # STG and the gates act: the perturbed sample differs from the plain one
        with torch.no_grad():
            plain = stock(**{**kwargs, "perturbation_mask": torch.ones(2)})[0]
        assert (plain[1] - stock(**kwargs)[0][1]).abs().max() > 1e-3


def _ltx_forward(policy, **kwargs):
    g = torch.Generator().manual_seed(0)
    inputs = dict(
        hidden_states=torch.randn(2, 64, 8, generator=g).to(DEVICE),
        encoder_hidden_states=torch.randn(2, 3, 32, generator=g).to(DEVICE),
        timestep=torch.tensor([300.0, 700.0], device=DEVICE),
        encoder_attention_mask=torch.ones(2, 3, dtype=torch.bool, device=DEVICE),
        num_frames=4,
        height=4,
        width=4,
        rope_interpolation_scale=(8 / 25.0, 8, 8),
        return_dict=False,
    )
    return policy.transformer(**inputs)[0]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """Tiny LTX-Video with head dim 64 (FlashAttention-3 needs one of 64/96/128/192/256)."""
    return build_tiny_ltx(tmp_path_factory.mktemp("tiny_ltx"), TinyLTXSpec(attention_head_dim=64))


@pytest.mark.parametrize("kind", ["fa3", "fa3_fp8"])
def test_kernel_runs_only_in_its_context_and_only_without_grad(tiny_dir, kernel, kind):
    policy = LTXPolicy.from_pretrained(tiny_dir).to(DEVICE)
    with torch.no_grad():
        stock = _ltx_forward(policy)
    processors = rollout_attention_processors(policy.transformer)
    with rollout_attention(processors, kind):
        with torch.no_grad():
            fast = _ltx_forward(policy)
        assert len(kernel) == len(processors) and set(kernel) == {kind == "fa3_fp8"}
        assert torch.equal(_ltx_forward(policy).detach(), stock)  # a forward with gradients: SDPA
    assert len(kernel) == len(processors)
    assert all(p.rollout_kernel is None for p in processors)
    with torch.no_grad():
        assert torch.equal(_ltx_forward(policy), stock)  # out of the context: SDPA again
    rel = float((fast - stock).norm() / stock.norm())
    if kind == "fa3_fp8":
        assert 1e-4 < rel < 0.1, rel  # e4m3 moves the velocity, by a few percent at most
    else:
        assert rel < 1e-2, rel  # the bf16 kernel: bf16 rounding


def test_quantize_heads_is_per_sample_and_head():
    x = torch.randn(2, 5, 3, 4, generator=torch.Generator().manual_seed(0))
    x[1, :, 2] *= 100.0
    q, descale = quantize_heads(x)
    assert q.dtype == torch.float8_e4m3fn and descale.shape == (2, 3)
    torch.testing.assert_close(descale, x.abs().amax(dim=(1, 3)) / 448.0)
    back = q.float() * descale[:, None, :, None]
    assert ((back - x).abs() <= x.abs().amax(dim=(1, 3), keepdim=True) * 2.0**-3).all()  # e4m3: 3 bits
    assert q.float().abs().amax(dim=(1, 3)).eq(448.0).all()


def test_static_scales_are_the_first_forwards_per_head_amax():
    """`FlashKernel` with static scaling: the calibrating forward is the dynamic kernel and records
    each head's largest query/key/value magnitude over the batch; later forwards round every sample of
    a head at that amax times the margin (by hand below)."""
    g = torch.Generator().manual_seed(0)
    scaling = FP8Scaling(static=True)
    kernel = FlashKernel(_flash_emulated, fp8=True, scaling=scaling)
    processor = type("Processor", (), {"fp8_amax": torch.zeros(3, 3)})()
    first = [torch.randn(2, 5, 3, 16, generator=g) for _ in range(3)]
    first[1][1, :, 2] *= 10.0
    out = kernel(processor, *first)
    torch.testing.assert_close(out, _emulated(*first, fp8=True).bfloat16(), rtol=0, atol=1e-2)
    amax = torch.stack([x.abs().amax(dim=(0, 1, 3)) for x in first])
    torch.testing.assert_close(processor.fp8_amax, amax, rtol=1e-6, atol=0)
    scaling.calibrated = True
    later = [torch.randn(2, 5, 3, 16, generator=g) * 0.5 for _ in range(3)]

    def rounded(x, head_amax):
        scale = head_amax[:, None] * STATIC_MARGIN / 448.0
        return (x / scale).clamp(-448, 448).to(torch.float8_e4m3fn).float() * scale

    by_hand = F.scaled_dot_product_attention(*(rounded(x, a).transpose(1, 2) for x, a in zip(later, amax)))
    out = kernel(processor, *later).float()
    torch.testing.assert_close(out, by_hand.transpose(1, 2), rtol=0, atol=1e-2)
    assert (out - _emulated(*later, fp8=True)).abs().max() > 1e-4  # not the per-(sample, head) scales


def test_fused_queries_and_keys_compute_the_unfused_static_path(tiny_dir, kernel, monkeypatch):
    """With static scales LTX-Video's queries and keys take the fused norm-RoPE-cast path
    (`policies.fp8_rope`; its Triton kernel on CUDA, else its PyTorch reference): the same
    attention as the unfused static path up to the bf16 rounding the fusion skips (none in float32)."""
    policy = LTXPolicy.from_pretrained(tiny_dir).to(DEVICE)
    processors = rollout_attention_processors(policy.transformer)
    fused_calls = []
    real = rollout_attention_module.norm_rope_fp8

    def counted(*args):
        fused_calls.append(1)
        return real(*args)

    monkeypatch.setattr(rollout_attention_module, "norm_rope_fp8", counted)
    outputs = {}
    for fused in (False, True):
        monkeypatch.setattr(rollout_attention_module, "fused_norm_rope_available", lambda *_, on=fused: on)
        scaling = FP8Scaling(static=True)
        with rollout_attention(processors, "fa3_fp8", scaling), scaling.calibrating(policy.transformer):
            with torch.no_grad():
                calibrating = _ltx_forward(policy)
                outputs[fused] = _ltx_forward(policy)
        assert len(fused_calls) == (2 * len(processors) if fused else 0)  # q and k of the static forward
    assert all(p.fp8_amax.gt(0).all() for p in processors)
    rel = float((outputs[True] - outputs[False]).norm() / outputs[False].norm())
    exact = (
        DEVICE == "cpu" and policy.transformer.dtype == torch.float32
    )  # the reference, no rounding skipped
    assert rel < (1e-5 if exact else 2e-2), rel
    assert float((calibrating - outputs[False]).norm()) > 0  # the calibrating forward is the dynamic one


def _redness(videos, prompts, contexts, **metadata):
    return [float((v[..., 0] - 0.5 * (v[..., 1] + v[..., 2])).mean()) for v in videos]


def test_trainer_rolls_out_in_the_kernel_and_trains_on_policy(tmp_path, tiny_dir, kernel):
    args = dict(num_generations=4, num_prompts_per_iteration=1, num_inference_steps=3, epsilon=1e-4)
    args.update(beta=0.0, seed=0)
    plain, fast = (
        GRPOTrainer(
            LTXPolicy.from_pretrained(tiny_dir),
            [_redness],
            GRPOConfig(output_dir=str(tmp_path / name), rollout_attention=name, **args),
            [{"prompt": "a ball"}],
        )
        for name in ("sdpa", "fa3_fp8")
    )
    assert not plain.attention_processors and fast.attention_processors
    ref, ref_scores, _ = plain._rollout_and_score(plain._rows_for(0), 0)
    rollout, scores, _ = fast._rollout_and_score(fast._rows_for(0), 0)
    assert len(kernel) == 3 * len(fast.attention_processors)  # every step's forward, every block
    moved = float((rollout.final_latents - ref.final_latents).norm() / ref.final_latents.norm())
    assert 1e-4 < moved < 0.1, moved
    advantages, _ = fast._advantages(scores)
    stats = fast._update(rollout, advantages, 0)
    assert len(kernel) == 3 * len(fast.attention_processors)  # the update's forwards: SDPA
    assert stats["train/ratio_min"] == stats["train/ratio_max"] == 1.0 and stats["train/clip_frac"] == 0
    exact = plain._update(ref, plain._advantages(ref_scores)[0], 0)
    # the kernel's record is not the training forward's; SDPA's is, to float32 rounding
    assert stats["train/logprob_drift"] > 1e-5 > 30 * exact["train/logprob_drift"]


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"overlap_update": True}, "overlap_update false"),
        ({"num_iterations": 2}, "num_iterations 1"),
        ({"guidance_scale": 3.0, "cfg_in_training": False}, "cfg_in_training true"),
    ],
)
def test_config_refuses_an_update_that_would_read_the_rollouts_log_probs(overrides, match):
    with pytest.raises(ConfigError, match=match) as error:
        GRPOConfig(output_dir="/tmp/x", rollout_attention="fa3", **overrides)
    assert error.value.field == "rollout_attention"
    with pytest.raises(ConfigError, match="one of"):
        GRPOConfig(output_dir="/tmp/x", rollout_attention="flash")
    GRPOConfig(output_dir="/tmp/x", rollout_attention="fa3", algorithm="nft", beta=0.0, overlap_update=True)


def test_fa3_matches_its_emulation_where_it_runs_and_is_refused_elsewhere(tiny_dir):
    """On Hopper with fa3-fwd: the kernel against the emulation. Anywhere else: the one-line refusal
    the trainer gives before any model work."""
    policy = LTXPolicy.from_pretrained(tiny_dir)
    with pytest.raises(InputError, match="no LTX blocks"):
        rollout_attention_processors(torch.nn.Linear(2, 2))
    if not HAS_FA3:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        with pytest.raises(InputError, match="(Hopper|pip install fa3-fwd).* rollout_attention sdpa"):
            check_rollout_attention("fa3_fp8", policy.transformer, device)
        check_rollout_attention("sdpa", policy.transformer, device)
        return
    check_rollout_attention("fa3_fp8", policy.transformer, torch.device("cuda"))
    tiny_heads = LTXPolicy.from_pretrained(build_tiny_ltx(tiny_dir.parent / "heads16")).transformer
    with pytest.raises(InputError, match=r"head dim \[16\]"):
        check_rollout_attention("fa3", tiny_heads, torch.device("cuda"))
    g = torch.Generator("cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 256, 4, 64, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    exact = _emulated(q, k, v).float()
    bf16 = fa3_attention(q, k, v).float()
    assert float((bf16 - exact).norm() / exact.norm()) < 1e-2
    fp8, emulated = fa3_attention(q, k, v, fp8=True).float(), _emulated(q, k, v, fp8=True).float()
    # the kernel also rounds the softmax weights to e4m3, which the emulation does not
    assert float((fp8 - emulated).norm() / emulated.norm()) < 0.1
