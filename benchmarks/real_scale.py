"""Real-scale rehearsal: the shipped real recipes, run as a user runs them, on random weights.

For each selected recipe this writes what a user has on disk -- random-weight checkpoints at the
released configs in their ``from_pretrained`` layouts (Qwen2.5-VL-7B; LTX-Video-2B 0.9.x; LTX-2 as
diffusers ships it, with its Gemma-3-12B text encoder where the recipe encodes prompts; a reward
model on a Qwen2.5-VL-7B backbone; NSP directories whose ``nsp_config.json`` names them) and a small
manifest of synthetic MP4s at the recipe's resolution -- then runs the recipe **unchanged except for
paths and its step count** through ``python -m grpo.cli train`` (the ``nextscene train`` command, in
a subprocess), with the in-process judge (``causal_consistency_local``, on the same 7B VLM
checkpoint as the policy's VLM: a second instance in memory, no second copy on disk) standing in
for the vLLM judge servers a recipe lists. The NSP chain runs in order: the SFT recipe starts from
the pretraining run's ``final``, GRPO from SFT's, when they run in the same invocation.

Per recipe it reports, from the run's ``metrics.jsonl``: the per-iteration split of GRPO (rollout
``time/rollout_s``; decode + reward ``time/reward_s`` of which ``time/reward_wait_s`` was not
hidden, ``time/reward_hidden_frac``; update ``time/update_s``; the pipeline, on-policy or
``trainer.overlap_update``'s one step off-policy, and ``trainer.compile``; medians over the
iterations after the first, which holds the held-out evaluation and the warm-up, and, with
``overlap_update``, over those that updated one batch, not the first nor the draining ones), or the
step time of the supervised stages; peak GPU memory (the trainer's ``memory/peak_gb``, allocated by
torch, where logged, and the device's used memory polled with ``nvidia-smi``, which includes the
CUDA context and the allocator's cache); the bytes the run wrote (under its output directory, each
file once however many links it has, not counting files that are hard links of files outside it: the
frozen VLM linked into a saved policy costs nothing); wall time; and the error of a failed run as
one line (one failure does not stop the others).

Disk: each invocation writes the checkpoints its recipes need under ``--work`` and deletes each
one after the last selected recipe that needs it (``--keep`` keeps them). Before a checkpoint is
written its size is estimated from its parameter count; one that would not fit in the free space is
an error of the recipes that need it. ``--gemma-layers`` and ``--reward-model-layers`` shrink LTX-2's
text encoder and the reward model's backbone (the real widths, fewer layers) where the full ones do
not fit; ``--set RECIPE:key=value`` adds a recipe override (e.g. fewer generations to fit a call's
time limit). Every such reduction is written in the table and the JSON.

    # one H200, one call per group of recipes (README "Real-scale rehearsal" lists the five calls)
    python benchmarks/real_scale.py --recipes nsp_qwen25vl7b_ltx2b_pretrain,nsp_qwen25vl7b_ltx2b_sft \
        --out $OUT/rs --json $OUT/real_scale_nsp2b_a.json --timeout 240
    python benchmarks/real_scale.py --tiny --out /tmp/rs_tiny        # every recipe, tiny, on CPU
    # a recipe twice in one call, the second run (RECIPE@LABEL) with its own overrides
    python benchmarks/real_scale.py --recipes nsp_qwen25vl7b_ltx2b_grpo,nsp_qwen25vl7b_ltx2b_grpo@overlap \
        --set nsp_qwen25vl7b_ltx2b_grpo@overlap:trainer.overlap_update=true --steps 3 --out $OUT/rs

``--tiny`` runs the same pipeline with tiny configs of the same classes (and tiny geometry
overrides, listed per recipe in ``TINY_OVERRIDES``) on the CPU, so the script cannot rot.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from benchmarks.gpu_rollout import build_ltx2_policy, build_policy, build_qwen_vl  # noqa: E402
from grpo.data.nsp_dataset import write_manifest  # noqa: E402
from grpo.recipe import load_recipe  # noqa: E402
from policies.tiny import build_tiny_ltx  # noqa: E402
from policies.tiny_ltx2 import build_tiny_ltx2  # noqa: E402
from policies.video_io import write_video  # noqa: E402

RECIPES_DIR = ROOT / "recipes"
JUDGE_REWARD = "causal_consistency"  # the vLLM judge; replaced by its in-process twin
GEMMA_12B_LAYERS = 48
QWEN_7B_LAYERS = 28


@dataclass
class Job:
    """One shipped recipe: the checkpoint its ``policy.path`` names, and the run it continues."""

    policy: str  # key of CHECKPOINTS
    after: str | None = None  # recipe whose run's ``final`` is the policy when both run
    needs: tuple[str, ...] = ()  # further checkpoints (judge VLM, reward model)


JOBS: dict[str, Job] = {
    "nsp_qwen25vl7b_ltx2b_pretrain": Job("nsp_ltx2b"),
    "nsp_qwen25vl7b_ltx2b_sft": Job("nsp_ltx2b", after="nsp_qwen25vl7b_ltx2b_pretrain"),
    "nsp_qwen25vl7b_ltx2b_grpo": Job("nsp_ltx2b", after="nsp_qwen25vl7b_ltx2b_sft", needs=("vlm",)),
    "ltx2_grpo": Job("ltx2_text", needs=("reward_model",)),
    "nsp_qwen25vl7b_ltx2_grpo": Job("nsp_ltx2", needs=("vlm",)),
    "nextclip_ltx2b_grpo": Job("nextclip_ltx2b", needs=("vlm",)),
}
STEPS = {"pretrain": 2, "sft": 2, "grpo": 2}  # optimizer steps / GRPO iterations per recipe

# tiny geometry and sizes (CPU, seconds): the only changes beyond paths and step counts in --tiny
_TINY_VIDEO = {"data.next_frames": 9, "data.height": 32, "data.width": 32, "policy.torch_dtype": "float32"}
_TINY_GRPO = {
    "trainer.num_frames": 9,
    "trainer.height": 32,
    "trainer.width": 32,
    "trainer.num_generations": 2,
    "trainer.num_prompts_per_iteration": 1,
    "trainer.num_inference_steps": 4,
    "trainer.per_device_train_batch_size": 2,
    "trainer.lora_rank": 4,
    "trainer.lora_alpha": 8,
    "trainer.mixed_precision": "no",
    "trainer.gradient_checkpointing": False,
}
_TINY_SUPERVISED = {
    "trainer.gradient_accumulation_steps": 1,
    "trainer.mixed_precision": "no",
    "trainer.gradient_checkpointing": False,
}
_TINY_LTX2 = {k: 64 for k in ("data.height", "data.width", "trainer.height", "trainer.width")}  # 2 cells
TINY_OVERRIDES: dict[str, dict[str, Any]] = {
    "nsp_qwen25vl7b_ltx2b_pretrain": {**_TINY_VIDEO, **_TINY_SUPERVISED},
    "nsp_qwen25vl7b_ltx2b_sft": {**_TINY_VIDEO, **_TINY_SUPERVISED, "data.context_frames": 5},
    "nsp_qwen25vl7b_ltx2b_grpo": {**_TINY_VIDEO, **_TINY_GRPO, "data.context_frames": 5},
    "ltx2_grpo": {**_TINY_VIDEO, **_TINY_GRPO, **_TINY_LTX2},
    "nsp_qwen25vl7b_ltx2_grpo": {
        **_TINY_VIDEO,
        **_TINY_GRPO,
        **_TINY_LTX2,
        "data.context_frames": 5,
        "trainer.num_generations": 4,  # the recipe keeps best-of-N: 4 drawn, [1, 1] kept
        "trainer.best_of_n_keep": [1, 1],
    },
    "nextclip_ltx2b_grpo": {  # clips of 9 frames (the tiny checkpoint's), 1 context + 2 generated
        **_TINY_VIDEO,
        **_TINY_GRPO,
        "data.context_frames": 9,
        "data.next_frames": 18,
        "trainer.num_frames": 18,
    },
}


def log(message: str) -> None:
    """A progress line with a UTC timestamp (the log of a GPU call is read afterwards)."""
    print(f"[{time.strftime('%H:%M:%S', time.gmtime())}] {message}", flush=True)


# ----------------------------------------------------------------------------------- checkpoints
class Checkpoints:
    """Random-weight checkpoints in their ``from_pretrained`` layouts, written on demand under
    ``root``: the released configs (built on the GPU in bf16), or tiny ones of the same classes."""

    def __init__(self, root: Path, tiny: bool, gemma_layers: int, reward_model_layers: int) -> None:
        self.root, self.tiny = root, tiny
        self.device = torch.device("cuda" if torch.cuda.is_available() and not tiny else "cpu")
        self.dtype = torch.float32 if tiny else torch.bfloat16
        self.gemma_layers, self.reward_model_layers = gemma_layers, reward_model_layers
        self.builders: dict[str, tuple[Callable[[Path], None], tuple[str, ...]]] = {
            "vlm": (self._vlm, ()),
            "ltx2b": (self._ltx2b, ()),
            "ltx2": (self._ltx2, ()),
            "ltx2_text": (self._ltx2_text, ()),
            "reward_model": (self._reward_model, ()),
            "nsp_ltx2b": (self._nsp_ltx2b, ("vlm", "ltx2b")),
            "nsp_ltx2": (self._nsp_ltx2, ("vlm", "ltx2")),
            "nextclip_ltx2b": (self._nextclip_ltx2b, ()),
        }

    def path(self, name: str) -> Path:
        return self.root / name

    def closure(self, names: Sequence[str]) -> list[str]:
        """``names`` and every checkpoint they refer to, dependencies first."""
        out: list[str] = []
        for name in names:
            for dep in self.closure(self.builders[name][1]):
                if dep not in out:
                    out.append(dep)
            if name not in out:
                out.append(name)
        return out

    def ensure(self, name: str) -> Path:
        """Write checkpoint ``name`` (and those it refers to) unless already there; return its path."""
        for dep in self.builders[name][1]:
            self.ensure(dep)
        path = self.path(name)
        if not (path / ".complete").is_file():
            shutil.rmtree(path, ignore_errors=True)
            self.root.mkdir(parents=True, exist_ok=True)
            tick = time.perf_counter()
            log(f"writing checkpoint {name} -> {path}")
            self.builders[name][0](path)
            (path / ".complete").write_text("")
            if self.device.type == "cuda":  # the runs get the GPU: only this process's context stays
                gc.collect()
                torch.cuda.empty_cache()
            log(f"wrote {name}: {tree_bytes(path) / 1e9:.2f} GB in {time.perf_counter() - tick:.0f} s")
        return path

    def _check_fits(self, what: str, *modules: torch.nn.Module) -> None:
        """Refuse to write ``modules`` (their weights' bytes) where the disk has less room free."""
        needed = sum(t.numel() * t.element_size() for m in modules for t in m.state_dict().values())
        free = shutil.disk_usage(self.root).free
        if needed > free:
            raise RuntimeError(
                f"{what} needs ~{needed / 1e9:.1f} GB but {free / 1e9:.1f} GB are free under "
                f"{self.root}: run fewer recipes per call, or shrink with --gemma-layers / "
                "--reward-model-layers"
            )

    # each builder writes one checkpoint directory
    def _vlm(self, path: Path) -> None:
        vlm, tokenizer, inputs_config = build_qwen_vl(self.tiny, self.device, self.dtype)
        self._check_fits("the Qwen2.5-VL checkpoint", vlm)
        vlm.save_pretrained(path)
        tokenizer.save_pretrained(path)
        inputs_config.save_pretrained(path)

    def _ltx2b(self, path: Path) -> None:
        policy = build_policy(self.tiny, self.device, self.dtype)
        self._check_fits("the LTX-Video-2B checkpoint", policy.transformer, policy.vae)
        policy.save_pretrained(path)

    def _nextclip_ltx2b(self, path: Path) -> None:
        """LTX-Video-2B with its T5-XXL text encoder (next-clip encodes the rows' prompts) and the
        ``nextclip.json`` of recipes/nextclip_ltx2b_grpo.yaml (17-frame clips; tiny: 9)."""
        from policies.nextclip import CONFIG_NAME, NextClipConfig

        if self.tiny:  # the tiny LTX-Video checkpoint, tiny T5 included
            build_tiny_ltx(path)
        else:
            policy = build_policy(self.tiny, self.device, self.dtype)
            policy.text_encoder, policy.tokenizer = build_t5_xxl(self.device, self.dtype)
            self._check_fits("LTX-Video-2B with T5-XXL", policy.transformer, policy.vae, policy.text_encoder)
            policy.save_pretrained(path)
        config = NextClipConfig(clip_frames=9 if self.tiny else 17)
        (path / CONFIG_NAME).write_text(json.dumps(asdict(config), indent=2))

    def _ltx2_policy(self) -> Any:
        return build_ltx2_policy(self.tiny, self.device, self.dtype, perturbed_attn=False)

    def _ltx2(self, path: Path) -> None:
        policy = self._ltx2_policy()
        policy.text_encoder = policy.tokenizer = None  # NSP conditions LTX-2 itself: no Gemma
        self._check_fits("the LTX-2 checkpoint", policy.transformer, policy.vae)
        policy.save_pretrained(path)

    def _ltx2_text(self, path: Path) -> None:
        """LTX-2 with its Gemma-3 text encoder (12B config; ``--gemma-layers`` of its 48 layers)."""
        if self.tiny:  # the tiny LTX-2 checkpoint, tiny Gemma-3 included
            build_tiny_ltx2(path)
            return
        policy = self._ltx2_policy()
        policy.text_encoder, policy.tokenizer, policy.connectors = build_gemma3_12b(
            self.gemma_layers, self.device, self.dtype
        )
        self._check_fits("LTX-2 with Gemma-3", policy.transformer, policy.vae, policy.text_encoder)
        policy.save_pretrained(path)

    def _reward_model(self, path: Path) -> None:
        """A `VideoRewardModel` on a Qwen2.5-VL-7B backbone (``--reward-model-layers`` of 28) reading the
        candidate and its prompt, with a stand-in calibration (mean 0, std 1): ``normalize`` needs one."""
        from rewards.reward_model import RewardModelArgs, VideoRewardModel

        layers = None if self.tiny else self.reward_model_layers
        vlm, tokenizer, inputs_config = build_qwen_vl(self.tiny, self.device, self.dtype, layers)
        args = RewardModelArgs(  # as recipes/ltx2_grpo.yaml describes it: the candidate and its prompt
            context_frames=0,
            use_prompt=True,
            inputs=asdict(inputs_config),
            calibration={"causal": [0.0, 1.0]},
        )
        model = VideoRewardModel.from_backbone(vlm.model, tokenizer, args)
        self._check_fits("the reward model", model)
        model.save_pretrained(path)

    def _nsp(self, path: Path, ltx: str, **config: Any) -> None:
        path.mkdir(parents=True)
        nsp = {"vlm": str(self.path("vlm")), "ltx": str(self.path(ltx)), **config}
        if self.tiny:
            nsp.update(connector_heads=4, context_frames=4)
        (path / "nsp_config.json").write_text(json.dumps(nsp, indent=2))

    def _nsp_ltx2b(self, path: Path) -> None:
        # recipes/nsp_qwen25vl7b_ltx2b_pretrain.yaml's header: the nsp_config.json of this stage
        self._nsp(path, "ltx2b", num_queries=64, connector_layers=2, connector_heads=28, context_frames=16)

    def _nsp_ltx2(self, path: Path) -> None:
        # recipes/nsp_qwen25vl7b_ltx2_grpo.yaml's header: the NSP paper's connector and 256 queries
        self._nsp(path, "ltx2", num_queries=256, connector="paper", context_frames=16)


def build_t5_xxl(device: torch.device, dtype: torch.dtype) -> tuple[Any, Any]:
    """LTX-Video's text encoder: the T5 v1.1 XXL encoder at its released config, with the project's
    small T5 tokenizer (the ids are its own)."""
    from transformers import T5Config, T5EncoderModel

    from policies.tiny import _character_tokenizer

    tokenizer = _character_tokenizer()
    config = T5Config(
        vocab_size=32128,
        d_model=4096,
        d_kv=64,
        d_ff=10240,
        num_layers=24,
        num_heads=64,
        relative_attention_num_buckets=32,
        feed_forward_proj="gated-gelu",
    )
    torch.manual_seed(0)
    with torch.device(device):
        return T5EncoderModel(config).to(dtype), tokenizer


def build_gemma3_12b(layers: int, device: torch.device, dtype: torch.dtype) -> tuple[Any, Any, Any]:
    """Gemma-3-12B (`Gemma3ForConditionalGeneration`, its released config with ``layers`` of its 48
    decoder layers), the project's small Gemma tokenizer, and LTX-2's text connectors reading every
    layer's hidden state (``text_proj_in_factor = layers + 1``, 49 as released)."""
    from diffusers.pipelines.ltx2 import LTX2TextConnectors
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    from policies.tiny_ltx2 import build_tiny_gemma_tokenizer

    tokenizer = build_tiny_gemma_tokenizer()
    ids = tokenizer.convert_tokens_to_ids
    config = Gemma3Config(
        text_config=dict(
            vocab_size=262208,
            hidden_size=3840,
            intermediate_size=15360,
            num_hidden_layers=layers,
            num_attention_heads=16,
            num_key_value_heads=8,
            head_dim=256,
            query_pre_attn_scalar=256,
            sliding_window=1024,
            max_position_embeddings=131072,
            rope_scaling={"rope_type": "linear", "factor": 8.0},
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        ),
        vision_config=dict(
            hidden_size=1152,
            intermediate_size=4304,
            num_hidden_layers=27,
            num_attention_heads=16,
            image_size=896,
            patch_size=14,
        ),
        mm_tokens_per_image=256,
        boi_token_index=ids("<start_of_image>"),
        eoi_token_index=ids("<end_of_image>"),
        image_token_index=ids("<image_soft_token>"),
    )
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            encoder = Gemma3ForConditionalGeneration(config)
            connectors = LTX2TextConnectors(text_proj_in_factor=layers + 1)
    finally:
        torch.set_default_dtype(default)
    return encoder, tokenizer, connectors


# -------------------------------------------------------------------------------------- manifests
def write_synthetic_manifest(
    folder: Path, frames: int, context_frames: int, height: int, width: int, fps: float, rows: int, seed: int
) -> Path:
    """``rows`` (context, next scene) MP4 pairs of a coloured square gliding over a gradient (the
    project's video writer and manifest format); every draw from ``seed``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    records = []
    for i in range(rows):
        base = rng.uniform(0.1, 0.6, size=3).astype(np.float32)
        colour = rng.uniform(0.5, 1.0, size=3).astype(np.float32)
        start, speed = rng.uniform(0, 1, size=2), rng.uniform(-0.01, 0.01, size=2)
        total = context_frames + frames - 1  # the next scene starts at the last context frame
        video = np.empty((total, height, width, 3), np.float32)
        side = max(2, min(height, width) // 6)
        for t in range(total):
            frame = base + 0.3 * (yy / height)[..., None] * (xx / width)[..., None]
            cy, cx = ((start + speed * t) % 1.0) * (height - side, width - side)
            frame[int(cy) : int(cy) + side, int(cx) : int(cx) + side] = colour
            video[t] = frame
        write_video(folder / f"context_{i}.mp4", video[:context_frames], fps)
        write_video(folder / f"next_{i}.mp4", video[context_frames - 1 :], fps)
        records.append(
            {
                "context_video": f"context_{i}.mp4",
                "next_video": f"next_{i}.mp4",
                "context_caption": f"a coloured square glides over a gradient, clip {i}",
                "next_caption": f"the square keeps gliding, clip {i}",
            }
        )
    return write_manifest(records, folder / "manifest.jsonl")


# ------------------------------------------------------------------------------------ measurements
def tree_bytes(path: Path, *, only_new: bool = False) -> int:
    """Bytes of the files under ``path``, each inode once; ``only_new``: leaving out files that are also
    linked from outside ``path`` (their bytes were on the disk before)."""
    seen: dict[tuple[int, int], list[Any]] = {}
    for folder, _, names in os.walk(path):
        for name in names:
            stat = os.lstat(Path(folder) / name)
            entry = seen.setdefault((stat.st_dev, stat.st_ino), [stat, 0])
            entry[1] += 1
    return sum(stat.st_size for stat, inside in seen.values() if not only_new or inside >= stat.st_nlink)


class GPUMemoryPoller:
    """The device's peak used memory (``nvidia-smi``, MiB -> GiB) while a run lasts; None without one."""

    def __init__(self, interval: float = 0.5) -> None:
        self.interval, self.peak_gib = interval, None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _read(self) -> float | None:
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                capture_output=True, text=True, timeout=10, check=True,
            ).stdout  # fmt: skip
            return max(float(v) for v in out.split()) / 1024
        except (OSError, subprocess.SubprocessError, ValueError):
            return None

    def _loop(self) -> None:
        while not self._stop.is_set():
            value = self._read()
            if value is not None:
                self.peak_gib = max(self.peak_gib or 0.0, value)
            self._stop.wait(self.interval)

    def __enter__(self) -> GPUMemoryPoller:
        if shutil.which("nvidia-smi"):
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def summarise_metrics(records: list[dict[str, Any]], stage: str) -> dict[str, Any]:
    """Per-iteration time split (GRPO) or step times (supervised) from ``metrics.jsonl`` records."""
    if stage == "grpo":
        rows = [r for r in records if "time/iteration_s" in r]
        iterations = [
            {
                "iteration": r.get("step"),
                "iteration_s": r["time/iteration_s"],
                "rollout_s": r["time/rollout_s"],
                "decode_reward_s": r["time/reward_s"],
                "reward_wait_s": r["time/reward_wait_s"],
                "hidden_frac": r["time/reward_hidden_frac"],
                "update_s": r.get(  # measured; before it was logged, what the iteration left
                    "time/update_s", r["time/iteration_s"] - r["time/rollout_s"] - r["time/reward_wait_s"]
                ),
                "updated_batches": r.get("train/updated_batches", 1.0),
                "peak_gb": r.get("memory/peak_gb"),
            }
            for r in rows
        ]
        steady = iterations[1:] or iterations  # iteration 0 holds the evaluation and the warm-up
        over = "iterations >= 1" if len(iterations) > 1 else "iteration 0 only"
        # overlap_update: an iteration that starts or drains the pipeline updates 0 or 2 batches
        if any(i["updated_batches"] != 1 for i in steady) and any(i["updated_batches"] == 1 for i in steady):
            steady = [i for i in steady if i["updated_batches"] == 1]
            over = "iterations >= 1 that updated one batch"
        keys = ("iteration_s", "rollout_s", "decode_reward_s", "hidden_frac", "update_s")
        median = {k: statistics.median(i[k] for i in steady) for k in keys} if steady else {}
        peaks = [i["peak_gb"] for i in iterations if i["peak_gb"] is not None]
        return {
            "iterations": iterations,
            "median": median,
            "median_over": over,
            "trainer_peak_gb": max(peaks, default=None),
        }
    steps = [r["time/step_s"] for r in records if "time/step_s" in r]
    steady = steps[1:] or steps
    return {"step_s": steps, "median": {"step_s": statistics.median(steady)} if steady else {}}


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    file = run_dir / "metrics.jsonl"
    if not file.is_file():
        return []
    return [json.loads(line) for line in file.read_text().splitlines() if line.strip()]


def one_line_error(output: str) -> str:
    """The last non-empty line of a failed run's output (the CLI's one-line error, or the exception)."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    return lines[-1][:400] if lines else "no output"


# -------------------------------------------------------------------------------------------- runs
@dataclass
class Result:
    recipe: str
    ok: bool = False
    error: str | None = None
    wall_s: float = 0.0
    disk_written_bytes: int | None = None
    final_bytes: int | None = None
    gpu_peak_gib: float | None = None
    reductions: list[str] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    command: list[str] = field(default_factory=list)


def recipe_overrides(
    name: str, raw: dict[str, Any], paths: dict[str, Path], tiny: bool, device: str, steps: int | None = None
) -> list[str]:
    """The ``key=value`` overrides of one run: paths, step count, the in-process judge, tiny sizes."""
    out = [f"policy.path={paths['policy']}", f"output_dir={paths['run']}", f"data.path={paths['manifest']}"]
    if "eval_path" in raw.get("data", {}):
        out.append(f"data.eval_path={paths['eval_manifest']}")
    steps_key = "max_iterations" if raw["stage"] == "grpo" else "max_steps"
    out.append(f"trainer.{steps_key}={steps or STEPS[raw['stage']]}")
    for i, reward in enumerate(raw.get("rewards", [])):
        if reward["name"] == JUDGE_REWARD:
            out += [
                f"rewards.{i}.name={JUDGE_REWARD}_local",
                f"rewards.{i}.kwargs.model={paths['vlm']}",
                f"rewards.{i}.kwargs.device={device}",
            ]
            if tiny:
                out.append(f"rewards.{i}.kwargs.dtype=float32")
        elif reward["name"] == "reward_model":
            out.append(f"rewards.{i}.kwargs.model={paths['reward_model']}")
    if tiny:
        out += [f"{k}={json.dumps(v)}" for k, v in TINY_OVERRIDES[name].items()]
    return out


def geometry(raw: dict[str, Any], tiny: bool, name: str) -> tuple[int, int, int, int, float]:
    """(next frames, context frames, height, width, fps) of the recipe's data section (tiny: shrunk)."""
    data = {**raw["data"]}
    if tiny:
        data.update({k[5:]: v for k, v in TINY_OVERRIDES[name].items() if k.startswith("data.")})
    # contexts as long as the longer clip: enough for the data section's default context length too
    context = max(int(data.get("context_frames", 0)), int(data["next_frames"]))
    return int(data["next_frames"]), context, int(data["height"]), int(data["width"]), float(data["fps"])


def run_recipe(
    name: str,
    args: argparse.Namespace,
    store: Checkpoints,
    finals: dict[str, Path],
    device: str,
) -> Result:
    result = Result(recipe=name, reductions=list(args.notes.get(name, [])))
    result.reductions += [f"override {o}" for o in extra_overrides(args, name)]
    tick = time.perf_counter()
    base = recipe_of(name)
    job = JOBS[base]
    try:
        raw = yaml.safe_load((RECIPES_DIR / f"{base}.yaml").read_text())
        frames, context, height, width, fps = geometry(raw, args.tiny, base)
        data_dir = args.work / "data" / f"{frames}x{context}x{height}x{width}"
        policy = finals.get(job.after) if job.after else None
        paths = {
            "policy": policy if policy is not None else store.path(job.policy),
            "run": args.out / "runs" / name,
            "manifest": data_dir / "train" / "manifest.jsonl",
            "eval_manifest": data_dir / "eval" / "manifest.jsonl",
            "vlm": store.path("vlm"),
            "reward_model": store.path("reward_model"),
        }
        if job.after and policy is None:
            result.reductions.append(f"starts from the base checkpoint ({job.after} did not run before it)")
        overrides = recipe_overrides(base, raw, paths, args.tiny, device, args.steps)
        overrides += extra_overrides(args, name)
        load_recipe(RECIPES_DIR / f"{base}.yaml", overrides)  # a bad override fails before any writing
        if not (data_dir / "eval" / "manifest.jsonl").is_file():
            log(f"{name}: synthetic manifests, {frames}+{context} frames {height}x{width} at {fps:g} fps")
            write_synthetic_manifest(data_dir / "train", frames, context, height, width, fps, 2, seed=0)
            write_synthetic_manifest(data_dir / "eval", frames, context, height, width, fps, 1, seed=1)
        for need in (job.policy, *job.needs):
            store.ensure(need)
        shutil.rmtree(paths["run"], ignore_errors=True)
        command = [sys.executable, "-m", "grpo.cli", "train", str(RECIPES_DIR / f"{base}.yaml"), *overrides]
        result.command = command
        log(f"{name}: nextscene train {' '.join(command[5:])}")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        env["PYTHONUNBUFFERED"] = "1"
        paths["run"].mkdir(parents=True, exist_ok=True)
        log_file = args.out / f"{name}.log"
        with GPUMemoryPoller() as poller, open(log_file, "w") as handle:
            try:
                proc = subprocess.run(
                    command, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT,
                    timeout=args.timeout, check=False,
                )  # fmt: skip
                returncode = proc.returncode
            except subprocess.TimeoutExpired:
                returncode = None
        result.gpu_peak_gib = poller.peak_gib
        output = log_file.read_text(errors="replace")
        if returncode != 0:
            why = f"timed out after {args.timeout} s" if returncode is None else one_line_error(output)
            raise RuntimeError(why)
        result.metrics = summarise_metrics(read_metrics(paths["run"]), raw["stage"])
        if raw["stage"] == "grpo":
            resolved = yaml.safe_load((paths["run"] / "resolved_recipe.yaml").read_text())["trainer"]
            result.metrics["pipeline"] = {k: resolved[k] for k in ("overlap_update", "compile")}
        result.final_bytes = tree_bytes(paths["run"] / "final", only_new=True)
        finals[name] = paths["run"] / "final"
        result.ok = True
    except Exception as err:  # one recipe failing must not stop the others
        result.error = f"{type(err).__name__}: {err}".splitlines()[0][:400]
    finally:
        run_dir = args.out / "runs" / name
        if run_dir.is_dir():
            result.disk_written_bytes = tree_bytes(run_dir, only_new=True)
        result.wall_s = time.perf_counter() - tick
    status = "ok" if result.ok else f"FAILED: {result.error}"
    log(f"{name}: {status} ({result.wall_s:.0f} s)")
    return result


def _fmt(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def _pipeline(options: dict[str, Any] | None) -> str:
    """``trainer.overlap_update`` and ``trainer.compile`` of a GRPO run, in words."""
    if options is None:
        return "-"
    mode = "one step off-policy" if options["overlap_update"] else "on-policy"
    return f"{mode}, compile {str(options['compile']).lower()}"


def format_table(results: list[Result]) -> str:
    head = (
        "| recipe | status | s/iter (or s/step) | rollout s | decode+reward s | hidden | update s "
        "| pipeline | peak GB (torch / device) | written GB (final) | wall s |\n" + "|---" * 11 + "|"
    )
    lines = [head]
    for r in results:
        m = r.metrics.get("median", {})
        per = m.get("iteration_s", m.get("step_s"))
        status = "ok" if r.ok else f"failed: {r.error}"
        if r.ok and r.metrics.get("median_over", "iterations >= 1") != "iterations >= 1":
            status += ", " + r.metrics["median_over"]
        if r.reductions:
            status += " (" + "; ".join(r.reductions) + ")"
        written = None if r.disk_written_bytes is None else r.disk_written_bytes / 1e9
        final = None if r.final_bytes is None else r.final_bytes / 1e9
        lines.append(
            f"| {r.recipe} | {status} | {_fmt(per)} | {_fmt(m.get('rollout_s'))} "
            f"| {_fmt(m.get('decode_reward_s'))} | {_fmt(m.get('hidden_frac'), '.0%')} "
            f"| {_fmt(m.get('update_s'))} | {_pipeline(r.metrics.get('pipeline'))} "
            f"| {_fmt(r.metrics.get('trainer_peak_gb'))} / {_fmt(r.gpu_peak_gib)} "
            f"| {_fmt(written, '.2f')} ({_fmt(final, '.2f')}) | {r.wall_s:.0f} |"
        )
    return "\n".join(lines)


def recipe_of(name: str) -> str:
    """The shipped recipe a ``--recipes`` entry runs: ``RECIPE`` or a variant ``RECIPE@LABEL``."""
    return name.partition("@")[0]


def extra_overrides(args: argparse.Namespace, name: str) -> list[str]:
    """The ``--set`` overrides of an entry: its recipe's, then a variant's own."""
    base = recipe_of(name)
    return list(args.extra.get(base, [])) + (list(args.extra.get(name, [])) if name != base else [])


def run(args: argparse.Namespace) -> list[Result]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    store = Checkpoints(args.work / "checkpoints", args.tiny, args.gemma_layers, args.reward_model_layers)
    for name in args.recipes:  # the stated reductions of the checkpoints each recipe reads
        job = JOBS[recipe_of(name)]
        needs = store.closure((job.policy, *job.needs))
        notes = args.notes.setdefault(name, [])
        if "ltx2_text" in needs and args.gemma_layers != GEMMA_12B_LAYERS and not args.tiny:
            notes.append(f"Gemma-3-12B text encoder with {args.gemma_layers} of its 48 layers")
        if "reward_model" in needs and args.reward_model_layers != QWEN_7B_LAYERS and not args.tiny:
            notes.append(f"reward model on Qwen2.5-VL-7B with {args.reward_model_layers} of its 28 layers")
    log(f"real-scale rehearsal ({'tiny, CPU' if args.tiny else device}): {', '.join(args.recipes)}")
    results, finals = [], {}
    for index, name in enumerate(args.recipes):
        results.append(run_recipe(name, args, store, finals, device))
        if not args.keep:  # free the disk of checkpoints no later recipe needs
            later = {
                n
                for other in args.recipes[index + 1 :]
                for n in store.closure((JOBS[recipe_of(other)].policy, *JOBS[recipe_of(other)].needs))
            }
            for stale in set(store.builders) - later:
                if store.path(stale).exists():
                    shutil.rmtree(store.path(stale))
                    log(f"removed checkpoint {stale} (no later recipe needs it)")
    return results


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--recipes",
        default=",".join(JOBS),
        help=f"comma-separated subset of {', '.join(JOBS)}; RECIPE@LABEL runs RECIPE once more (a "
        "variant: its own run directory and --set RECIPE@LABEL:key=value overrides, after RECIPE's)",
    )
    parser.add_argument("--tiny", action="store_true", help="tiny configs on the CPU (CI)")
    parser.add_argument("--work", type=Path, default=None, help="checkpoints and data (default: <out>/work)")
    parser.add_argument("--out", type=Path, required=True, help="run directories, logs and the JSON")
    parser.add_argument("--json", type=Path, default=None, help="also write the JSON here")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints after the last recipe")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per recipe run")
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"optimizer steps / GRPO iterations per recipe (default {STEPS})",
    )
    parser.add_argument(
        "--gemma-layers", type=int, default=GEMMA_12B_LAYERS, help="LTX-2's Gemma-3-12B layers (disk)"
    )
    parser.add_argument(
        "--reward-model-layers", type=int, default=QWEN_7B_LAYERS, help="reward model's Qwen layers (disk)"
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="RECIPE:key=value",
        help="an extra override of one recipe (a stated reduction), repeatable",
    )  # fmt: skip
    args = parser.parse_args(argv)
    args.recipes = [r for r in args.recipes.split(",") if r]
    unknown = [r for r in args.recipes if recipe_of(r) not in JOBS]
    if unknown:
        parser.error(f"unknown recipes {unknown}; choose from {', '.join(JOBS)}")
    args.extra, args.notes = {}, {}
    for item in args.set:
        recipe, sep, override = item.partition(":")
        if not sep or recipe_of(recipe) not in JOBS or "=" not in override:
            parser.error(
                f"--set {item!r}: expected RECIPE[@LABEL]:key=value with RECIPE one of {', '.join(JOBS)}"
            )
        args.extra.setdefault(recipe, []).append(override)
    # absolute: the NSP directories written here name their VLM and generator by these paths
    args.out = args.out.resolve()
    args.work = (args.work or args.out / "work").resolve()
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    tick = time.perf_counter()
    results = run(args)
    table = format_table(results)
    print(table, flush=True)
    payload = {
        "tiny": args.tiny,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "steps": {stage: args.steps or n for stage, n in STEPS.items()},
        "wall_s": time.perf_counter() - tick,
        "results": [asdict(r) for r in results],
    }
    for target in filter(None, (args.out / "real_scale.json", args.json)):
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(payload, indent=2) + "\n")
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
