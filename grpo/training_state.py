"""What every trainer shares: the trainable weights, optimizer, LR schedule, EMA, and their checkpoints."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from grpo.checkpoint import SAMPLER_FILE, check_checkpoint, load_checkpoint, resolve_resume, save_checkpoint
from grpo.config import TrainerConfig, VideoTrainerConfig, write_trained_frame_rate
from grpo.ema import EMA, full_tensor
from policies.errors import InputError
from policies.protocol import Trainable
from policies.seeding import seed_process, use_deterministic_algorithms


class TrainingState:
    """Optimises the policy's trainable transformer weights (LoRA or full) with AdamW.

    Data parallelism: with several processes the transformer is wrapped by accelerate (DDP) and
    the policy's training forwards go through the wrapper; with ``fsdp: true`` it is instead
    sharded in place with FSDP2 (``fully_shard`` on each repeated block, then the root), so each
    rank holds 1/N of the fp32 weights, gradients and optimizer state, and computes with the weights
    cast to ``fsdp_param_dtype`` (bf16 halves every all-gather; gradients are reduced in fp32).
    With LoRA the frozen base is sharded in its own dtype (a bf16 base stays bf16) and the adapters
    are fp32 master weights under the same policy; only the adapters are gathered to save them.
    ``fsdp: true`` shards on one process too (a one-rank group), so a recipe computes the same way
    at every world size and its checkpoints resume at any other. Counts optimizer steps; saves
    and restores everything a run needs to continue exactly (gathering full tensors under FSDP).
    """

    def __init__(self, policy: Trainable, args: TrainerConfig, accelerator: Any, total_steps: int) -> None:
        from transformers import get_scheduler

        self.policy = policy
        self.args = args
        self.accelerator = accelerator
        # dropout and any draw without its own generator: from the recipe's seed, per rank
        seed_process(args.seed, accelerator.process_index)
        if args.full_determinism:
            use_deterministic_algorithms()
        if args.gradient_checkpointing:
            policy.transformer.enable_gradient_checkpointing()
        self.fsdp = args.fsdp
        if self.fsdp:
            if args.use_lora:  # fp32 master weights for the adapters only; the frozen base keeps its dtype
                for param in policy.transformer.parameters():
                    if param.requires_grad:
                        param.data = param.data.float()
            _init_single_process_group(accelerator.device)
            _fully_shard(policy.transformer, _DTYPES[args.fsdp_param_dtype])
        self.trainable = {n: p for n, p in policy.transformer.named_parameters() if p.requires_grad}
        # weights outside the transformer (e.g. the NSP queries and connector): replicated on every
        # rank, their gradients averaged by hand before each optimizer step
        self.extra = dict(policy.extra_trainable_parameters())
        self.trainable.update(self.extra)
        if self.fsdp and self.extra:
            raise NotImplementedError(
                "FSDP2 with trainable weights outside the transformer (e.g. the NSP connector) is not "
                "supported yet: train this policy with DDP (trainer.fsdp: false), with or without LoRA"
            )
        if not self.trainable:
            raise InputError("the policy has no trainable parameters (frozen transformer and no LoRA)")
        optimizer = torch.optim.AdamW(
            self.trainable.values(),
            lr=args.learning_rate,
            betas=(args.adam_beta1, args.adam_beta2),
            eps=args.adam_epsilon,
            weight_decay=args.weight_decay,
        )
        if self.fsdp:  # sharded in place: forwards already go through the FSDP module
            self.wrapped, self.optimizer = policy.transformer, optimizer
        else:
            self.wrapped, self.optimizer = accelerator.prepare(policy.transformer, optimizer)
            if accelerator.num_processes > 1:
                policy.wrap_transformer(self.wrapped)
        self.lr_scheduler = get_scheduler(
            args.lr_scheduler_type,
            self.optimizer,
            num_warmup_steps=args.warmup_steps,
            num_training_steps=total_steps,
        )
        self.ema = EMA(self.trainable, args.ema_decay) if args.ema_decay > 0 else None
        # DiffusionNFT's sampling policy (`grpo.trainer`, algorithm nft): set by the trainer that uses
        # one, saved and resumed with the rest
        self.sampler: EMA | None = None
        self.autocast = torch.autocast(
            accelerator.device.type, dtype=torch.bfloat16, enabled=args.mixed_precision == "bf16"
        )
        self.optimizer_steps = 0

    def no_sync(self, sync: bool):
        """Skip the gradient all-reduce of a backward that is not the last before an optimizer step."""
        if sync or self.accelerator.num_processes == 1:
            return contextlib.nullcontext()
        if self.fsdp:
            return _fsdp_no_sync(self.wrapped)
        return self.accelerator.no_sync(self.wrapped)

    @contextlib.contextmanager
    def rollout_weights(self) -> Iterator[None]:
        """Keep the transformer's weights gathered across the forwards of a rollout (FSDP2).

        Training reshards each block after its forward (the backward gathers it again); a rollout
        runs no backward, so resharding would only repeat the same all-gathers every denoising step.
        Inside this context each block is gathered once, at its first forward; all are resharded at
        the end. The gathered weights are the ones training computes with: log-probs are unchanged.
        """
        if not self.fsdp:
            yield
            return
        from torch.distributed.fsdp import FSDPModule

        modules = [m for m in self.wrapped.modules() if isinstance(m, FSDPModule)]
        self.wrapped.set_reshard_after_forward(False)
        try:
            yield
        finally:
            self.wrapped.set_reshard_after_forward(True)
            for module in modules:
                module.reshard()

    def optimizer_step(self) -> float:
        """Clip, step, schedule, update the EMA; returns the gradient norm before clipping."""
        self._average_extra_gradients()
        params = [p for p in self.trainable.values() if p.grad is not None]
        if self.args.max_grad_norm and not self.fsdp:
            norm = float(self.accelerator.clip_grad_norm_(params, self.args.max_grad_norm))
        else:  # torch's clip handles FSDP2 shards (the norm is reduced over ranks)
            limit = self.args.max_grad_norm or float("inf")
            norm = float(full_tensor(torch.nn.utils.clip_grad_norm_(params, limit)))
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update()
        self.optimizer_steps += 1
        return norm

    def _average_extra_gradients(self) -> None:
        if self.accelerator.num_processes == 1:
            return
        for param in self.extra.values():
            if param.grad is not None:  # the same parameters get gradients on every rank
                torch.distributed.all_reduce(param.grad)
                param.grad /= self.accelerator.num_processes

    @property
    def learning_rate(self) -> float:
        return self.lr_scheduler.get_last_lr()[0]

    def save(self, step: int, trainer_state: dict[str, Any]) -> Path:
        """Atomic checkpoint at ``step`` (an iteration for GRPO, an optimizer step for SFT)."""
        model_state, optimizer_state = self._full_states()
        return save_checkpoint(
            self.args.output_dir,
            step,
            model_state=model_state,
            optimizer_state=optimizer_state,
            scheduler_state=self.lr_scheduler.state_dict(),
            ema_state=self.ema.state_dict() if self.ema is not None else None,
            sampler_state=self.sampler.state_dict() if self.sampler is not None else None,
            data_state={"step": step},
            trainer_state={**trainer_state, "step": step, "optimizer_steps": self.optimizer_steps},
            rank=self.accelerator.process_index,
            world_size=self.accelerator.num_processes,
            barrier=self.accelerator.wait_for_everyone,
            save_total_limit=self.args.save_total_limit,
        )

    def resume(self) -> int:
        """Restore from ``resume_from_checkpoint`` (``auto``: the newest complete one); returns its step.

        A checkpoint written by another number of processes resumes too (full tensors are saved and
        every draw of an iteration comes from the recipe's seed); only the ranks' own RNG states, used
        by draws without a generator of their own (dropout), are then left as seeded."""
        path = resolve_resume(self.args.resume_from_checkpoint, self.args.output_dir)
        if path is None:
            return 0
        same_world = check_checkpoint(path)["world_size"] == self.accelerator.num_processes
        ckpt = load_checkpoint(path, rank=self.accelerator.process_index, restore_rng=same_world)
        if set(ckpt.model_state) != set(self.trainable):
            example = sorted(set(self.trainable) ^ set(ckpt.model_state))[:3]
            raise InputError(
                f"checkpoint {path} does not match the trainable parameters (e.g. {example}): "
                "resume with the same policy, LoRA and fine-tuning settings"
            )
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_model_state_dict,
                set_optimizer_state_dict,
            )

            options = StateDictOptions(full_state_dict=True, strict=False)
            sharded = {k: v for k, v in ckpt.model_state.items() if k not in self.extra}
            set_model_state_dict(self.wrapped, sharded, options=options)
            set_optimizer_state_dict(self.wrapped, self.optimizer, ckpt.optimizer_state, options=options)
            with torch.no_grad():
                for name, param in self.extra.items():
                    param.copy_(ckpt.model_state[name])
        else:
            with torch.no_grad():
                for name, param in self.trainable.items():
                    param.copy_(ckpt.model_state[name])
            self.optimizer.load_state_dict(ckpt.optimizer_state)
        self.lr_scheduler.load_state_dict(ckpt.scheduler_state)
        if self.ema is not None and ckpt.ema_state is not None:
            self.ema.load_state_dict(ckpt.ema_state)
        if self.sampler is not None:
            if ckpt.sampler_state is None:
                raise InputError(
                    f"checkpoint {path} has no {SAMPLER_FILE} (DiffusionNFT's sampling policy): it was "
                    "not written by an algorithm nft run; resume with the algorithm it was trained with"
                )
            self.sampler.load_state_dict(ckpt.sampler_state)
        self.optimizer_steps = int(ckpt.trainer_state["optimizer_steps"])
        return int(ckpt.trainer_state["step"])

    def save_final(self) -> Path:
        """Save the trained policy (EMA weights if EMA is on) to ``output_dir/final``, with the frame rate
        a video policy was trained at."""
        path = Path(self.args.output_dir) / "final"
        with self.ema.swapped_in() if self.ema is not None else contextlib.nullcontext():
            gathered = None
            if self.fsdp:  # every rank takes part in the gather; rank 0 receives the full weights
                from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

                options = StateDictOptions(full_state_dict=True, cpu_offload=True)
                gathered = get_model_state_dict(self.wrapped, options=options)
                if self.args.use_lora:  # the base, under its own names; the adapters are saved apart
                    base = {k: v for k, v in gathered.items() if "lora_" not in k}
                    gathered = {k.replace(".base_layer", ""): v for k, v in base.items()}
            with self._full_lora_weights():
                if self.accelerator.is_main_process:
                    self.policy.save_pretrained(path, transformer_state_dict=gathered)
                    if isinstance(self.args, VideoTrainerConfig):
                        write_trained_frame_rate(path, self.args.frame_rate)
        self.accelerator.wait_for_everyone()
        return path

    @contextlib.contextmanager
    def _full_lora_weights(self) -> Iterator[None]:
        """Under FSDP2 with LoRA: the transformer's ``state_dict()`` gives the adapters' full tensors
        instead of their shards, so that peft's adapter export (which reads it) writes whole weights.
        Every rank gathers on entry; the base stays sharded."""
        if not (self.fsdp and self.args.use_lora):
            yield
            return
        full = {name: full_tensor(param).detach() for name, param in self.trainable.items()}

        def gathered(module: torch.nn.Module, state: dict[str, Any], prefix: str, metadata: Any) -> None:
            for name, tensor in full.items():
                if prefix + name in state:
                    state[prefix + name] = tensor

        handle = self.wrapped.register_state_dict_post_hook(gathered)
        try:
            yield
        finally:
            handle.remove()

    def _full_states(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Trainable weights and optimizer state as full tensors (gathered from every rank under FSDP)."""
        if not self.fsdp:
            weights = {n: p.detach().float().cpu() for n, p in self.trainable.items()}
            return weights, self.optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        # the trainable weights only: a LoRA run never gathers its frozen base
        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
        full = get_model_state_dict(self.wrapped, options=options)
        weights = {n: full[n].float() for n in self.trainable if n in full}  # empty except on rank 0
        if weights:
            weights.update({n: p.detach().float().cpu() for n, p in self.extra.items()})
        return weights, get_optimizer_state_dict(self.wrapped, self.optimizer, options=options)

    def any_rank(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is true on any (e.g. one rank got SIGTERM)."""
        if self.accelerator.num_processes == 1:
            return flag
        value = torch.tensor([1.0 if flag else 0.0], device=self.accelerator.device)
        return bool(self.accelerator.reduce(value, reduction="sum").item() > 0)


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _init_single_process_group(device: torch.device) -> None:
    """FSDP2 needs a process group; a one-process run (no launcher) gets a one-rank group of its own."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def leave_process_group() -> None:
    """End a multi-process run cleanly (call it last, on every rank): a rank exiting with the process
    group still up can abort in its teardown (SIGABRT, "terminate called without an active
    exception", seen with gloo), which torchrun reports as a failed run although everything was saved."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _fully_shard(module: torch.nn.Module, param_dtype: torch.dtype) -> None:
    """FSDP2: shard every repeated block (diffusers' ``_repeated_blocks``), then the root module.

    The shards keep the weights' own dtype (fp32 for full fine-tuning: the optimizer's master
    weights); forwards all-gather them in ``param_dtype`` and gradients are reduce-scattered in
    fp32. Each block's forward prefetches the next block's all-gather (the backward prefetches the
    previous block by default), so communication overlaps the compute of the block before it.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    names = set(getattr(module, "_repeated_blocks", ()))
    blocks = [child for child in module.modules() if type(child).__name__ in names]
    for block in blocks:
        fully_shard(block, mp_policy=policy)
    fully_shard(module, mp_policy=policy)
    for block, following in zip(blocks, blocks[1:]):
        block.set_modules_to_forward_prefetch([following])


@contextlib.contextmanager
def _fsdp_no_sync(module: Any) -> Iterator[None]:
    """Accumulate unsharded gradients locally; the next synced backward reduce-scatters them all."""
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)
