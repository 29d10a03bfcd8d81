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

    processors = rollout_attention_processors(policy.transformer)   # once, before compiling
    with rollout_attention(processors, "fa3_fp8"):
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
from policies.fp8 import E4M3_MAX

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
    computation outside a clip plan; idempotent, no weights change) and return those processors."""
    blocks = _blocks(transformer)
    install_clip_attention(transformer)
    return [block.attn1.processor for block in blocks]


@functools.cache
def _kernel(kind: str, attention: Callable, flash: Callable) -> Callable:
    return functools.partial(attention, fp8=kind == "fa3_fp8", flash=flash)


@contextlib.contextmanager
def rollout_attention(processors: Sequence, kind: str) -> Iterator[None]:
    """Within this context the processors' unmasked, no-grad self-attention runs in ``kind``'s kernel
    (``sdpa``: unchanged); on exit they use SDPA again."""
    # the function is looked up here (a compiled block cannot trace an import), and the same kernel
    # object is set every time: compiled blocks guard on it, a new one would recompile them
    kernel = None if kind == "sdpa" else _kernel(kind, fa3_attention, find_flash_attention())
    for processor in processors:
        processor.rollout_kernel = kernel
    try:
        yield
    finally:
        for processor in processors:
            processor.rollout_kernel = None
