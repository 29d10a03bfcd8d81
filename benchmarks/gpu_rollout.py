"""Rollout and GRPO-update speed of LTX-Video on one GPU, against diffusers' own `LTXPipeline`.

In one process, on one random-weight LTX transformer (the 2B release's config: 28 layers,
32 heads x 64, caption width 4096, 128 latent channels), for G videos of one prompt:

    a        diffusers `LTXPipeline` (eager, as users run it) from given prompt embeddings
    c_eager  our SDE rollout with log-prob tracking, eager (what our own code costs)
    b        our ODE rollout (`LTXPolicy.rollout`, kind="ode"), compiled (`LTXPolicy.compile`)
    c        our SDE rollout with log-prob tracking (Flow-GRPO "sde" on every step), compiled
    e        NSP (`policies.nsp.NSPPolicy`, Qwen2.5-VL-7B config): one context's condition (VLM
             forward + connector + continuity frame), once per group, vs the group's SDE rollout
    check    recompute == rollout under compile (same batch, and at the update's micro-batch)
    train    the denoiser forward + backward of full fine-tuning (batch 2), compiled
    d        one GRPO update on the trained steps: LoRA, log-prob recomputation (with the rollout's
             CFG) + the reference forward for the KL + backward, per micro-batch and step

FLOPs are counted, not measured (`ltx_forward_flops`): 2 per multiply-add of every matmul and of
attention's two products (QK^T, PV); norms, RoPE and element-wise work are not counted. Training
counts the usual 3x forward for full fine-tuning (backward = input + weight gradients) and 2x for
LoRA (backward = input gradients; the rank-r adapter products are under 2% and not counted); the
reference forward of the KL counts 1x. TFLOP/s are set against the bf16 matmul ceiling measured
in the same process (an 8192^3 product). Times are wall-clock around a synchronised region, after
a warm-up run that compiles and autotunes.

    python benchmarks/gpu_rollout.py                       # 2B config, 121 frames 512x768, G=8
    python benchmarks/gpu_rollout.py --settings 49x480x704 --sections a,c_eager,b,c
    python benchmarks/gpu_rollout.py --tiny                # CPU smoke run (seconds)

LTX-2 (``--family ltx2``): one random-weight LTX-2 at the released config (diffusers' defaults of
`LTX2VideoTransformer3DModel`: 48 blocks, video 32 heads x 128, audio 32 x 64, audio<->video
cross-attention; `LTX2TextConnectors` on Gemma-3-12B's 49 stacked layers; the LTX-2 video / audio
VAEs), bf16, G audio+video samples of one prompt (random text features), with `LTX2Pipeline`'s
guidance (``--guidance`` CFG, ``--audio-guidance``, ``--modality``, ``--rescale``; ``--stg`` needs
``--perturbed-attn``, LTX-2.3's STG layout, else STG is a no-op in the pipeline and refused by us):

    a          diffusers `LTX2Pipeline`, eager
    c_eager    our SDE rollout with log-probs (`LTX2Policy.rollout`, Flow-GRPO "sde" on every step,
               ``--modalities`` video | audio_video), eager
    check_eager  recompute == rollout log-prob (eager)
    a_compiled `LTX2Pipeline` with ``transformer.compile_repeated_blocks(fullgraph=True)``
    c          our SDE rollout on that same compiled transformer
    check      recompute == rollout log-prob (compiled)
    d          one GRPO update on the compiled rollout's record, as `recipes/ltx2_grpo.yaml` trains:
               LoRA (``--lora-rank``), ``--train-steps`` recorded steps of every sample, micro-batches
               of ``--micro-batch``, the rollout's guidance in training, no KL (beta 0: no reference
               forward), ``--gradient-checkpointing``; its time and peak memory

FLOPs of LTX-2 are counted by ``torch.utils.flop_counter`` on one eager guided velocity (all
branches), not by a formula.

    python benchmarks/gpu_rollout.py --family ltx2                          # 121x512x768, G=8
    python benchmarks/gpu_rollout.py --family ltx2 --settings 49x480x704 --generations 4
    python benchmarks/gpu_rollout.py --family ltx2 --settings 81x256x384 --lora-rank 64 \
        --train-steps 3 --micro-batch 2 --gradient-checkpointing   # recipes/ltx2_grpo.yaml's shape
    python benchmarks/gpu_rollout.py --family ltx2 --tiny                   # CPU smoke run

Prints a table and writes JSON (``--json``, default benchmarks/results/gpu_rollout_<setting>.json).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from policies import LTXPolicy, SamplingConfig  # noqa: E402
from policies.errors import InputError  # noqa: E402
from policies.fp8 import FP8Scaling, fp8_forwards, fp8_linears  # noqa: E402
from policies.rollout import Rollout  # noqa: E402
from policies.rollout_attention import (  # noqa: E402
    check_rollout_attention,
    rollout_attention,
    rollout_attention_processors,
)

# The LTX-Video 2B release's transformer (diffusers' defaults) and a tiny one of the same architecture.
LTX_2B = dict(
    in_channels=128,
    out_channels=128,
    num_attention_heads=32,
    attention_head_dim=64,
    cross_attention_dim=2048,
    num_layers=28,
    caption_channels=4096,
)
LTX_TINY = dict(
    in_channels=8,
    out_channels=8,
    num_attention_heads=4,
    attention_head_dim=16,
    cross_attention_dim=64,
    num_layers=2,
    caption_channels=32,
)
# Qwen2.5-VL-7B-Instruct's config.json (text and vision tower), and a tiny one of the same shape.
QWEN_7B_TEXT = dict(
    vocab_size=152064,
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    max_position_embeddings=128000,
    rms_norm_eps=1e-6,
)
QWEN_7B_VISION = dict(
    depth=32,
    hidden_size=1280,
    intermediate_size=3420,
    num_heads=16,
    out_hidden_size=3584,
    patch_size=14,
    spatial_merge_size=2,
    temporal_patch_size=2,
    window_size=112,
    fullatt_block_indexes=[7, 15, 23, 31],
)
QWEN_TINY_TEXT = dict(
    vocab_size=1024,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    rms_norm_eps=1e-6,
)
QWEN_TINY_VISION = dict(
    depth=2,
    hidden_size=32,
    intermediate_size=64,
    num_heads=2,
    out_hidden_size=64,
    patch_size=14,
    spatial_merge_size=2,
    temporal_patch_size=2,
    window_size=112,
    fullatt_block_indexes=[1],
)

# name -> (frames, height, width); the tiny ones run on a CPU in seconds
SETTINGS = {"121x512x768": (121, 512, 768), "49x480x704": (49, 480, 704), "81x256x384": (81, 256, 384)}
TINY_SETTINGS = {"tiny-17x64x96": (17, 64, 96), "tiny-9x32x32": (9, 32, 32)}
SECTIONS = (
    "a",
    "c_eager",
    "check_eager",
    "a_compiled",
    "b",
    "c",
    "c_fp8",
    "check_fp8",
    "c_fa3",
    "c_fp8_fa3",
    "check_fp8_fa3",
    "c_fp8_fa3_dynamic",
    "profile",
    "e",
    "check",
    "train",
    "d",
)
TEXT_TOKENS = 128  # T5 prompt length LTXPipeline uses


@dataclass
class Row:
    """One line of the table."""

    key: str
    what: str
    ms: float
    tflop: float
    peak_gib: float
    tflops: float = 0.0
    pct_ceiling: float = 0.0
    speedup_vs_diffusers: float | None = None
    speedup_vs_diffusers_compiled: float | None = None
    note: str = ""


def ltx_forward_flops(config: dict, tokens: int, batch: int, text_tokens: int = TEXT_TOKENS) -> float:
    """FLOPs of one LTX transformer forward over ``batch`` sequences of ``tokens`` video tokens.

    Per block (width d): self-attention projections 4 d^2 per token, cross-attention q/o 2 d^2 per
    token and k/v 2 d^2 per text token, feed-forward 8 d^2 per token (4d hidden), attention
    products 2 S^2 d (self) + 2 S L d (cross); outside the blocks proj_in/out and the caption
    projection. Two FLOPs per multiply-add.
    """
    d = config["num_attention_heads"] * config["attention_head_dim"]
    s, l_txt = tokens, text_tokens
    block = s * 14 * d * d + l_txt * 2 * d * d + 2 * s * s * d + 2 * s * l_txt * d
    outer = 2 * s * config["in_channels"] * d + l_txt * (config["caption_channels"] * d + d * d)
    return 2.0 * batch * (config["num_layers"] * block + outer)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0


def timed(device: torch.device, fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """(result, milliseconds, peak GiB) of ``fn()`` with the device synchronised around it."""
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    tick = time.perf_counter()
    out = fn()
    _sync(device)
    return out, (time.perf_counter() - tick) * 1e3, _peak_gib(device)


def matmul_ceiling(device: torch.device, size: int) -> float:
    """Measured bf16 (fp32 on CPU) matmul TFLOP/s: median of 10 ``size^3`` products after 3 warm-ups."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator(device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=dtype, generator=gen)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=gen)
    for _ in range(30):  # also brings the clocks up from idle
        a @ b
    times = []
    for _ in range(10):
        _, ms, _ = timed(device, lambda: a @ b)
        times.append(ms)
    return 2 * size**3 / (sorted(times)[5] * 1e-3) / 1e12


# ----------------------------------------------------------------------------------------- models
def build_policy(tiny: bool, device: torch.device, dtype: torch.dtype) -> LTXPolicy:
    """A random-weight LTX policy (2B config or tiny), built directly on ``device``."""
    from diffusers import AutoencoderKLLTXVideo, FlowMatchEulerDiscreteScheduler, LTXVideoTransformer3DModel

    from policies.tiny import TinyLTXSpec, _scheduler_config

    torch.manual_seed(0)
    with torch.device(device):
        transformer = LTXVideoTransformer3DModel(**(LTX_TINY if tiny else LTX_2B))
        if tiny:
            spec = TinyLTXSpec()
            n = len(spec.vae_channels)
            vae = AutoencoderKLLTXVideo(
                latent_channels=spec.latent_channels,
                block_out_channels=spec.vae_channels,
                decoder_block_out_channels=spec.vae_channels,
                down_block_types=("LTXVideoDownBlock3D",) * n,
                layers_per_block=(1,) * (n + 1),
                decoder_layers_per_block=(1,) * (n + 1),
                spatio_temporal_scaling=(True,) * n,
                decoder_spatio_temporal_scaling=(True,) * n,
                decoder_inject_noise=(False,) * (n + 1),
                downsample_type=("conv",) * n,
                upsample_residual=(False,) * n,
                upsample_factor=(1,) * n,
                patch_size=spec.vae_patch_size,
            )
        else:
            vae = AutoencoderKLLTXVideo()  # the LTX-Video 0.9 VAE config (32x space, 8x time, 128 ch)
    scheduler = FlowMatchEulerDiscreteScheduler(**_scheduler_config())
    transformer.requires_grad_(False)  # each section says what it trains
    return LTXPolicy(transformer.to(dtype), vae.to(dtype), scheduler).eval()


def make_condition(policy: LTXPolicy, guidance: float, device: torch.device) -> dict[str, torch.Tensor]:
    """One prompt's random T5-like embeddings (40 of 128 tokens valid), with a negative for CFG."""
    gen = torch.Generator(device).manual_seed(1)
    width = policy.transformer.config.caption_channels
    dtype = policy.transformer.dtype
    mask = torch.zeros(1, TEXT_TOKENS, dtype=torch.bool, device=device)
    mask[:, :40] = True
    cond = {
        "prompt_embeds": torch.randn(1, TEXT_TOKENS, width, generator=gen, device=device).to(dtype),
        "prompt_attention_mask": mask,
    }
    if guidance > 1:
        neg_mask = torch.zeros_like(mask)
        neg_mask[:, :1] = True
        cond["negative_prompt_embeds"] = torch.randn(1, TEXT_TOKENS, width, generator=gen, device=device).to(
            dtype
        )
        cond["negative_prompt_attention_mask"] = neg_mask
    return cond


# ----------------------------------------------------------------------------------------- runs
# the rollout speed options of the fast sections: (rollout_fp8, rollout_attention, rollout_fp8_scaling)
FAST = {
    "c_fp8": (True, "sdpa", "static"),
    "c_fa3": (False, "fa3", "static"),
    "c_fp8_fa3": (True, "fa3_fp8", "static"),
    "c_fp8_fa3_dynamic": (True, "fa3_fp8", "dynamic"),
}
FAST_LABEL = {
    "c_fp8": "FP8 matmuls",
    "c_fa3": "FlashAttention-3 bf16",
    "c_fp8_fa3": "FP8 matmuls + FlashAttention-3 FP8",
    "c_fp8_fa3_dynamic": "FP8 matmuls + FlashAttention-3 FP8, dynamic scales",
}


class FastForwards:
    """The rollout speed options of the sections in `FAST` on one transformer, as the trainer applies
    them: the blocks' linears in FP8 (`policies.fp8`) and their self-attention in FlashAttention-3
    (`policies.rollout_attention`; its processors are installed at the first such section, after
    diffusers' own sections ran with diffusers' processors)."""

    def __init__(self, transformer: torch.nn.Module, device: torch.device) -> None:
        self.transformer, self.device = transformer, device
        self.fp8_layers: list | None = None
        self.processors: list | None = None
        self.scaling = {kind: FP8Scaling(static=kind == "static") for kind in ("static", "dynamic")}

    def unavailable(self, key: str) -> str | None:
        """Why section ``key`` cannot run here (one line), or None."""
        try:
            check_rollout_attention(FAST[key][1], self.transformer, self.device)
        except InputError as error:
            return str(error)
        return None

    def __call__(self, key: str) -> contextlib.ExitStack:
        """The context one rollout of section ``key`` runs in (its first forward calibrates static
        scales, as each of the trainer's rollouts does)."""
        fp8, attention, kind = FAST[key]
        scaling = self.scaling[kind]
        stack = contextlib.ExitStack()
        if fp8:
            self.fp8_layers = self.fp8_layers or fp8_linears(self.transformer)
            stack.enter_context(fp8_forwards(self.fp8_layers, scaling))
        if attention != "sdpa":
            self.processors = self.processors or rollout_attention_processors(self.transformer)
            stack.enter_context(rollout_attention(self.processors, attention, scaling))
        stack.enter_context(scaling.calibrating(self.transformer))
        return stack

    def run(self, key: str, fn: Callable[[], Any]) -> Any:
        """``fn()`` (a rollout) in section ``key``'s context, or as it is for a plain section."""
        with self(key) if key in FAST else contextlib.nullcontext():
            return fn()

    def sizes(self) -> dict[str, int]:
        return {"fp8_layers": len(self.fp8_layers or []), "fa3_processors": len(self.processors or [])}


def skip(info: dict[str, Any], key: str, why: str) -> None:
    """Record and print a section this machine cannot run."""
    info[f"{key}_skipped"] = why
    print(f"  {key:10s} skipped: {why}", flush=True)


class Bench:
    """Runs the sections of one setting and collects their rows."""

    def __init__(
        self, args: argparse.Namespace, device: torch.device, geometry: tuple[int, int, int]
    ) -> None:
        self.args = args
        self.device = device
        self.geometry = geometry
        self.tiny = args.tiny
        self.config = LTX_TINY if args.tiny else LTX_2B
        self.dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
        self.policy = build_policy(args.tiny, device, self.dtype)
        self.rows: list[Row] = []
        self.checks: dict[str, Any] = {}
        self.info: dict[str, Any] = {}
        self.compiled = False
        self.sde_rollout: Rollout | None = None
        self.eager_rollout: Rollout | None = None
        self.fast_rollouts: dict[str, Rollout] = {}
        self.fast = FastForwards(self.policy.transformer, device)
        self.cond = make_condition(self.policy, args.guidance, device)

    # -- helpers
    def sampling(self, frames: int, height: int, width: int, kind: str, steps: int) -> SamplingConfig:
        return SamplingConfig(
            num_frames=frames,
            height=height,
            width=width,
            num_inference_steps=steps,
            guidance_scale=self.args.guidance,
            kind=kind,
            noise_level=0.0 if kind == "ode" else 0.7,
        )

    def tokens(self, frames: int, height: int, width: int) -> int:
        return math.prod(self.policy.latent_shape(frames, height, width))

    def add(self, key: str, what: str, ms: float, tflop: float, peak: float, note: str = "") -> Row:
        row = Row(key, what, ms, tflop, peak, note=note)
        row.tflops = tflop / (ms * 1e-3) if ms > 0 else 0.0
        row.pct_ceiling = 100 * row.tflops / self.info["matmul_ceiling_tflops"]
        self.rows.append(row)
        print(f"  {key:8s} {what:60s} {ms:10.1f} ms {row.tflops:7.1f} TFLOP/s", flush=True)
        return row

    def compile(self) -> None:
        if self.compiled or self.args.compile == "none":
            return
        backend = self.args.attention
        if backend == "auto":
            backend = self.pick_attention()
        self.info["attention_backend"] = backend or "native"
        self.policy.compile(
            backend=self.args.compile,
            mode=self.args.mode,
            attention_backend=None if backend in (None, "native") else backend,
            emulate_precision_casts=self.args.emulate_precision_casts,
        )
        self.info["compile"] = {
            "backend": self.args.compile,
            "mode": self.args.mode,
            "emulate_precision_casts": self.args.emulate_precision_casts,
        }
        self.compiled = True

    def pick_attention(self) -> str | None:
        """Time the self-attention op alone under each SDPA backend; returns the fastest (forward)."""
        if self.device.type != "cuda":
            return None
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        frames, height, width = self.geometry
        s = self.tokens(frames, height, width)
        heads, dim = self.config["num_attention_heads"], self.config["attention_head_dim"]
        b = self.args.generations * (2 if self.args.guidance > 1 else 1)
        gen = torch.Generator(self.device).manual_seed(0)
        q, k, v = (
            torch.randn(b, s, heads, dim, device=self.device, dtype=self.dtype, generator=gen)
            for _ in range(3)
        )
        flops = 4.0 * b * heads * s * s * dim
        results = {}
        for name in ("native", "_native_flash", "_native_cudnn", "_native_efficient"):
            try:
                for _ in range(2):
                    dispatch_attention_fn(q, k, v, backend=name)
                times = [timed(self.device, lambda n=name: dispatch_attention_fn(q, k, v, backend=n))[1]]
                times += [timed(self.device, lambda n=name: dispatch_attention_fn(q, k, v, backend=n))[1]]
                results[name] = flops / (min(times) * 1e-3) / 1e12
            except Exception as error:  # a backend this build or GPU lacks
                results[name] = f"unavailable: {type(error).__name__}: {str(error)[:120]}"
        self.info["attention_tflops_by_backend"] = results
        print(f"  attention backends (TFLOP/s, forward): {results}", flush=True)
        numeric = {k: v for k, v in results.items() if isinstance(v, float)}
        return max(numeric, key=numeric.get)

    def result(self, name: str, ceiling: float) -> dict[str, Any]:
        """The JSON record of this setting so far."""
        frames, height, width = self.geometry
        args = self.args
        diffusers_ms = getattr(self, "diffusers_ms", None)
        compiled_ms = getattr(self, "diffusers_compiled_ms", None)
        for row in self.rows:
            if diffusers_ms and row.key in ("a", "b", "c", "c_eager", "a_compiled", *FAST):
                row.speedup_vs_diffusers = diffusers_ms / row.ms
            if compiled_ms and row.key in ("b", "c", "a_compiled", *FAST):
                row.speedup_vs_diffusers_compiled = compiled_ms / row.ms
        by_key = {r.key: r for r in self.rows}
        if "b" in by_key and "c" in by_key:
            self.info["sde_overhead_vs_ode"] = by_key["c"].ms / by_key["b"].ms - 1
        device = self.device
        return {
            "setting": name,
            "frames": frames,
            "height": height,
            "width": width,
            "latent_tokens": self.tokens(frames, height, width),
            "generations": args.generations,
            "steps": args.steps,
            "guidance": args.guidance,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__,
            "model": "tiny LTX (2 layers)" if args.tiny else "LTX-Video 2B config, random weights, bf16",
            "matmul_ceiling_tflops": ceiling,
            "rows": [asdict(r) for r in self.rows],
            "checks": self.checks,
            "info": self.info,
            "flop_convention": __doc__.split("FLOPs are counted")[1].split("\n\n")[0].strip(),
        }

    # -- sections
    def run_diffusers(self, frames: int, height: int, width: int, steps: int) -> torch.Tensor:
        from diffusers import FlowMatchEulerDiscreteScheduler, LTXPipeline

        p = self.policy
        pipe = LTXPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler.from_config(p.scheduler.config),
            vae=p.vae,
            text_encoder=None,
            tokenizer=None,
            transformer=p.transformer,
        )
        pipe.set_progress_bar_config(disable=True)
        g = self.args.generations
        cond = self.cond
        kwargs = dict(
            prompt_embeds=cond["prompt_embeds"].expand(g, -1, -1),
            prompt_attention_mask=cond["prompt_attention_mask"].expand(g, -1),
        )
        if self.args.guidance > 1:
            kwargs.update(
                negative_prompt_embeds=cond["negative_prompt_embeds"].expand(g, -1, -1),
                negative_prompt_attention_mask=cond["negative_prompt_attention_mask"].expand(g, -1),
            )
        rope = p.transformer.rope  # diffusers' own rotary embedding (batch-wide tables), not CachedRope
        p.transformer.rope = getattr(rope, "rope", rope)
        try:
            with torch.no_grad():
                return pipe(
                    **kwargs,
                    num_frames=frames,
                    height=height,
                    width=width,
                    num_inference_steps=steps,
                    guidance_scale=self.args.guidance,
                    generator=[torch.Generator(self.device).manual_seed(s) for s in range(g)],
                    output_type="latent",
                ).frames
        finally:
            p.transformer.rope = rope

    def rollout(self, frames: int, height: int, width: int, kind: str, steps: int) -> Rollout:
        g = self.args.generations
        return self.policy.rollout(
            self.cond,
            num_generations=g,
            sampling=self.sampling(frames, height, width, kind, steps),
            seeds=list(range(g)),
        )

    def rollout_flops(self, frames: int, height: int, width: int, steps: int) -> float:
        batch = self.args.generations * (2 if self.args.guidance > 1 else 1)
        return steps * ltx_forward_flops(self.config, self.tokens(frames, height, width), batch)

    def section_a(self, key: str, frames: int, height: int, width: int) -> None:
        """``a``: diffusers eager; ``a_compiled``: with its documented regional compile,
        ``transformer.compile_repeated_blocks(fullgraph=True)``, which the rollouts after it share
        (so ours and diffusers' run the same compiled blocks)."""
        steps = self.args.steps
        if key == "a_compiled" and not self.compiled:
            self.policy.transformer.compile_repeated_blocks(fullgraph=True, backend=self.args.compile)
            self.compiled = True
            self.info["compile"] = (
                f"transformer.compile_repeated_blocks(fullgraph=True, backend={self.args.compile!r}) "
                "(diffusers' own), shared by a_compiled and the rollouts after it"
            )
        self.run_diffusers(frames, height, width, 2)  # warm-up (kernels, handles; compiles)
        _, ms, peak = timed(self.device, lambda: self.run_diffusers(frames, height, width, steps))
        if key == "a":
            self.diffusers_ms = ms
        else:
            self.diffusers_compiled_ms = ms
        mode = "eager" if key == "a" else "compile_repeated_blocks"
        self.add(
            key,
            f"diffusers LTXPipeline, {mode}, {self.args.generations} videos, {steps} steps",
            ms,
            self.rollout_flops(frames, height, width, steps) / 1e12,
            peak,
        )

    def section_rollout(self, key: str, frames: int, height: int, width: int) -> None:
        """``b`` / ``c`` / ``c_eager`` as the module says; the `FAST` sections: ``c`` with the blocks'
        linear layers in row-wise FP8 (`policies.fp8`, ``trainer.rollout_fp8``) and / or their
        self-attention in FlashAttention-3 (``trainer.rollout_attention``)."""
        if key in FAST and (why := self.fast.unavailable(key)):
            return skip(self.info, key, why)
        kind = "ode" if key == "b" else "sde"
        steps = self.args.steps
        if key != "c_eager":
            self.compile()
        self.fast.run(key, lambda: self.rollout(frames, height, width, kind, 2))  # warm-up (compiles)
        out, ms, peak = timed(
            self.device, lambda: self.fast.run(key, lambda: self.rollout(frames, height, width, kind, steps))
        )
        if key == "c":
            self.sde_rollout = out
        elif key == "c_eager":
            self.eager_rollout = out
        elif key in FAST:
            self.fast_rollouts[key] = out
        label = {
            "b": "ODE rollout",
            "c": "SDE rollout + log-probs",
            "c_eager": "SDE rollout + log-probs",
            **{k: f"SDE rollout + log-probs, {v}" for k, v in FAST_LABEL.items()},
        }
        mode = "eager" if key == "c_eager" or not self.compiled else "compiled"
        self.add(
            key,
            f"ours: {label[key]}, {mode}, {self.args.generations} videos, {steps} steps",
            ms,
            self.rollout_flops(frames, height, width, steps) / 1e12,
            peak,
        )

    def section_check(self, key: str) -> None:
        """Recomputed log-probs vs the rollout's (``check``: compiled rollout c; ``check_eager``: c_eager).

        Three ways of recomputing the same recorded steps: the rollout's own batch without
        gradients (what the correctness test asserts), the update's micro-batches without
        gradients (batch-size-dependent kernels), and those micro-batches with gradients on every
        weight (the training graph). Besides the log-prob difference it reports how far the
        Gaussian mean moved, relative to the step (``mean_rel``) and in units of the step's std
        (``mean_over_std_rms``), which is what turns kernel rounding into a log-prob difference.
        """
        rollout = self.eager_rollout if key == "check_eager" else self.sde_rollout
        steps = [0, rollout.latents.shape[1] - 1]
        mb = self.args.micro_batch
        chunks = [list(range(b, min(b + mb, rollout.num_samples))) for b in range(0, rollout.num_samples, mb)]
        results: dict[str, float] = {}
        for j in steps:
            with torch.no_grad():
                full = self.policy.log_prob(rollout, j)
            x = rollout.latents[:, j].float()
            for variant, grad in (("same_batch", None), ("microbatch", False), ("microbatch_grad", True)):
                if variant == "same_batch":
                    logp, mean = full.log_prob, full.mean
                else:
                    self.policy.transformer.requires_grad_(grad)
                    logps, means = [], []
                    for c in chunks:  # keep no graph alive across micro-batches
                        with torch.set_grad_enabled(grad):
                            out = self.policy.log_prob(rollout.select(c), j)
                        logps.append(out.log_prob.detach())
                        means.append(out.mean.detach())
                        del out
                    self.policy.transformer.requires_grad_(False)
                    logp, mean = torch.cat(logps), torch.cat(means)
                diff = float((logp - rollout.log_probs[:, j]).abs().max())
                rel = float((mean - full.mean).norm() / (full.mean - x).norm())
                std = full.std.expand_as(mean)
                over_std = float(((mean - full.mean) / std.clamp_min(1e-12)).square().mean().sqrt())
                for name, value in (
                    ("logp_max_abs", diff),
                    ("mean_rel", rel),
                    ("mean_over_std_rms", over_std),
                ):
                    full_name = f"{variant}_{name}"
                    results[full_name] = max(results.get(full_name, 0.0), value)
        results["ratio_max_dev_microbatch_grad"] = math.expm1(results["microbatch_grad_logp_max_abs"])
        results["compiled"] = key == "check" and self.compiled
        results["dtype"] = str(self.dtype)
        results["micro_batch"] = mb
        self.checks[key] = results
        print(f"  {key:8s} {results}", flush=True)

    def section_check_fast(self, key: str) -> None:
        """A fast rollout (``check_fp8``: ``c_fp8``'s, ``check_fp8_fa3``: ``c_fp8_fa3``'s) against the
        model's own precision, as the trainer trains on it: every recorded step re-scored by the plain
        forward (the on-policy update's; its difference from the record is ``train/logprob_drift``),
        the Gaussian mean's move relative to the step (``mean_rel``, about the velocity's relative
        error) and in units of the step's std, the fast re-score of the same batch (deterministic:
        0), and the samples against ``c``'s (same seeds and noise)."""
        source = key.replace("check", "c")
        if source not in self.fast_rollouts:
            return skip(self.checks, key, f"no {source} rollout")
        rollout = self.fast_rollouts[source]
        results: dict[str, Any] = {"logprob_drift_by_step": [], "mean_rel_by_step": []}
        over_std, again = 0.0, 0.0
        steps = range(rollout.latents.shape[1])
        with torch.no_grad():  # the fast re-score in one context: step 0 calibrates, as in the rollout
            fast_steps = self.fast.run(source, lambda: [self.policy.log_prob(rollout, j) for j in steps])
        for j, fast in zip(steps, fast_steps, strict=True):
            with torch.no_grad():
                full = self.policy.log_prob(rollout, j)
            x = rollout.latents[:, j].float()
            results["logprob_drift_by_step"].append(
                float((full.log_prob - rollout.log_probs[:, j]).abs().max())
            )
            results["mean_rel_by_step"].append(float((fast.mean - full.mean).norm() / (full.mean - x).norm()))
            std = full.std.expand_as(full.mean).clamp_min(1e-12)
            over_std = max(over_std, float(((fast.mean - full.mean) / std).square().mean().sqrt()))
            again = max(again, float((fast.log_prob - rollout.log_probs[:, j]).abs().max()))
        results["logprob_drift_max_abs"] = max(results["logprob_drift_by_step"])
        results["mean_rel_max"] = max(results["mean_rel_by_step"])
        results["mean_over_std_rms_max"] = over_std
        results["fast_recompute_logp_max_abs"] = again
        if self.sde_rollout is not None:
            a, b = rollout.final_latents.float(), self.sde_rollout.final_latents.float()
            results["final_latents_rel_l2_vs_c"] = float((a - b).norm() / b.norm())
        results.update(self.fast.sizes())
        results["dtype"] = str(self.dtype)
        self.checks[key] = results
        print(f"  {key} {results}", flush=True)

    def section_profile(self, frames: int, height: int, width: int) -> None:
        """Where one rollout forward's GPU time goes (torch.profiler): by kernel class, and top kernels."""
        from torch.profiler import ProfilerActivity, profile

        self.compile()
        p = self.policy
        batch = self.args.generations * (2 if self.args.guidance > 1 else 1)
        gen = torch.Generator(self.device).manual_seed(4)
        latents = torch.randn(
            batch,
            self.tokens(frames, height, width),
            self.config["in_channels"],
            generator=gen,
            device=self.device,
        )
        idx = torch.zeros(batch, dtype=torch.long, device=self.device)
        text = p.text_inputs(self.cond, idx, 1.0)
        timestep = torch.full((batch,), 500.0, device=self.device)
        shape = p.latent_shape(frames, height, width)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        key = self.args.profile_with

        def forwards() -> profile:  # in a fast section's context the first forward calibrates
            p.velocity(latents, timestep, text, 1.0, shape, 25.0)
            with profile(activities=activities) as prof:
                p.velocity(latents, timestep, text, 1.0, shape, 25.0)
                _sync(self.device)
            return prof

        if key and (why := self.fast.unavailable(key)):
            return skip(self.info, "profile", why)
        with torch.no_grad():
            prof = self.fast.run(key, forwards) if key else forwards()
        classes: dict[str, float] = {}
        kernels = []
        for event in prof.key_averages():
            us = (
                getattr(event, "device_time_total", 0.0)
                if self.device.type == "cuda"
                else event.cpu_time_total
            )
            if us <= 0 or (self.device.type == "cuda" and event.device_type.name != "CUDA"):
                continue
            name = event.key.lower()
            if "triton" in name:  # inductor's kernels are named after what they fused, e.g. "...attention..."
                group = "fused element-wise (inductor)"
            elif any(t in name for t in ("flash", "fmha", "cudnn", "attention", "sdpa", "efficient")):
                group = "attention"
            elif any(t in name for t in ("gemm", "cutlass", "xmma", "nvjet", "matmul", "sm90")):
                group = "matmul"
            else:
                group = "other element-wise / copies"
            classes[group] = classes.get(group, 0.0) + us / 1e3
            kernels.append((us / 1e3, event.count, event.key[:100]))
        kernels.sort(reverse=True)
        self.info["profile_forward_batch"] = batch
        self.info["profile_with"] = key or "plain"
        self.info["profile_ms_by_class"] = classes
        self.info["profile_top_kernels"] = [{"ms": ms, "calls": n, "kernel": k} for ms, n, k in kernels[:15]]
        print(f"  profile  one forward, batch {batch}: {classes}", flush=True)
        for ms, n, k in kernels[:15]:
            print(f"           {ms:9.2f} ms {n:5d}x {k}", flush=True)

    def section_train(self, frames: int, height: int, width: int) -> None:
        """Full fine-tuning denoiser forward + backward, batch 2 (the anchor's measurement)."""
        self.compile()
        p = self.policy
        s = self.tokens(frames, height, width)
        batch = 2
        gen = torch.Generator(self.device).manual_seed(3)
        latents = torch.randn(batch, s, self.config["in_channels"], generator=gen, device=self.device)
        timestep = torch.full((batch,), 500.0, device=self.device)
        text = p.text_inputs(self.cond, torch.zeros(batch, dtype=torch.long, device=self.device), 1.0)
        shape = p.latent_shape(frames, height, width)
        p.transformer.requires_grad_(True)

        def step() -> None:
            v = p.velocity(latents, timestep, text, 1.0, shape, 25.0)
            v.square().mean().backward()

        for _ in range(2):
            step()  # warm-up: compiles forward + backward
        times = []
        for _ in range(3):
            _, ms, peak = timed(self.device, step)
            times.append(ms)
        p.transformer.zero_grad(set_to_none=True)
        p.transformer.requires_grad_(False)
        flop = 3 * ltx_forward_flops(self.config, s, batch) / 1e12
        self.add(
            "train",
            f"denoiser fwd+bwd, full params, batch {batch}",
            sorted(times)[1],
            flop,
            peak,
            note="3x forward FLOPs",
        )

    def section_d(self, frames: int, height: int, width: int) -> None:
        """One GRPO update (LoRA r=32): every sample, ``--train-steps`` recorded steps, micro-batches."""
        from grpo.loss import grpo_loss
        from policies.sde import kl_divergence

        p = self.policy
        rollout = self.sde_rollout or self.eager_rollout
        if not p.has_lora:
            p.add_lora(rank=self.args.lora_rank, alpha=2 * self.args.lora_rank)
            if self.args.gradient_checkpointing:
                p.transformer.enable_gradient_checkpointing()
        params = [q for q in p.transformer.parameters() if q.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-5)
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda")
        k_steps = min(self.args.train_steps, rollout.latents.shape[1])
        advantages = torch.linspace(-1, 1, rollout.num_samples, device=self.device)
        mb = self.args.micro_batch

        def update(steps: int) -> None:
            for b in range(0, rollout.num_samples, mb):
                idx = list(range(b, min(b + mb, rollout.num_samples)))
                sub = rollout.select(idx)
                for j in range(steps):
                    with autocast:
                        out = p.log_prob(sub, j)
                        with torch.no_grad(), p.reference():
                            ref = p.log_prob(sub, j)
                        kl = kl_divergence(out.mean, ref.mean, out.std)[:, None]
                        loss, _ = grpo_loss(
                            out.log_prob[:, None],
                            sub.log_probs[:, j : j + 1],
                            advantages[idx],
                            epsilon=1e-4,
                            beta=0.004,
                            kl=kl,
                        )
                    (loss / steps).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        update(1)  # warm-up: compiles the LoRA training and reference graphs
        _, ms, peak = timed(self.device, lambda: update(k_steps))
        tokens = self.tokens(frames, height, width)
        cfg = 2 if rollout.uses_cfg else 1
        per = ltx_forward_flops(self.config, tokens, cfg)  # one sample's (CFG-batched) forward
        flop = rollout.num_samples * k_steps * per * (2 + 1) / 1e12
        ckpt = "on" if self.args.gradient_checkpointing else "off"
        self.add(
            "d",
            f"GRPO update: LoRA r{self.args.lora_rank}, {rollout.num_samples} samples x {k_steps} steps, "
            f"micro-batch {mb}",
            ms,
            flop,
            peak,
            note=f"2x fwd (LoRA) + 1x reference fwd; CFG in training; checkpointing {ckpt}",
        )
        self.info["update_ms_per_sample_step"] = ms / (rollout.num_samples * k_steps)

    def section_e(self, frames: int, height: int, width: int) -> None:
        """NSP (`policies.nsp.NSPPolicy`, Qwen2.5-VL-7B config + this LTX): the condition of one context
        (VLM forward + connector + the continuity frame's VAE encoding), computed once per group, vs the
        group's G-video SDE rollout (image-to-video through the continuity frame)."""
        self.compile()
        nsp = build_nsp(self.policy, self.tiny, self.device, self.dtype)
        n_frames = 4 if self.tiny else 16
        context = torch.rand(n_frames, height, width, 3, generator=torch.Generator().manual_seed(2))
        row = {"context": context, "instruction": "What happens next? Continue the scene."}
        guidance = self.args.guidance
        seen: dict[str, int] = {}
        hooks = [
            nsp.vlm.get_input_embeddings().register_forward_hook(
                lambda m, args, out: seen.__setitem__("tokens", out.shape[1])
            ),
            nsp.vlm.model.visual.register_forward_pre_hook(
                lambda m, args: seen.__setitem__("patches", args[0].shape[0])
            ),
        ]
        with torch.no_grad():
            nsp.prepare_condition([row], guidance_scale=guidance)  # warm-up
            cond, ms_cond, peak = timed(
                self.device, lambda: nsp.prepare_condition([row], guidance_scale=guidance)
            )
            _, ms_vlm, _ = timed(self.device, lambda: nsp.query_states([row]))
        for hook in hooks:
            hook.remove()
        g, steps = self.args.generations, self.args.steps

        def rollout(n: int) -> Rollout:
            return nsp.rollout(
                cond,
                num_generations=g,
                sampling=self.sampling(frames, height, width, "sde", n),
                seeds=list(range(g)),
            )

        rollout(2)  # warm-up (per-token timesteps: its own compiled shapes)
        _, ms_roll, peak_roll = timed(self.device, lambda: rollout(steps))
        mode = "compiled" if self.compiled else "eager"
        vlm = "tiny" if self.tiny else "7B"
        self.add(
            "e_cond",
            f"NSP condition: Qwen2.5-VL-{vlm} ({seen['tokens']} tokens) + connector + continuity frame",
            ms_cond,
            qwen_vl_flops(self.tiny, seen["tokens"], seen["patches"]) / 1e12,
            peak,
            note=f"VLM forward alone {ms_vlm:.1f} ms",
        )
        row_roll = self.add(
            "e",
            f"NSP SDE rollout + log-probs, {mode}, {g} videos, {steps} steps (I2V continuity)",
            ms_roll,
            self.rollout_flops(frames, height, width, steps) / 1e12,
            peak_roll,
        )
        share = ms_cond / (ms_cond + ms_roll)
        row_roll.note = f"condition = {100 * share:.2f}% of condition + rollout"
        self.info["nsp_vlm_share"] = share
        self.info["nsp_vlm_forward_ms"] = ms_vlm


def build_qwen_vl(
    tiny: bool, device: torch.device, dtype: torch.dtype, layers: int | None = None
) -> tuple[Any, Any, Any]:
    """A random Qwen2.5-VL (7B config, or tiny; ``layers`` language-model layers instead of the
    config's) built on ``device``, with Qwen's chat tokenizer (the project's small BPE: Qwen's special
    tokens and template, its own ids) and the video pre-processing config of 16-frame 448x448
    contexts: ``(model, tokenizer, inputs_config)``."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from policies.qwen_vl_inputs import QwenVLInputsConfig
    from policies.tiny_qwen_vl import build_tiny_qwen_tokenizer

    tokenizer = build_tiny_qwen_tokenizer()  # Qwen's special tokens and chat template; the ids are its own
    ids = {
        f"{name}_token_id": tokenizer.convert_tokens_to_ids(f"<|{token}|>")
        for name, token in (
            ("image", "image_pad"),
            ("video", "video_pad"),
            ("vision_start", "vision_start"),
            ("vision_end", "vision_end"),
        )
    }
    text, vision = (QWEN_TINY_TEXT, QWEN_TINY_VISION) if tiny else (QWEN_7B_TEXT, QWEN_7B_VISION)
    text = {**text, "num_hidden_layers": layers or text["num_hidden_layers"]}
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    section = [head_dim // 8, head_dim * 3 // 16, head_dim * 3 // 16]  # Qwen's 16:24:24 M-RoPE split
    rope = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": section}
    special = dict(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None
    )
    config = Qwen2_5_VLConfig(
        text_config={**text, "rope_parameters": rope, **special}, vision_config=vision, **ids
    )
    torch.manual_seed(0)
    with torch.device(device):
        vlm = Qwen2_5_VLForConditionalGeneration(config).to(dtype)
    pixels = 56 * 56 if tiny else 448 * 448  # 16 frames of 448x448: 2048 video tokens
    inputs_config = QwenVLInputsConfig(video_min_pixels=min(pixels, 128 * 28 * 28), video_max_pixels=pixels)
    return vlm, tokenizer, inputs_config


def build_nsp(policy: LTXPolicy, tiny: bool, device: torch.device, dtype: torch.dtype) -> Any:
    """An `NSPPolicy` over ``policy``'s LTX modules with a random Qwen2.5-VL (7B config, or tiny)."""
    from policies.nsp import NSPConfig, NSPPolicy

    vlm, tokenizer, inputs_config = build_qwen_vl(tiny, device, dtype)
    nsp_config = NSPConfig(
        num_queries=8 if tiny else 64, context_frames=4 if tiny else 16, connector_heads=4 if tiny else 8
    )
    nsp = NSPPolicy(
        policy.transformer, policy.vae, policy.scheduler, vlm, tokenizer, inputs_config, nsp_config
    )
    return nsp.to(device)


def qwen_vl_flops(tiny: bool, tokens: int, patches: int) -> float:
    """FLOPs of a Qwen2.5-VL forward over ``tokens`` LLM tokens and ``patches`` vision patches
    (linear layers and LLM attention products; the vision tower's windowed attention is not counted)."""
    text, vision = (QWEN_TINY_TEXT, QWEN_TINY_VISION) if tiny else (QWEN_7B_TEXT, QWEN_7B_VISION)
    d = text["hidden_size"]
    kv = d // text["num_attention_heads"] * text["num_key_value_heads"]
    per_token = text["num_hidden_layers"] * (
        2 * d * d + 2 * d * kv + 3 * d * text["intermediate_size"] + 2 * tokens * d
    )
    dv = vision["hidden_size"]
    per_patch = vision["depth"] * (4 * dv * dv + 3 * dv * vision["intermediate_size"])
    return 2.0 * (tokens * per_token + patches * per_patch)


# ----------------------------------------------------------------------------------------- LTX-2
LTX2_SECTIONS = (
    "a",
    "c_eager",
    "check_eager",
    "a_compiled",
    "c",
    "check",
    "c_fp8",
    "check_fp8",
    "c_fa3",
    "c_fp8_fa3",
    "check_fp8_fa3",
    "c_fp8_fa3_dynamic",
    "d",
)
LTX2_TINY_SETTINGS = {"tiny-9x64x64": (9, 64, 64)}
LTX2_TEXT_TOKENS = 1024  # LTX2Pipeline's max_sequence_length


def build_ltx2_policy(
    tiny: bool, device: torch.device, dtype: torch.dtype, perturbed_attn: bool, num_layers: int | None = None
) -> Any:
    """A random-weight LTX-2 policy: the released config (diffusers' defaults; ``num_layers`` of its 48
    blocks, None: all), or the tiny checkpoint."""
    import tempfile

    from diffusers import (
        AutoencoderKLLTX2Audio,
        AutoencoderKLLTX2Video,
        FlowMatchEulerDiscreteScheduler,
        LTX2VideoTransformer3DModel,
    )
    from diffusers.pipelines.ltx2 import LTX2TextConnectors
    from diffusers.pipelines.ltx2.vocoder import LTX2Vocoder

    from policies.ltx2 import LTX2Policy
    from policies.tiny_ltx2 import build_tiny_ltx2

    if tiny:
        path = build_tiny_ltx2(Path(tempfile.mkdtemp()) / "tiny_ltx2")
        policy = LTX2Policy.from_pretrained(path, torch_dtype=dtype, device=device, load_text_encoder=False)
        transformer = policy.transformer
        if perturbed_attn:  # LTX-2.3's STG layout adds no weights: rebuild the blocks' processors
            transformer = LTX2VideoTransformer3DModel.from_config(
                {**transformer.config, "perturbed_attn": True}
            )
            transformer.load_state_dict(policy.transformer.state_dict())
            policy.transformer = transformer.to(device, dtype)
    else:
        torch.manual_seed(0)
        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # build the 19B transformer directly in bf16 on the GPU
        try:
            with torch.device(device):
                policy = LTX2Policy(
                    LTX2VideoTransformer3DModel(
                        perturbed_attn=perturbed_attn, **({"num_layers": num_layers} if num_layers else {})
                    ),
                    # the released VAE's config.json states its ratios; the class defaults would
                    # derive 64x / 16x from its layer list
                    AutoencoderKLLTX2Video(spatial_compression_ratio=32, temporal_compression_ratio=8),
                    FlowMatchEulerDiscreteScheduler(
                        use_dynamic_shifting=True, base_shift=0.95, max_shift=2.05
                    ),
                    LTX2TextConnectors(),
                    AutoencoderKLLTX2Audio(),
                    LTX2Vocoder(),
                )
        finally:
            torch.set_default_dtype(default_dtype)
    policy.transformer.requires_grad_(False)
    return policy.eval()


class LTX2Bench:
    """The LTX-2 sections of one setting: diffusers' LTX2Pipeline vs our rollout, eager and compiled."""

    def __init__(
        self, args: argparse.Namespace, device: torch.device, geometry: tuple[int, int, int]
    ) -> None:
        from policies.ltx2 import LTX2SamplingConfig

        self.args, self.device, self.geometry = args, device, geometry
        self.dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
        self.policy = build_ltx2_policy(args.tiny, device, self.dtype, args.perturbed_attn)
        self.rows: list[Row] = []
        self.checks: dict[str, Any] = {}
        self.info: dict[str, Any] = {}
        self.rollouts: dict[str, Rollout] = {}
        self.fast = FastForwards(self.policy.transformer, device)
        frames, height, width = geometry
        self.guidance = dict(
            guidance_scale=args.guidance,
            audio_guidance_scale=args.audio_guidance,
            stg_scale=args.stg,
            stg_blocks=[int(b) for b in args.stg_blocks.split(",")] if args.stg > 0 else [],
            modality_scale=args.modality,
            guidance_rescale=args.rescale,
        )
        self.sampling = LTX2SamplingConfig(
            num_frames=frames,
            height=height,
            width=width,
            frame_rate=24.0,
            num_inference_steps=args.steps,
            kind="sde",
            noise_level=0.7,
            modalities=args.modalities,
            **self.guidance,
        )
        config = self.policy.connectors.config
        width_text = config.caption_channels * config.text_proj_in_factor
        tokens = 64 if args.tiny else LTX2_TEXT_TOKENS
        gen = torch.Generator(device).manual_seed(1)
        mask = torch.zeros(1, tokens, dtype=torch.long, device=device)
        mask[:, -40:] = 1  # 40 real tokens, left padding as Gemma's
        self.cond = {
            "prompt_embeds": torch.randn(1, tokens, width_text, generator=gen, device=device).to(self.dtype),
            "prompt_attention_mask": mask,
            "negative_prompt_embeds": torch.randn(1, tokens, width_text, generator=gen, device=device).to(
                self.dtype
            ),
            "negative_prompt_attention_mask": mask.clone(),
        }
        self.info["step_tflop"] = self.count_step_flops() / 1e12

    def count_step_flops(self) -> float:
        """FLOPs of one guided denoising step of the group (all branches), counted by torch."""
        from dataclasses import replace

        from torch.utils.flop_counter import FlopCounterMode

        two_steps = replace(self.sampling, num_inference_steps=2, kind="ode")  # 1 step: no terminal stretch
        with FlopCounterMode(display=False) as counter:
            self.policy.rollout(
                self.cond,
                num_generations=self.args.generations,
                sampling=two_steps,
                seeds=[0] * self.args.generations,
            )
        return float(counter.get_total_flops()) / 2

    def add(
        self,
        key: str,
        what: str,
        ms: float,
        peak: float,
        diffusers_ms: float | None = None,
        tflop: float | None = None,
    ) -> None:
        """A table row; ``tflop`` defaults to one rollout's (``--steps`` guided steps of the group)."""
        tflop = self.info["step_tflop"] * self.args.steps if tflop is None else tflop
        row = Row(key, what, ms, tflop, peak)
        row.speedup_vs_diffusers = diffusers_ms / ms if diffusers_ms else None
        row.tflops = tflop / (ms * 1e-3) if ms > 0 else 0.0
        row.pct_ceiling = 100 * row.tflops / self.info["matmul_ceiling_tflops"]
        self.rows.append(row)
        print(f"  {key:10s} {what:60s} {ms:10.1f} ms {row.tflops:7.1f} TFLOP/s", flush=True)

    def run_diffusers(self, steps: int) -> Any:
        from diffusers import FlowMatchEulerDiscreteScheduler, LTX2Pipeline

        p, g, guidance = self.policy, self.args.generations, self.guidance
        pipe = LTX2Pipeline(
            scheduler=FlowMatchEulerDiscreteScheduler.from_config(p.scheduler.config),
            vae=p.vae,
            audio_vae=p.audio_vae,
            text_encoder=None,
            tokenizer=None,
            connectors=p.connectors,
            transformer=p.transformer,
            vocoder=p.vocoder,
        )
        pipe.set_progress_bar_config(disable=True)
        cond = self.cond
        frames, height, width = self.geometry
        with torch.no_grad():
            return pipe(
                prompt_embeds=cond["prompt_embeds"].expand(g, -1, -1),
                prompt_attention_mask=cond["prompt_attention_mask"].expand(g, -1),
                negative_prompt_embeds=cond["negative_prompt_embeds"].expand(g, -1, -1),
                negative_prompt_attention_mask=cond["negative_prompt_attention_mask"].expand(g, -1),
                num_frames=frames,
                height=height,
                width=width,
                frame_rate=24.0,
                num_inference_steps=steps,
                guidance_scale=guidance["guidance_scale"],
                audio_guidance_scale=guidance["audio_guidance_scale"],
                stg_scale=guidance["stg_scale"],
                audio_stg_scale=guidance["stg_scale"],
                spatio_temporal_guidance_blocks=guidance["stg_blocks"] or None,
                modality_scale=guidance["modality_scale"],
                audio_modality_scale=guidance["modality_scale"],
                guidance_rescale=guidance["guidance_rescale"],
                audio_guidance_rescale=guidance["guidance_rescale"],
                generator=[torch.Generator(self.device).manual_seed(s) for s in range(g)],
                output_type="latent",
            )

    def rollout(self, steps: int) -> Rollout:
        from dataclasses import replace

        g = self.args.generations
        sampling = replace(self.sampling, num_inference_steps=steps)
        return self.policy.rollout(self.cond, num_generations=g, sampling=sampling, seeds=list(range(g)))

    def section(self, key: str) -> None:
        steps, g = self.args.steps, self.args.generations
        if key in FAST and (why := self.fast.unavailable(key)):
            return skip(self.info, key, why)
        if key in ("a_compiled", "c", *FAST) and not self.info.get("compiled"):
            # diffusers' perturbed (STG) attention branches on a tensor (`if all_perturbed:`), which
            # a full graph cannot hold: with STG on, the blocks compile with graph breaks
            fullgraph = self.args.stg == 0
            self.policy.transformer.compile_repeated_blocks(fullgraph=fullgraph, backend=self.args.compile)
            self.info["compiled"] = (
                f"transformer.compile_repeated_blocks(fullgraph={fullgraph}, backend={self.args.compile!r}), "
                "shared by a_compiled, c and the fast sections"
            )
        if key in ("a", "a_compiled"):
            self.run_diffusers(2)  # warm-up (kernels; compiles every branch's graph)
            _, ms, peak = timed(self.device, lambda: self.run_diffusers(steps))
            self.info[f"diffusers_ms_{key}"] = ms
            mode = "eager" if key == "a" else "compiled"
            self.add(key, f"diffusers LTX2Pipeline, {mode}, {g} samples, {steps} steps", ms, peak)
        elif key in ("c", "c_eager", *FAST):
            self.fast.run(key, lambda: self.rollout(2))  # warm-up; as the trainer's options do:
            out, ms, peak = timed(self.device, lambda: self.fast.run(key, lambda: self.rollout(steps)))
            self.rollouts[key] = out
            mode = {"c_eager": "eager", "c": "compiled"}.get(key) or f"compiled, {FAST_LABEL[key]}"
            what = (
                f"ours: SDE rollout + log-probs ({self.args.modalities}), {mode}, {g} samples, {steps} steps"
            )
            base = self.info.get("diffusers_ms_a" if key == "c_eager" else "diffusers_ms_a_compiled")
            self.add(key, what, ms, peak, diffusers_ms=base)  # against diffusers in the same mode
        elif key == "d":
            self.update()
        elif key in ("check_fp8", "check_fp8_fa3"):  # the fast record against the plain recompute
            if key.replace("check", "c") not in self.rollouts:
                return skip(self.checks, key, f"no {key.replace('check', 'c')} rollout")
            rollout = self.rollouts[key.replace("check", "c")]
            drifts = []
            for j in range(rollout.latents.shape[1]):
                with torch.no_grad():
                    full = self.policy.log_prob(rollout, j).log_prob
                drifts.append(float((full - rollout.log_probs[:, j]).abs().max()))
            self.checks[key] = {"logprob_drift_by_step": drifts, "logprob_drift_max_abs": max(drifts)}
            if "c" in self.rollouts:
                a, b = rollout.final_latents.float(), self.rollouts["c"].final_latents.float()
                self.checks[key]["final_latents_rel_l2_vs_c"] = float((a - b).norm() / b.norm())
            self.checks[key].update(self.fast.sizes())
            print(f"  {key:10s} {self.checks[key]}", flush=True)
        else:  # check, check_eager: recompute every recorded step of the rollout, same batch
            rollout = self.rollouts["c_eager" if key == "check_eager" else "c"]
            diffs = []
            for j in range(rollout.latents.shape[1]):
                with torch.no_grad():
                    diffs.append(
                        float(
                            (self.policy.log_prob(rollout, j).log_prob - rollout.log_probs[:, j]).abs().max()
                        )
                    )
            self.checks[key] = {"logp_max_abs": max(diffs), "dtype": str(self.dtype)}
            print(f"  {key:10s} {self.checks[key]}", flush=True)

    def update(self) -> None:
        """Section d: one GRPO update (LoRA) on the latest rollout's record, with its peak memory."""
        from grpo.loss import grpo_loss

        p, args = self.policy, self.args
        rollout = self.rollouts.get("c") or self.rollouts["c_eager"]
        if not p.has_lora:
            p.add_lora(rank=args.lora_rank, alpha=args.lora_rank)
            if args.gradient_checkpointing:
                p.transformer.enable_gradient_checkpointing()
        params = [q for q in p.transformer.parameters() if q.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-5)
        k_steps = min(args.train_steps, rollout.latents.shape[1])
        advantages = torch.linspace(-1, 1, rollout.num_samples, device=self.device)
        mb = args.micro_batch

        def update(steps: int) -> None:
            for b in range(0, rollout.num_samples, mb):
                idx = list(range(b, min(b + mb, rollout.num_samples)))
                sub = rollout.select(idx)
                for j in range(steps):  # the rollout's guidance: every branch's forward and backward
                    out = p.log_prob(sub, j)
                    loss, _ = grpo_loss(
                        out.log_prob[:, None], sub.log_probs[:, j : j + 1], advantages[idx], epsilon=1e-4
                    )
                    (loss / steps).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        update(1)  # warm-up: the LoRA forward + backward graphs
        _, ms, peak = timed(self.device, lambda: update(k_steps))
        # forward + backward (2x: input and LoRA gradients) of every branch; a checkpointed block's
        # second forward is not counted
        tflop = 3 * k_steps * self.info["step_tflop"]
        ckpt = "on" if args.gradient_checkpointing else "off"
        what = (
            f"GRPO update: LoRA r{args.lora_rank}, {rollout.num_samples} samples x {k_steps} steps, "
            f"micro-batch {mb}, guidance in training, checkpointing {ckpt}"
        )
        self.add("d", what, ms, peak, tflop=tflop)
        self.info["update_ms_per_sample_step"] = ms / (rollout.num_samples * k_steps)

    def result(self, name: str, ceiling: float) -> dict[str, Any]:
        frames, height, width = self.geometry
        geometry = self.policy.geometry(self.sampling)
        device = self.device
        return {
            "setting": name,
            "family": "ltx2",
            "frames": frames,
            "height": height,
            "width": width,
            "latent_tokens": math.prod(geometry.latent_shape),
            "audio_tokens": geometry.audio_frames,
            "generations": self.args.generations,
            "steps": self.args.steps,
            "guidance": self.args.guidance,
            "ltx2_guidance": self.guidance,
            "modalities": self.args.modalities,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__,
            "model": "tiny LTX-2" if self.args.tiny else "LTX-2 released config, random weights, bf16",
            "matmul_ceiling_tflops": ceiling,
            "rows": [asdict(r) for r in self.rows],
            "checks": self.checks,
            "info": self.info,
        }


def run_ltx2(
    args: argparse.Namespace, device: torch.device, names: list[str], sections: list[str]
) -> list[dict]:
    """The ``--family ltx2`` benchmark (module docstring)."""
    table = LTX2_TINY_SETTINGS if args.tiny else SETTINGS
    bad = [n for n in names if n not in table] + [s for s in sections if s not in LTX2_SECTIONS]
    if bad:
        raise SystemExit(f"unknown LTX-2 settings or sections {bad}: {list(table)}, {LTX2_SECTIONS}")
    ceiling = matmul_ceiling(device, 512 if device.type == "cpu" else 8192)
    results = []
    for name in names:
        print(f"== LTX-2 {name}: G={args.generations}, device {device}", flush=True)
        bench = LTX2Bench(args, device, table[name])
        bench.info["matmul_ceiling_tflops"] = ceiling
        path = Path(args.json.format(setting=f"ltx2_{name}"))
        path.parent.mkdir(parents=True, exist_ok=True)
        for section in LTX2_SECTIONS:
            if section in sections:
                bench.section(section)
                result = bench.result(name, ceiling)
                path.write_text(json.dumps(result, indent=2))
        print(format_table(result), flush=True)
        print(f"wrote {path}", flush=True)
        results.append(result)
        del bench
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


# ----------------------------------------------------------------------------------------- output
def format_table(result: dict[str, Any]) -> str:
    """The markdown table of one result file."""
    lines = [
        f"{result['setting']} on {result['device']} (G={result['generations']}, {result['steps']} steps, "
        f"CFG {result['guidance']}; matmul ceiling {result['matmul_ceiling_tflops']:.0f} TFLOP/s)",
        "",
        "| | what | ms | TFLOP/s | % ceiling | peak GiB | vs diffusers | vs diffusers compiled | note |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in result["rows"]:
        speed = "" if r["speedup_vs_diffusers"] is None else f"{r['speedup_vs_diffusers']:.2f}x"
        compiled = r.get("speedup_vs_diffusers_compiled")
        speed += " | " + ("" if compiled is None else f"{compiled:.2f}x")
        lines.append(
            f"| {r['key']} | {r['what']} | {r['ms']:.1f} | {r['tflops']:.1f} | {r['pct_ceiling']:.1f} | "
            f"{r['peak_gib']:.1f} | {speed} | {r['note']} |"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.family == "ltx2":
        table = LTX2_TINY_SETTINGS if args.tiny else SETTINGS
        names = args.settings.split(",") if args.settings else [next(iter(table))]
        sections = args.sections.split(",") if args.sections else list(LTX2_SECTIONS)
        return run_ltx2(args, device, names, sections)
    table = TINY_SETTINGS if args.tiny else SETTINGS
    names = args.settings.split(",") if args.settings else [next(iter(table))]
    unknown = [n for n in names if n not in table]
    sections = args.sections.split(",") if args.sections else list(SECTIONS)
    bad = [s for s in sections if s not in SECTIONS]
    if unknown or bad:
        raise SystemExit(
            f"unknown settings {unknown} (choose from {list(table)}) or sections {bad} ({SECTIONS})"
        )
    ceiling = matmul_ceiling(device, 512 if device.type == "cpu" else 8192)
    results = []
    for name in names:
        frames, height, width = table[name]
        print(
            f"== {name}: {frames} frames {height}x{width}, G={args.generations}, device {device}", flush=True
        )
        bench = Bench(args, device, (frames, height, width))
        bench.info["matmul_ceiling_tflops"] = ceiling
        path = Path(args.json.format(setting=name))
        path.parent.mkdir(parents=True, exist_ok=True)
        for section in SECTIONS:
            if section not in sections:
                continue
            if section in ("a", "a_compiled"):
                bench.section_a(section, frames, height, width)
            elif section in ("b", "c", "c_eager", *FAST):
                bench.section_rollout(section, frames, height, width)
            elif section in ("check_fp8", "check_fp8_fa3"):
                bench.section_check_fast(section)
            elif section in ("check", "check_eager"):
                bench.section_check(section)
            elif section == "profile":
                bench.section_profile(frames, height, width)
            elif section == "train":
                bench.section_train(frames, height, width)
            elif section == "d":
                bench.section_d(frames, height, width)
            elif section == "e":
                bench.section_e(frames, height, width)
            if device.type == "cuda":
                torch.cuda.empty_cache()  # what a section built (e.g. the NSP VLM) is gone
            result = bench.result(name, ceiling)
            path.write_text(json.dumps(result, indent=2))  # after every section: a killed run keeps its rows
        print(format_table(result), flush=True)
        print(f"wrote {path}", flush=True)
        results.append(result)
        del bench
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--family",
        default="ltx",
        choices=["ltx", "ltx2"],
        help="LTX-Video (default) or LTX-2 (audio + video)",
    )
    parser.add_argument("--tiny", action="store_true", help="tiny model and geometry (CPU smoke run)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    parser.add_argument("--settings", default=None, help=f"comma-separated: {list(SETTINGS)} (or tiny ones)")
    parser.add_argument(
        "--sections",
        default=None,
        help=f"comma-separated subset of {SECTIONS} (ltx2: {LTX2_SECTIONS}); default all",
    )
    parser.add_argument("--generations", type=int, default=8, help="G videos per prompt")
    parser.add_argument("--steps", type=int, default=10, help="denoising steps of each rollout")
    parser.add_argument("--guidance", type=float, default=3.0, help="CFG scale (LTX default 3; 1 disables)")
    parser.add_argument("--train-steps", type=int, default=2, help="recorded steps trained per sample in d")
    parser.add_argument("--micro-batch", type=int, default=1, help="samples per micro-batch in d and check")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="checkpoint blocks in d")
    parser.add_argument("--lora-rank", type=int, default=32, help="LoRA rank of the update in d")
    parser.add_argument(
        "--compile",
        default=None,
        choices=["inductor", "aot_eager", "none"],
        help="torch.compile backend (default: inductor on GPU, aot_eager with --tiny)",
    )
    parser.add_argument("--mode", default=None, help="torch.compile mode (default: the default mode)")
    parser.add_argument(
        "--profile-with",
        default=None,
        choices=list(FAST),
        help="profile one forward under this fast section's options (default: the plain forward)",
    )
    parser.add_argument(
        "--attention",
        default="auto",
        help="self-attention backend: auto (fastest measured), native, _native_cudnn, ...",
    )
    parser.add_argument(
        "--no-emulate-precision-casts",
        dest="emulate_precision_casts",
        action="store_false",
        help="let inductor keep fp32 intermediates (LTXPolicy.compile(emulate_precision_casts=False))",
    )
    ltx2 = parser.add_argument_group("LTX-2 (--family ltx2; LTX2Pipeline's names and defaults)")
    ltx2.add_argument("--audio-guidance", type=float, default=7.0, help="audio CFG scale")
    ltx2.add_argument("--modality", type=float, default=3.0, help="modality-isolation guidance scale")
    ltx2.add_argument("--rescale", type=float, default=0.7, help="guidance rescale (video and audio)")
    ltx2.add_argument("--stg", type=float, default=0.0, help="STG scale (needs --perturbed-attn)")
    ltx2.add_argument("--stg-blocks", default="28", help="comma-separated STG blocks")
    ltx2.add_argument(
        "--perturbed-attn", action="store_true", help="transformer with STG attention (LTX-2.3)"
    )
    ltx2.add_argument("--modalities", default="audio_video", choices=["video", "audio_video"])
    parser.add_argument("--json", default=None, help="output path; {setting} is replaced by the setting name")
    args = parser.parse_args(argv)
    if args.compile is None:
        args.compile = "aot_eager" if args.tiny else "inductor"
    if args.json is None:
        prefix = "tiny_" if args.tiny else ""
        args.json = str(ROOT / "benchmarks" / "results" / f"{prefix}gpu_rollout_{{setting}}.json")
    if args.tiny:
        args.generations = min(args.generations, 2)
        args.steps = min(args.steps, 3)
    return args


if __name__ == "__main__":
    run(parse_args())
