"""Where an FP8 rollout's time can come from: the kernels of one LTX-Video-2B block at the rollout's shape.

On one GPU, at G = 8 with CFG (batch 16) and 121 x 512 x 768 (6144 latent tokens), 32 heads x 64:

* self-attention: SDPA's default choice, cuDNN and FlashAttention-2 forced, and SageAttention's INT8
  Triton kernel (``pip install sageattention``; skipped if absent), with its relative error;
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
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BATCH, HEADS, TOKENS, HEAD_DIM = 16, 32, 6144, 64
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


def quantize(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = t.abs().amax(-1, keepdim=True).float().clamp_min(1e-12) / 448
    return (t.float() / scale).to(torch.float8_e4m3fn), scale


def attention(device: torch.device, gen: torch.Generator) -> dict[str, float | str]:
    q, k, v = (
        torch.randn(BATCH, HEADS, TOKENS, HEAD_DIM, device=device, dtype=torch.bfloat16, generator=gen)
        for _ in range(3)
    )
    flops = 4 * BATCH * HEADS * TOKENS * TOKENS * HEAD_DIM
    reference = F.scaled_dot_product_attention(q, k, v).float()
    out: dict[str, float | str] = {
        "sdpa_default_ms": median_ms(lambda: F.scaled_dot_product_attention(q, k, v))
    }
    for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
        with sdpa_kernel(backend):
            out[f"sdpa_{name}_ms"] = median_ms(lambda: F.scaled_dot_product_attention(q, k, v))
    try:
        from sageattention import sageattn

        sage = sageattn(q, k, v, tensor_layout="HND").float()
        out["sage_ms"] = median_ms(lambda: sageattn(q, k, v, tensor_layout="HND"))
        out["sage_rel_err"] = float((sage - reference).norm() / reference.norm())
    except ImportError as error:
        out["sage_error"] = f"{type(error).__name__}: {error}"
    for key in [k for k in out if k.endswith("_ms")]:
        out[key.replace("_ms", "_tflops")] = flops / (float(out[key]) * 1e-3) / 1e12
    return out


def matmul(
    k: int, n: int, device: torch.device, gen: torch.Generator, quantizer: Callable
) -> dict[str, float]:
    """One ``[16 * 6144, k] x [k, n]`` product: bf16, and row-wise e4m3 with and without fast accumulation."""
    rows = BATCH * TOKENS
    x = torch.randn(rows, k, device=device, dtype=torch.bfloat16, generator=gen)
    w = torch.randn(n, k, device=device, dtype=torch.bfloat16, generator=gen) / k**0.5
    exact = x.float() @ w.float().t()
    xq, xs = quantize(x)
    wq, ws = quantize(w)
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
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("fp8_kernels.py needs a CUDA GPU with float8 tensor cores (Hopper, Ada)")
    device = torch.device("cuda")
    gen = torch.Generator(device).manual_seed(0)
    quantizer = torch.compile(quantize)
    result = {
        "device": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "shape": {"batch": BATCH, "heads": HEADS, "tokens": TOKENS, "head_dim": HEAD_DIM},
        "attention": attention(device, gen),
        "matmul": {name: matmul(k, n, device, gen, quantizer) for name, (k, n) in MATMULS.items()},
    }
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
