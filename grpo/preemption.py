"""Graceful stop on SIGTERM / SIGINT, for preemptible clusters.

Schedulers (Slurm, Kubernetes) send SIGTERM some time before killing a job. Inside
`PreemptionHandler` the first such signal only sets a flag; the training loop checks
``handler.requested`` after each iteration, writes a checkpoint and returns, so the job resumes with
``resume_from_checkpoint: auto`` having lost nothing. A second signal restores the previous handler
and re-delivers the signal, so pressing Ctrl-C twice still stops at once. The previous handlers are
restored when the block exits.

With several processes, every rank must stop at the same iteration or the others hang in the next
collective: reduce the flag across ranks (e.g. ``accelerator.reduce(torch.tensor(int(flag)), "max")``)
before acting on it.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Sequence
from types import FrameType
from typing import Any


class PreemptionHandler:
    """Context manager turning the first SIGTERM / SIGINT into a flag instead of an exit.

    Must be entered in the main thread (Python only delivers signals there).

    Example::

        with PreemptionHandler() as preemption:
            for iteration in range(start, max_iterations):
                train_one_iteration()
                if preemption.requested:
                    save_checkpoint(...)
                    break
    """

    def __init__(self, signals: Sequence[signal.Signals] = (signal.SIGTERM, signal.SIGINT)) -> None:
        self.signals = tuple(signals)
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, Any] = {}

    @property
    def requested(self) -> bool:
        """True once one of the signals has arrived."""
        return self.received is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        sig = signal.Signals(signum)
        if self.received is not None:
            # second signal: behave as if we were not there
            signal.signal(sig, self._previous[sig])
            signal.raise_signal(sig)
            return
        self.received = sig
        print(
            f"received {sig.name}: finishing the current iteration, then saving a checkpoint and exiting "
            f"(send {sig.name} again to stop immediately)",
            file=sys.stderr,
            flush=True,
        )

    def __enter__(self) -> PreemptionHandler:
        for sig in self.signals:
            previous = signal.getsignal(sig)
            # None: a handler not installed from Python; the closest restorable value is the default
            self._previous[sig] = signal.SIG_DFL if previous is None else previous
            signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()
