"""Pieces diffusers' context parallelism (0.42) lacks for training LTX-2 with it.

* `UlyssesAttention`: diffusers' Ulysses attention whose backward also holds when keys are longer or
  shorter than queries (cross-attention). diffusers' own reshapes the key/value gradients with the
  query's length, which fails on LTX-2's text and audio<->video cross-attention.
* `scale_grad`: identity forward, gradient times a constant backward. Under context parallelism every
  rank computes the whole (unsplit) audio stream; scaling its output's gradient by 1 / ranks makes
  the ranks' gradients sum to the one-process gradient.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.attention_dispatch import TemplatedUlyssesAttention as _DiffusersUlysses


def install_ulysses_backward() -> None:
    """Route diffusers' Ulysses attention through `UlyssesAttention` (idempotent; forward unchanged)."""
    from diffusers.models import attention_dispatch

    attention_dispatch.TemplatedUlyssesAttention = UlyssesAttention


class UlyssesAttention(_DiffusersUlysses):
    """diffusers' `TemplatedUlyssesAttention` with the key/value gradients reshaped by their own length."""

    @staticmethod
    def forward(ctx: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any) -> Any:
        ctx.kv_length = key.shape[1]
        return _DiffusersUlysses.forward(ctx, query, key, value, *args)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor, *args: Any) -> tuple[torch.Tensor | None, ...]:
        from diffusers.models.attention_dispatch import _all_to_all_single

        config = ctx._parallel_config.context_parallel_config
        world, group = config.ulysses_degree, config._ulysses_mesh.get_group()
        batch, length, heads, dim = grad_out.shape
        local_heads = heads // world
        grad_out = (
            grad_out.reshape(batch, length, world, local_heads, dim).permute(2, 1, 0, 3, 4).contiguous()
        )
        grad_out = _all_to_all_single(grad_out, group).flatten(0, 1).permute(1, 0, 2, 3).contiguous()
        grad_query, grad_key, grad_value, *_ = ctx.backward_op(ctx, grad_out)
        grads = []
        for grad, n in ((grad_query, length), (grad_key, ctx.kv_length), (grad_value, ctx.kv_length)):
            grad = grad.reshape(batch, world, n, local_heads, dim).permute(1, 3, 0, 2, 4).contiguous()
            grads.append(_all_to_all_single(grad, group).flatten(0, 1).permute(1, 2, 0, 3).contiguous())
        return (*grads, *([None] * 9))


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.scale, None


def scale_grad(tensor: torch.Tensor, scale: float) -> torch.Tensor:
    """``tensor`` unchanged; the gradient flowing back through it multiplied by ``scale``."""
    return _ScaleGrad.apply(tensor, scale)
