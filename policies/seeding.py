"""Where a run's randomness comes from: every draw is derived from the recipe's ``seed``.

* Data order, per-sample noise, trained steps and flow-matching noise use explicit generators
  seeded by `derived_seed` ``(seed, iteration, ...)``: what makes resume exact.
* Module inits the trainers do (LoRA adapters, reward-model heads, NSP queries and connector built
  without trained weights) run inside `seeded`, whose draws from torch's global generators come
  from a seed derived from the recipe's, and which puts the global state back afterwards.
* Draws no generator can be passed to (dropout, libraries' own draws) come from the process's
  global generators, which `seed_process` seeds per rank when a trainer is built; checkpoints save
  them and resume restores them.

Same recipe + same seed + same machine kind -> bitwise the same run on CPU. On CUDA some kernels
(atomic adds in backward passes) sum in varying order; `use_deterministic_algorithms`
(``trainer.full_determinism: true``) selects torch's deterministic kernels where it has them.
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator

# stream tags of derived_seed: far above any iteration, step or epoch number the trainers pass
INIT_STREAM = 1_000_000_001  # module inits done by a trainer (LoRA adapters, new heads)
PROCESS_STREAM = 1_000_000_002  # the global generators of each rank (dropout)


def derived_seed(*parts: int) -> int:
    """A 63-bit seed determined by ``parts`` (seed, iteration, sample...), stable across runs.

    ``parts`` are mixed by numpy's ``SeedSequence``, which ignores trailing zeros: ``(s, 3)`` and
    ``(s, 3, 0)`` give the same seed, so streams are told apart by their leading parts.
    """
    import numpy as np

    return int(
        np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> np.uint64(1)
    )


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block whose draws from torch's global generators (CPU, and the current CUDA device when
    CUDA is in use) come from ``seed``; the generators are put back as they were afterwards.

    For module inits (e.g. peft's LoRA ``kaiming_uniform_``) that take no generator argument.
    """
    import torch

    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    devices = [torch.cuda.current_device()] if cuda else []
    with torch.random.fork_rng(devices=devices):
        torch.random.default_generator.manual_seed(seed)
        if cuda:
            torch.cuda.manual_seed(seed)
        yield


def seed_process(seed: int, rank: int = 0) -> None:
    """Seed this process's global generators (python ``random``, numpy, torch CPU and CUDA) from the
    recipe's ``seed``, differently on every ``rank`` (dropout masks differ across data-parallel ranks)."""
    import numpy as np
    import torch

    value = derived_seed(seed, PROCESS_STREAM, rank)
    random.seed(value)
    np.random.seed(value % 2**32)
    torch.manual_seed(value)  # CPU and every CUDA device


def use_deterministic_algorithms() -> None:
    """Select torch's deterministic kernels where it has them (cuBLAS workspace, cuDNN, scatter/index
    ops...); an op that has none warns once and runs its usual kernel.

    cuBLAS reads ``CUBLAS_WORKSPACE_CONFIG`` when its first handle is made: it is set here if unset,
    which is in time unless a matrix product already ran on the GPU in this process (export it to be
    sure).
    """
    import torch

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
