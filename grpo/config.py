"""Configuration of the trainers: `GRPOConfig` (reinforcement learning) and `FlowMatchingConfig`
(the supervised pretrain / SFT stages), both built on `VideoTrainerConfig`: `TrainerConfig` (the
fields every trainer shares) plus the frame rate every stage of a video policy uses.

Names follow TRL's `GRPOConfig` / `TrainingArguments` where the meaning is the same
(`num_generations`, `beta`, `epsilon`, `learning_rate`, `save_steps`...), so TRL users feel at
home. Every field carries a one-line help in its metadata; every impossible value is rejected in
`__post_init__` with a `ConfigError` (an `InputError`) whose one-line message names the field and
the fix, so a bad recipe fails before any model is loaded. This module imports no torch.
"""

from __future__ import annotations

import difflib
import functools
import json
import math
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

from grpo.tracking import tracker_problem
from policies.errors import InputError


class ConfigError(InputError):
    """An `InputError` about one config field; `field` is its dotted path (``trainer.beta``)."""

    def __init__(self, field: str, problem: str) -> None:
        self.field = field
        self.problem = problem
        super().__init__(f"{field}: {problem}" if field else problem)


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    """Raise a `ConfigError` naming ``name`` unless ``value`` is one of ``choices`` (same type too)."""
    if any(value == choice and type(value) is type(choice) for choice in choices):
        return
    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    options = ", ".join(repr(c) for c in choices)
    raise ConfigError(name, f"must be one of {options}, got {value!r}{hint}")


def _require(condition: bool, name: str, problem: str) -> None:
    if not condition:
        raise ConfigError(name, problem)


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


@dataclass
class TrainerConfig:
    """Optimisation, precision, adapter, checkpoint and logging fields shared by every trainer."""

    # --- run ---
    output_dir: str = field(
        default="runs/nextscene", metadata={"help": "Directory for checkpoints, metrics and samples."}
    )
    run_name: str | None = field(
        default=None, metadata={"help": "Run name shown in TensorBoard / W&B (default: output_dir's name)."}
    )
    seed: int = field(default=42, metadata={"help": "Seed of every random generator (data, noise, init)."})
    full_determinism: bool = field(
        default=False,
        metadata={"help": "Use torch's deterministic GPU kernels where it has them (slower)."},
    )
    # --- optimisation ---
    learning_rate: float = field(default=1e-5, metadata={"help": "Peak learning rate of AdamW."})
    lr_scheduler_type: Literal["constant", "constant_with_warmup", "linear", "cosine"] = field(
        default="constant",
        metadata={
            "help": "Learning-rate schedule (transformers' names); all but 'constant' warm up linearly."
        },
    )
    warmup_steps: int = field(default=0, metadata={"help": "Optimizer steps of linear warm-up from 0."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW decoupled weight decay."})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1."})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2."})
    adam_epsilon: float = field(default=1e-8, metadata={"help": "AdamW epsilon."})
    max_grad_norm: float = field(
        default=1.0, metadata={"help": "Clip the global gradient norm to this value; 0 disables clipping."}
    )
    gradient_accumulation_steps: int = field(
        default=1, metadata={"help": "Micro-batches whose gradients are summed before each optimizer step."}
    )
    # --- precision and memory ---
    mixed_precision: Literal["no", "bf16"] = field(
        default="no", metadata={"help": "'bf16': bf16 autocast over fp32 master weights; 'no': fp32."}
    )
    bf16: bool = field(
        default=False, metadata={"help": "TRL alias: true is the same as mixed_precision: bf16."}
    )
    fsdp: bool = field(
        default=False,
        metadata={
            "help": "Shard the transformer with FSDP2 (per block): full fine-tuning, "
            "or LoRA (fp32) on a frozen base."
        },
    )
    fsdp_param_dtype: Literal["auto", "fp32", "bf16"] = field(
        default="auto",
        metadata={
            "help": "FSDP2 compute dtype (fp32 master weights and grad reduction); "
            "auto: bf16 if mixed_precision is."
        },
    )
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Recompute activations in backward to save memory (slower)."}
    )
    # --- what is trained ---
    use_lora: bool = field(
        default=False, metadata={"help": "Train LoRA adapters (peft) instead of the full model."}
    )
    lora_rank: int = field(default=32, metadata={"help": "LoRA rank r."})
    lora_alpha: int = field(default=64, metadata={"help": "LoRA alpha (the update is scaled by alpha / r)."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"],
        metadata={"help": "Module names (peft patterns) that get LoRA adapters."},
    )
    ema_decay: float = field(
        default=0.0,
        metadata={
            "help": "EMA decay of the trained weights (e.g. 0.95); evaluated and saved as final. 0: off."
        },
    )
    # --- logging, evaluation, checkpoints ---
    logging_steps: int = field(default=1, metadata={"help": "Log metrics every N iterations (GRPO) / steps."})
    eval_every: int = field(
        default=0, metadata={"help": "Evaluate on the eval dataset every N iterations / steps; 0 never."}
    )
    save_steps: int = field(
        default=50,
        metadata={"help": "Checkpoint every N iterations / steps; 0 only at the end and on preemption."},
    )
    save_total_limit: int | None = field(
        default=3, metadata={"help": "Keep only the newest N complete checkpoints; null keeps all."}
    )
    resume_from_checkpoint: str | None = field(
        default=None,
        metadata={
            "help": "'auto' (latest complete checkpoint in output_dir, if any), a checkpoint path, or null."
        },
    )
    report_to: list[Literal["tensorboard", "wandb"]] = field(
        default_factory=list,
        metadata={"help": "Extra trackers besides the always-written metrics.jsonl: tensorboard, wandb."},
    )

    def __post_init__(self) -> None:
        for f in fields(self):
            hint = _type_hints(type(self))[f.name]
            value = getattr(self, f.name)
            if get_origin(hint) is Literal:
                check_choice(f.name, value, get_args(hint))
            elif get_origin(hint) is list and get_origin(get_args(hint)[0]) is Literal:
                for i, item in enumerate(value):
                    check_choice(f"{f.name}.{i}", item, get_args(get_args(hint)[0]))
        _require(bool(self.output_dir), "output_dir", "must not be empty; give a directory for the run")
        _require(self.learning_rate > 0, "learning_rate", f"must be > 0, got {self.learning_rate}")
        _require(self.warmup_steps >= 0, "warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        _require(
            self.lr_scheduler_type != "constant" or self.warmup_steps == 0,
            "lr_scheduler_type",
            "'constant' ignores warmup_steps; use 'constant_with_warmup' or set warmup_steps: 0",
        )
        _require(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        for name in ("adam_beta1", "adam_beta2"):
            _require(0 <= getattr(self, name) < 1, name, f"must be in [0, 1), got {getattr(self, name)}")
        _require(self.adam_epsilon > 0, "adam_epsilon", f"must be > 0, got {self.adam_epsilon}")
        _require(
            self.max_grad_norm >= 0,
            "max_grad_norm",
            f"must be >= 0 (0 = no clipping), got {self.max_grad_norm}",
        )
        _require(
            self.gradient_accumulation_steps >= 1,
            "gradient_accumulation_steps",
            f"must be >= 1, got {self.gradient_accumulation_steps}",
        )
        if self.bf16:
            self.mixed_precision = "bf16"
        self.bf16 = self.mixed_precision == "bf16"
        if self.fsdp_param_dtype == "auto":
            self.fsdp_param_dtype = "bf16" if self.bf16 else "fp32"
        _require(self.lora_rank >= 1, "lora_rank", f"must be >= 1, got {self.lora_rank}")
        _require(self.lora_alpha > 0, "lora_alpha", f"must be > 0, got {self.lora_alpha}")
        _require(
            not self.use_lora or len(self.lora_target_modules) > 0,
            "lora_target_modules",
            "must name at least one module when use_lora is true",
        )
        _require(0 <= self.ema_decay < 1, "ema_decay", f"must be in [0, 1) (0 = off), got {self.ema_decay}")
        _require(self.logging_steps >= 1, "logging_steps", f"must be >= 1, got {self.logging_steps}")
        _require(self.eval_every >= 0, "eval_every", f"must be >= 0 (0 = never), got {self.eval_every}")
        _require(
            self.save_steps >= 0, "save_steps", f"must be >= 0 (0 = only at the end), got {self.save_steps}"
        )
        _require(
            self.save_total_limit is None or self.save_total_limit >= 1,
            "save_total_limit",
            f"must be >= 1 or null (keep all), got {self.save_total_limit}",
        )
        _require(
            self.resume_from_checkpoint != "",
            "resume_from_checkpoint",
            "must be 'auto', a checkpoint path or null, got an empty string",
        )
        for name in self.report_to:
            problem = tracker_problem(name)
            _require(problem is None, "report_to", problem or "")


@dataclass
class VideoTrainerConfig(TrainerConfig):
    """`TrainerConfig` plus the frame rate of a video policy's trainers (flow matching and GRPO).

    The frame rate sets LTX-Video's temporal RoPE scale (``temporal_compression / frame_rate``) in
    every forward -- supervised losses, rollouts, log-probs, evaluation -- and the rate of every
    written video. A policy must be trained, sampled and evaluated at one rate: a recipe sets it from
    its data section's ``fps`` (the rate of the videos the policy learns from), and the trained
    policy records it (`write_trained_frame_rate`) so a later stage can check it.
    """

    frame_rate: float = field(
        default=8.0,
        metadata={"help": "Frame rate trained and generated at (temporal RoPE, videos); recipes: data.fps."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(
            self.frame_rate > 0 and math.isfinite(self.frame_rate),
            "frame_rate",
            f"must be a positive number, got {self.frame_rate}",
        )


TRAINED_AT_FILE = "trained_at.json"


def write_trained_frame_rate(policy_dir: str | os.PathLike[str], frame_rate: float) -> Path:
    """Record in a saved policy directory the frame rate it was trained at (``trained_at.json``)."""
    path = Path(policy_dir) / TRAINED_AT_FILE
    path.write_text(json.dumps({"frame_rate": float(frame_rate)}) + "\n", encoding="utf-8")
    return path


def trained_frame_rate(policy_dir: str | os.PathLike[str]) -> float | None:
    """The frame rate a policy directory records it was trained at; None when it records none
    (a base checkpoint such as LTX-Video's own, or one saved before the record existed)."""
    path = Path(policy_dir) / TRAINED_AT_FILE
    if not path.is_file():
        return None
    try:
        return float(json.loads(path.read_text(encoding="utf-8"))["frame_rate"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise InputError(f"{path}: not a frame-rate record ({type(err).__name__}: {err})") from None


@dataclass
class GRPOConfig(VideoTrainerConfig):
    """Group-relative PPO for diffusion policies (the algorithm is spelled out in `grpo.trainer`).

    One *iteration* rolls out ``num_generations`` videos for each of ``num_prompts_per_iteration``
    prompts (all ranks together), scores them, computes group-relative advantages and runs
    ``num_iterations`` inner epochs of the clipped surrogate over the trained denoising steps.
    ``save_steps``, ``logging_steps`` and ``eval_every`` count iterations.

    ``rollout_batch_size`` only regroups the rollout calls (every sample keeps its seed and place):
    one group per call by default, so a group's decode + reward overlaps the next group's rollout;
    several contexts per call for small models and CPUs (fewer, larger forwards; held-out evaluation
    batches as many rows); a group in parts when one context per GPU would leave nothing to overlap.

    ``overlap_update`` pipelines iterations one step off-policy: iteration t rolls out with the
    current weights, then runs the update of iteration t-1's batch while t's decode + reward run in
    the scorer thread (on CUDA on its own stream), so they hide behind the update even at one context
    per GPU. The PPO ratio's old log-probs are then the rollout's (the behaviour policy's), so the
    first epoch's ratio is not 1 and the clip works on it (``train/ratio_*``, ``train/clip_frac``;
    the rollout/recompute numerics, ``train/logprob_drift``, count in it too). An iteration logs its
    batch's rewards and the update(s) it ran (``train/updated_batches``). The first iteration only
    rolls out; the pipeline drains (the pending batch is updated) after the last iteration and before
    every checkpoint, so a resumed run is the uninterrupted one exactly and ``final`` has every batch;
    a preemption's drain is not logged. Held-out evaluation at iteration t sees the weights t's rollout
    uses (batch t-1 not yet applied; the final evaluation sees all); the EMA and the LR schedule count
    optimizer steps, as without it. Memory: the scorer's decoder and reward models work while the
    update's activations are alive (peak = update + decode/reward), plus one pending batch's record.

    ``algorithm: nft`` replaces the PPO update by DiffusionNFT's (`grpo.nft`): rollouts are ODE
    samples (no step recorded, no log-prob) drawn by a sampling policy that follows the trained weights
    by a soft update after every iteration (``nft_old_decay``; saved in checkpoints); each kept sample
    is forward-noised ``nft_noise_draws`` times at a level in ``[nft_sigma_min, 1)`` and the velocity
    there is regressed towards the sample's flow-matching target or away from it by its
    group-relative advantage (``nft_beta``). It trains without CFG (``guidance_scale: 1``) and without
    a KL term (``beta: 0``): the sampling policy is the anchor. The SDE settings are unused.

    ``prefetch_iterations`` (k) loads the rows of iterations t+1 .. t+k (a manifest's videos,
    decoded) in a background thread while iteration t runs (`grpo.prefetch`). An iteration's rows are
    a function of (seed, iteration, rank), so a resumed run, with or without it, reads the same rows
    and no loader state is checkpointed; errors surface at the iteration that needs the row. Memory:
    k iterations of rows beyond the current one.

    ``rollout_fp8`` runs the rollout's block matmuls in row-wise FP8 (`policies.fp8`; GPUs with
    float8 tensor cores): the samples come from that FP8 sampler, while the update, the KL reference
    and held-out evaluation keep the model's precision. PPO then takes its old log-probs from the
    update's own forward (one optimizer step per rollout, one epoch, the rollout's guidance, no
    overlap: checked), so the first ratio is exactly 1; ``train/logprob_drift`` reports how far the
    FP8 rollout's recorded log-probs are from it. DiffusionNFT uses no log-prob and takes it as is.
    ``rollout_attention`` (``fa3``: FlashAttention-3 in bf16, ``fa3_fp8``: in e4m3; Hopper GPUs,
    ``pip install fa3-fwd``) runs the rollout's self-attention in that forward-only kernel
    (`policies.rollout_attention`) under the same rules. ``rollout_fp8_scaling`` says how both scale
    their e4m3 activations: ``static`` (default) records each tensor's largest magnitude in the
    rollout's first forward and casts with it, times a margin of 4, from the second forward on (no
    amax pass per forward); ``dynamic`` takes every row's (attention: every sample-head's) own amax
    in every forward (`policies.fp8.FP8Scaling`).

    ``compile`` (``auto``: on where the policy runs on CUDA without FSDP or context parallelism,
    off on the CPU; ``true`` where it cannot is a one-line error) compiles the policy's
    transformer blocks (`policies.LTXPolicy.compile`) once, after LoRA: the rollout and the update's
    recomputation run the same compiled blocks, the recomputed log-prob differing from the recorded
    one by inference-vs-training kernel fusion only (~2e-4 in bf16, measured at 2B; reported as
    ``train/logprob_drift``; with one update per rollout and ``overlap_update`` off the ratio is
    exactly 1 regardless, see `grpo.trainer.GRPOTrainer._step_loss`).
    """

    # --- rollout ---
    num_generations: int = field(
        default=8, metadata={"help": "Videos sampled per prompt (the group size G)."}
    )
    num_prompts_per_iteration: int = field(
        default=4, metadata={"help": "Prompts (groups) per iteration, over all ranks together."}
    )
    max_iterations: int = field(default=100, metadata={"help": "Iterations (rollout + update) to run."})
    num_inference_steps: int = field(default=10, metadata={"help": "Denoising steps of each rollout."})
    eval_num_inference_steps: int | None = field(
        default=None,
        metadata={"help": "Denoising steps of held-out evaluation; null: num_inference_steps."},
    )
    num_frames: int = field(
        default=9, metadata={"help": "Frames per generated video (VAE temporal ratio x k + 1)."}
    )
    height: int = field(default=32, metadata={"help": "Height of generated videos in pixels."})
    width: int = field(default=32, metadata={"help": "Width of generated videos in pixels."})
    per_device_train_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Samples per micro-batch in the update; null = all of this rank's samples at once."
        },
    )
    steps_per_forward: int | None = field(
        default=1,
        metadata={
            "help": "Trained steps of every sample per update forward: 1 = least memory; null = all in one "
            "forward."
        },
    )
    context_parallel: bool = field(
        default=False,
        metadata={
            "help": "LTX-2: split every denoiser forward's tokens over all ranks, which share samples."
        },
    )
    rollout_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Samples per rollout call: null = G, one group; k x G batches k contexts; "
            "G / k splits a group."
        },
    )
    overlap_update: bool = field(
        default=False,
        metadata={
            "help": "One step off-policy: update on the last iteration's batch while this one is scored."
        },
    )
    rollout_fp8: bool = field(
        default=False,
        metadata={
            "help": "Rollout matmuls in row-wise FP8 (Hopper/Ada GPUs, policies.fp8); the update keeps "
            "its precision."
        },
    )
    rollout_attention: Literal["sdpa", "fa3", "fa3_fp8"] = field(
        default="sdpa",
        metadata={
            "help": "Rollout self-attention kernel: sdpa, fa3 (FlashAttention-3 bf16) or fa3_fp8 (e4m3); "
            "Hopper only."
        },
    )
    rollout_fp8_scaling: Literal["static", "dynamic"] = field(
        default="static",
        metadata={
            "help": "FP8 rollout activation scales: static (the rollout's first forward calibrates) or "
            "dynamic (every forward)."
        },
    )
    decode_batch_size: int = field(
        default=8,
        metadata={
            "help": "Videos per VAE decode call (rewards, evaluation); 1 at 121x512x768 beside an "
            "overlapped update."
        },
    )
    prefetch_iterations: int = field(
        default=1,
        metadata={
            "help": "Decode the next k iterations' rows in a background thread (holds k more); 0 = off."
        },
    )
    compile: bool | Literal["auto"] = field(
        default="auto",
        metadata={
            "help": "torch.compile the denoiser's blocks: true, false, or auto (on CUDA, without fsdp/CP)."
        },
    )
    max_reward_outage_iterations: int = field(
        default=3,
        metadata={
            "help": "Iterations in a row a reward may be down (scores None) before the run saves and stops."
        },
    )
    guidance_scale: float = field(
        default=1.0, metadata={"help": "Classifier-free guidance weight w in rollouts; 1 disables CFG."}
    )
    cfg_in_training: bool = field(
        default=True,
        metadata={
            "help": "Recompute training log-probs with the rollout's CFG (true) or without CFG (false)."
        },
    )
    sde_kind: Literal["sde", "cps", "dance"] = field(
        default="sde",
        metadata={"help": "Stochastic sampler: Flow-GRPO 'sde', coefficients-preserving 'cps', 'dance'."},
    )
    noise_level: float = field(
        default=0.7, metadata={"help": "Noise level a of the SDE steps (eta for 'dance'; <= 1 for 'cps')."}
    )
    logprob_reduction: Literal["mean", "sum"] = field(
        default="mean",
        metadata={"help": "Per-step log-prob: mean over latent elements (anchors' choice) or sum (exact)."},
    )
    # --- which denoising steps are stochastic and trained ---
    timestep_selection: Literal["all", "fraction", "window", "sliding_window"] = field(
        default="all",
        metadata={
            "help": "Trained steps: all, a random fraction, a fixed SDE window, or a MixGRPO sliding window."
        },
    )
    timestep_fraction: float = field(
        default=1.0, metadata={"help": "With 'fraction': share of the steps trained, drawn anew per call."}
    )
    sde_window_size: int = field(default=4, metadata={"help": "With window modes: SDE steps in the window."})
    sde_window_start: int = field(
        default=0, metadata={"help": "With window modes: first step of the (initial) window."}
    )
    sde_window_stride: int = field(
        default=1, metadata={"help": "With 'sliding_window': steps the window moves at each shift."}
    )
    sde_window_shift_interval: int = field(
        default=25, metadata={"help": "With 'sliding_window': iterations between two window shifts."}
    )
    # --- advantages ---
    reward_weights: list[float] | None = field(
        default=None, metadata={"help": "Weight of each reward function; null weighs every reward 1."}
    )
    reward_aggregation: Literal["normalize_then_sum", "sum_then_normalize"] = field(
        default="normalize_then_sum",
        metadata={
            "help": "Several rewards: normalise each within its group then sum, or sum then normalise."
        },
    )
    scale_rewards: Literal["group", "batch", "none"] = field(
        default="group",
        metadata={"help": "Divide centred rewards by the group's std, the whole batch's std, or nothing."},
    )
    adv_clip: float | None = field(
        default=5.0, metadata={"help": "Clip advantages to [-adv_clip, adv_clip]; null disables."}
    )
    nextclip_groups: Literal["video", "branch"] = field(
        default="video",
        metadata={
            "help": "Next-clip groups: G whole videos, or per clip G samples continuing the first "
            "video's clips (branch)."
        },
    )
    best_of_n_keep: list[int] | None = field(
        default=None,
        metadata={
            "help": "[k_top, k_bottom]: train on each group's k_top best and k_bottom worst only; null: all."
        },
    )
    # --- policy update ---
    num_iterations: int = field(
        default=1, metadata={"help": "Inner epochs over each rollout batch (TRL's num_iterations, mu)."}
    )
    beta: float = field(default=0.004, metadata={"help": "Weight of the KL(policy || reference) penalty."})
    epsilon: float = field(
        default=1e-4,
        metadata={"help": "PPO clip range of the ratio (small: log-probs are per-element means)."},
    )
    epsilon_high: float | None = field(
        default=None, metadata={"help": "Upper clip range if different from epsilon (DAPO); null = epsilon."}
    )
    loss_type: Literal["grpo", "bnpo", "dr_grpo"] = field(
        default="grpo",
        metadata={
            "help": "Average of (sample, trained step) losses: per sample, then samples (grpo); all "
            "(bnpo); sum/(B*max) (dr_grpo)."
        },
    )
    algorithm: Literal["grpo", "nft"] = field(
        default="grpo",
        metadata={
            "help": "grpo: PPO-clip on the SDE steps' log-probs; nft: DiffusionNFT on clean ODE samples "
            "(grpo.nft)."
        },
    )
    nft_beta: float = field(
        default=1.0, metadata={"help": "nft: step of the implicit policies, v_old +- nft_beta (v - v_old)."}
    )
    nft_old_decay: float = field(
        default=0.5,
        metadata={"help": "nft: the sampling policy's soft update per iteration, old = d old + (1 - d) new."},
    )
    nft_sigma_min: float = field(
        default=0.5, metadata={"help": "nft: the loss's noise levels are drawn in [nft_sigma_min, 1)."}
    )
    nft_noise_draws: int = field(
        default=1, metadata={"help": "nft: forward-noised copies of each kept sample per update."}
    )
    # --- outputs ---
    sample_every: int = field(
        default=10, metadata={"help": "Save rollout videos every N iterations; 0 never."}
    )
    save_samples: int = field(
        default=4, metadata={"help": "How many rollout videos to save each sample_every iterations."}
    )
    save_eval_videos: int = field(
        default=4, metadata={"help": "Held-out rows whose videos each evaluation saves for the report."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(
            self.num_generations >= 2,
            "num_generations",
            f"must be >= 2 to form a group, got {self.num_generations}",
        )
        _require(
            self.num_prompts_per_iteration >= 1,
            "num_prompts_per_iteration",
            f"must be >= 1, got {self.num_prompts_per_iteration}",
        )
        _require(self.max_iterations >= 1, "max_iterations", f"must be >= 1, got {self.max_iterations}")
        _require(
            self.prefetch_iterations >= 0,
            "prefetch_iterations",
            f"must be >= 0 (0 = off), got {self.prefetch_iterations}",
        )
        _require(
            self.num_inference_steps >= 1,
            "num_inference_steps",
            f"must be >= 1, got {self.num_inference_steps}",
        )
        _require(
            self.eval_num_inference_steps is None or self.eval_num_inference_steps >= 1,
            "eval_num_inference_steps",
            f"must be >= 1 or null (= num_inference_steps), got {self.eval_num_inference_steps}",
        )
        for name in ("num_frames", "height", "width"):
            _require(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        _require(
            isinstance(self.compile, bool) or self.compile == "auto",
            "compile",
            f"must be 'auto', true or false, got {self.compile!r}",
        )
        _require(
            not (self.overlap_update and self.save_steps == 1),
            "overlap_update",
            "drains its pipeline before every checkpoint, so save_steps 1 would hide nothing: "
            "set save_steps >= 2 (or 0) or overlap_update false",
        )
        _require(
            self.max_reward_outage_iterations >= 1,
            "max_reward_outage_iterations",
            f"must be >= 1, got {self.max_reward_outage_iterations}",
        )
        _require(
            self.steps_per_forward is None or self.steps_per_forward >= 1,
            "steps_per_forward",
            f"must be >= 1 or null (all), got {self.steps_per_forward}",
        )
        _require(
            not (self.context_parallel and self.fsdp),
            "context_parallel",
            "with fsdp is not supported yet (both would use the same ranks): set fsdp: false",
        )
        size, group = self.rollout_batch_size, self.num_generations
        _require(
            size is None or (size >= 1 and (size % group == 0 or group % size == 0)),
            "rollout_batch_size",
            f"must be a multiple or a divisor of num_generations {group} (or null), got {size}",
        )
        _require(
            self.per_device_train_batch_size is None or self.per_device_train_batch_size >= 1,
            "per_device_train_batch_size",
            f"must be >= 1 or null, got {self.per_device_train_batch_size}",
        )
        _require(
            self.guidance_scale >= 1,
            "guidance_scale",
            f"must be >= 1 (1 disables CFG), got {self.guidance_scale}",
        )
        _require(self.noise_level >= 0, "noise_level", f"must be >= 0, got {self.noise_level}")
        _require(
            self.sde_kind != "cps" or self.noise_level <= 1,
            "noise_level",
            f"must be in [0, 1] with sde_kind 'cps', got {self.noise_level}",
        )
        _require(
            0 < self.timestep_fraction <= 1,
            "timestep_fraction",
            f"must be in (0, 1], got {self.timestep_fraction}",
        )
        if self.timestep_selection in ("window", "sliding_window"):
            _require(
                1 <= self.sde_window_size <= self.num_inference_steps,
                "sde_window_size",
                f"must be in [1, num_inference_steps={self.num_inference_steps}], got {self.sde_window_size}",
            )
            _require(
                0 <= self.sde_window_start <= self.num_inference_steps - self.sde_window_size,
                "sde_window_start",
                f"must be in [0, {self.num_inference_steps - self.sde_window_size}] so the window fits in "
                f"num_inference_steps, got {self.sde_window_start}",
            )
            _require(
                self.sde_window_stride >= 1,
                "sde_window_stride",
                f"must be >= 1, got {self.sde_window_stride}",
            )
            _require(
                self.sde_window_shift_interval >= 1,
                "sde_window_shift_interval",
                f"must be >= 1, got {self.sde_window_shift_interval}",
            )
        if self.rollout_fp8:
            _require(not self.fsdp, "rollout_fp8", "quantizes whole weights, which fsdp shards: fsdp false")
        # rollout forwards that are not the training forward's: PPO's old log-prob must be the latter
        approximate = [
            name
            for name, on in (("rollout_fp8", self.rollout_fp8), ("rollout_attention", self.fast_attention))
            if on
        ]
        if approximate and self.algorithm == "grpo":
            name = approximate[0]
            why = "the update must read its old log-probs from the training forward (on-policy): "
            _require(not self.overlap_update, name, why + "set overlap_update false")
            _require(self.num_iterations == 1, name, why + "set num_iterations 1")
            _require(
                self.cfg_in_training or self.guidance_scale <= 1,
                name,
                why + "set cfg_in_training true (or guidance_scale 1)",
            )
        if self.algorithm == "nft":
            _require(self.nft_beta > 0, "nft_beta", f"must be > 0, got {self.nft_beta}")
            _require(
                0 <= self.nft_old_decay < 1, "nft_old_decay", f"must be in [0, 1), got {self.nft_old_decay}"
            )
            _require(
                0 <= self.nft_sigma_min < 1, "nft_sigma_min", f"must be in [0, 1), got {self.nft_sigma_min}"
            )
            draws = self.nft_noise_draws
            _require(draws >= 1, "nft_noise_draws", f"must be >= 1, got {draws}")
            _require(
                self.guidance_scale == 1,
                "guidance_scale",
                f"must be 1 with algorithm nft (it samples and trains CFG-free), got {self.guidance_scale}",
            )
            _require(
                self.beta == 0,
                "beta",
                f"must be 0 with algorithm nft (its sampling policy is the anchor), got {self.beta}",
            )
        if self.reward_weights is not None:
            _require(len(self.reward_weights) > 0, "reward_weights", "must not be empty; use null for all 1")
            _require(
                all(math.isfinite(w) for w in self.reward_weights),
                "reward_weights",
                f"must all be finite numbers, got {self.reward_weights}",
            )
        _require(
            self.adv_clip is None or self.adv_clip > 0,
            "adv_clip",
            f"must be > 0 or null, got {self.adv_clip}",
        )
        if self.best_of_n_keep is not None:
            keep = self.best_of_n_keep
            _require(
                len(keep) == 2,
                "best_of_n_keep",
                f"must be [k_top, k_bottom] (two numbers) or null, got {keep}",
            )
            _require(
                min(keep) >= 0 and sum(keep) >= 2,
                "best_of_n_keep",
                f"{keep} must keep >= 0 best and >= 0 worst samples, at least 2 in all to form a group",
            )
            _require(
                sum(keep) <= self.num_generations,
                "best_of_n_keep",
                f"{keep} keeps {sum(keep)} of num_generations {self.num_generations}; keep at most "
                f"{self.num_generations} or raise num_generations",
            )
        if self.nextclip_groups == "branch":
            _require(
                self.best_of_n_keep is None,
                "nextclip_groups",
                "'branch' ranks no whole videos, so best-of-N cannot select: set best_of_n_keep null "
                "or nextclip_groups video",
            )
            _require(
                (self.rollout_batch_size or group) >= group,
                "rollout_batch_size",
                f"{size} splits each group over several rollout calls, but nextclip_groups 'branch' "
                f"shares one history per group: use a multiple of num_generations {group} (or null)",
            )
        _require(self.num_iterations >= 1, "num_iterations", f"must be >= 1, got {self.num_iterations}")
        _require(self.beta >= 0, "beta", f"must be >= 0 (0 = no KL penalty), got {self.beta}")
        _require(self.epsilon > 0, "epsilon", f"must be > 0, got {self.epsilon}")
        _require(
            self.epsilon_high is None or self.epsilon_high > 0,
            "epsilon_high",
            f"must be > 0 or null, got {self.epsilon_high}",
        )
        _require(self.sample_every >= 0, "sample_every", f"must be >= 0 (0 = never), got {self.sample_every}")
        _require(self.save_samples >= 0, "save_samples", f"must be >= 0, got {self.save_samples}")
        batch = self.decode_batch_size
        _require(batch >= 1, "decode_batch_size", f"must be >= 1, got {batch}")
        _require(self.save_eval_videos >= 0, "save_eval_videos", f"must be >= 0, got {self.save_eval_videos}")

    @property
    def trained_group_size(self) -> int:
        """Samples of each group the update trains on: ``k_top + k_bottom`` with best-of-N, else all
        ``num_generations``."""
        return sum(self.best_of_n_keep) if self.best_of_n_keep is not None else self.num_generations

    @property
    def fast_attention(self) -> bool:
        """Whether the rollout's self-attention runs another kernel than the training forward's."""
        return self.rollout_attention != "sdpa"

    @property
    def rollout_rows_per_call(self) -> int:
        """Contexts rolled out in one call: 1 unless ``rollout_batch_size`` is a multiple of the group."""
        return max(1, (self.rollout_batch_size or self.num_generations) // self.num_generations)

    def sde_steps(self, iteration: int) -> list[int]:
        """Indices of the denoising steps that are stochastic in the rollout of ``iteration`` (0-based).

        'all' and 'fraction' make every step stochastic; 'window' uses steps
        ``[sde_window_start, sde_window_start + sde_window_size)``; 'sliding_window' moves that window
        by ``sde_window_stride`` steps every ``sde_window_shift_interval`` iterations and wraps back to
        ``sde_window_start`` when it would run past the last step (MixGRPO). Other steps are ODE steps.
        """
        if self.timestep_selection in ("all", "fraction"):
            return list(range(self.num_inference_steps))
        start = self.sde_window_start
        if self.timestep_selection == "sliding_window":
            positions = self.num_inference_steps - self.sde_window_size - self.sde_window_start + 1
            shifts = iteration // self.sde_window_shift_interval
            start += (shifts * self.sde_window_stride) % positions
        return list(range(start, start + self.sde_window_size))

    def trained_steps(self, iteration: int, rng: random.Random) -> list[int]:
        """Sorted indices of the steps whose log-probs are trained for one sample of ``iteration``.

        With 'fraction' a fresh random subset of ``max(1, int(timestep_fraction * num_inference_steps))``
        steps drawn from ``rng`` (Flow-GRPO draws one per sample); otherwise every SDE step.
        """
        steps = self.sde_steps(iteration)
        if self.timestep_selection != "fraction":
            return steps
        count = max(1, int(self.timestep_fraction * len(steps)))
        return sorted(rng.sample(steps, count))


@dataclass
class FlowMatchingConfig(VideoTrainerConfig):
    """Supervised flow-matching stages (pretrain, SFT): regress the velocity ``eps - x0`` at noisy
    latents ``x_s = (1 - s) x0 + s eps`` for (conditioning, target video) pairs.
    ``save_steps``, ``logging_steps`` and ``eval_every`` count optimizer steps."""

    max_steps: int = field(default=1000, metadata={"help": "Optimizer steps to run."})
    batch_size: int = field(default=8, metadata={"help": "Training pairs per device per micro-batch."})
    eval_batch_size: int = field(default=8, metadata={"help": "Pairs per device per evaluation batch."})
    timestep_sampling: Literal["uniform", "logit_normal"] = field(
        default="logit_normal",
        metadata={"help": "Distribution of the noise level s: uniform on (0, 1) or sigmoid(normal) (SD3)."},
    )
    logit_mean: float = field(default=0.0, metadata={"help": "With 'logit_normal': mean of the normal."})
    logit_std: float = field(default=1.0, metadata={"help": "With 'logit_normal': std of the normal."})
    dataloader_num_workers: int = field(
        default=0,
        metadata={"help": "Worker processes making the next steps' rows (a DataLoader; same run); 0: none."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(self.max_steps >= 1, "max_steps", f"must be >= 1, got {self.max_steps}")
        _require(
            self.dataloader_num_workers >= 0,
            "dataloader_num_workers",
            f"must be >= 0 (0 = rows loaded in the training process), got {self.dataloader_num_workers}",
        )
        _require(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        _require(self.eval_batch_size >= 1, "eval_batch_size", f"must be >= 1, got {self.eval_batch_size}")
        _require(self.logit_std > 0, "logit_std", f"must be > 0, got {self.logit_std}")
