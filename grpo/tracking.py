"""Metrics logging: ``metrics.jsonl`` always, TensorBoard and Weights & Biases when asked for, and a
progress bar with ETA and the latest reward. Each sink is an ``accelerate.tracking.GeneralTracker``:
accelerate's `TensorBoardTracker` and `WandBTracker`, and our `JSONLTracker`.

Only the main process writes (pass ``is_main_process=False`` on the other ranks: `log` is then a
no-op), so a multi-GPU run has one file and one bar. A run that starts from step ``k``
(``resume_step``: the checkpoint it resumed from, 0 for a fresh start) first drops what an
interrupted run logged at steps >= k (it runs them again): ``metrics.jsonl`` is rewritten
atomically with the rows before k, TensorBoard purges its events from step k (``purge_step``),
and W&B resumes the same run, whose history keeps one value per step (it ignores steps below its
last one; a fresh start, step 0, is a new W&B run). Each step then appears once. Non-finite
numbers are written as the strings ``"nan"``, ``"inf"``, ``"-inf"`` (JSON has no NaN) and read
back as floats.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from accelerate.tracking import GeneralTracker, TensorBoardTracker, WandBTracker
from tqdm.auto import tqdm

from policies.errors import InputError

METRICS_FILE = "metrics.jsonl"
WANDB_ID_FILE = "wandb_run_id"

# tracker name in report_to -> the pip package it needs
TRACKERS: dict[str, str] = {"tensorboard": "tensorboard", "wandb": "wandb"}

_NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def tracker_problem(name: str) -> str | None:
    """Why the tracker ``name`` cannot be used (unknown, or its package missing), or None if it can."""
    if name not in TRACKERS:
        return f"unknown tracker {name!r}; choose from {', '.join(TRACKERS)}"
    if importlib.util.find_spec(TRACKERS[name]) is None:
        return f"{name!r} is asked for but not installed; `pip install {TRACKERS[name]}` or remove it"
    return None


def _json_value(key: str, value: Any) -> Any:
    if hasattr(value, "item") and callable(value.item):  # 0-d tensors, numpy scalars
        value = value.item()
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    raise TypeError(f"metric {key!r} is a {type(value).__name__}; log numbers (or tensors of one) or strings")


class JSONLTracker(GeneralTracker):
    """``metrics.jsonl``: one JSON record per `log` call, flushed before returning (a killed run loses
    at most the line being written). ``resume_step``: first drop the records of steps >= it."""

    name = "jsonl"
    requires_logging_directory = True
    main_process_only = False  # `MetricsLogger` opens it on the main process only

    def __init__(self, path: Path, resume_step: int | None = None) -> None:
        super().__init__()
        self.path = path
        if resume_step is not None:
            truncate_metrics(path, resume_step)
        # a run killed mid-write can leave a last line without its newline: end it before appending
        needs_newline = path.exists() and path.stat().st_size > 0 and path.read_bytes()[-1:] != b"\n"
        self.file = path.open("a", encoding="utf-8")
        if needs_newline:
            self.file.write("\n")
            self.file.flush()

    @property
    def tracker(self):
        return self.file

    def log(self, values: dict, step: int | None = None, **kwargs: Any) -> None:
        self.file.write(json.dumps(values) + "\n")
        self.file.flush()

    def finish(self) -> None:
        self.file.close()


class MetricsLogger:
    """Writes one record per `log` call to every configured sink.

    Args:
        output_dir: run directory; ``metrics.jsonl`` and ``tensorboard/`` go here.
        report_to: extra trackers, a subset of ``("tensorboard", "wandb")``.
        total: steps of the whole run (the bar's 100%); None for an open-ended bar.
        initial: step the run starts from (the resumed checkpoint's), so the ETA covers what is left.
        resume_step: the run (re)starts at this step: records of steps >= it are dropped from
            ``metrics.jsonl`` and TensorBoard. None (default): append to what is there.
        run_name: TensorBoard / W&B run name (default: the output directory's name).
        config: resolved configuration recorded by W&B.
        is_main_process: False on every rank but 0: nothing is opened or written.
        progress_bar: show the tqdm bar.
        progress_keys: metrics shown next to the bar (the latest value of each that was logged).
        desc: the bar's label.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike[str],
        *,
        report_to: Sequence[str] = (),
        total: int | None = None,
        initial: int = 0,
        resume_step: int | None = None,
        run_name: str | None = None,
        config: Mapping[str, Any] | None = None,
        is_main_process: bool = True,
        progress_bar: bool = True,
        progress_keys: Sequence[str] = ("reward/mean", "loss"),
        desc: str = "train",
    ) -> None:
        self.enabled = is_main_process
        self.progress_keys = tuple(progress_keys)
        self._jsonl: JSONLTracker | None = None
        self._trackers: list[GeneralTracker] = []  # TensorBoard, W&B: they get the numbers
        self._bar = None
        if not self.enabled:
            return
        for name in report_to:
            problem = tracker_problem(name)
            if problem is not None:
                raise InputError(f"report_to: {problem}")
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.output_dir / METRICS_FILE
        run_name = run_name or self.output_dir.resolve().name
        self._jsonl = JSONLTracker(self.path, resume_step)
        if "tensorboard" in report_to:
            # events in output_dir/tensorboard; purge_step drops those an interrupted run logged from it
            self._trackers.append(TensorBoardTracker("tensorboard", self.output_dir, purge_step=resume_step))
        if "wandb" in report_to:
            self._trackers.append(self._wandb_tracker(run_name, config, fresh=resume_step == 0))
        for tracker in self._trackers:
            tracker.start()
        self._bar = tqdm(
            total=total, initial=initial, desc=desc, dynamic_ncols=True, disable=not progress_bar
        )

    def _wandb_tracker(self, run_name: str, config: Mapping[str, Any] | None, fresh: bool) -> WandBTracker:
        import wandb

        # the run id is kept in the run directory so that a resumed run continues the same W&B run
        # (which keeps one value per step: W&B ignores steps below its last); a run starting again
        # from step 0 is a new W&B run
        id_file = self.output_dir / WANDB_ID_FILE
        reuse = id_file.exists() and not fresh
        run_id = id_file.read_text().strip() if reuse else wandb.util.generate_id()
        id_file.write_text(run_id)
        return WandBTracker(
            os.environ.get("WANDB_PROJECT", "nextscene"),  # accelerate passes it as wandb's project
            name=run_name,
            id=run_id,
            resume="allow",
            dir=str(self.output_dir),
            config=dict(config) if config is not None else None,
        )

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        """Record ``metrics`` for ``step`` (the iteration or optimizer step just completed).

        Values are numbers, 0-d tensors / numpy scalars, strings or None; trackers get the numbers.
        The JSONL line is flushed before returning, so a killed run loses at most the line being written.
        """
        if not self.enabled:
            return
        if "step" in metrics or "time" in metrics:
            raise ValueError("metric names 'step' and 'time' are reserved by the logger")
        record = {"step": int(step), "time": round(time.time(), 3)}
        record.update((key, _json_value(key, value)) for key, value in metrics.items())
        self._jsonl.log(record, step=step)
        scalars: dict[str, float] = {}
        for key, value in record.items():
            if key in ("step", "time") or isinstance(value, bool):
                continue
            if isinstance(value, int | float):
                scalars[key] = float(value)
            elif value in _NON_FINITE:
                scalars[key] = _NON_FINITE[value]
        for tracker in self._trackers:
            tracker.log(scalars, step=step)
        if self._bar is not None:
            if step > self._bar.n:
                self._bar.update(step - self._bar.n)
            shown = {key: f"{scalars[key]:.4g}" for key in self.progress_keys if key in scalars}
            if shown:
                self._bar.set_postfix(shown, refresh=True)

    def close(self) -> None:
        """Flush and close every sink (idempotent)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        for tracker in self._trackers:
            tracker.finish()
        self._trackers = []
        if self._jsonl is not None:
            self._jsonl.finish()
            self._jsonl = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def truncate_metrics(path: str | os.PathLike[str], step: int) -> int:
    """Keep only the records of ``metrics.jsonl`` logged at steps < ``step``; return how many were dropped.

    The kept lines are written to a temporary file beside it, fsynced and renamed over it, so a kill
    at any moment leaves either the old or the new file. Torn lines (a write cut by a kill) go too.
    """
    path = Path(path)
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            record_step = int(json.loads(line)["step"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            record_step = None
        if record_step is not None and record_step < step:
            kept.append(line + "\n")
        else:
            dropped += 1
    if dropped:
        staging = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        with staging.open("w", encoding="utf-8") as handle:
            handle.writelines(kept)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(staging, path)
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    return dropped


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` (or of the run directory holding one), one per step.

    Where a resumed run logged a step again, the last record written wins; records come sorted by
    step; ``"nan"`` / ``"inf"`` / ``"-inf"`` strings become floats; a torn line is skipped with a warning.
    """
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    by_step: dict[int, dict[str, Any]] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            warnings.warn(f"{path}:{number}: skipping a torn metrics line", stacklevel=2)
            continue
        by_step[record["step"]] = {
            key: _NON_FINITE[value] if isinstance(value, str) and value in _NON_FINITE else value
            for key, value in record.items()
        }
    return [by_step[step] for step in sorted(by_step)]
