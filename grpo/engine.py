"""The training engine: the one loop every stage runs, and the seeded row sampler they share.

A stage (GRPO, flow matching, reward-model training) says what one step does and how it evaluates;
the engine owns the rest, so that every stage resumes, stops on preemption, logs, checkpoints and
evaluates the same way:

    start   = resume (``resume_from_checkpoint``: the newest complete checkpoint with ``auto``)
    for step in start .. total:
        metrics  = evaluation, every ``eval_every`` steps (before the step, so step 0 is the baseline)
                 + the stage's step (it calls `Engine.optimizer_step` for each optimizer step)
        log them every ``logging_steps`` steps and at the last; callbacks' ``on_iteration_end``
        checkpoint every ``save_steps``, or at once and return on SIGTERM (on any rank) or when the
        stage halts (it then raises the stage's error, the checkpoint written)
    final evaluation (logged at step ``total``), the stage's ``finish``, ``output_dir/final``

The optimizer, LR schedule, EMA, process seeding and checkpoint contents are `TrainingState`'s.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from grpo.config import TrainerConfig
from grpo.preemption import PreemptionHandler
from grpo.tracking import MetricsLogger
from grpo.training_state import TrainingState
from policies.seeding import INIT_STREAM, derived_seed, seeded


class RowSampler:
    """Which dataset row fills each slot of an endless stream: epoch ``e`` is a permutation of the
    rows seeded by ``derived_seed(seed, e)``, and slot ``k`` is row ``perm[k // n][k % n]``.

    Stages number their slots so that ranks and steps never share one (e.g. GRPO's slot of rank r's
    i-th prompt of iteration t is ``t * prompts + r * local + i``), so a run reads the same rows for
    any resume point, and every rank a disjoint part of them.
    """

    def __init__(self, num_rows: int, seed: int) -> None:
        self.num_rows = num_rows
        self.seed = seed

    def indices(self, first: int, count: int) -> list[int]:
        """Rows of slots ``first .. first + count - 1``."""
        perms: dict[int, torch.Tensor] = {}
        rows = []
        for slot in range(first, first + count):
            epoch = slot // self.num_rows
            if epoch not in perms:
                generator = torch.Generator().manual_seed(derived_seed(self.seed, epoch))
                perms[epoch] = torch.randperm(self.num_rows, generator=generator)
            rows.append(int(perms[epoch][slot % self.num_rows]))
        return rows

    def micro_batch(self, step: int, micro: int, accumulation: int, size: int, accelerator: Any) -> list[int]:
        """Rows of micro-batch ``micro`` of optimizer step ``step`` on this rank (``size`` per rank)."""
        world, rank = accelerator.num_processes, accelerator.process_index
        return self.indices(((step * accumulation + micro) * world + rank) * size, size)


def make_accelerator() -> Any:
    """The `accelerate.Accelerator` of a stage: the GPU when there is one, else the CPU."""
    from accelerate import Accelerator

    return Accelerator(cpu=not torch.cuda.is_available())


def add_lora(policy: Any, args: Any) -> None:
    """Give ``policy`` the recipe's LoRA adapters (if ``use_lora``), initialised from the recipe's seed."""
    if args.use_lora:
        with seeded(derived_seed(args.seed, INIT_STREAM)):
            policy.add_lora(args.lora_rank, args.lora_alpha, args.lora_target_modules)


class Stage:
    """What a stage plugs into the `Engine`; the defaults suit a stage that needs none of the hooks."""

    def train_step(self, step: int, started: float) -> dict[str, Any]:
        """Run step ``step`` (``started``: its `time.perf_counter`, evaluation included); its metrics."""
        raise NotImplementedError(f"{type(self).__name__} does not define train_step")

    def eval_metrics(self, step: int) -> dict[str, Any]:
        """Held-out metrics of the weights before step ``step`` (``total`` for the final evaluation)."""
        raise NotImplementedError(f"{type(self).__name__} does not define eval_metrics")

    def checkpoint_state(self, step: int) -> dict[str, Any]:
        """JSON-able fields the stage adds to the checkpoint written after ``step - 1``."""
        return {}

    def should_halt(self) -> bool:
        """True to checkpoint and stop with `halt_error` (checked on every rank after each step)."""
        return False

    def halt_error(self, saved: Path) -> Exception:
        """The error raised when a rank asked to halt, after checkpoint ``saved`` was written."""
        return RuntimeError(f"{type(self).__name__} halted; saved {saved}")

    def finish(self) -> None:
        """Work after the last step and before ``final`` is written (e.g. a reward model's calibration)."""


class Engine:
    """Runs a `Stage` for ``total`` steps on a `TrainingState` (see the module docstring for the loop).

    Args:
        stage: the stage; it is also what callbacks receive as their ``trainer``.
        state: the stage's `TrainingState` (its ``args`` are the trainer settings).
        total: steps of the run (GRPO iterations, optimizer steps otherwise).
        evaluates: whether the stage has held-out data (evaluation then runs every ``eval_every``).
        final_eval: evaluate once more after the last step (logged at step ``total``).
        progress_keys: metrics shown beside the progress bar.
        callbacks: objects with optional ``on_optimizer_step(trainer, step)`` and
            ``on_iteration_end(trainer, step, metrics)`` methods.
    """

    def __init__(
        self,
        stage: Stage,
        state: TrainingState,
        *,
        total: int,
        evaluates: bool,
        final_eval: bool,
        progress_keys: tuple[str, ...],
        callbacks: list[Any],
    ) -> None:
        self.stage = stage
        self.state = state
        self.args: TrainerConfig = state.args
        self.total = total
        self.evaluates = evaluates
        self.final_eval = final_eval
        self.progress_keys = progress_keys
        self.callbacks = callbacks

    def optimizer_step(self) -> float:
        """`TrainingState.optimizer_step`, then the callbacks' ``on_optimizer_step``; the gradient norm."""
        norm = self.state.optimizer_step()
        self._call("on_optimizer_step", self.state.optimizer_steps)
        return norm

    def _call(self, hook: str, *args: Any) -> None:
        for callback in self.callbacks:
            if hasattr(callback, hook):
                getattr(callback, hook)(self.stage, *args)

    def run(self) -> list[dict[str, Any]]:
        """Run the steps left (resuming if asked); returns the metrics of every step run."""
        args, state, stage = self.args, self.state, self.stage
        start = state.resume()
        history: list[dict[str, Any]] = []
        logger = MetricsLogger(
            args.output_dir,
            report_to=args.report_to,
            total=self.total,
            initial=start,
            resume_step=start,
            run_name=args.run_name,
            config=asdict(args),
            is_main_process=state.accelerator.is_main_process,
            progress_keys=self.progress_keys,
        )
        with PreemptionHandler() as preemption, logger:
            for step in range(start, self.total):
                started = time.perf_counter()
                metrics: dict[str, Any] = {}
                if self.evaluates and args.eval_every and step % args.eval_every == 0:
                    metrics.update(stage.eval_metrics(step))
                metrics.update(stage.train_step(step, started))
                if step % args.logging_steps == 0 or step == self.total - 1:
                    logger.log(metrics, step=step)
                history.append(metrics)
                self._call("on_iteration_end", step, metrics)

                stop = state.any_rank(preemption.requested)
                halt = state.any_rank(stage.should_halt())
                if stop or halt or (args.save_steps and (step + 1) % args.save_steps == 0):
                    saved = state.save(step + 1, stage.checkpoint_state(step + 1))
                if halt:
                    raise stage.halt_error(saved)
                if stop:
                    return history
            if self.final_eval:
                final = stage.eval_metrics(self.total)
                logger.log(final, step=self.total)
                history.append(final)
        stage.finish()
        state.save_final()
        return history
