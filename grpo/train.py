"""Run a recipe: build the policy, the data and the rewards it names, then the trainer of its stage
(``pretrain`` / ``sft``: `FlowMatchingTrainer`; ``grpo``: `GRPOTrainer`; ``reward_model`` and
``judge_sft``: `grpo.reward_modeling` and `grpo.judge_training`).

`validate` does every check that needs no model (keys, types, files, reward names) so a bad
recipe fails in well under a second; `run` then loads models and trains.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from grpo import judge_training, reward_modeling
from grpo.checkpoint import check_resume
from grpo.config import ConfigError, trained_frame_rate
from grpo.data import NSPDataConfig, NSPVideoDataset, ToyWorld, ToyWorldConfig
from grpo.data.rows import scene_row
from grpo.report import write_report
from grpo.schema import from_dict, save_resolved
from grpo.sft import FlowMatchingTrainer
from grpo.toy_checkpoints import build_fitted_tiny_ltx2, build_fitted_tiny_nextclip, build_fitted_tiny_nsp
from grpo.trainer import GRPOTrainer
from policies import LTXPolicy
from policies.errors import InputError
from policies.files import check_output_dir
from policies.ltx import check_ltx_dir
from policies.ltx2 import (
    LTX2_ONLY_FIELDS,
    LTX2Policy,
    LTX2SamplingConfig,
    check_ltx2_checkpoint,
    check_ltx2_dir,
)
from policies.nextclip import NextClipConfig, NextClipPolicy, check_nextclip_dir
from policies.nsp import NSPConfig, NSPLTX2Policy, NSPPolicy, check_nsp_dir, generator_family
from policies.seeding import INIT_STREAM, derived_seed, seeded
from policies.tiny import TinyLTXSpec, build_tiny_ltx
from policies.tiny_ltx2 import TinyLTX2Spec
from policies.tiny_nsp import TinyNSPSpec
from rewards.composite import CompositeReward

if TYPE_CHECKING:
    from grpo.recipe import Recipe

# ----------------------------------------------------------------------------------------- policies


@dataclass
class LTXPolicySpec:
    """``policy: {type: ltx, ...}``: an LTX-Video checkpoint directory, or a tiny random one."""

    type: Literal["ltx"] = field(default="ltx", metadata={"help": "policy kind"})
    path: str | None = field(default=None, metadata={"help": "diffusers-format LTX-Video directory"})
    tiny: bool = field(default=False, metadata={"help": "build a tiny random checkpoint when path is null"})
    torch_dtype: Literal["float32", "bfloat16"] = field(default="float32", metadata={"help": "weights dtype"})
    device: str | None = field(default=None, metadata={"help": "torch device (default: cuda if available)"})


@dataclass
class NSPPolicySpec:
    """``policy: {type: nsp, ...}``: an NSP directory (Qwen-VL + queries + connector + LTX), or a tiny one."""

    type: Literal["nsp"] = field(default="nsp", metadata={"help": "policy kind"})
    path: str | None = field(default=None, metadata={"help": "NSP policy directory (nsp_config.json)"})
    tiny: bool = field(default=False, metadata={"help": "build a tiny random NSP policy when path is null"})
    torch_dtype: Literal["float32", "bfloat16"] = field(default="float32", metadata={"help": "weights dtype"})
    device: str | None = field(default=None, metadata={"help": "torch device (default: cuda if available)"})
    overrides: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "NSPConfig fields to change (e.g. {train_queries: false})"}
    )
    tiny_vae_fit_steps: int = field(
        default=0, metadata={"help": "with tiny: fit the tiny VAE to the toy world first (0: random VAE)"}
    )
    tiny_generator: Literal["ltx", "ltx2"] = field(
        default="ltx",
        metadata={
            "help": "with tiny: the generator of the tiny NSP policy, ltx (LTX-Video 0.9) or ltx2 (LTX-2); "
            "a directory's own generator is read from it"
        },
    )
    sampling: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "NSP on LTX-2 only: LTX-2 sampling keys, as policy.sampling of type ltx2"},
    )

    def __post_init__(self) -> None:
        check_ltx2_sampling_keys(self.sampling)
        if self.tiny_generator not in ("ltx", "ltx2"):
            raise InputError(f"policy.tiny_generator must be 'ltx' or 'ltx2', got {self.tiny_generator!r}")
        if self.path is None and self.sampling and self.tiny_generator != "ltx2":
            raise InputError(
                "policy.sampling is for NSP on LTX-2: set policy.tiny_generator: ltx2 (or remove it)"
            )


def check_ltx2_sampling_keys(sampling: dict[str, Any]) -> None:
    """A recipe's ``policy.sampling`` (LTX-2 modalities and guidance): known keys with valid values."""
    unknown = sorted(set(sampling) - set(LTX2_ONLY_FIELDS))
    if unknown:
        raise InputError(
            f"policy.sampling: unknown key(s) {unknown}; choose from {', '.join(LTX2_ONLY_FIELDS)} "
            "(geometry, steps and CFG scale are trainer settings)"
        )
    LTX2SamplingConfig(**sampling)  # bad values fail here, before any model is loaded


@dataclass
class NextClipPolicySpec:
    """``policy: {type: nextclip, ...}``: an LTX-Video or LTX-2 directory (its ``model_index.json``
    picks which) run as a next-clip (clip-causal) model."""

    type: Literal["nextclip"] = field(default="nextclip", metadata={"help": "policy kind"})
    path: str | None = field(default=None, metadata={"help": "diffusers-format LTX-Video or LTX-2 directory"})
    tiny: bool = field(default=False, metadata={"help": "build a tiny random checkpoint when path is null"})
    torch_dtype: Literal["float32", "bfloat16"] = field(default="float32", metadata={"help": "weights dtype"})
    device: str | None = field(default=None, metadata={"help": "torch device (default: cuda if available)"})
    tiny_generator: Literal["ltx", "ltx2"] = field(
        default="ltx",
        metadata={
            "help": "with tiny: the generator of the tiny next-clip model, ltx (LTX-Video 0.9) or ltx2 "
            "(LTX-2, video stream); a directory's own generator is read from it"
        },
    )
    clip_frames: int | None = field(
        default=None, metadata={"help": "frames per clip (8k+1); null: the checkpoint's nextclip.json or 9"}
    )
    history_sigma: float | None = field(
        default=None, metadata={"help": "noise level of the clean history; null: the checkpoint's or 0"}
    )
    tiny_vae_fit_steps: int = field(
        default=0, metadata={"help": "with tiny: fit the tiny VAE to the toy world first (0 = random VAE)"}
    )


@dataclass
class LTX2PolicySpec:
    """``policy: {type: ltx2, ...}``: an LTX-2 (audio + video) directory, or a tiny random one."""

    type: Literal["ltx2"] = field(default="ltx2", metadata={"help": "policy kind"})
    path: str | None = field(default=None, metadata={"help": "diffusers-format LTX-2 directory"})
    tiny: bool = field(default=False, metadata={"help": "build a tiny random checkpoint when path is null"})
    torch_dtype: Literal["float32", "bfloat16"] = field(default="float32", metadata={"help": "weights dtype"})
    device: str | None = field(default=None, metadata={"help": "torch device (default: cuda if available)"})
    tiny_vae_fit_steps: int = field(
        default=0,
        metadata={
            "help": "with tiny: the toy-world layout (TinyLTX2Spec.toy_world), its video VAE fitted to "
            "the toy world for this many steps first (0 = the default random tiny layout)"
        },
    )
    tiny_audio_fit_steps: int = field(
        default=0,
        metadata={
            "help": "with tiny: the toy-world layout, its audio VAE and then its vocoder fitted to the toy "
            "world's sound for this many steps each first (grpo.toy_audio; 0 = random)"
        },
    )
    sampling: dict[str, Any] = field(
        default_factory=dict,
        metadata={
            "help": "LTX-2 sampling: modalities (video | audio_video), stg_scale, stg_blocks, "
            "modality_scale, guidance_rescale, audio_guidance_scale, audio_stg_scale, "
            "audio_modality_scale, audio_guidance_rescale"
        },
    )

    def __post_init__(self) -> None:
        check_ltx2_sampling_keys(self.sampling)


POLICY_SPECS: dict[str, type] = {
    "ltx": LTXPolicySpec,
    "ltx2": LTX2PolicySpec,
    "nsp": NSPPolicySpec,
    "nextclip": NextClipPolicySpec,
}


def _policy_spec(recipe: Recipe) -> Any:
    kind = recipe.policy["type"]
    if kind not in POLICY_SPECS:
        raise InputError(f"policy.type: unknown policy {kind!r}; choose one of {', '.join(POLICY_SPECS)}")
    spec = from_dict(POLICY_SPECS[kind], recipe.policy, where="policy")
    if spec.path is None and not spec.tiny:
        raise InputError(
            "policy.path: give a checkpoint directory (or set policy.tiny: true for a random tiny one)"
        )
    if spec.path is not None:
        if not Path(spec.path).is_dir():
            raise InputError(f"policy.path: checkpoint directory {spec.path!r} does not exist")
        trained = trained_frame_rate(spec.path)
        if trained is not None and trained != recipe.args.frame_rate:
            raise InputError(
                f"policy.path: {spec.path!r} was trained at {trained:g} fps but data.fps is "
                f"{recipe.args.frame_rate:g}: set data.fps: {trained:g} (or retrain the policy at this rate)"
            )
        check_policy_dir(spec)
        if isinstance(spec, LTX2PolicySpec) and recipe.stage == "grpo":
            check_ltx2_recipe(spec, recipe.args)
    return spec


def check_ltx2_recipe(spec: LTX2PolicySpec, args: Any) -> None:
    """What the LTX-2 directory cannot sample at the GRPO config's geometry, modalities and guidance,
    from its configs alone: a one-line error at recipe time, not after the first rollout."""
    sampling = LTX2SamplingConfig(
        num_frames=args.num_frames,
        height=args.height,
        width=args.width,
        frame_rate=args.frame_rate,
        guidance_scale=args.guidance_scale,
        **spec.sampling,
    )
    check_ltx2_checkpoint(Path(spec.path), sampling, modalities_option="policy.sampling.modalities")


def check_policy_dir(spec: Any) -> None:
    """Layout and weight files of the checkpoint a spec names (safetensors headers only: cheap)."""
    if isinstance(spec, NSPPolicySpec):
        config = check_nsp_dir(Path(spec.path), **spec.overrides)
        if spec.sampling and generator_family(Path(spec.path) / config.ltx) != "ltx2":
            raise InputError(
                f"policy.sampling: {spec.path!r} generates with LTX-Video, which has no LTX-2 sampling "
                "settings: remove policy.sampling (or give an NSP directory on LTX-2)"
            )
    elif isinstance(spec, NextClipPolicySpec):
        check_nextclip_dir(Path(spec.path))
    elif isinstance(spec, LTX2PolicySpec):
        check_ltx2_dir(Path(spec.path))
    else:
        check_ltx_dir(Path(spec.path))


def build_policy(spec: Any, output_dir: Path) -> Any:
    """The policy a spec names: loaded from its directory, or a tiny random one built in the run dir."""
    import torch

    device = spec.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, spec.torch_dtype)
    if isinstance(spec, NSPPolicySpec):
        path = Path(spec.path) if spec.path else output_dir / "base_tiny_nsp"
        if spec.path is None and not (path / "nsp_config.json").is_file():
            # built with the overrides, so its queries and connector are of the kind they ask for
            tiny = TinyNSPSpec(vae_fit_steps=spec.tiny_vae_fit_steps, generator=spec.tiny_generator)
            tiny.nsp = NSPConfig.from_dict({**asdict(tiny.nsp), **spec.overrides}, "policy.overrides")
            build_fitted_tiny_nsp(path, tiny)
        policy = NSPPolicy.from_pretrained(path, torch_dtype=dtype, device=device, **spec.overrides)
        if isinstance(policy, NSPLTX2Policy):
            policy.sampling_overrides = dict(spec.sampling)
        return policy
    if isinstance(spec, NextClipPolicySpec):
        path = Path(spec.path) if spec.path else output_dir / "base_tiny_nextclip"
        changes = {
            k: getattr(spec, k) for k in ("clip_frames", "history_sigma") if getattr(spec, k) is not None
        }
        if spec.path is None and not (path / "model_index.json").is_file():
            toy = TinyLTX2Spec.toy_world() if spec.tiny_generator == "ltx2" else TinyLTXSpec.toy_world()
            build_fitted_tiny_nextclip(
                path,
                toy,
                config=NextClipConfig(**changes),
                vae_fit_steps=spec.tiny_vae_fit_steps,
                generator=spec.tiny_generator,
            )
        return NextClipPolicy.from_pretrained(path, torch_dtype=dtype, device=device, **changes)
    if isinstance(spec, LTX2PolicySpec):
        path = Path(spec.path) if spec.path else output_dir / "base_tiny_ltx2"
        if spec.path is None and not (path / "model_index.json").is_file():
            fits = dict(vae_fit_steps=spec.tiny_vae_fit_steps, audio_fit_steps=spec.tiny_audio_fit_steps)
            build_fitted_tiny_ltx2(path, TinyLTX2Spec.toy_world(**fits) if any(fits.values()) else None)
        policy = LTX2Policy.from_pretrained(path, torch_dtype=dtype, device=device)
        policy.sampling_overrides = dict(spec.sampling)
        return policy
    path = Path(spec.path) if spec.path else output_dir / "base_tiny_ltx"
    if spec.path is None and not (path / "model_index.json").is_file():
        build_tiny_ltx(path)
    return LTXPolicy.from_pretrained(path, torch_dtype=dtype, device=device)


# ----------------------------------------------------------------------------------------- data


@dataclass
class PromptDataSpec:
    """``data: {type: prompts, ...}``: text prompts inline or from a file (one per line, or JSONL rows)."""

    type: Literal["prompts"] = field(default="prompts", metadata={"help": "data kind"})
    prompts: list[str] | None = field(default=None, metadata={"help": "training prompts"})
    path: str | None = field(
        default=None, metadata={"help": ".txt (one prompt a line) or .jsonl with 'prompt'"}
    )
    eval_prompts: list[str] | None = field(default=None, metadata={"help": "held-out prompts for evaluation"})
    fps: float = field(
        default=8.0, metadata={"help": "frame rate of the generated videos (temporal RoPE scale, files)"}
    )


@dataclass
class ToyWorldDataSpec:
    """``data: {type: toyworld, ...}``: the embedded toy causal world, generated in memory from seeds."""

    type: Literal["toyworld"] = field(default="toyworld", metadata={"help": "data kind"})
    size: int = field(default=32, metadata={"help": "frame height and width in pixels"})
    context_frames: int = field(default=9, metadata={"help": "frames of the context clip (8k+1)"})
    next_frames: int = field(default=9, metadata={"help": "frames of the next scene (8k+1)"})
    num_train: int = field(default=2048, metadata={"help": "training samples (train split seeds)"})
    num_eval: int = field(default=32, metadata={"help": "held-out samples (validation split seeds)"})
    prompt: Literal["next_caption", "context_caption", "instruction"] = field(
        default="next_caption", metadata={"help": "which caption is the text prompt"}
    )
    context: bool = field(
        default=False, metadata={"help": "give the policy the context clip and instruction (NSP)"}
    )
    next_overlap: int = field(
        default=0, metadata={"help": "last context frames repeated at the start of the next scene"}
    )
    fps: float = field(
        default=8.0, metadata={"help": "frame rate of the videos; every stage trains and generates at it"}
    )
    audio: bool = field(
        default=False,
        metadata={"help": "sound: rows carry the next scene's waveform ('audio', 'sample_rate'; LTX-2)"},
    )
    first_frame: bool = field(
        default=False,
        metadata={
            "help": "image-to-video: rows carry the next scene's first frame as 'image' (clean conditioning);"
            " needs next_overlap >= 1, so that frame is the last context frame, already seen"
        },
    )

    def __post_init__(self) -> None:
        if self.first_frame and self.next_overlap < 1:
            raise InputError(
                "data.first_frame conditions on the next scene's first frame, which must be one the "
                f"context showed: set data.next_overlap >= 1 (got {self.next_overlap})"
            )


@dataclass
class ManifestDataSpec:
    """``data: {type: nsp_manifest, ...}``: an NSP manifest (JSONL / Parquet) of (context, next) videos."""

    type: Literal["nsp_manifest"] = field(default="nsp_manifest", metadata={"help": "data kind"})
    path: str = field(default="", metadata={"help": "manifest file, or the folder holding manifest.jsonl"})
    eval_path: str | None = field(default=None, metadata={"help": "held-out manifest"})
    context_frames: int = field(default=9, metadata={"help": "context frames to load"})
    next_frames: int = field(default=9, metadata={"help": "next-scene frames to load (8k+1)"})
    fps: float | None = field(
        default=None,
        metadata={"help": "frame rate the videos are resampled to, trained and generated at (required)"},
    )
    height: int = field(default=32, metadata={"help": "frame height after resize/crop"})
    width: int = field(default=32, metadata={"help": "frame width after resize/crop"})
    on_error: Literal["raise", "skip"] = field(
        default="raise", metadata={"help": "bad rows: raise, or skip (undecodable: the next row instead)"}
    )
    prompt: Literal["next_caption", "context_caption", "instruction"] = field(
        default="next_caption", metadata={"help": "which caption is the text prompt"}
    )
    context: bool = field(
        default=False, metadata={"help": "give the policy the context clip and instruction (NSP)"}
    )


@dataclass
class ToyWorldClipsDataSpec:
    """``data: {type: toyworld_clips, ...}``: the toy world as clip sequences (next-clip models).

    Rows: ``video`` (every clip, the teacher-forcing target), ``context`` (the first clips, what a
    rollout continues), the world's truth for the rewards, and the chosen caption as ``prompt``.
    """

    type: Literal["toyworld_clips"] = field(default="toyworld_clips", metadata={"help": "data kind"})
    size: int = field(default=32, metadata={"help": "frame height and width in pixels"})
    num_clips: int = field(default=4, metadata={"help": "clips per video, context clips included"})
    context_clips: int = field(default=1, metadata={"help": "leading clips given as context"})
    clip_frames: int = field(default=9, metadata={"help": "frames per clip (8k+1)"})
    num_train: int = field(default=2048, metadata={"help": "training samples (train split seeds)"})
    num_eval: int = field(default=32, metadata={"help": "held-out samples (validation split seeds)"})
    prompt: Literal["none", "context_caption", "next_caption"] = field(
        default="none", metadata={"help": "caption given as the text prompt; none: video only"}
    )
    fps: float = field(
        default=8.0, metadata={"help": "frame rate of the videos; every stage trains and generates at it"}
    )


DATA_SPECS: dict[str, type] = {
    "prompts": PromptDataSpec,
    "toyworld": ToyWorldDataSpec,
    "toyworld_clips": ToyWorldClipsDataSpec,
    "nsp_manifest": ManifestDataSpec,
}


def data_frame_rate(data: dict[str, Any]) -> float | None:
    """The frame rate of a recipe's data section: its ``fps``, or the default of its kind; None for a
    kind this module does not know (`validate` names the problem).

    This is the recipe's one frame rate: `grpo.recipe.Recipe` copies it into ``trainer.frame_rate``,
    so pretraining, SFT, GRPO rollouts, evaluation and written videos all use the rate of the videos
    the policy learns from. A manifest's videos have their own native rates, so it must name one.
    """
    kind = DATA_SPECS.get(data.get("type"))
    if kind is None:
        return None
    fps = data.get("fps", next(f.default for f in fields(kind) if f.name == "fps"))
    if fps is None:
        raise ConfigError(
            "data.fps",
            "required: the frame rate the videos are resampled to and the policy trains and generates "
            "at (e.g. 24)",
        )
    if isinstance(fps, bool) or not isinstance(fps, int | float) or not (fps > 0 and math.isfinite(fps)):
        raise ConfigError("data.fps", f"must be a positive number, got {fps!r}")
    return float(fps)


def _data_spec(recipe: Recipe) -> Any:
    kind = recipe.data["type"]
    if kind not in DATA_SPECS:
        raise InputError(f"data.type: unknown data kind {kind!r}; choose one of {', '.join(DATA_SPECS)}")
    spec = from_dict(DATA_SPECS[kind], recipe.data, where="data")
    if kind == "prompts" and (spec.prompts is None) == (spec.path is None):
        raise InputError("data: give exactly one of data.prompts (a list) or data.path (a file)")
    for key in ("path", "eval_path"):
        value = getattr(spec, key, None)
        if kind != "toyworld" and value is not None and not Path(value).exists():
            raise InputError(f"data.{key}: dataset file {value!r} does not exist")
    if recipe.stage in ("pretrain", "sft") and kind == "prompts":
        raise InputError(
            f"data.type: stage {recipe.stage!r} needs target videos: use toyworld or nsp_manifest"
        )
    return spec


class _Rows:
    """A lazy sequence of rows: ``source[i]`` turned into a trainer row by ``convert``.

    A source sample that is None (an `NSPVideoDataset` row whose video failed to decode, with
    ``on_error: skip``) is replaced by the next sample that is not, wrapping around: the trainers'
    row order stays a function of the seed and the data only, so a resumed run reads the same rows.
    """

    def __init__(self, source: Any, convert: Any) -> None:
        self.source, self.convert = source, convert
        self.failed: set[int] = set()  # source indices that gave None (not decoded again)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self.source)
        if not -n <= index < n:
            raise IndexError(f"row {index} is out of range for {n} rows")
        index %= n
        for candidate in ((index + k) % n for k in range(n)):
            if candidate in self.failed:
                continue
            sample = self.source[candidate]
            if sample is not None:
                return self.convert(sample)
            self.failed.add(candidate)
        raise InputError(f"none of the {n} rows of the dataset could be decoded; check its video files")


def _clip_row(prompt_column: str):
    """Clip-sequence sample -> row: every clip as ``video``, the ``context`` clips, the truth."""

    def convert(sample: dict[str, Any]) -> dict[str, Any]:
        row = {"video": sample["clips"].flatten(0, 1), "context": sample["context"]}
        if prompt_column != "none":
            row["prompt"] = sample[prompt_column]
        row.update({k: v for k, v in sample.items() if k in ("world", "next_caption", "context_caption")})
        return row

    return convert


def _read_prompts(path: Path) -> list[dict[str, Any]]:
    """Rows of a prompts file: one prompt a line (.txt) or JSONL objects with a 'prompt' string."""
    if not path.is_file():
        raise InputError(f"data.path: {path} is not a file; give a .txt (one prompt a line) or .jsonl file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise InputError(f"data.path: {path} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if path.suffix != ".jsonl":
            rows.append({"prompt": line.strip()})
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(
                f"{path}:{number}: not valid JSON ({err.msg}); one JSON object per line"
            ) from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise InputError(f"{path}:{number}: each JSONL row needs a 'prompt' string")
        rows.append(row)
    if not rows:
        raise InputError(f"data.path: {path} holds no prompts; give one prompt a line (.txt) or JSONL rows")
    return rows


def build_datasets(spec: Any) -> tuple[Any, Any]:
    """Training and held-out rows for a data spec."""
    if isinstance(spec, ToyWorldClipsDataSpec):
        config = ToyWorldConfig.for_clips(
            spec.num_clips,
            clip_frames=spec.clip_frames,
            context_clips=spec.context_clips,
            size=spec.size,
            fps=spec.fps,
        )
        convert = _clip_row(spec.prompt)
        return (
            _Rows(ToyWorld(config, split="train", num_samples=spec.num_train), convert),
            _Rows(ToyWorld(config, split="validation", num_samples=spec.num_eval), convert),
        )
    if isinstance(spec, ToyWorldDataSpec):
        config = ToyWorldConfig(
            size=spec.size,
            context_frames=spec.context_frames,
            next_frames=spec.next_frames,
            next_overlap=spec.next_overlap,
            fps=spec.fps,
            audio=spec.audio,
        )
        convert = scene_row(spec.prompt, spec.context, spec.first_frame)
        return (
            _Rows(ToyWorld(config, split="train", num_samples=spec.num_train), convert),
            _Rows(ToyWorld(config, split="validation", num_samples=spec.num_eval), convert),
        )
    if isinstance(spec, ManifestDataSpec):
        config = NSPDataConfig(
            context_frames=spec.context_frames,
            next_frames=spec.next_frames,
            fps=spec.fps,
            height=spec.height,
            width=spec.width,
            on_error=spec.on_error,
        )
        convert = scene_row(spec.prompt, spec.context)
        evaluation = _Rows(NSPVideoDataset(spec.eval_path, config), convert) if spec.eval_path else None
        return _Rows(NSPVideoDataset(spec.path, config), convert), evaluation
    if spec.prompts is not None:
        train = [{"prompt": p} for p in spec.prompts]
    else:
        train = _read_prompts(Path(spec.path))
    if not train:
        raise InputError("data.prompts: the training set is empty; give at least one prompt")
    evaluation = [{"prompt": p} for p in spec.eval_prompts] if spec.eval_prompts else None
    return train, evaluation


# ----------------------------------------------------------------------------------------- running


def validate(recipe: Recipe) -> tuple[Any, Any]:
    """Every check that needs no model; returns the policy and data specs."""
    check_output_dir(recipe.args.output_dir, "output_dir")
    if recipe.stage == "reward_model":
        specs = reward_modeling.validate_recipe(recipe)
    elif recipe.stage == "judge_sft":
        specs = judge_training.validate_recipe(recipe)
    else:
        specs = _policy_spec(recipe), _data_spec(recipe)
    check_resume(recipe.args.resume_from_checkpoint, recipe.args.output_dir)
    return specs


def run(recipe: Recipe) -> list[dict[str, Any]]:
    """Train as the recipe says; returns the logged metrics."""
    if recipe.stage == "reward_model":
        return reward_modeling.run_recipe(recipe)
    if recipe.stage == "judge_sft":
        return judge_training.run_recipe(recipe)
    policy_spec, data_spec = validate(recipe)
    train, evaluation = build_datasets(data_spec)
    flow_matching = recipe.stage in ("pretrain", "sft")
    rewards = None
    if not flow_matching:  # before anything is written: a reward that cannot work leaves no run dir
        specs = [{"name": r.name, "weight": r.weight, "kwargs": r.kwargs} for r in recipe.rewards]
        rewards = CompositeReward.from_specs(specs)
        for func in rewards.funcs:
            if callable(getattr(func, "check_health", None)):  # a judge server must answer now
                func.check_health()
    output_dir = Path(recipe.args.output_dir)
    save_resolved(recipe, output_dir)
    # weights a checkpoint may lack (an NSP connector not trained yet) are drawn from the recipe's seed
    with seeded(derived_seed(recipe.args.seed, INIT_STREAM, 1)):
        policy = build_policy(policy_spec, output_dir)
    if flow_matching:
        return FlowMatchingTrainer(policy, recipe.args, train, eval_dataset=evaluation).train()
    trainer = GRPOTrainer(policy, rewards, recipe.args, train, eval_dataset=evaluation)
    history = trainer.train()
    if trainer.accelerator.is_main_process:  # curves, before/after table and videos in one page
        print(f"report: {write_report(output_dir)}")
    return history
