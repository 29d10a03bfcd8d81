"""Clip-causal self-attention for diffusers' LTX-Video and LTX-2 transformers, with a key/value cache.

A next-clip model (Video-GPT, arXiv 2505.12489) sees a token sequence made of *clean* clips (the
history) and *noisy* clips (being denoised). Who may attend to whom is a rule on each token's clip
index and clean flag (`clip_causal_allowed`):

* a clean token of clip ``i`` attends to the clean tokens of clips ``<= i`` (causal over clips,
  bidirectional within a clip), never to noisy tokens;
* a noisy token of clip ``k`` attends to the noisy tokens of its own clip (bidirectional) and to the
  clean tokens of clips ``< k``.

Because clean tokens never look at noisy ones, the history's keys and values at every layer do not
depend on the clip being denoised: they are computed once (`KVCache`), reused by every denoising
step of the next clip, and extended clip after clip.

How the mask reaches the blocks: `install_clip_attention` sets the ``attn1`` processor of every
block to `ClipCausalAttnProcessor` (LTX-Video) or `ClipCausalLTX2AttnProcessor` (LTX-2's
`LTX2VideoTransformer3DModel`: the video stream's self-attention; its audio self-attention and the
audio <-> video cross-attentions keep diffusers' processors, and next-clip policies switch the
cross-modal ones off, see `policies.nextclip`) and puts a forward hook on the transformer's (video)
rotary embedding (no weights change, so checkpoints are unchanged). The hook reads the
`AttentionPlan` of the current forward (set with `attention_plan`) and hands it to every block
together with the rotary tables (`PlannedRotaryEmbedding`), so a block recomputed by gradient
checkpointing during backward gets the same plan as in its forward. Outside `attention_plan` the
processor is plain full attention, exactly the stock `LTXVideoAttnProcessor`
(`LTX2AudioVideoAttnProcessor`). Nothing here imports diffusers at module import time.

The mask is materialised as a boolean SDPA mask (fine on CPU and at toy sizes). The rule is written
elementwise on broadcastable tensors so that a flex-attention ``mask_mod`` can call it unchanged
(``lambda b, h, q, k: clip_causal_allowed(clip[b, q], clean[b, q], clip[b, k], clean[b, k])``) when
sequences grow too long for a dense mask.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

_PLAN: contextvars.ContextVar[AttentionPlan | None] = contextvars.ContextVar(
    "clip_attention_plan", default=None
)


def clip_causal_allowed(
    q_clip: torch.Tensor, q_clean: torch.Tensor, k_clip: torch.Tensor, k_clean: torch.Tensor
) -> torch.Tensor:
    """Whether a query token may attend to a key token, from their clip indices and clean flags.

    Elementwise on broadcastable tensors (module docstring for the rule).
    """
    from_clean = k_clean & (k_clip <= q_clip)
    from_noisy = (k_clean & (k_clip < q_clip)) | (~k_clean & (k_clip == q_clip))
    return torch.where(q_clean, from_clean, from_noisy)


def clip_causal_mask(clip: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """Boolean SDPA mask ``[1, 1, S, S]`` (True = may attend) for tokens with clip index ``clip [S]``
    and clean flag ``clean [S]``; queries are rows, keys are columns."""
    return clip_causal_allowed(clip[:, None], clean[:, None], clip[None, :], clean[None, :])[None, None]


@dataclass
class KVCache:
    """Per-layer keys and values ``[B, S, heads, head_dim]`` (after norm and RoPE) of the clean history."""

    keys: dict[int, torch.Tensor] = field(default_factory=dict)
    values: dict[int, torch.Tensor] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return next(iter(self.keys.values())).shape[1] if self.keys else 0

    def extend(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> None:
        if layer in self.keys:
            key = torch.cat([self.keys[layer], key], dim=1)
            value = torch.cat([self.values[layer], value], dim=1)
        self.keys[layer], self.values[layer] = key, value


@dataclass
class AttentionPlan:
    """What the self-attention of one transformer forward does.

    ``mask``: boolean ``[B or 1, 1, S_q, S_cache + S_q]`` (None: attend to everything). ``cache``:
    keys/values put in front of the forward's own (the clean history). ``extend_cache``: append the
    forward's own keys/values to ``cache`` afterwards (the forward's tokens are a clean clip).
    """

    mask: torch.Tensor | None = None
    cache: KVCache | None = None
    extend_cache: bool = False


@contextlib.contextmanager
def attention_plan(plan: AttentionPlan) -> Iterator[None]:
    """Transformer forwards run inside this context use ``plan`` in every block's self-attention."""
    token = _PLAN.set(plan)
    try:
        yield
    finally:
        _PLAN.reset(token)


class PlannedRotaryEmbedding(tuple):
    """The ``(cos, sin)`` rotary tables, carrying the forward's `AttentionPlan` to the blocks."""

    plan: AttentionPlan | None

    def __new__(
        cls, cos: torch.Tensor, sin: torch.Tensor, plan: AttentionPlan | None
    ) -> PlannedRotaryEmbedding:
        out = super().__new__(cls, (cos, sin))
        out.plan = plan
        return out


def _pass_plan(module: torch.nn.Module, args: tuple, output: tuple) -> PlannedRotaryEmbedding:
    """Forward hook of the rotary embedding: its ``(cos, sin)`` plus the current `AttentionPlan`."""
    cos, sin = output
    return PlannedRotaryEmbedding(cos, sin, _PLAN.get())


@torch.compiler.disable
def _with_history(
    processor: ClipCausalAttnProcessor | ClipCausalLTX2AttnProcessor,
    plan: AttentionPlan,
    key: torch.Tensor,
    value: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys/values with the processor's layer's cached history in front; the new ones cached if
    the plan asks. Eager under ``torch.compile``: which layer's cache is read is not the graph's."""
    layer = processor.layer
    past_key, past_value = plan.cache.keys.get(layer), plan.cache.values.get(layer)
    if plan.extend_cache:
        plan.cache.extend(layer, key, value)
    if past_key is not None:
        key, value = torch.cat([past_key, key], dim=1), torch.cat([past_value, value], dim=1)
    return key, value


def _planned_attention(
    processor: ClipCausalAttnProcessor | ClipCausalLTX2AttnProcessor,
    plan: AttentionPlan | None,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
) -> torch.Tensor:
    """SDPA of ``query/key/value [B, S, heads, dim]`` under ``plan`` (cached history keys/values of
    the processor's layer put in front, the mask applied, the new keys/values cached if asked);
    returns ``[B, S, heads * dim]``. Without a plan, a forward that records no gradient runs the
    processor's ``rollout_kernel`` if one is set (`policies.rollout_attention`).

    The processor's layer index is read only where the cache needs it, and outside the compiled
    graph (`_with_history`): a compiled block guards on what it reads, and every block reading its
    own index would compile a graph of its own (past dynamo's recompile limit, the rest eager)."""
    kernel = processor.rollout_kernel
    if kernel is not None and plan is None and not torch.is_grad_enabled():
        return kernel(processor, query, key, value).flatten(2, 3).to(query.dtype)
    mask = None
    if plan is not None:
        mask = plan.mask
        if plan.cache is not None:
            key, value = _with_history(processor, plan, key, value)
    out = F.scaled_dot_product_attention(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_mask=mask
    )
    return out.transpose(1, 2).flatten(2, 3).to(query.dtype)


class ClipCausalAttnProcessor:
    """``attn1`` processor: LTX self-attention (RMS-normed q/k, RoPE) under the forward's plan.

    Identical to diffusers' `LTXVideoAttnProcessor` when there is no plan; with one, keys/values of
    the cached history are prepended, the mask applied, and the new keys/values cached if asked.
    ``rollout_kernel`` (a `policies.rollout_attention.FlashKernel`) replaces SDPA in no-grad
    forwards without a plan; with static e4m3 scales it also takes the queries and keys from their
    projections (its fused RMSNorm-RoPE-cast path).
    """

    rollout_kernel: Callable | None = None

    def __init__(self, layer: int, rotary) -> None:
        self.layer = layer
        self.rotary = rotary  # diffusers' LTX apply_rotary_emb

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        plan = getattr(image_rotary_emb, "plan", None)
        kernel = self.rollout_kernel
        if (
            kernel is not None
            and plan is None
            and not torch.is_grad_enabled()
            and kernel.fuses(attn, hidden_states, image_rotary_emb)
        ):
            out = kernel.fused(self, attn, hidden_states, image_rotary_emb).to(hidden_states.dtype)
            return attn.to_out[1](attn.to_out[0](out))
        query = attn.norm_q(attn.to_q(hidden_states))
        key = attn.norm_k(attn.to_k(hidden_states))
        value = attn.to_v(hidden_states)
        if image_rotary_emb is not None:
            query = self.rotary(query, image_rotary_emb)
            key = self.rotary(key, image_rotary_emb)
        query, key, value = (x.unflatten(2, (attn.heads, -1)) for x in (query, key, value))
        out = _planned_attention(self, plan, query, key, value)
        return attn.to_out[1](attn.to_out[0](out))


class ClipCausalLTX2AttnProcessor:
    """LTX-2 video ``attn1`` processor: RMS-normed q/k, RoPE (interleaved or split, as the layer
    says), per-head gates when the layer has them (LTX-2.3), under the forward's plan.

    Identical to diffusers' `LTX2AudioVideoAttnProcessor` (and, for a transformer with perturbed
    attention, `LTX2PerturbedAttnProcessor`: spatio-temporal guidance's ``perturbation_mask``) for
    self-attention when there is no plan. Spatio-temporal guidance and an external video
    self-attention mask are not available under clip-causal attention. ``rollout_kernel`` as in
    `ClipCausalAttnProcessor`.
    """

    rollout_kernel: Callable | None = None

    def __init__(self, layer: int) -> None:
        self.layer = layer

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        query_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        key_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        perturbation_mask: torch.Tensor | None = None,
        all_perturbed: bool | None = None,
    ) -> torch.Tensor:
        from diffusers.models.transformers.transformer_ltx2 import (
            apply_interleaved_rotary_emb,
            apply_split_rotary_emb,
        )

        if encoder_hidden_states is not None or key_rotary_emb is not None:
            raise NotImplementedError("ClipCausalLTX2AttnProcessor is a self-attention processor (attn1)")
        plan = getattr(query_rotary_emb, "plan", None)
        if attention_mask is not None or (plan is not None and perturbation_mask is not None):
            raise NotImplementedError(
                "clip-causal LTX-2 attention sets its own mask: video_self_attention_mask and "
                "spatio-temporal guidance (stg_scale) are not available on a next-clip model"
            )
        value = attn.to_v(hidden_states)
        if perturbation_mask is not None and all_perturbed:  # every sample skips attention (STG)
            out = value
        else:
            query = attn.norm_q(attn.to_q(hidden_states))
            key = attn.norm_k(attn.to_k(hidden_states))
            if query_rotary_emb is not None:
                rotate = (
                    apply_interleaved_rotary_emb
                    if attn.rope_type == "interleaved"
                    else apply_split_rotary_emb
                )
                query, key = rotate(query, query_rotary_emb), rotate(key, query_rotary_emb)
            query, key, heads = (x.unflatten(2, (attn.heads, -1)) for x in (query, key, value))
            out = _planned_attention(self, plan, query, key, heads)
            if perturbation_mask is not None:  # perturbed samples (mask 0) take the values instead
                out = torch.lerp(value, out, perturbation_mask)
        if attn.to_gate_logits is not None:
            gates = 2.0 * torch.sigmoid(attn.to_gate_logits(hidden_states))  # [B, S, heads]
            out = (out.unflatten(2, (attn.heads, -1)) * gates.unsqueeze(-1)).flatten(2, 3)
        return attn.to_out[1](attn.to_out[0](out))


def install_clip_attention(transformer: torch.nn.Module) -> None:
    """Give an `LTXVideoTransformer3DModel` or an `LTX2VideoTransformer3DModel` (its video stream)
    clip-causal self-attention (no weights change; idempotent)."""
    if type(transformer).__name__ == "LTX2VideoTransformer3DModel":

        def processor(layer: int) -> ClipCausalLTX2AttnProcessor:
            return ClipCausalLTX2AttnProcessor(layer)

    else:
        from diffusers.models.transformers.transformer_ltx import apply_rotary_emb

        def processor(layer: int) -> ClipCausalAttnProcessor:
            return ClipCausalAttnProcessor(layer, apply_rotary_emb)

    if not getattr(transformer.rope, "_passes_attention_plan", False):
        transformer.rope.register_forward_hook(_pass_plan)
        transformer.rope._passes_attention_plan = True
    for layer, block in enumerate(transformer.transformer_blocks):
        block.attn1.set_processor(processor(layer))
