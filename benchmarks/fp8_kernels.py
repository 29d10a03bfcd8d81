"""Where an FP8 rollout's time can come from: the kernels of one LTX-Video-2B block at the rollout's shape.

On one GPU, at G = 8 with CFG (batch 16) and 121 x 512 x 768 (6144 latent tokens), 32 heads x 64:

* self-attention: SDPA's default choice, cuDNN and FlashAttention-2 forced, SageAttention's INT8
  Triton kernel (``pip install sageattention``) and FlashAttention-3 in bf16 and in e4m3 with one
  scale per (sample, head) (``pip install fa3-fwd``, the forward-only build; each skipped if
  absent), with their relative errors against fp32 attention and the e4m3 quantization's own time;
* the queries' RMSNorm + RoPE + static e4m3 cast before FlashAttention-3's FP8 forward: as the
  model computes it (torch's RMSNorm, diffusers' RoPE, compiled) and in `policies.fp8_rope`'s one
  Triton kernel, with how many e4m3 codes differ;
* the block's matmul shapes (q/k/v/out 2048 -> 2048, feed-forward 2048 -> 8192 -> 2048) in bf16 and
  as row-wise e4m3 ``torch._scaled_mm`` (what `policies.fp8` runs) with and without fast
  accumulation, with their relative errors against an fp32 product, and the activation
  quantization's own time (compiled).

Prints and writes JSON (``--json``). Needs a GPU with float8 tensor cores (Hopper, Ada).

    python benchmarks/fp8_kernels.py --json benchmarks/results/fp8_kernel_probe.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from policies.errors import InputError  # noqa: E402
from policies.fp8 import E4M3_MAX, quantize_rows  # noqa: E402
from policies.fp8_rope import fused_norm_rope_available, norm_rope_fp8  # noqa: E402
from policies.rollout_attention import find_flash_attention, quantize_heads  # noqa: E402

BATCH, HEADS, TOKENS, HEAD_DIM = 16, 32, 6144, 64  # defaults: LTX-Video 2B; LTX-2 has 32 x 128
MATMULS = {"qkvo": (2048, 2048), "ff_up": (2048, 8192), "ff_down": (8192, 2048)}


def median_ms(fn: Callable[[], object], n: int = 10) -> float:
    """Median wall time of ``fn`` in ms over ``n`` synchronised runs, after 3 warm-ups."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(n):
        tick = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - tick) * 1e3)
    return sorted(times)[n // 2]


def attention(
    shape: tuple[int, int, int, int], device: torch.device, gen: torch.Generator
) -> dict[str, float | str]:
    batch, heads, tokens, head_dim = shape
    # [B, S, H, D], what diffusers' processors hold; SDPA takes the [B, H, S, D] view
    q, k, v = (
        torch.randn(batch, tokens, heads, head_dim, device=device, dtype=torch.bfloat16, generator=gen)
        for _ in range(3)
    )
    qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))
    flops = 4 * batch * heads * tokens * tokens * head_dim
    reference = F.scaled_dot_product_attention(qh.float(), kh.float(), vh.float()).transpose(1, 2)

    def error(out: torch.Tensor) -> float:
        return float((out.float() - reference).norm() / reference.norm())

    out: dict[str, float | str] = {
        "sdpa_default_ms": median_ms(lambda: F.scaled_dot_product_attention(qh, kh, vh)),
        "sdpa_default_rel_err": error(F.scaled_dot_product_attention(qh, kh, vh).transpose(1, 2)),
    }
    for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
        with sdpa_kernel(backend):
            out[f"sdpa_{name}_ms"] = median_ms(lambda: F.scaled_dot_product_attention(qh, kh, vh))
    try:
        from sageattention import sageattn

        out["sage_ms"] = median_ms(lambda: sageattn(q, k, v, tensor_layout="NHD"))
        out["sage_rel_err"] = error(sageattn(q, k, v, tensor_layout="NHD"))
    except ImportError as err:
        out["sage_error"] = f"{type(err).__name__}: {err}"
    try:
        flash3 = find_flash_attention()
    except InputError as err:
        out["fa3_error"] = str(err)
    else:
        out["fa3_bf16_ms"] = median_ms(lambda: flash3(q, k, v))
        out["fa3_bf16_rel_err"] = error(flash3(q, k, v))
        (q8, qs), (k8, ks), (v8, vs) = (quantize_heads(x) for x in (q, k, v))
        out["fa3_e4m3_ms"] = median_ms(lambda: flash3(q8, k8, v8, q_descale=qs, k_descale=ks, v_descale=vs))
        out["fa3_e4m3_rel_err"] = error(flash3(q8, k8, v8, q_descale=qs, k_descale=ks, v_descale=vs))
        quantizer = torch.compile(lambda a, b, c: [quantize_heads(x) for x in (a, b, c)])
        out["quant_qkv_ms"] = median_ms(lambda: quantizer(q, k, v))
    for key in [k for k in out if k.endswith("_ms") and k != "quant_qkv_ms"]:
        out[key.replace("_ms", "_tflops")] = flops / (float(out[key]) * 1e-3) / 1e12
    return out


def norm_rope(
    shape: tuple[int, int, int, int], device: torch.device, gen: torch.Generator
) -> dict[str, float | str]:
    """The queries ``[B, S, H * D]`` from their projection to e4m3: compiled model ops vs the kernel."""
    from diffusers.models.transformers.transformer_ltx import apply_rotary_emb

    batch, heads, tokens, head_dim = shape
    dim = heads * head_dim
    x = torch.randn(batch, tokens, dim, device=device, dtype=torch.bfloat16, generator=gen) * 3
    weight = (torch.rand(dim, device=device, generator=gen) + 0.5).bfloat16()
    angles = torch.rand(1, tokens, dim // 2, device=device, generator=gen) * 6
    cos, sin = (f(angles).repeat_interleave(2, -1).expand(batch, tokens, dim) for f in (torch.cos, torch.sin))
    inv_scale = torch.rand(heads, device=device, generator=gen) * 20 + 60

    def model(x, weight, cos, sin, inv_scale):  # what the LTX processor computes, then the static cast
        q = apply_rotary_emb(F.rms_norm(x, (dim,), weight, 1e-5), (cos, sin)).unflatten(2, (heads, -1))
        return (q.float() * inv_scale[:, None]).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).flatten(2)

    compiled = torch.compile(model, fullgraph=True)
    out: dict[str, float | str] = {
        "compiled_model_ms": median_ms(lambda: compiled(x, weight, cos, sin, inv_scale))
    }
    if not fused_norm_rope_available(device, dim):
        out["triton_error"] = "policies.fp8_rope's kernel needs Triton and a power-of-two width"
        return out
    fused = norm_rope_fp8(x, weight, 1e-5, cos, sin, inv_scale)
    reference = compiled(x, weight, cos, sin, inv_scale).float()
    out["triton_ms"] = median_ms(lambda: norm_rope_fp8(x, weight, 1e-5, cos, sin, inv_scale))
    out["triton_vs_model_code_mismatch"] = float((fused.float() != reference).float().mean())
    out["triton_vs_model_rel"] = float((fused.float() - reference).norm() / reference.norm())
    return out


def matmul(
    k: int, n: int, device: torch.device, gen: torch.Generator, quantizer: Callable
) -> dict[str, float]:
    """One ``[16 * 6144, k] x [k, n]`` product: bf16, and row-wise e4m3 with and without fast accumulation."""
    rows = BATCH * TOKENS
    x = torch.randn(rows, k, device=device, dtype=torch.bfloat16, generator=gen)
    w = torch.randn(n, k, device=device, dtype=torch.bfloat16, generator=gen) / k**0.5
    exact = x.float() @ w.float().t()
    xq, xs = quantize_rows(x)
    wq, ws = quantize_rows(w)
    ws = ws.reshape(1, -1)
    row = {"flops_tflop": 2 * rows * k * n / 1e12, "bf16_ms": median_ms(lambda: x @ w.t())}
    row["bf16_rel_err"] = float(((x @ w.t()).float() - exact).norm() / exact.norm())
    for fast in (False, True):

        def product(fast: bool = fast) -> torch.Tensor:
            return torch._scaled_mm(
                xq, wq.t(), scale_a=xs, scale_b=ws, out_dtype=torch.bfloat16, use_fast_accum=fast
            )

        row[f"fp8_fast{int(fast)}_ms"] = median_ms(product)
        row[f"fp8_fast{int(fast)}_rel_err"] = float((product().float() - exact).norm() / exact.norm())
    row["quant_x_ms"] = median_ms(lambda: quantizer(x))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", default=None, help="where to write the results")
    parser.add_argument("--batch", type=int, default=BATCH, help="attention batch (G x guidance branches)")
    parser.add_argument("--heads", type=int, default=HEADS, help="attention heads")
    parser.add_argument("--tokens", type=int, default=TOKENS, help="latent tokens per sample")
    parser.add_argument("--head-dim", type=int, default=HEAD_DIM, help="attention head dim (LTX-2: 128)")
    parser.add_argument("--attention-only", action="store_true", help="skip the matmul shapes")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("fp8_kernels.py needs a CUDA GPU with float8 tensor cores (Hopper, Ada)")
    device = torch.device("cuda")
    gen = torch.Generator(device).manual_seed(0)
    quantizer = torch.compile(quantize_rows)
    result = {
        "device": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "shape": {"batch": args.batch, "heads": args.heads, "tokens": args.tokens, "head_dim": args.head_dim},
        "attention": attention((args.batch, args.heads, args.tokens, args.head_dim), device, gen),
        "norm_rope": norm_rope((args.batch, args.heads, args.tokens, args.head_dim), device, gen),
    }
    if not args.attention_only:
        result["matmul"] = {name: matmul(k, n, device, gen, quantizer) for name, (k, n) in MATMULS.items()}
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
