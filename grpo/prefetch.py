"""Rows of the coming iterations loaded in the background while the current one trains.

A GRPO iteration's rows (for a video manifest: its context and next MP4s, decoded and resized) are a
pure function of ``(seed, iteration, rank)`` (`grpo.engine.RowSampler`), so they can be loaded before
they are needed without any loader state to checkpoint: a resumed run asks for the same iterations
and gets the same rows. `RowPrefetcher` loads iterations ``t+1 .. t+k`` in one background thread while
iteration t runs (PyAV and the resize release the GIL while they work). One thread, fed in iteration
order, calls the dataset in exactly the order the synchronous loop would, so a dataset's own state
(a skipped row's replacement, its skip count and one-time warning) evolves as it would without it;
an error in a background load is raised, unchanged, by `RowPrefetcher.get` of the iteration that
needs the row.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from types import TracebackType
from typing import Any

Rows = list[dict[str, Any] | None]


class RowPrefetcher:
    """Serves ``load(iteration)``, loading up to ``ahead`` later iterations (below ``end``) meanwhile.

    ``ahead = 0`` loads synchronously in the caller's thread (no thread is started). Use as a context
    manager (or call `close`): leaving it cancels the loads not started and waits for the one
    running, so no thread outlives it.
    """

    def __init__(self, load: Callable[[int], Rows], ahead: int, end: int) -> None:
        if ahead < 0:
            raise ValueError(f"ahead must be >= 0, got {ahead}")
        self.load, self.ahead, self.end = load, ahead, end
        self._queued: dict[int, Future[Rows]] = {}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="row-prefetch") if ahead else None

    def get(self, iteration: int) -> Rows:
        """The rows of ``iteration`` (what ``load(iteration)`` returns, or raises); queues the next
        ``ahead`` iterations' loads before waiting."""
        if self._pool is None:
            return self.load(iteration)
        window = range(iteration, min(iteration + self.ahead + 1, self.end))
        for other in [i for i in self._queued if i not in window]:  # a caller that jumped
            self._queued.pop(other).cancel()
        future = self._queued.pop(iteration, None) or self._pool.submit(self.load, iteration)
        for later in window[1:]:
            if later not in self._queued:
                self._queued[later] = self._pool.submit(self.load, later)
        return future.result()

    def close(self) -> None:
        """Cancel the queued loads and wait for the running one (its result is dropped)."""
        for future in self._queued.values():
            future.cancel()
        self._queued.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> RowPrefetcher:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
