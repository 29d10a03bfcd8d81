"""`policies.fp8_rope`: LTX queries/keys RMS-normed, rotated and cast to e4m3 in one pass. The
PyTorch reference against the model's own modules (torch's RMSNorm, diffusers' RoPE), and the
Triton kernel against the reference where it runs (CUDA with Triton)."""

import torch
from diffusers.models.transformers.transformer_ltx import apply_rotary_emb

from policies.fp8_rope import fused_norm_rope_available, norm_rope_fp8, norm_rope_fp8_reference

E4M3_ULP = 2.0**-3  # relative spacing of e4m3 values


def _inputs(device: str, batch: int = 2, seq: int = 24, heads: int = 4, head_dim: int = 64):
    g = torch.Generator().manual_seed(0)
    dim = heads * head_dim
    x = (torch.randn(batch, seq, dim, generator=g) * 3).to(device)
    weight = (torch.rand(dim, generator=g) + 0.5).to(device)
    angles = torch.rand(1, seq, dim // 2, generator=g).to(device) * 6
    cos, sin = (f(angles).repeat_interleave(2, -1).expand(batch, seq, dim) for f in (torch.cos, torch.sin))
    inv_scale = (torch.rand(heads, generator=g) * 40 + 60).to(device)  # some values saturate
    return x, weight, cos, sin, inv_scale


def test_reference_is_the_models_rms_norm_and_rope_then_the_static_cast():
    x, weight, cos, sin, inv_scale = _inputs("cpu")
    norm = torch.nn.RMSNorm(x.shape[-1], eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(weight)
        model = apply_rotary_emb(norm(x), (cos, sin))
    by_hand = (model.unflatten(-1, (4, -1)) * inv_scale[:, None]).clamp(-448, 448).flatten(-2)
    ours = norm_rope_fp8_reference(x, weight, 1e-5, cos, sin, inv_scale).float()
    assert ours.abs().max() == 448  # the largest values saturate, as the static cast says
    assert ((ours - by_hand).abs() <= E4M3_ULP * by_hand.abs() / 2 + 2.0**-9).all()
    unscaled = norm_rope_fp8_reference(x, weight, 1e-5, cos, sin, torch.ones(4)).float()
    assert float((unscaled - model).norm() / model.norm()) < 0.03  # e4m3 rounding, ~2 %


def test_kernel_matches_the_reference_where_it_runs():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    inputs = _inputs(device)
    reference = norm_rope_fp8_reference(*inputs[:1], inputs[1], 1e-5, *inputs[2:])
    out = norm_rope_fp8(inputs[0].bfloat16(), inputs[1], 1e-5, *inputs[2:])
    if not fused_norm_rope_available(torch.device(device), inputs[0].shape[-1]):
        assert device == "cpu" or not fused_norm_rope_available(torch.device("cuda"), 256)
        assert torch.equal(
            out.float(),
            norm_rope_fp8_reference(inputs[0].bfloat16(), *inputs[1:2], 1e-5, *inputs[2:]).float(),
        )
        return
    assert out.dtype == torch.float8_e4m3fn and out.shape == inputs[0].shape
    bf16 = norm_rope_fp8_reference(inputs[0].bfloat16(), inputs[1], 1e-5, *inputs[2:])
    assert (out.float() != bf16.float()).float().mean() < 1e-3  # fp32 summation order only
    assert float((out.float() - reference.float()).norm() / reference.float().norm()) < 0.03
    compiled = torch.compile(norm_rope_fp8, fullgraph=True)
    assert torch.equal(compiled(inputs[0].bfloat16(), inputs[1], 1e-5, *inputs[2:]).float(), out.float())
