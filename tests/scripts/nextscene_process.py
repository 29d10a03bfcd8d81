"""`nextscene ARGS...` in a process of its own, for tests/test_reproducibility.py.

Usage: nextscene_process.py GLOBAL_SEED KILL_AFTER_STEP -- ARGS...

GLOBAL_SEED seeds python's, numpy's and torch's global generators before anything else runs, so that
two runs given different values prove the run draws nothing from them unseeded (torch >= 2.13 seeds
its global generator randomly anyway; older versions start every process from the same seed).
KILL_AFTER_STEP >= 0: the process SIGKILLs itself right after metrics.jsonl got the record of that
step (flushed), i.e. between checkpoints when the step is not a checkpoint's last; -1: never.
"""

import os
import random
import signal
import sys

import numpy as np
import torch

from grpo import tracking
from grpo.cli import main


def die_after(step: int) -> None:
    log = tracking.MetricsLogger.log

    def log_then_die(self, metrics, **kwargs):
        log(self, metrics, **kwargs)
        if kwargs["step"] == step:
            os.kill(os.getpid(), signal.SIGKILL)

    tracking.MetricsLogger.log = log_then_die


if __name__ == "__main__":
    seed, kill_after, separator, *args = sys.argv[1:]
    assert separator == "--", __doc__
    random.seed(int(seed))
    np.random.seed(int(seed))
    torch.manual_seed(int(seed))
    if int(kill_after) >= 0:
        die_after(int(kill_after))
    sys.exit(main(args))
