"""Supervised flow-matching stages (text-to-video pretraining, SFT on (context, next scene) pairs).

Each step: a batch of (conditioning, target video) rows -> clean latents ``x0`` -> noise level
``s`` (uniform or logit-normal) -> ``x_s = (1 - s) x0 + s eps`` -> regress ``v = eps - x0``.
The same `TrainingState` as GRPO handles the optimizer, EMA, checkpoints and exact resume, so
the policy a supervised stage writes is the one GRPO starts from.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from grpo.config import FlowMatchingConfig
from grpo.engine import Engine, RowSampler, Stage, add_lora, make_accelerator
from grpo.training_state import TrainingState
from policies.errors import InputError
from policies.protocol import Policy
from policies.seeding import derived_seed

EVAL_SIGMAS = (0.1, 0.3, 0.5, 0.7, 0.9)  # held-out loss is averaged over these noise levels


class FlowMatchingTrainer(Stage):
    """Supervised flow-matching training of a policy on rows ``{"video": [F, H, W, 3], prompt / image ...}``.

    Args:
        policy: a policy with ``prepare_condition``, ``encode_video`` and ``flow_matching_loss``.
        args: the `FlowMatchingConfig`.
        train_dataset / eval_dataset: sequences of dict rows; ``video`` is the target clip.
        callbacks: objects with optional ``on_optimizer_step(trainer, step)``.
    """

    def __init__(
        self,
        policy: Policy,
        args: FlowMatchingConfig,
        train_dataset: Sequence[dict[str, Any]],
        eval_dataset: Sequence[dict[str, Any]] | None = None,
        callbacks: Sequence[Any] | None = None,
    ) -> None:
        if len(train_dataset) == 0:
            raise InputError("train_dataset is empty: give rows with a target 'video' and a 'prompt'")
        if "video" not in train_dataset[0]:
            raise InputError("flow-matching rows need a target 'video' [F, H, W, 3] in [0, 1]")
        self.args = args
        self.train_dataset = train_dataset
        self.eval_dataset = eval_dataset
        self.callbacks = list(callbacks or [])
        self.accelerator = make_accelerator()
        self.policy = policy.to(self.accelerator.device)
        video = torch.as_tensor(train_dataset[0]["video"])
        self.latent_shape = self.policy.latent_shape(*video.shape[:3])
        add_lora(self.policy, args)
        self.state = TrainingState(self.policy, args, self.accelerator, args.max_steps)
        self.rows = RowSampler(len(train_dataset), args.seed)
        self._loaded: Iterator[list[dict[str, Any]]] | None = None  # with dataloader_num_workers
        self._next_slot: tuple[int, int] | None = None  # the (step, micro) it yields next
        evaluates = eval_dataset is not None
        self.engine = Engine(
            self,
            self.state,
            total=args.max_steps,
            evaluates=evaluates,
            final_eval=evaluates and bool(args.eval_every),
            progress_keys=("loss", "eval/loss"),
            callbacks=self.callbacks,
        )

    def train(self) -> list[dict[str, Any]]:
        """Run optimizer steps up to ``max_steps`` (resuming if asked); returns the logged metrics."""
        return self.engine.run()

    def train_step(self, step: int, started: float) -> dict[str, Any]:
        """One optimizer step over ``gradient_accumulation_steps`` micro-batches; its metrics."""
        args = self.args
        losses = []
        accum = args.gradient_accumulation_steps
        for micro in range(accum):
            with self.state.no_sync(micro == accum - 1), self.state.autocast:
                loss = self._loss(self._batch(step, micro), derived_seed(args.seed, step, micro)).mean()
                self.accelerator.backward(loss / accum)
            losses.append(loss.item())
        return {
            "grad_norm": self.engine.optimizer_step(),
            "loss": sum(losses) / len(losses),
            "lr": self.state.learning_rate,
            "time/step_s": time.perf_counter() - started,
        }

    def eval_metrics(self, step: int) -> dict[str, Any]:
        return {"eval/loss": self.evaluate()}

    def _picks(self, step: int, micro: int) -> list[int]:
        """Row indices of one micro-batch (`grpo.engine.RowSampler`), this rank's slice."""
        args = self.args
        return self.rows.micro_batch(
            step, micro, args.gradient_accumulation_steps, args.batch_size, self.accelerator
        )

    def _batch(self, step: int, micro: int) -> list[dict[str, Any]]:
        """Rows of one micro-batch: loaded here, or with ``dataloader_num_workers`` taken from worker
        processes that load the following micro-batches meanwhile (the same rows in the same order)."""
        args = self.args
        if not args.dataloader_num_workers:
            return [self.train_dataset[i] for i in self._picks(step, micro)]
        if self._next_slot != (step, micro):  # first step, or resumed
            accum = range(args.gradient_accumulation_steps)
            loader = torch.utils.data.DataLoader(
                self.train_dataset,
                batch_sampler=(self._picks(s, m) for s in range(step, args.max_steps) for m in accum),
                num_workers=args.dataloader_num_workers,
                collate_fn=list,
                generator=torch.Generator().manual_seed(args.seed),  # leaves the global RNG alone
            )
            self._loaded = iter(loader)
        last = micro + 1 == args.gradient_accumulation_steps
        self._next_slot = (step + 1, 0) if last else (step, micro + 1)
        return next(self._loaded)

    def _sigmas(self, count: int, generator: torch.Generator) -> torch.Tensor:
        if self.args.timestep_sampling == "uniform":
            return torch.rand(count, generator=generator)
        normal = torch.randn(count, generator=generator) * self.args.logit_std + self.args.logit_mean
        return torch.sigmoid(normal)

    def _loss(
        self, rows: list[dict[str, Any]], seed: int, sigmas: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Per-sample flow-matching loss of ``rows`` with noise (and sigmas, unless given) from ``seed``."""
        generator = torch.Generator().manual_seed(seed)
        # with grad: a policy may train part of its conditioning (e.g. the NSP queries)
        condition = self.policy.prepare_condition(rows)
        with torch.no_grad():
            target = self.policy.encode_video(torch.stack([torch.as_tensor(r["video"]) for r in rows]))
        sigmas = self._sigmas(len(rows), generator) if sigmas is None else sigmas
        noise = torch.randn(target.shape, generator=generator).to(target.device)
        extra = self.policy.flow_matching_noise(condition, generator)  # e.g. LTX-2's audio stream
        return self.policy.flow_matching_loss(
            condition, target, sigmas, noise, self.latent_shape, frame_rate=self.args.frame_rate, **extra
        )

    @torch.no_grad()
    def evaluate(self, dataset: Sequence[dict[str, Any]] | None = None) -> float:
        """Held-out loss: every row at each of `EVAL_SIGMAS`, with fixed noise (comparable across steps)."""
        dataset = self.eval_dataset if dataset is None else dataset
        total, count = 0.0, 0
        size = self.args.eval_batch_size
        for start in range(
            self.accelerator.process_index * size, len(dataset), size * self.accelerator.num_processes
        ):
            rows = [dataset[i] for i in range(start, min(start + size, len(dataset)))]
            for k, sigma in enumerate(EVAL_SIGMAS):
                with self.state.autocast:
                    loss = self._loss(
                        rows, derived_seed(self.args.seed, 7, start, k), torch.full((len(rows),), sigma)
                    )
                total += float(loss.sum())
                count += len(rows)
        if self.accelerator.num_processes > 1:
            both = self.accelerator.reduce(
                torch.tensor([total, count], device=self.accelerator.device), "sum"
            )
            total, count = float(both[0]), float(both[1])
        return total / count if count else math.nan
