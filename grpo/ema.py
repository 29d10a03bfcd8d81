"""Exponential moving average of the trainable weights, kept in fp32 beside them."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind an FSDP2 shard (a collective), or the tensor itself."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def like(reference: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """``full`` laid out like ``reference``: sharded the same way when ``reference`` is an FSDP2 shard."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    full = full.to(reference.device, reference.dtype)
    if isinstance(reference, DTensor):
        return distribute_tensor(full, reference.device_mesh, reference.placements)
    return full


class EMA:
    """``shadow = decay * shadow + (1 - decay) * param`` after every optimizer step."""

    def __init__(self, params: dict[str, torch.nn.Parameter], decay: float) -> None:
        self.params = params
        self.decay = decay
        self.shadow = {name: p.detach().float().clone() for name, p in params.items()}

    @torch.no_grad()
    def update(self) -> None:
        for name, param in self.params.items():
            self.shadow[name].lerp_(param.detach().float(), 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Full (unsharded) tensors on the CPU; a collective when the weights are FSDP shards."""
        return {name: full_tensor(t).cpu() for name, t in self.shadow.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if set(state) != set(self.shadow):
            raise ValueError("EMA state does not match the trainable parameters")
        for name, tensor in state.items():
            self.shadow[name].copy_(like(self.shadow[name], tensor))

    @contextlib.contextmanager
    @torch.no_grad()
    def swapped_in(self) -> Iterator[None]:
        """Within this context the model runs with the EMA weights (e.g. to save or evaluate them)."""
        saved = {name: p.detach().clone() for name, p in self.params.items()}
        for name, param in self.params.items():
            param.copy_(self.shadow[name])
        try:
            yield
        finally:
            for name, param in self.params.items():
                param.copy_(saved[name])
