"""Group-relative PPO (GRPO) for video diffusion policies.

One iteration reads like the algorithm:

    rows      = the iteration's prompts / contexts                (data, split across ranks)
    rollout   = G stochastic denoising chains per row              (policy.rollout, old log-probs)
    rewards   = every reward function on the decoded videos        (scored in threads while the
                                                                    next group is still rolling out,
                                                                    or the update runs: overlap_update)
    kept      = all, or each group's k_top best and k_bottom worst (best_of_n_keep)
    advantage = (R - mean_group) / (std + 1e-4), clipped           (grpo.advantages, over all ranks)
    update    = PPO-clip surrogate + beta KL on the trained steps  (policy.log_prob, grpo.loss)
                or, with ``algorithm: nft``, DiffusionNFT's flow matching on the clean samples
                (ODE rollouts by a soft-updated sampling policy; policy.nft_velocity)

Any policy honouring `policies.protocol.Policy` (every family does; a test checks it) can be trained.
Everything random in an iteration (data order, sample seeds, trained steps) is derived from
``(seed, iteration)``, so a run resumed from a checkpoint continues exactly as the uninterrupted
run would have. With ``overlap_update`` (one step off-policy) iteration t updates on batch t-1
while batch t is scored; the batch keeps its own iteration's draws (`_Batch`).
"""

from __future__ import annotations

import contextlib
import math
import random
import resource
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from grpo.advantages import best_of_n_indices, compute_advantages, rewards_to_tensor
from grpo.config import GRPOConfig
from grpo.ema import EMA
from grpo.engine import Engine, RowSampler, Stage, add_lora, make_accelerator
from grpo.evaluation import (
    EVAL_DIR,
    eval_sampling,
    evaluate,
    ode_sampling,
    reward_metadata,
    rollout_groups,
    score_videos,
    write_evaluation,
)
from grpo.loss import grpo_loss, loss_weights
from grpo.nft import nft_loss, optimality
from grpo.prefetch import RowPrefetcher
from grpo.training_state import TrainingState
from policies.errors import InputError
from policies.fp8 import FP8RolloutLinear, FP8Scaling, fp8_forwards, fp8_linears
from policies.ltx import SamplingConfig
from policies.nextclip import NextClipPolicy
from policies.protocol import Policy
from policies.rollout import Rollout
from policies.rollout_attention import (
    check_rollout_attention,
    rollout_attention,
    rollout_attention_processors,
)
from policies.sde import kl_divergence
from policies.seeding import derived_seed
from policies.video_io import write_video
from rewards.composite import CompositeOutput, CompositeReward
from rewards.types import RewardUnavailableError


@dataclass
class _Batch:
    """A rolled-out, scored batch ready for its update: the (kept) samples and their advantages, the
    iteration whose draws (trained steps, micro-batch order) it keeps, and the optimizer steps taken
    when it was rolled out (another step since makes it off-policy)."""

    iteration: int
    rollout: Rollout
    advantages: torch.Tensor
    behaviour_step: int


class GRPOTrainer(Stage):
    """Trains a diffusion policy with group-relative PPO against one or more reward functions.

    Args:
        policy: a `policies.protocol.Policy` (e.g. `policies.LTXPolicy`).
        reward_funcs: a reward callable, registered name or ``module:function``, or a list of them,
            or a ready `rewards.CompositeReward`.
        args: the `GRPOConfig`.
        train_dataset: a sequence of dict rows (``prompt`` and/or ``image`` / ``context``; other
            columns reach the rewards as metadata).
        eval_dataset: rows scored with deterministic (ODE) rollouts every ``eval_every`` iterations.
        reward_weights: one weight per reward (overrides ``args.reward_weights``).
        callbacks: objects with optional ``on_optimizer_step(trainer, step)`` and
            ``on_iteration_end(trainer, iteration, metrics)`` methods.
    """

    def __init__(
        self,
        policy: Policy,
        reward_funcs: Any,
        args: GRPOConfig,
        train_dataset: Sequence[dict[str, Any]],
        eval_dataset: Sequence[dict[str, Any]] | None = None,
        reward_weights: Sequence[float] | None = None,
        callbacks: Sequence[Any] | None = None,
    ) -> None:
        self.args = args
        self.train_dataset = train_dataset
        self.eval_dataset = eval_dataset
        self.callbacks = list(callbacks or [])
        if len(train_dataset) == 0:
            raise InputError("train_dataset is empty: give at least one row with a 'prompt' (or context)")
        if isinstance(reward_funcs, CompositeReward):
            self.reward = reward_funcs
        else:
            funcs = list(reward_funcs) if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
            self.reward = CompositeReward(
                funcs, reward_weights if reward_weights is not None else args.reward_weights
            )

        self.accelerator = make_accelerator()
        # context parallelism: every rank works on the same samples, each on a part of every forward
        self.context_parallel = args.context_parallel and self.accelerator.num_processes > 1
        self.world_size = 1 if self.context_parallel else self.accelerator.num_processes
        self.rank = 0 if self.context_parallel else self.accelerator.process_index
        if args.num_prompts_per_iteration % self.world_size != 0:
            raise InputError(
                f"num_prompts_per_iteration={args.num_prompts_per_iteration} does not split over "
                f"{self.world_size} processes: use a multiple of {self.world_size}"
            )
        self.local_prompts = args.num_prompts_per_iteration // self.world_size
        self.output_dir = Path(args.output_dir)

        if args.nextclip_groups == "branch" and not isinstance(policy, NextClipPolicy):
            raise InputError(
                f"nextclip_groups 'branch' needs a next-clip policy, got {type(policy).__name__}: "
                "set trainer.nextclip_groups video"
            )
        self.nft = args.algorithm == "nft"
        if self.nft:
            why = getattr(policy, "nft_unsupported", None)
            if why or not hasattr(policy, "nft_velocity"):
                raise NotImplementedError(
                    f"trainer.algorithm nft: {why or type(policy).__name__ + ' has no nft_velocity'}"
                )
        self.policy = policy.to(self.accelerator.device)
        # validate the geometry and sampler settings before any model work
        self.sampling = self._sampling(args.sde_steps(0))
        self.policy.latent_shape(args.num_frames, args.height, args.width)
        if args.use_lora:
            add_lora(self.policy, args)
        elif args.beta > 0:
            self.policy.keep_reference_copy()
        if self.context_parallel:
            self._enable_context_parallel(eval_dataset is not None and args.eval_every > 0)
        self.fp8_layers = self._fp8_layers()
        self.attention_processors = self._rollout_attention()
        self.fp8_scaling = FP8Scaling(static=args.rollout_fp8_scaling == "static")
        self.compiled = self._compile()
        total_steps = args.max_iterations * args.num_iterations * len(self._accumulation_groups())
        self.state = TrainingState(self.policy, args, self.accelerator, total_steps)
        if self.nft:  # the sampling ("old") policy, soft-updated after every iteration's update
            self.state.sampler = EMA(self.state.trainable, args.nft_old_decay)
        self.rows = RowSampler(len(train_dataset), args.seed)
        evaluates = eval_dataset is not None
        self.engine = Engine(
            self,
            self.state,
            total=args.max_iterations,
            evaluates=evaluates,
            final_eval=evaluates and bool(args.eval_every),
            progress_keys=("reward/mean", "loss"),
            callbacks=self.callbacks,
        )
        self.iteration = 0
        self.outage_iterations, self.outage_reason = 0, ""  # iterations in a row a reward was down
        self.pending: _Batch | None = None  # overlap_update: the batch the next iteration updates on
        self._prefetcher: RowPrefetcher | None = None  # while `train` runs
        self._score_stream = torch.cuda.Stream(self.accelerator.device) if self._on_cuda else None

    # ------------------------------------------------------------------ the stage
    def _enable_context_parallel(self, evaluates: bool) -> None:
        """Split the policy's denoiser over all ranks (after LoRA, whose layers the split must wrap)."""
        if not hasattr(self.policy, "enable_context_parallel"):
            raise InputError(
                f"trainer.context_parallel: {type(self.policy).__name__} has no context parallelism "
                "(LTX-2 policies have): set it false"
            )
        if evaluates:
            raise NotImplementedError(
                "held-out evaluation splits rows over the ranks, which context parallelism makes "
                "share every forward: set trainer.eval_every: 0 with trainer.context_parallel"
            )
        self.policy.enable_context_parallel()

    def _require_one_step(self, option: str) -> None:
        """A rollout whose forwards are not the training forward's: PPO must make one optimizer step
        per rollout, so that its old log-prob is the update's own forward (the config checks the rest
        of on-policy)."""
        steps = len(self._accumulation_groups())
        if not self.nft and steps > 1:
            raise InputError(
                f"trainer.{option}: the update makes {steps} optimizer steps per rollout, so its old "
                "log-probs would be the rollout's: set per_device_train_batch_size null or raise "
                "gradient_accumulation_steps to cover every micro-batch"
            )

    def _fp8_layers(self) -> list[FP8RolloutLinear]:
        """``trainer.rollout_fp8``: the denoiser's block linears that roll out in FP8 (after LoRA, whose
        frozen bases they then are)."""
        if not self.args.rollout_fp8:
            return []
        self._require_one_step("rollout_fp8")
        return fp8_linears(self.policy.transformer)

    def _calibrating(self) -> contextlib.AbstractContextManager:
        """The rollout's FP8 scales calibrated by its first forward (`policies.fp8.FP8Scaling`)."""
        if self.fp8_layers or self.args.rollout_attention == "fa3_fp8":
            return self.fp8_scaling.calibrating(self.policy.transformer)
        return contextlib.nullcontext()

    def _rollout_attention(self) -> list:
        """``trainer.rollout_attention``: the denoiser's self-attention processors that roll out in
        FlashAttention-3 (installed before compiling)."""
        if not self.args.fast_attention:
            return []
        self._require_one_step("rollout_attention")
        check_rollout_attention(self.args.rollout_attention, self.policy.transformer, self.accelerator.device)
        return rollout_attention_processors(self.policy.transformer)

    @property
    def _on_cuda(self) -> bool:
        return self.accelerator.device.type == "cuda"

    def _compile(self) -> bool:
        """Apply ``trainer.compile`` (after LoRA, so the adapters are compiled in); whether it did.

        ``auto`` compiles where the policy runs on CUDA with a regional compile of its own
        (`policies.LTXPolicy.compile`) and neither FSDP nor context parallelism wraps the blocks;
        ``true`` insists, with a one-line error where it cannot (the CPU: inductor's C++ build takes
        minutes there and is not what a CPU run is for)."""
        args = self.args
        if args.compile is False:
            return False
        regional = getattr(type(self.policy), "compile", None) not in (None, torch.nn.Module.compile)
        problem = None
        if not self._on_cuda:
            problem = "the policy runs on the CPU, where compiling is slow and untested"
        elif not regional:
            problem = f"{type(self.policy).__name__} has no regional compile (LTX-family policies have)"
        elif args.fsdp or self.context_parallel:
            problem = "fsdp / context_parallel wrap the blocks it would compile (not supported together yet)"
        if problem is None:
            self.policy.compile()
            return True
        if args.compile == "auto":
            return False
        raise InputError(f"trainer.compile true: {problem}; set trainer.compile auto or false")

    def train(self) -> list[dict[str, Any]]:
        """Run iterations up to ``max_iterations`` (resuming if asked); returns the logged metrics.

        Meanwhile the next ``prefetch_iterations`` iterations' rows load in a background thread
        (`grpo.prefetch`), stopped when the run ends, is preempted or fails."""
        ahead = self.args.prefetch_iterations
        with RowPrefetcher(self._load_rows, ahead, self.args.max_iterations) as self._prefetcher:
            try:
                return self.engine.run()
            finally:
                self._prefetcher = None

    def train_step(self, iteration: int, started: float) -> dict[str, Any]:
        """One iteration: roll out, score, select, advantages, update; its metrics.

        With ``overlap_update`` the update is that of the pending batch (iteration - 1's), run while
        this iteration's batch is decoded and scored; this batch then waits, or is updated at once
        when a checkpoint or the end follows (`_drain`)."""
        self.iteration = iteration
        behaviour_step = self.state.optimizer_steps
        tick = time.perf_counter()
        rows = self._rows_for(iteration)  # prefetched (trainer.prefetch_iterations): the wait is logged
        rows_wait_s = time.perf_counter() - tick
        updates: list[dict[str, float]] = []
        clock = {"update_s": 0.0}
        meanwhile = (lambda: self._drain(updates, clock)) if self.args.overlap_update else None
        rollout, scores, timing = self._rollout_and_score(rows, iteration, meanwhile)
        metrics = self._track_outage(scores)
        trained, trained_scores, selection_stats = self._best_of_n(rollout, scores)
        advantages, reward_stats = self._advantages(trained_scores)
        self.pending = _Batch(iteration, trained, advantages, behaviour_step)
        save_follows = self.args.save_steps and (iteration + 1) % self.args.save_steps == 0
        if not self.args.overlap_update or save_follows or iteration == self.args.max_iterations - 1:
            self._drain(updates, clock)

        metrics.update(selection_stats)
        metrics.update(reward_stats)
        metrics.update(_mean_stats(updates))
        metrics["train/updated_batches"] = float(len(updates))
        metrics.update(timing)
        metrics["time/update_s"] = clock["update_s"]
        metrics["time/rows_wait_s"] = rows_wait_s
        elapsed = time.perf_counter() - started
        metrics["time/iteration_s"] = elapsed
        metrics["samples_per_s"] = rollout.num_samples * self.world_size / elapsed
        metrics["memory/peak_gb"] = _peak_memory_gb(self.accelerator.device)
        metrics["lr"] = self.state.learning_rate
        if self.args.sample_every and iteration % self.args.sample_every == 0:
            self._save_samples(rollout, scores, iteration)
        return metrics

    def eval_metrics(self, step: int) -> dict[str, Any]:
        self.iteration = step
        return self.evaluate()

    def checkpoint_state(self, step: int) -> dict[str, Any]:
        # a checkpoint holds every batch rolled out before it (overlap_update: a preemption or a
        # halt drains here; its update is not logged)
        self._drain([], {"update_s": 0.0})
        return {"iteration": step}

    def should_halt(self) -> bool:
        return self.outage_iterations >= self.args.max_reward_outage_iterations

    def halt_error(self, saved: Path) -> Exception:
        return RewardUnavailableError(
            f"a reward could not score for {self.outage_iterations} iterations in a row "
            f"({self.outage_reason}); saved {saved}: bring its server back and rerun with "
            "trainer.resume_from_checkpoint=auto (max_reward_outage_iterations sets the patience)"
        )

    # ------------------------------------------------------------------ data
    def _rows_for(self, iteration: int) -> list[dict[str, Any]]:
        """This rank's rows of ``iteration``: loaded ahead by the prefetcher while `train` runs, else now."""
        if self._prefetcher is not None:
            return self._prefetcher.get(iteration)
        return self._load_rows(iteration)

    def _load_rows(self, iteration: int) -> list[dict[str, Any]]:
        """This rank's rows of ``iteration`` (`grpo.engine.RowSampler`, sliced per rank), read now."""
        first = iteration * self.args.num_prompts_per_iteration + self.rank * self.local_prompts
        return [self.train_dataset[i] for i in self.rows.indices(first, self.local_prompts)]

    # ------------------------------------------------------------------ rollout and reward
    def _sampling(self, sde_steps: list[int]) -> SamplingConfig:
        args = self.args
        steps = [s for s in sde_steps if not (args.sde_kind == "cps" and s == args.num_inference_steps - 1)]
        # the ODE sampler's geometry, schedule and CFG, with this iteration's stochastic steps
        ode = ode_sampling(args, args.num_inference_steps)
        return replace(ode, kind=args.sde_kind, noise_level=args.noise_level, sde_steps=steps)

    def _rollout_and_score(
        self, rows: list[dict[str, Any]], iteration: int, meanwhile: Callable[[], None] | None = None
    ) -> tuple[Rollout, CompositeOutput, dict[str, float]]:
        """Roll out G videos per row, ``rollout_batch_size`` samples per call (whole groups of several
        rows, or equal parts of one row's group), scoring each group or part in a thread meanwhile,
        then run ``meanwhile`` (the previous batch's update) before waiting for the last scores.
        Every sample keeps its seed and its place, so the chunking changes no sample's draws.

        ``time/reward_hidden_frac`` is the share of the scorer's decode + reward time the main thread
        did not wait for (it rolled out or updated meanwhile)."""
        generations = self.args.num_generations
        part_size = min(self.args.rollout_batch_size or generations, generations)
        # DiffusionNFT samples with the ODE (no step is recorded) and its sampling policy's weights
        if self.nft:
            sampling = ode_sampling(self.args, self.args.num_inference_steps)
        else:
            sampling = self._sampling(self.args.sde_steps(iteration))
        sampler = self.state.sampler.swapped_in() if self.nft else contextlib.nullcontext()
        first = self.rank * self.local_prompts * generations
        seeds = [derived_seed(self.args.seed, iteration, first + s) for s in range(len(rows) * generations)]
        parts: list[Rollout] = []
        futures: list[Future] = []
        clock = {"rollout_s": 0.0}
        calls = rollout_groups(  # a context is encoded once per iteration
            self.policy,
            rows,
            sampling,
            seeds,
            num_generations=generations,
            part_size=part_size,
            rows_per_call=self.args.rollout_rows_per_call,
            autocast=self.state.autocast,
            timing=clock,
            options={"branch": True} if self.args.nextclip_groups == "branch" else None,
        )
        with ThreadPoolExecutor(max_workers=1) as scorer:
            with (
                self.state.rollout_weights(),
                sampler,
                fp8_forwards(self.fp8_layers, self.fp8_scaling),
                rollout_attention(self.attention_processors, self.args.rollout_attention, self.fp8_scaling),
                self._calibrating(),
            ):
                for part, groups in calls:
                    parts.append(part)
                    if self._score_stream is not None:  # the scorer's stream starts after the rollout
                        self._score_stream.wait_stream(torch.cuda.current_stream(self.accelerator.device))
                    for _, row, own in groups:
                        futures.append(scorer.submit(self._score_group, own, row))
            if meanwhile is not None:
                meanwhile()
            tick = time.perf_counter()
            groups = [f.result() for f in futures]
            wait_s = time.perf_counter() - tick
        scores = CompositeOutput(
            columns={name: sum((g.columns[name] for g in groups), []) for name in self.reward.names},
            weights=dict(self.reward.weights),
            metadata={key: sum((g.metadata[key] for g in groups), []) for key in groups[0].metadata},
            unavailable={name: why for g in groups for name, why in g.unavailable.items()},
        )
        reward_s = sum(g.timings["total"] + g.timings["decode"] for g in groups)
        timing = {
            "time/rollout_s": clock["rollout_s"],
            "time/reward_s": reward_s,
            "time/reward_wait_s": wait_s,
            # clamped: the wait also holds the handover, so with nothing hidden it ends ~1e-4 over
            "time/reward_hidden_frac": max(0.0, 1.0 - wait_s / reward_s) if reward_s > 0 else 1.0,
        }
        return Rollout.cat(parts), scores, timing

    def _track_outage(self, scores: CompositeOutput) -> dict[str, float]:
        """Count the iterations in a row in which a reward could not score (its server was down: its
        scores are None, so those samples carry no advantage from it); the loop stops at the limit."""
        if scores.unavailable:
            self.outage_iterations += 1
            self.outage_reason = "; ".join(f"{name}: {why}" for name, why in scores.unavailable.items())
        else:
            self.outage_iterations = 0
        return {"reward/unavailable": float(len(scores.unavailable))}

    def _score_group(self, rollout: Rollout, row: dict[str, Any]) -> CompositeOutput:
        """Decode and score one group. A next-clip rollout (``num_clips`` > 0) also gets every
        reward's per-clip scores, ``metadata["clip_rewards/<name>"]`` (a list per video): the reward's
        own ``clip_scores`` column if it has one (history -> clip consistency), else its video score
        repeated for every clip. A branched rollout (``nextclip_groups: branch``) needs every reward's
        own clip scores: its samples' clips continue the group's shared history, not one another, so
        they are scored clip by clip, never as one video."""
        tick = time.perf_counter()
        # on CUDA its own stream, so its kernels can run beside the update's (overlap_update)
        on_stream = self._score_stream is not None
        with torch.cuda.stream(self._score_stream) if on_stream else contextlib.nullcontext():
            with torch.no_grad():
                videos = self.policy.decode(
                    rollout.final_latents, rollout.latent_shape, self.args.decode_batch_size
                ).cpu()
                metadata = reward_metadata(self.policy, rollout, row)
            decode_s = time.perf_counter() - tick
            out = score_videos(self.reward, videos, row, metadata)
        n = rollout.num_samples
        out.timings["decode"] = decode_s
        out.metadata["videos"] = list(videos)
        num_clips = rollout.num_clips
        if num_clips:
            for name in self.reward.names:
                own = out.metadata.get(f"{name}/clip_scores")
                if own is None and self.args.nextclip_groups == "branch":
                    raise InputError(
                        f"reward {name!r} gives no per-clip scores, which nextclip_groups 'branch' needs "
                        "(its videos are clips of different histories): use per-clip rewards (e.g. "
                        "toyworld_verifiable with per_clip: true) or nextclip_groups video"
                    )
                if own is None:
                    own = [None] * n
                if any(c is not None and len(c) != num_clips for c in own):
                    lengths = sorted({len(c) for c in own if c is not None})
                    raise InputError(
                        f"reward {name!r} returned clip_scores of lengths {lengths} for {num_clips} "
                        "generated clips: score every generated clip (per_clip clip_frames)"
                    )
                out.metadata[f"clip_rewards/{name}"] = [
                    list(c) if c is not None else [s] * num_clips
                    for c, s in zip(own, out.columns[name], strict=True)
                ]
        return out

    def _best_of_n(
        self, rollout: Rollout, scores: CompositeOutput
    ) -> tuple[Rollout, CompositeOutput, dict[str, float]]:
        """The samples this rank trains on, their scores, and selection statistics.

        Without ``best_of_n_keep`` every sample. With ``[k_top, k_bottom]`` each group keeps its
        ``k_top`` best and ``k_bottom`` worst samples (`grpo.advantages.best_of_n_indices`), ranked by
        the weighted sum of their raw rewards (a next-clip video's own score, not its clips'). Every
        rank holds whole groups, so the selection is local; the rewards of all ranks are gathered
        only for ``best_of_n/reward_mean_all`` (over every generated sample) and
        ``best_of_n/reward_mean_kept`` (over the kept ones).
        """
        if self.args.best_of_n_keep is None:
            return rollout, scores, {}
        keep_top, keep_bottom = self.args.best_of_n_keep
        local = rewards_to_tensor(scores.weighted_sum())
        kept = best_of_n_indices(local, self.args.num_generations, keep_top, keep_bottom)
        flags = torch.zeros_like(local, dtype=torch.bool)
        flags[kept] = True
        both = torch.stack([local, flags.double()]).to(self.accelerator.device)
        if self.world_size > 1:
            both = self.accelerator.gather(both.T.contiguous()).T
        everything, everywhere_kept = both[0].cpu(), both[1].cpu().bool()
        stats = {
            "best_of_n/reward_mean_all": float(everything.nanmean()),
            "best_of_n/reward_mean_kept": float(everything[everywhere_kept].nanmean()),
        }
        return rollout.select(kept), scores.select(kept.tolist()), stats

    def _advantages(self, scores: CompositeOutput) -> tuple[torch.Tensor, dict[str, float]]:
        """Advantages of this rank's (kept) samples, normalised over the groups of every rank: ``[B]``,
        or ``[B, num_clips]`` (each clip index normalised within its group) when `_score_group` gave
        per-clip rewards."""
        clip_keys = [f"clip_rewards/{name}" for name in self.reward.names]
        if all(key in scores.metadata for key in clip_keys):
            local = rewards_to_tensor([scores.metadata[key] for key in clip_keys]).float()  # [R, B, C]
        else:
            local = scores.to_tensor().T.contiguous()  # [R, B_local]
        local = local.to(self.accelerator.device)
        if self.world_size > 1:  # gather concatenates dim 0: put the samples there
            everything = self.accelerator.gather(local.movedim(1, 0).contiguous()).movedim(0, 1)
        else:
            everything = local
        generations = self.args.trained_group_size
        group_ids = torch.arange(everything.shape[1] // generations).repeat_interleave(generations)
        advantages, stats = compute_advantages(
            everything.cpu(),
            group_ids,
            reward_weights=[scores.weights[n] for n in self.reward.names],
            scale_rewards=self.args.scale_rewards,
            aggregation=self.args.reward_aggregation,
            adv_clip=self.args.adv_clip,
            reward_names=self.reward.names,
        )
        if everything.dim() == 3:
            for r, name in enumerate(self.reward.names):
                for c in range(everything.shape[2]):
                    stats[f"reward/{name}/clip{c}/mean"] = float(everything[r, :, c].nanmean())
        b = local.shape[1]
        return advantages[self.rank * b : (self.rank + 1) * b].to(self.accelerator.device), stats

    # ------------------------------------------------------------------ update
    def _accumulation_groups(self, num_samples: int | None = None) -> list[int]:
        """Micro-batches per optimizer step, e.g. [2, 2, 1] for 5 micro-batches accumulated by 2."""
        num_samples = num_samples or self.local_prompts * self.args.trained_group_size
        size = self.args.per_device_train_batch_size or num_samples
        micro = math.ceil(num_samples / size)
        accum = self.args.gradient_accumulation_steps
        return [min(accum, micro - i) for i in range(0, micro, accum)]

    def _trained_positions(self, rollout: Rollout, iteration: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Where in the rollout's record each sample trains: ``positions [B, W]`` (padded with 0),
        ``mask [B, W]`` (True where a position is trained) and ``W``, the most records a sample can
        train this iteration (``dr_grpo``'s constant).

        A schedule step recorded once per clip (next-clip rollouts) is trained at every clip; positions
        are in record order (clip after clip), so a column holds the same clip for every sample. A
        drawn step the rollout did not record stochastically (the last step with 'cps') is not
        trained, so samples may train different numbers of steps: the mask says which.
        """
        positions: dict[int, list[int]] = defaultdict(list)
        for j, s in enumerate(rollout.step_indices.tolist()):
            positions[int(s)].append(j)
        rng = random.Random(derived_seed(self.args.seed, iteration, 1))
        rows = []
        for _ in range(rollout.num_samples):
            trained = self.args.trained_steps(iteration, rng)
            rows.append(sorted(j for s in trained for j in positions.get(s, [])))
        # the most a sample can train: as many recorded steps as it draws (a config constant, so
        # every rank has the same width and runs the same forwards), each once per clip
        per_step = max(len(v) for v in positions.values())
        max_steps = min(len(trained), len(positions)) * per_step
        device = rollout.latents.device
        padded = torch.tensor(
            [row + [0] * (max_steps - len(row)) for row in rows], dtype=torch.long, device=device
        )
        mask = torch.tensor([[k < len(row) for k in range(max_steps)] for row in rows], device=device)
        return padded, mask, max_steps

    def _drain(self, updates: list[dict[str, float]], clock: dict[str, float]) -> None:
        """Update on the pending batch, if any (appending its statistics to ``updates`` and its time
        to ``clock["update_s"]``); off-policy when an optimizer step came after its rollout."""
        batch, self.pending = self.pending, None
        if batch is None:
            return
        tick = time.perf_counter()
        stale = self.state.optimizer_steps != batch.behaviour_step
        update = self._nft_update if self.nft else self._update
        updates.append(update(batch.rollout, batch.advantages, batch.iteration, stale=stale))
        clock["update_s"] += time.perf_counter() - tick

    def _update(
        self, rollout: Rollout, advantages: torch.Tensor, iteration: int, stale: bool = False
    ) -> dict[str, float]:
        """``num_iterations`` epochs of PPO over the rollout: micro-batches x trained steps, accumulated.

        ``stale``: the weights moved since the rollout (``overlap_update``), so the rollout's recorded
        log-probs are the old policy's from the first step on.

        Each micro-batch's loss is the ``loss_type`` average of its (sample, trained step) entries
        (`grpo.loss.loss_weights`), computed ``steps_per_forward`` trained steps of every sample per
        forward; an optimizer step averages the losses of the micro-batches it accumulates (as TRL does).
        """
        args = self.args
        positions, mask, max_steps = self._trained_positions(rollout, iteration)
        num_steps = positions.shape[1]
        advantages = advantages.to(positions.device)
        if advantages.dim() == 2:  # per-clip advantages [B, num_clips]: a step takes its clip's
            step_clips = torch.tensor(rollout.step_clips, dtype=torch.long, device=positions.device)
            advantages = advantages.gather(1, step_clips[positions])
        else:
            advantages = advantages[:, None].expand(-1, num_steps)
        size = args.per_device_train_batch_size or rollout.num_samples
        per_forward = args.steps_per_forward or num_steps
        # the KL reference's means depend on the rollout alone: with several epochs, computed in the first
        reference_means: dict[tuple[int, int], torch.Tensor] | None = (
            {} if args.beta > 0 and args.num_iterations > 1 else None
        )
        stats: dict[str, list[float]] = defaultdict(list)
        for epoch in range(args.num_iterations):
            order = torch.randperm(
                rollout.num_samples,
                generator=torch.Generator().manual_seed(derived_seed(args.seed, iteration, 2, epoch)),
            ).to(rollout.latents.device)
            groups = self._split(list(order.split(size)))
            # one optimizer step per rollout, and the rollout's guidance: every loss sees the sampler
            same_guidance = args.cfg_in_training or args.guidance_scale <= 1
            on_policy = not stale and args.num_iterations == 1 and len(groups) == 1 and same_guidance
            for group in groups:
                for m, idx in enumerate(group):
                    sub, adv, pos, trains = rollout.select(idx), advantages[idx], positions[idx], mask[idx]
                    weights = loss_weights(trains, args.loss_type, max_steps) / len(group)
                    # every column on every sample, trained or not (weight 0): every rank runs the same
                    # forwards, as DDP's gradient sync and FSDP's collective forwards need
                    for k in range(0, num_steps, per_forward):
                        cols = slice(k, k + per_forward)
                        with (
                            self.state.no_sync(m == len(group) - 1 and k + per_forward >= num_steps),
                            self.state.autocast,
                        ):
                            loss, step_stats = self._step_loss(
                                sub,
                                adv[:, cols],
                                pos[:, cols],
                                on_policy=on_policy,
                                weights=weights[:, cols],
                                mask=trains[:, cols],
                                samples=idx,
                                reference_means=reference_means,
                            )
                            # context parallel ranks hold shares of one gradient: DDP averages
                            # them, so the loss counts once per rank to make that their sum
                            self.accelerator.backward(
                                loss * (self.accelerator.num_processes / self.world_size)
                            )
                        if trains[:, cols].any():  # statistics of no trained entry are undefined
                            for key, value in step_stats.items():
                                stats[key].append(float(value))
                stats["grad_norm"].append(self.engine.optimizer_step())
        out = {f"train/{k}": sum(v) / len(v) for k, v in stats.items()}
        out["train/ratio_first_step"] = stats["ratio_mean"][0]  # before any step: 1 unless stale
        out["train/trained_steps_per_sample"] = float(mask.sum(1).float().mean())
        return out

    def _step_loss(
        self,
        sub: Rollout,
        advantages: torch.Tensor,
        steps: torch.Tensor,
        on_policy: bool = False,
        weights: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        samples: torch.Tensor | None = None,
        reference_means: dict[tuple[int, int], torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Clipped surrogate + KL of recorded steps ``steps [b, n]`` (n trained steps of every sample,
        in one forward of ``n * b`` entries) under current weights.

        ``weights [b, n]``: each entry's weight in the micro-batch's ``loss_type`` average (`_update`);
        None averages this call's entries. ``mask [b, n]``: which entries train (None: all).
        ``samples [b]`` (the rollout's indices of ``sub``'s samples) and ``reference_means``: the KL
        reference's mean per (sample, record position), filled by the first epoch and read by the
        others (see `_reference_mean`); None computes it in every call.

        ``on_policy`` (the weights are still the rollout's): the old log-prob is this forward's own,
        detached, as in TRL with one update per generation. The log-prob recorded during the rollout
        differs from it only by numerics (compiled or fused kernels, bf16: ~1e-4), which the PPO clip
        (epsilon 1e-4) would read as a policy change; ``logprob_drift`` reports that difference.
        """
        args = self.args
        guidance = None if args.cfg_in_training else 1.0
        b, n = steps.shape
        # step-major: every sample at its first trained step, then every sample at its second, ...
        entries = sub if n == 1 else sub.select(torch.arange(b, device=steps.device).repeat(n))
        flat = steps.T.reshape(-1)

        def per_entry(values: torch.Tensor) -> torch.Tensor:  # [n * b] -> [b, n]
            return values.view(n, b).T

        out = self.policy.log_prob(entries, flat, guidance_scale=guidance)
        log_prob = per_entry(out.log_prob)
        kl = None
        if args.beta > 0:
            keys = None
            if reference_means is not None and samples is not None:
                keys = list(zip(samples.repeat(n).tolist(), flat.tolist(), strict=True))
            ref_mean = self._reference_mean(entries, flat, guidance, keys, reference_means)
            kl = per_entry(kl_divergence(out.mean, ref_mean, out.std, args.logprob_reduction))
        recorded = sub.log_probs.gather(1, steps)
        old = log_prob.detach() if on_policy else recorded
        loss, stats = grpo_loss(
            log_prob,
            old,
            advantages,
            epsilon=args.epsilon,
            epsilon_high=args.epsilon_high,
            beta=args.beta,
            kl=kl,
            loss_type=args.loss_type,
            mask=mask,
            weights=weights,
        )
        stats["logprob_drift"] = (log_prob.detach() - recorded).abs().max()
        return loss, stats

    def _nft_update(
        self, rollout: Rollout, advantages: torch.Tensor, iteration: int, stale: bool = False
    ) -> dict[str, float]:
        """DiffusionNFT (Zheng et al. 2025, arXiv 2509.16117) on the rollout's clean samples.

        A sample's advantage becomes its optimality ``r = (1 + clip(A, -1, 1)) / 2``. Each sample is
        forward-noised ``nft_noise_draws`` times (level ``s`` uniform in ``[nft_sigma_min, 1)``, noise
        ``eps``; drawn from its own seed, so neither micro-batching nor the world size changes a draw)
        and `_nft_loss` regresses the velocity there; ``num_iterations`` epochs of micro-batches,
        accumulated as in `_update`. Then the sampling policy takes its soft update. No log-prob is
        used, so ``stale`` (``overlap_update``) changes nothing: the sampling policy is the anchor.
        """
        del stale
        args = self.args
        device = rollout.final_latents.device
        optimalities = optimality(advantages.to(device))
        size = args.per_device_train_batch_size or rollout.num_samples
        stats: dict[str, list[float]] = defaultdict(list)
        for epoch in range(args.num_iterations):
            order = torch.randperm(
                rollout.num_samples,
                generator=torch.Generator().manual_seed(derived_seed(args.seed, iteration, 2, epoch)),
            ).to(device)
            for group in self._split(list(order.split(size))):
                for m, idx in enumerate(group):
                    entries = idx.repeat(args.nft_noise_draws)  # draw after draw of the same samples
                    sub = rollout.select(entries)
                    sigmas, noise = self._nft_draws(sub, iteration, epoch, len(idx))
                    with self.state.no_sync(m == len(group) - 1), self.state.autocast:
                        loss, step_stats = self._nft_loss(sub, optimalities[entries], sigmas, noise)
                        self.accelerator.backward(
                            loss / len(group) * (self.accelerator.num_processes / self.world_size)
                        )
                    for key, value in step_stats.items():
                        stats[key].append(float(value))
                stats["grad_norm"].append(self.engine.optimizer_step())
        self.state.sampler.update()
        return {f"train/{k}": sum(v) / len(v) for k, v in stats.items()}

    def _nft_draws(
        self, sub: Rollout, iteration: int, epoch: int, per_draw: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Noise levels ``[b]`` (a next-clip rollout's: ``[b, K]``, one per clip) and noise ``[b, S, C]``
        of ``sub``'s entries (the kept samples, repeated ``nft_noise_draws`` times, ``per_draw``
        samples a copy), each from its sample's seed."""
        args = self.args
        sigmas, noise = [], []
        shape, dtype = sub.final_latents.shape[1:], sub.final_latents.dtype
        levels_shape = (sub.num_clips,) if sub.num_clips else ()
        for j, sample_seed in enumerate(sub.seeds.tolist()):
            generator = torch.Generator().manual_seed(
                derived_seed(args.seed, iteration, 3, sample_seed, epoch, j // per_draw)
            )
            sigmas.append(torch.rand(levels_shape, generator=generator))
            noise.append(torch.randn(shape, generator=generator, dtype=dtype))
        device = sub.final_latents.device
        levels = args.nft_sigma_min + (1 - args.nft_sigma_min) * torch.stack(sigmas)
        return levels.to(device), torch.stack(noise).to(device)

    def _nft_loss(
        self, sub: Rollout, optimalities: torch.Tensor, sigmas: torch.Tensor, noise: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`grpo.nft.nft_loss` of ``sub``'s entries (optimalities ``[b]``, or ``[b, K]`` per clip of a
        next-clip rollout, each clip's tokens then taking its clip's), averaged, with the sampling
        policy's velocity at the same points (weights swapped in)."""
        with torch.no_grad(), self.state.sampler.swapped_in():
            old = self.policy.nft_velocity(sub, sigmas, noise)
        new = self.policy.nft_velocity(sub, sigmas, noise)
        target = noise - sub.final_latents
        if optimalities.dim() == 2:  # per clip -> per token
            optimalities = optimalities.repeat_interleave(target.shape[1] // optimalities.shape[1], dim=1)
        loss = nft_loss(new, old, target, optimalities, self.args.nft_beta, sub.generated_mask).mean()
        return loss, {"loss": loss.detach(), "velocity_shift": (new - old).detach().pow(2).mean()}

    def _reference_mean(
        self,
        entries: Rollout,
        steps: torch.Tensor,
        guidance: float | None,
        keys: list[tuple[int, int]] | None,
        cache: dict[tuple[int, int], torch.Tensor] | None,
    ) -> torch.Tensor:
        """The reference policy's step mean at record positions ``steps`` of ``entries``.

        It depends only on the rollout (the reference's weights never train), so with ``keys`` (one
        ``(sample, record position)`` per entry) and a ``cache`` it is computed once per iteration:
        the first PPO epoch stores each entry's mean, later epochs read them back (the same tensors
        the first computed) instead of running the reference forward again.
        """
        if keys is not None and cache is not None and all(key in cache for key in keys):
            return torch.stack([cache[key] for key in keys])
        with torch.no_grad(), self.policy.reference():
            mean = self.policy.log_prob(entries, steps, guidance_scale=guidance).mean
        if keys is not None and cache is not None:
            cache.update(zip(keys, mean, strict=True))
        return mean

    def _split(self, micro_batches: list[torch.Tensor]) -> list[list[torch.Tensor]]:
        sizes = self._accumulation_groups(sum(len(m) for m in micro_batches))
        groups, start = [], 0
        for n in sizes:
            groups.append(micro_batches[start : start + n])
            start += n
        return groups

    # ------------------------------------------------------------------ evaluation and samples
    def evaluate(self, dataset: Sequence[dict[str, Any]] | None = None) -> dict[str, float]:
        """Mean reward of deterministic (ODE) rollouts on the evaluation rows, G per row.

        With EMA on, the EMA weights are evaluated: they are what ``final`` holds.

        The main process also writes every sample's rewards and the first ``save_eval_videos`` rows'
        videos to ``output_dir/eval/step_<iteration>/`` (`grpo.evaluation`): the run report compares
        the first and the last of these.
        """
        dataset = self.eval_dataset if dataset is None else dataset
        ema = self.state.ema
        with ema.swapped_in() if ema is not None else contextlib.nullcontext():
            evaluation = evaluate(
                self.policy,
                self.reward,
                dataset,
                eval_sampling(self.args),
                num_generations=self.args.num_generations,
                seed=self.args.seed,
                num_videos=self.args.save_eval_videos,
                accelerator=self.accelerator,
                autocast=self.state.autocast,
                rows_per_call=self.args.rollout_rows_per_call,
                decode_batch_size=self.args.decode_batch_size,
            )
        if self.accelerator.is_main_process:
            folder = self.output_dir / EVAL_DIR / f"step_{self.iteration:06d}"
            write_evaluation(folder, evaluation, dataset, self.args.frame_rate, step=self.iteration)
        return evaluation.results.metrics()

    def _save_samples(self, rollout: Rollout, scores: CompositeOutput, iteration: int) -> None:
        if not self.accelerator.is_main_process or not self.args.save_samples:
            return
        folder = self.output_dir / "samples" / f"iter_{iteration:06d}"
        for b, video in enumerate(scores.metadata["videos"][: self.args.save_samples]):
            reward = sum((scores.weights[n] * (scores.columns[n][b] or 0.0)) for n in scores.columns)
            write_video(folder / f"sample{b:02d}_reward{reward:+.3f}.mp4", video, self.args.frame_rate)


def _mean_stats(updates: list[dict[str, float]]) -> dict[str, float]:
    """Key-wise mean of the statistics of the updates an iteration ran (none, one, or two when
    ``overlap_update`` drains)."""
    return {key: sum(u[key] for u in updates) / len(updates) for key in updates[0]} if updates else {}


def _peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
