"""FP8 matmuls for rollout forwards: the sampler runs its big matmuls in float8, training does not.

A rollout's forwards are pure inference: no gradient, and they are most of a GRPO iteration's
GPU time. On GPUs with float8 tensor cores (Hopper, Ada) the linear layers of the transformer's
blocks can run as row-wise scaled e4m3 matmuls (`torch._scaled_mm`): each activation row and each
weight row (output channel) gets its own scale ``amax / 448``, the product is accumulated with the
tensor cores' fast FP8 accumulation (measured on an H200 at the LTX-2B rollout's shapes: 1.04-1.30x
faster than without, the same 3.7 % relative error, which e4m3 rounding sets) and written in bf16.
Everything else (attention, norms, the update's forwards and backwards, the KL reference, held-out
evaluation) keeps the model's own precision.

The samples then come from a slightly different sampler than the one training differentiates.
So FP8 rollouts are only honest where the update does not read the rollout's recorded log-probs:
PPO on-policy (one optimizer step per rollout: its old log-prob is the bf16 training forward's own,
detached, and the recorded one is only compared, as ``train/logprob_drift``) and DiffusionNFT
(no log-probs). `grpo.config.GRPOConfig.rollout_fp8` enforces that.

    layers = fp8_linears(policy.transformer)      # once; weights, names and state dict unchanged
    with fp8_forwards(layers):                    # quantizes the current weights, then rolls out
        rollout = policy.rollout(...)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from policies.errors import InputError
from policies.ltx import repeated_blocks

E4M3_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise e4m3 quantization of a 2-D tensor: ``(q [M, K] float8, scale [M, 1] fp32)`` with
    ``x ~= q * scale``; each row's largest magnitude maps to 448 (an all-zero row keeps scale 1e-12)."""
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp_min(1e-12) / E4M3_MAX
    q = (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q, scale


class FP8RolloutLinear(nn.Linear):
    """An `nn.Linear` that multiplies in row-wise FP8 while `fp8_forwards` holds its quantized weight
    and no gradient is being recorded; otherwise exactly `nn.Linear`. Made by `fp8_linears` (a class
    swap: parameters, names, state dict, LoRA wrapping and FSDP see a plain `nn.Linear`)."""

    fp8_weight: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fp8_weight is None or torch.is_grad_enabled():
            return F.linear(x, self.weight, self.bias)
        weight, weight_scale = self.fp8_weight
        rows, scale = quantize_rows(x.reshape(-1, x.shape[-1]))
        out = torch._scaled_mm(
            rows,
            weight.t(),
            scale_a=scale,
            scale_b=weight_scale,
            out_dtype=torch.bfloat16,
            use_fast_accum=True,
        )
        out = out.to(x.dtype)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.view(*x.shape[:-1], self.out_features)


def fp8_linears(transformer: nn.Module) -> list[FP8RolloutLinear]:
    """Turn the linear layers inside the transformer's repeated blocks (diffusers'
    ``_repeated_blocks``: attention projections and feed-forwards, the model's matmul FLOPs) into
    `FP8RolloutLinear`, in place, and return them. LoRA adapters (``lora_`` modules) stay as they
    are: a LoRA layer's frozen base multiplies in FP8, its adapters in the model's precision.
    Layers whose width is not a multiple of 16 (what float8 matmuls need) are left alone."""
    blocks = repeated_blocks(transformer)
    if not blocks:
        raise InputError(f"{type(transformer).__name__} declares no _repeated_blocks: no FP8 rollout for it")
    layers: list[FP8RolloutLinear] = []
    for block in blocks:
        for name, module in block.named_modules():
            if type(module) not in (nn.Linear, FP8RolloutLinear) or "lora_" in name:
                continue
            if module.in_features % 16 or module.out_features % 16:
                continue
            module.__class__ = FP8RolloutLinear
            layers.append(module)
    if not layers:
        raise InputError(f"{type(transformer).__name__}'s blocks hold no linear layer FP8 can multiply")
    # a compiled block keeps one graph per (batch shape, FP8 or not): FP8 doubles the rollout's
    # graphs, which with LTX-2's guidance branches would pass dynamo's default limit of 8
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
    return layers


@contextlib.contextmanager
def fp8_forwards(layers: Sequence[FP8RolloutLinear]) -> Iterator[None]:
    """Within this context the layers' no-grad forwards multiply in FP8 with their current weights
    (quantized on entry: after an optimizer step, the new ones); on exit they are `nn.Linear` again
    and the FP8 copies are freed."""
    with torch.no_grad():
        for layer in layers:
            weight, scale = quantize_rows(layer.weight)
            layer.fp8_weight = (weight, scale.reshape(1, -1))  # [N, K] e4m3 and [1, N] scales
    try:
        yield
    finally:
        for layer in layers:
            layer.fp8_weight = None
