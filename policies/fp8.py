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

Activation scales (`FP8Scaling`): ``dynamic`` computes every row's amax in every forward, a
reduction pass over each activation before its matmul; ``static`` (the default) lets the first
forward of a rollout run dynamic and record each layer's largest input magnitude, then casts with
that amax times `STATIC_MARGIN` for the rest of the rollout, an element-wise cast the compiler fuses
into the op that produces the activation. e4m3 keeps its 3-bit relative precision over 2^15 of
range, so the margin costs no measurable precision, and values past it saturate instead of
overflowing. `policies.rollout_attention` scales FlashAttention-3's e4m3 inputs the same way.

    scaling = FP8Scaling(static=True)
    layers = fp8_linears(policy.transformer)      # once; weights, names and state dict unchanged
    with fp8_forwards(layers, scaling), scaling.calibrating(policy.transformer):
        rollout = policy.rollout(...)             # the first forward calibrates the static scales
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from diffusers.models.activations import GELU
from torch import nn

from policies.errors import InputError
from policies.ltx import repeated_blocks

E4M3_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448
STATIC_MARGIN = 4.0  # a static scale's headroom over the amax its calibrating forward saw


class FP8Scaling:
    """How a rollout's FP8 activations are scaled: every forward from its own amax (``static`` False),
    or, within `calibrating`, by the amax the first forward recorded (`STATIC_MARGIN` times it) from the
    second forward on. One object is shared by the FP8 linears and the attention kernel; compiled
    blocks guard on `use_static`, so a rollout runs two graphs (calibrating, static)."""

    def __init__(self, static: bool = True) -> None:
        self.static = static
        self.calibrated = False

    @property
    def use_static(self) -> bool:
        """Whether this forward casts with the recorded scales."""
        return self.static and self.calibrated

    @property
    def records(self) -> bool:
        """Whether this forward records its amax (the calibrating one)."""
        return self.static and not self.calibrated

    @contextlib.contextmanager
    def calibrating(self, transformer: nn.Module) -> Iterator[None]:
        """Within this context the transformer's first forward records the scales, every later one
        uses them; on exit the next context calibrates afresh (the weights will have changed)."""
        self.calibrated = False
        hook = transformer.register_forward_hook(lambda *_: setattr(self, "calibrated", True))
        try:
            yield
        finally:
            hook.remove()
            self.calibrated = False


def static_scale(amax: torch.Tensor) -> torch.Tensor:
    """The static e4m3 scale of a recorded ``amax``: ``amax * STATIC_MARGIN / 448`` in fp32."""
    return amax.float().clamp_min(1e-12) * (STATIC_MARGIN / E4M3_MAX)


def static_cast(x: torch.Tensor, amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 of ``x`` with `static_scale` of ``amax`` (``amax`` broadcasts against ``x``: one value, or
    one per head): ``(q float8, scale fp32)`` with ``x ~= q * scale``, values past the margin
    saturating at +-448."""
    scale = static_scale(amax)
    # times the reciprocal: one multiply per element where a division takes several instructions
    q = (x.float() * scale.reciprocal()).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q, scale


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise e4m3 quantization of a 2-D tensor: ``(q [M, K] float8, scale [M, 1] fp32)`` with
    ``x ~= q * scale``; each row's largest magnitude maps to 448 (an all-zero row keeps scale 1e-12)."""
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp_min(1e-12) / E4M3_MAX
    q = (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q, scale


class FP8RolloutLinear(nn.Linear):
    """An `nn.Linear` that multiplies in FP8 while `fp8_forwards` holds its quantized weight (row-wise)
    and no gradient is being recorded; otherwise exactly `nn.Linear`. Its input is scaled per row, or
    per tensor by its static scale (`FP8Scaling`). Made by `fp8_linears` (a class swap: parameters,
    names, state dict, LoRA wrapping and FSDP see a plain `nn.Linear`)."""

    fp8_weight: tuple[torch.Tensor, torch.Tensor] | None = None
    scaling: FP8Scaling | None = None
    input_amax: torch.Tensor | None = None  # [1, 1] fp32, recorded by the calibrating forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fp8_weight is None or torch.is_grad_enabled():
            return F.linear(x, self.weight, self.bias)
        weight, weight_scale = self.fp8_weight
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        if self.scaling is not None and self.scaling.use_static:
            rows, scale = static_cast(x, self.input_amax)
            scale = scale.expand(x.shape[0], 1).contiguous()  # the row-wise kernel takes [M, 1]
        else:
            rows, scale = quantize_rows(x)
            if self.scaling is not None and self.scaling.records:
                self.input_amax.copy_(scale.amax() * E4M3_MAX)
        out = torch._scaled_mm(
            rows,
            weight.t(),
            scale_a=scale,
            scale_b=weight_scale,
            bias=None if self.bias is None else self.bias.to(torch.bfloat16),  # added in the epilogue
            out_dtype=torch.bfloat16,
            use_fast_accum=True,
        )
        return out.to(x.dtype).view(*shape[:-1], self.out_features)


class FP8RolloutGELU(GELU):
    """diffusers' ``GELU`` (a linear, then GELU) whose tanh-approximated activation is computed as
    ``x * sigmoid(2 z)``, ``z = sqrt(2 / pi) (x + 0.044715 x^3)``, while its linear multiplies in FP8:
    the same function (``(1 + tanh z) / 2 == sigmoid(2 z)``) to float32 rounding, which compiles to
    the GPU's fast exponential where ``tanh`` is an accurate library call. With ``tanh`` the fused
    activation-and-cast kernel ran at about a third of an H200's memory bandwidth (41.1 ms of an
    LTX-Video-2B rollout forward); with this form and reciprocal casts the rollout took 6082.5 ms
    instead of 6253.9 (`benchmarks/results/gpu_rollout_static_121x512x768*.json`).
    Otherwise exactly diffusers' ``GELU``. Made by `fp8_linears` (a class swap)."""

    def gelu(self, gate: torch.Tensor) -> torch.Tensor:
        linear = getattr(self.proj, "base_layer", self.proj)  # under LoRA, its frozen base
        if getattr(linear, "fp8_weight", None) is None or torch.is_grad_enabled():
            return super().gelu(gate)
        x = gate.float()
        return (x * torch.sigmoid(GELU_TANH_2C * (x + 0.044715 * x * x * x))).to(gate.dtype)


GELU_TANH_2C = 2.0 * math.sqrt(2.0 / math.pi)


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
            if type(module) is GELU and module.approximate == "tanh":
                module.__class__ = FP8RolloutGELU
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
def fp8_forwards(layers: Sequence[FP8RolloutLinear], scaling: FP8Scaling | None = None) -> Iterator[None]:
    """Within this context the layers' no-grad forwards multiply in FP8 with their current weights
    (quantized on entry: after an optimizer step, the new ones), their inputs scaled as ``scaling``
    says (None: dynamic); on exit they are `nn.Linear` again and the FP8 copies are freed."""
    with torch.no_grad():
        for layer in layers:
            weight, scale = quantize_rows(layer.weight)
            layer.fp8_weight = (weight, scale.reshape(1, -1))  # [N, K] e4m3 and [1, N] scales
            layer.scaling = scaling
            if scaling is not None and scaling.static:
                layer.input_amax = torch.zeros(1, 1, device=layer.weight.device)
    try:
        yield
    finally:
        for layer in layers:
            layer.fp8_weight = layer.scaling = layer.input_amax = None
