"""LTX queries and keys for an FP8 attention kernel in one pass: RMSNorm, RoPE and the e4m3 cast fused.

In an LTX block the self-attention's queries and keys are RMS-normed across all heads
(``attn.norm_q`` / ``norm_k``), rotated (interleaved RoPE: pairs ``(2i, 2i + 1)``) and, for
FlashAttention-3's FP8 forward, cast to e4m3. Compiled by inductor these are a looped reduction over
the row and shifted loads for the pair partners: 1.01 ms for the queries of an LTX-Video-2B rollout
batch (16 x 6144 tokens, 2048 channels) on an H200. `norm_rope_fp8` does it in one Triton kernel,
0.33 ms (`benchmarks/results/fp8_norm_rope_probe.json`), that reads each row once (its rotary-table
rows shared by the batch, which runs token-major so they stay in cache) and writes e4m3 with a
static per-head scale (`policies.fp8.FP8Scaling`).

Numbers: the kernel keeps the normed row in fp32 (the model rounds it to bf16 before RoPE), so it
differs from the unfused computation by that rounding before the cast; `norm_rope_fp8_reference`
is the same computation in PyTorch (used off CUDA or without Triton, and by the tests).
"""

from __future__ import annotations

import torch

from policies.fp8 import E4M3_MAX


def norm_rope_fp8_reference(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    cos: torch.Tensor,
    sin: torch.Tensor,
    inv_scale: torch.Tensor,
) -> torch.Tensor:
    """``x [B, S, D]`` RMS-normed over ``D`` (times ``weight``), rotated by ``cos/sin [B, S, D]``
    (interleaved pairs) and cast to e4m3 after multiplying head ``h`` by ``inv_scale[h]``; fp32 inside."""
    x = x.float()
    normed = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)
    if weight is not None:
        normed = normed * weight.float()
    even, odd = normed.unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack([-odd, even], dim=-1).flatten(-2)
    out = normed * cos + rotated * sin
    heads = inv_scale.numel()
    out = out.unflatten(-1, (heads, -1)) * inv_scale.float()[:, None]
    return out.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).flatten(-2)


def _triton_op():
    """The Triton kernel as an opaque torch op a compiled graph calls as it is (None without Triton).
    Built once, at import: a compiled graph cannot trace its definition."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def kernel(
        x_ptr, w_ptr, cos_ptr, sin_ptr, inv_ptr, out_ptr,
        batch, seq, cos_batch, cos_seq, sin_batch, sin_seq, eps,
        D: tl.constexpr, HEAD_DIM: tl.constexpr, HAS_WEIGHT: tl.constexpr, MAX: tl.constexpr,
    ):  # fmt: skip
        pid = tl.program_id(0)
        token, sample = pid // batch, pid % batch  # token-major: the batch shares a table row in cache
        row = sample * seq + token
        cols = tl.arange(0, D)
        x = tl.load(x_ptr + row.to(tl.int64) * D + cols).to(tl.float32)
        normed = x * tl.rsqrt(tl.sum(x * x, axis=0) / D + eps)
        if HAS_WEIGHT:
            normed = normed * tl.load(w_ptr + cols).to(tl.float32)
        sample, token = sample.to(tl.int64), token.to(tl.int64)
        cos = tl.load(cos_ptr + sample * cos_batch + token * cos_seq + cols)
        sin = tl.load(sin_ptr + sample * sin_batch + token * sin_seq + cols)
        even, odd = tl.split(tl.reshape(normed, (D // 2, 2)))
        out = normed * cos + tl.interleave(-odd, even) * sin
        out = out * tl.load(inv_ptr + cols // HEAD_DIM)
        out = tl.minimum(tl.maximum(out, -MAX), MAX)
        tl.store(out_ptr + row.to(tl.int64) * D + cols, out.to(tl.float8e4nv))

    @torch.library.custom_op("nextscene::norm_rope_fp8", mutates_args=())
    def norm_rope_fp8_op(
        x: torch.Tensor,
        weight: torch.Tensor,
        has_weight: bool,
        eps: float,
        cos: torch.Tensor,
        sin: torch.Tensor,
        inv_scale: torch.Tensor,
    ) -> torch.Tensor:
        batch, seq, dim = x.shape
        x, weight, inv_scale = x.contiguous(), weight.contiguous(), inv_scale.float().contiguous()
        cos, sin = (t.float() if t.stride(-1) == 1 else t.float().contiguous() for t in (cos, sin))
        out = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
        kernel[(batch * seq,)](
            x, weight, cos, sin, inv_scale, out,
            batch, seq, cos.stride(0), cos.stride(1), sin.stride(0), sin.stride(1), eps,
            D=dim, HEAD_DIM=dim // inv_scale.numel(), HAS_WEIGHT=has_weight, MAX=E4M3_MAX,
            num_warps=8 if dim >= 2048 else 4,
        )  # fmt: skip
        return out

    @norm_rope_fp8_op.register_fake
    def _(x, weight, has_weight, eps, cos, sin, inv_scale):
        return torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)

    return norm_rope_fp8_op


_NORM_ROPE_OP = _triton_op()


def fused_norm_rope_available(device: torch.device, dim: int) -> bool:
    """Whether `norm_rope_fp8` runs its Triton kernel for rows of width ``dim`` on ``device`` (CUDA,
    Triton installed, a power-of-two width)."""
    return device.type == "cuda" and dim & (dim - 1) == 0 and _NORM_ROPE_OP is not None


def norm_rope_fp8(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    cos: torch.Tensor,
    sin: torch.Tensor,
    inv_scale: torch.Tensor,
) -> torch.Tensor:
    """`norm_rope_fp8_reference` in one Triton kernel where `fused_norm_rope_available`, else that."""
    if not fused_norm_rope_available(x.device, x.shape[-1]):
        return norm_rope_fp8_reference(x, weight, eps, cos, sin, inv_scale)
    cos, sin = (t.expand(x.shape) for t in (cos, sin))
    has_weight = weight is not None
    weight = weight if has_weight else inv_scale  # a placeholder the kernel does not read
    return _NORM_ROPE_OP(x, weight, has_weight, eps, cos, sin, inv_scale)
