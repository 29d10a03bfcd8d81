"""Several reward functions as one call: run concurrently, weighted, with per-reward columns for logging.

A trainer holds one `CompositeReward` and calls it once per batch::

    rewards = CompositeReward(["causal_consistency", "temporal_smoothness", "my_pkg.rewards:sharpness"],
                              weights=[1.0, 0.2, 0.1])
    out = rewards(videos, prompts, contexts, **dataset_columns)
    out.columns["temporal_smoothness"]   # list[float | None], one per video
    out.weighted_sum()                   # list[float | None]

Async rewards (``async def``, or objects with an ``acall`` coroutine method such as the judge) are
awaited on one event loop, sync ones run in worker threads, so a slow remote judge and a local
frame metric overlap. ``None`` scores are kept as ``None``: the trainer excludes those samples from
that reward's advantage.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import inspect
import logging
import math
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from policies.errors import InputError
from rewards.registry import resolve
from rewards.types import RewardOutput, RewardUnavailableError, as_reward_output

logger = logging.getLogger(__name__)

T = TypeVar("T")


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion from sync code, even when the caller is inside a running event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


def _on_callers_stream(func: Any) -> Any:
    """``func``, run on the CUDA stream current where this is called: a worker thread would otherwise
    use the default stream (e.g. a trainer's scorer thread on its own stream, beside the update)."""
    if not torch.cuda.is_initialized():
        return func
    stream = torch.cuda.current_stream()
    if stream == torch.cuda.default_stream():
        return func

    def on_stream(*args: Any, **kwargs: Any) -> Any:
        with torch.cuda.stream(stream):
            return func(*args, **kwargs)

    return on_stream


@dataclass
class CompositeOutput:
    """Per-reward score columns (one entry per video), their weights, logging metadata and timings."""

    columns: dict[str, list[float | None]]
    weights: dict[str, float]
    metadata: dict[str, list[Any]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    unavailable: dict[str, str] = field(
        default_factory=dict, metadata={"help": "Rewards that could not score the batch: name -> why."}
    )

    def to_tensor(self) -> torch.Tensor:
        """Scores as a float32 tensor ``[num_videos, num_rewards]`` (column order), NaN where ``None``."""
        rows = zip(*self.columns.values())
        return torch.tensor(
            [[math.nan if s is None else s for s in row] for row in rows], dtype=torch.float32
        )

    def select(self, samples: Sequence[int]) -> CompositeOutput:
        """The scores and per-video metadata of the given videos (as `Rollout.select` for samples)."""
        return CompositeOutput(
            columns={name: [column[i] for i in samples] for name, column in self.columns.items()},
            weights=dict(self.weights),
            metadata={key: [column[i] for i in samples] for key, column in self.metadata.items()},
            timings=dict(self.timings),
            unavailable=dict(self.unavailable),
        )

    def weighted_sum(self) -> list[float | None]:
        """``sum_r weight_r * score_r`` per video; ``None`` where a reward with non-zero weight is ``None``.

        Trainers that normalise each reward within its group before weighting use ``columns``.
        """
        totals: list[float | None] = []
        for row in zip(*self.columns.values()):
            pairs = [
                (self.weights[name], score) for name, score in zip(self.columns, row) if self.weights[name]
            ]
            totals.append(None if any(s is None for _, s in pairs) else sum(w * s for w, s in pairs))
        return totals


def _reward_name(func: Any) -> str:
    name = getattr(func, "__name__", None) or type(func).__name__
    return name


def _is_async(func: Any) -> bool:
    return inspect.iscoroutinefunction(func) or inspect.iscoroutinefunction(type(func).__call__)


def build_reward(spec: str | Callable[..., Any], **kwargs: Any) -> Callable[..., Any]:
    """A reward callable from a registered name, ``module:function`` or a callable.

    A class (registered or dotted) is instantiated with ``kwargs``; a function gets them bound.
    """
    func = resolve(spec) if isinstance(spec, str) else spec
    if inspect.isclass(func):
        return func(**kwargs)
    if not callable(func):
        raise InputError(
            f"reward {spec!r} is a {type(func).__name__}, not a callable; give a function or class"
        )
    return functools.partial(func, **kwargs) if kwargs else func


class CompositeReward:
    """Run several reward functions on one batch and collect weighted, named score columns.

    Args:
        funcs: reward callables, registered names or ``module:function`` specs.
        weights: one weight per reward (default 1.0 each); 0 logs a reward without training on it.
        names: column names (default: the spec string, or the function/class name).
    """

    def __init__(
        self,
        funcs: Sequence[str | Callable[..., Any]],
        weights: Sequence[float] | None = None,
        names: Sequence[str] | None = None,
    ) -> None:
        if not funcs:
            raise InputError("CompositeReward needs at least one reward function")
        weights = [1.0] * len(funcs) if weights is None else [float(w) for w in weights]
        if len(weights) != len(funcs):
            raise InputError(
                f"got {len(weights)} reward weights for {len(funcs)} rewards; give one per reward"
            )
        if any(not math.isfinite(w) for w in weights):
            raise InputError(f"reward weights {weights} must be finite numbers")
        if names is None:
            names = [f if isinstance(f, str) else _reward_name(f) for f in funcs]
        if len(names) != len(funcs) or len(set(names)) != len(names):
            raise InputError(f"reward names {list(names)} must be unique, one per reward; pass names=[...]")
        self.names = list(names)
        self.funcs = [build_reward(f) for f in funcs]
        self.weights = dict(zip(self.names, weights))

    @classmethod
    def from_specs(cls, specs: Sequence[str | dict[str, Any]]) -> CompositeReward:
        """From recipe entries: a name/``module:function`` string, or ``{name, weight, kwargs, column}``."""
        funcs, weights, names = [], [], []
        for spec in specs:
            if isinstance(spec, str):
                spec = {"name": spec}
            unknown = set(spec) - {"name", "weight", "kwargs", "column"}
            if "name" not in spec or unknown:
                raise InputError(
                    f"reward entry {spec!r}: give 'name' and optionally 'weight', 'kwargs', 'column'"
                    + (f" (unknown keys: {sorted(unknown)})" if unknown else "")
                )
            funcs.append(build_reward(spec["name"], **(spec.get("kwargs") or {})))
            weights.append(spec.get("weight", 1.0))
            names.append(spec.get("column", spec["name"]))
        return cls(funcs, weights, names)

    async def _run_one(self, name: str, func: Any, n: int, args: tuple, metadata: dict[str, Any]) -> Any:
        start = time.perf_counter()
        try:
            if hasattr(func, "acall"):
                result = await func.acall(*args, **metadata)
            elif _is_async(func):
                result = await func(*args, **metadata)
            else:
                result = await asyncio.to_thread(_on_callers_stream(func), *args, **metadata)
            if inspect.isawaitable(result):
                result = await result
        except RewardUnavailableError as err:  # its service is down: no score for this batch
            logger.warning("reward %r could not score a batch of %d: %s", name, n, err)
            return RewardOutput([None] * n), time.perf_counter() - start, str(err)
        except Exception as err:
            err.add_note(f"raised by reward {name!r}")
            raise
        output = as_reward_output(result)
        if len(output.scores) != n:
            raise InputError(
                f"reward {name!r} returned {len(output.scores)} scores for {n} videos; return one each"
            )
        for i, score in enumerate(output.scores):
            if score is not None and not math.isfinite(score):
                raise InputError(
                    f"reward {name!r} returned {score} for video {i}; return None for 'cannot score'"
                )
        return output, time.perf_counter() - start, None

    async def acall(
        self, videos: Any, prompts: Sequence[str] | None = None, contexts: Any = None, **metadata: Any
    ) -> CompositeOutput:
        """Score a batch with every reward concurrently. A reward that raises `RewardUnavailableError`
        (its server is down) scores the batch ``None`` and is named in ``unavailable``."""
        n = next((len(x) for x in (videos, prompts, contexts) if x is not None), None)
        if n is None:
            raise InputError("rewards need videos, prompts or contexts to know the batch size; got all None")
        for key, column in metadata.items():
            if isinstance(column, Sequence) and not isinstance(column, str) and len(column) != n:
                raise InputError(f"metadata column {key!r} has {len(column)} entries for {n} videos")
        start = time.perf_counter()
        args = (videos, prompts, contexts)
        results = await asyncio.gather(
            *(self._run_one(name, func, n, args, metadata) for name, func in zip(self.names, self.funcs))
        )
        out = CompositeOutput(columns={}, weights=dict(self.weights))
        for name, (output, seconds, unavailable) in zip(self.names, results):
            if unavailable is not None:
                out.unavailable[name] = unavailable
            out.columns[name] = output.scores
            out.metadata.update({f"{name}/{key}": column for key, column in output.metadata.items()})
            out.timings[name] = seconds
        out.timings["total"] = time.perf_counter() - start
        return out

    def __call__(
        self, videos: Any, prompts: Sequence[str] | None = None, contexts: Any = None, **metadata: Any
    ) -> CompositeOutput:
        """Sync `acall` for a trainer's plain loop."""
        return run_sync(self.acall(videos, prompts, contexts, **metadata))
