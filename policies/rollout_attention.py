"""FlashAttention-3 for rollout forwards: the sampler's self-attention in a faster kernel, training's not.

Self-attention is the largest single cost of an LTX rollout forward at video sizes (42 % of a
compiled LTX-Video-2B forward at 121 x 512 x 768, measured on an H200), and SDPA's best kernel there
(cuDNN's) leaves speed on Hopper's table. `fa3_fwd`, the forward-only build of FlashAttention-3
(``pip install fa3-fwd``; upstream's ``flash_attn_interface`` works too), runs it

* ``fa3``: in bf16, 1.07-1.14x cuDNN's speed with the same error against fp32 attention, and
* ``fa3_fp8``: in e4m3 with one scale per (sample, head) for queries, keys and values (the
  kernel's own FP8 path also rounds the softmax weights to e4m3): 1.29-1.47x cuDNN, at about 5 %
  relative error of the attention output on random inputs

(`benchmarks/fp8_kernels.py`, `benchmarks/results/fp8_attention_probe.json`). The kernel has no
backward, and its numbers differ from what the training forward computes, so like
`policies.fp8` it is honest only where the update does not read the rollout's recorded log-probs
(PPO on-policy, DiffusionNFT); `grpo.config.GRPOConfig.rollout_attention` enforces that.

How it reaches the blocks: the self-attention (``attn1``) of every block gets the processor
`policies.clip_attention` defines, which is diffusers' own computation when no clip plan is set
(and is what next-clip models already run); inside `rollout_attention` and only for forwards that
record no gradient, that processor calls the kernel instead of SDPA. Cross-attentions, LTX-2's
audio stream and clip-causal (masked) attention keep SDPA.

The e4m3 scales follow `policies.fp8.FP8Scaling`: per (sample, head) from each forward's own amax,
or static per head, recorded by the rollout's first forward. With static scales LTX-Video's queries
and keys go from their projections to e4m3 in one kernel (`policies.fp8_rope`: RMSNorm, RoPE and the
cast fused) where Triton runs.

    processors = rollout_attention_processors(policy.transformer)   # once, before compiling
    with rollout_attention(processors, "fa3_fp8", scaling), scaling.calibrating(policy.transformer):
        rollout = policy.rollout(...)
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from policies.clip_attention import install_clip_attention
from policies.errors import InputError
from policies.fp8 import E4M3_MAX, FP8Scaling, static_cast, static_scale
from policies.fp8_rope import fused_norm_rope_available, norm_rope_fp8

KINDS = ("sdpa", "fa3", "fa3_fp8")
FA3_HEAD_DIMS = (64, 96, 128, 192, 256)  # head dims FlashAttention-3's FP8 forward is built for


def quantize_heads(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 with one scale per (sample, head) of ``x [B, S, H, D]``: ``(q [B, S, H, D] float8,
    descale [B, H] fp32)`` with ``x ~= q * descale`` (each sample-head's largest magnitude maps to 448)."""
    descale = x.abs().amax(dim=(1, 3)).float().clamp_min(1e-12) / E4M3_MAX
    q = (x.float() / descale[:, None, :, None]).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q, descale


def find_flash_attention() -> Callable:
    """FlashAttention-3's ``flash_attn_func``: the forward-only ``fa3_fwd`` or upstream's."""
    for module in ("fa3_fwd_interface", "flash_attn_interface"):
        try:
            return __import__(module).flash_attn_func
        except ImportError:
            continue
    raise InputError(
        "trainer.rollout_attention fa3/fa3_fp8 needs FlashAttention-3: pip install fa3-fwd "
        "(or set rollout_attention sdpa)"
    )


def fa3_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fp8: bool = False, flash: Callable | None = None
) -> torch.Tensor:
    """Attention of ``q/k/v [B, S, H, D]`` (no mask) by FlashAttention-3 (``flash``: its
    ``flash_attn_func``, looked up if None), in e4m3 if ``fp8``, else in bf16 (float32 inputs are
    rounded to bf16); returns ``[B, S, H, D]`` bf16."""
    flash = flash or find_flash_attention()
    if not fp8:
        return flash(*(x.to(torch.bfloat16) for x in (q, k, v)))
    (q8, q_descale), (k8, k_descale), (v8, v_descale) = (quantize_heads(x) for x in (q, k, v))
    return flash(q8, k8, v8, q_descale=q_descale, k_descale=k_descale, v_descale=v_descale)


def check_rollout_attention(kind: str, transformer: nn.Module, device: torch.device) -> None:
    """One-line errors, before any rollout, for a ``kind`` this machine or model cannot run."""
    if kind not in KINDS:
        raise InputError(f"trainer.rollout_attention must be one of {', '.join(KINDS)}, got {kind!r}")
    if kind == "sdpa":
        return
    if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] != 9:
        raise InputError(
            f"trainer.rollout_attention {kind} runs FlashAttention-3, a Hopper (sm90) kernel; this run is "
            f"on {device}: set rollout_attention sdpa"
        )
    find_flash_attention()
    dims = {block.attn1.inner_dim // block.attn1.heads for block in _blocks(transformer)}
    if not dims <= set(FA3_HEAD_DIMS):
        raise InputError(
            f"trainer.rollout_attention {kind}: head dim {sorted(dims)} is not one FlashAttention-3 is "
            f"built for ({', '.join(map(str, FA3_HEAD_DIMS))}): set rollout_attention sdpa"
        )


def _blocks(transformer: nn.Module) -> list[nn.Module]:
    blocks = getattr(transformer, "transformer_blocks", None)
    if not blocks or not all(hasattr(block, "attn1") for block in blocks):
        raise InputError(
            f"trainer.rollout_attention: {type(transformer).__name__} has no LTX blocks with self-attention "
            "(attn1): set rollout_attention sdpa"
        )
    return list(blocks)


def rollout_attention_processors(transformer: nn.Module) -> list:
    """Give every block's self-attention the `policies.clip_attention` processor (diffusers' own
    computation outside a clip plan; idempotent, no weights change) and return those processors, each
    holding room for the static e4m3 scales of its queries, keys and values (``fp8_amax [3, heads]``)."""
    blocks = _blocks(transformer)
    install_clip_attention(transformer)
    for block in blocks:
        block.attn1.processor.fp8_amax = block.attn1.to_q.weight.new_zeros(
            3, block.attn1.heads, dtype=torch.float32
        )
    return [block.attn1.processor for block in blocks]


class FlashKernel:
    """What a processor runs instead of SDPA in a rollout forward (`policies.clip_attention`):
    FlashAttention-3 (``flash``) in bf16, or in e4m3 scaled as ``scaling`` says (None: dynamic)."""

    def __init__(self, flash: Callable, fp8: bool, scaling: FP8Scaling | None) -> None:
        self.flash, self.fp8, self.scaling = flash, fp8, scaling

    @property
    def static(self) -> bool:
        return self.fp8 and self.scaling is not None and self.scaling.use_static

    def __call__(
        self, processor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
    ) -> torch.Tensor:
        """Attention of ``query/key/value [B, S, H, D]`` for ``processor``'s layer; ``[B, S, H, D]`` bf16."""
        if not self.fp8:
            return fa3_attention(query, key, value, flash=self.flash)
        if self.static:
            amax = processor.fp8_amax
            casts = [static_cast(x, amax[i][:, None]) for i, x in enumerate((query, key, value))]
            return self._e4m3(casts)
        casts = [quantize_heads(x) for x in (query, key, value)]
        if self.scaling is not None and self.scaling.records:
            processor.fp8_amax.copy_(torch.stack([descale for _, descale in casts]).amax(1) * E4M3_MAX)
        return self._e4m3(casts)

    def fuses(self, attn, hidden_states: torch.Tensor, rotary) -> bool:
        """Whether an LTX-Video self-attention's queries and keys go to e4m3 in one fused kernel."""
        norms = (getattr(attn, "norm_q", None), getattr(attn, "norm_k", None))
        return (
            self.static
            and rotary is not None
            and all(isinstance(norm, nn.RMSNorm) for norm in norms)
            and fused_norm_rope_available(hidden_states.device, attn.inner_dim)
        )

    def fused(self, processor, attn, hidden_states: torch.Tensor, rotary) -> torch.Tensor:
        """LTX-Video self-attention from ``hidden_states`` with RMSNorm, RoPE and the static e4m3
        cast of queries and keys fused (`fuses`); ``[B, S, H * D]``."""
        cos, sin = rotary
        amax = processor.fp8_amax
        scales = static_scale(amax)
        qk = []
        for i, (project, norm) in enumerate(((attn.to_q, attn.norm_q), (attn.to_k, attn.norm_k))):
            eps = norm.eps if norm.eps is not None else torch.finfo(hidden_states.dtype).eps
            q8 = norm_rope_fp8(project(hidden_states), norm.weight, eps, cos, sin, scales[i].reciprocal())
            qk.append((q8.unflatten(2, (attn.heads, -1)), scales[i]))
        value = static_cast(attn.to_v(hidden_states).unflatten(2, (attn.heads, -1)), amax[2][:, None])
        return self._e4m3([*qk, value]).flatten(2, 3)

    def _e4m3(self, casts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """The e4m3 kernel on cast queries, keys and values ``[B, S, H, D]``; their scales are per
        (sample, head) ``[B, H]`` or, static, per head (the same for every sample)."""
        descales = (scale.reshape(-1, q.shape[2]).expand(q.shape[0], -1).contiguous() for q, scale in casts)
        return self.flash(*(q for q, _ in casts), **dict(zip(DESCALES, descales, strict=True)))


DESCALES = ("q_descale", "k_descale", "v_descale")


@functools.cache
def _kernel(kind: str, flash: Callable, scaling: FP8Scaling | None) -> FlashKernel:
    return FlashKernel(flash, kind == "fa3_fp8", scaling)


@contextlib.contextmanager
def rollout_attention(processors: Sequence, kind: str, scaling: FP8Scaling | None = None) -> Iterator[None]:
    """Within this context the processors' unmasked, no-grad self-attention runs in ``kind``'s kernel
    (``sdpa``: unchanged), its e4m3 inputs scaled as ``scaling`` says (None: dynamic); on exit they
    use SDPA again."""
    # the function is looked up here (a compiled block cannot trace an import), and the same kernel
    # object is set every time: compiled blocks guard on it, a new one would recompile them
    kernel = None if kind == "sdpa" else _kernel(kind, find_flash_attention(), scaling)
    for processor in processors:
        processor.rollout_kernel = kernel
    try:
        yield
    finally:
        for processor in processors:
            processor.rollout_kernel = None
