"""Run a recipe, and the policy and data kinds of the stages that train a video policy.

The specs here (``policy.type`` ltx / ltx2 / nsp / nextclip, ``data.type`` prompts / toyworld /
toyworld_clips / nsp_manifest) each carry their checks and their builder; `grpo.recipe.STAGES` names
them. `validate` does every check that needs no model (keys, types, files, reward names) through the
recipe's stage entry, so a bad recipe fails in well under a second; `run` then hands the validated
specs to the stage's runner (``pretrain`` / ``sft`` / ``grpo``: `train_policy`; ``reward_model`` and
``judge_sft``: `grpo.reward_modeling` and `grpo.judge_training`), which loads models and trains.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from grpo.checkpoint import check_resume
from grpo.config import GRPOConfig, trained_frame_rate
from grpo.data import NSPDataConfig, NSPVideoDataset, ToyWorld, ToyWorldConfig
from grpo.data.rows import scene_row
from grpo.report import write_report
from grpo.schema import build_rewards, save_resolved, section_spec
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

if TYPE_CHECKING:
    from grpo.recipe import Recipe

# ----------------------------------------------------------------------------------------- policies


@dataclass
class VideoPolicySpec:
    """What every video policy section has: a checkpoint directory, or a tiny random one; the checks
    of a directory before any model is loaded; the device and dtype it is built on (`build_policy`)."""

    type: str = field(metadata={"help": "policy kind"})
    path: str | None = field(default=None, metadata={"help": "checkpoint directory"})
    tiny: bool = field(default=False, metadata={"help": "build a tiny random checkpoint when path is null"})
    torch_dtype: Literal["float32", "bfloat16"] = field(default="float32", metadata={"help": "weights dtype"})
    device: str | None = field(default=None, metadata={"help": "torch device (default: cuda if available)"})

    def check(self, recipe: Recipe) -> None:
        """A checkpoint or tiny, the directory's layout and weight files (safetensors headers only:
        cheap), and that it was trained at the recipe's frame rate."""
        if self.path is None and not self.tiny:
            raise InputError(
                "policy.path: give a checkpoint directory (or set policy.tiny: true for a random tiny one)"
            )
        if self.path is None:
            return
        if not Path(self.path).is_dir():
            raise InputError(f"policy.path: checkpoint directory {self.path!r} does not exist")
        trained = trained_frame_rate(self.path)
        if trained is not None and trained != recipe.args.frame_rate:
            raise InputError(
                f"policy.path: {self.path!r} was trained at {trained:g} fps but data.fps is "
                f"{recipe.args.frame_rate:g}: set data.fps: {trained:g} (or retrain the policy at this rate)"
            )
        self.check_dir()

    def check_dir(self) -> None:
        """Layout and weight files of the directory ``path`` names, loading nothing."""
        raise NotImplementedError(f"{type(self).__name__} names no checkpoint layout")

    def build(self, output_dir: Path, device: str, dtype: Any) -> Any:
        """The policy: loaded from ``path``, or a tiny random one built in ``output_dir`` first."""
        raise NotImplementedError(f"{type(self).__name__} has no builder")


@dataclass
class LTXPolicySpec(VideoPolicySpec):
    """``policy: {type: ltx, ...}``: an LTX-Video checkpoint directory, or a tiny random one."""

    type: Literal["ltx"] = field(default="ltx", metadata={"help": "policy kind"})
    path: str | None = field(default=None, metadata={"help": "diffusers-format LTX-Video directory"})

    def check_dir(self) -> None:
        check_ltx_dir(Path(self.path))

    def build(self, output_dir: Path, device: str, dtype: Any) -> Any:
        path = Path(self.path) if self.path else output_dir / "base_tiny_ltx"
        if self.path is None and not (path / "model_index.json").is_file():
            build_tiny_ltx(path)
        return LTXPolicy.from_pretrained(path, torch_dtype=dtype, device=device)


@dataclass
class NSPPolicySpec(VideoPolicySpec):
    """``policy: {type: nsp, ...}``: an NSP directory (Qwen-VL + queries + connector + LTX), or a tiny one."""

    type: Literal["nsp"] = field(default="nsp", metadata={"help": "policy kind"})
    path: str | None = field(default=None, metadata={"help": "NSP policy directory (nsp_config.json)"})
    overrides: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "NSPConfig fields to change (e.g. {train_queries: false})"}
    )
    tiny_vae_fit_steps: int = field(
        default=0, metadata={"help": "with tiny: fit the tiny VAE to the toy world first (0: random VAE)"}
    )
    tiny_audio_fit_steps: int = field(
        default=0,
        metadata={
            "help": "with tiny and tiny_generator ltx2: fit the audio VAE to the toy world's sound for this "
            "many steps, then the vocoder for half as many (0: random)"
        },
    )
    tiny_generator: Literal["ltx", "ltx2"] = field(
        default="ltx",
        metadata={
            "help": "with tiny: the generator of the tiny NSP policy, ltx (LTX-Video 0.9) or ltx2 (LTX-2); "
            "a directory's own generator is read from it"
        },
    )
    tiny_ltx: dict[str, Any] = field(
        default_factory=dict,
        metadata={
            "help": "with tiny (generator ltx): TinyLTXSpec sizes changed from the toy-world layout, "
            "e.g. {vae_patch_size: 8}"
        },
    )
    sampling: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "NSP on LTX-2 only: LTX-2 sampling keys, as policy.sampling of type ltx2"},
    )

    def __post_init__(self) -> None:
        if self.sampling:  # (empty: an NSP on LTX-Video, which has no LTX-2 settings)
            self.sampling = resolved_ltx2_sampling(self.sampling)
        if self.tiny_ltx or (self.tiny and self.tiny_generator == "ltx"):
            self.tiny_ltx = tiny_ltx_sizes(self.tiny_ltx, self.tiny_generator)
        if self.tiny_generator not in ("ltx", "ltx2"):
            raise InputError(f"policy.tiny_generator must be 'ltx' or 'ltx2', got {self.tiny_generator!r}")
        if self.tiny_audio_fit_steps and self.tiny_generator != "ltx2":
            raise InputError(
                "policy.tiny_audio_fit_steps fits an LTX-2 audio path: set policy.tiny_generator: ltx2 "
                "(or remove it)"
            )
        if self.path is None and self.sampling and self.tiny_generator != "ltx2":
            raise InputError(
                "policy.sampling is for NSP on LTX-2: set policy.tiny_generator: ltx2 (or remove it)"
            )

    def check_dir(self) -> None:
        config = check_nsp_dir(Path(self.path), **self.overrides)
        if self.sampling and generator_family(Path(self.path) / config.ltx) != "ltx2":
            raise InputError(
                f"policy.sampling: {self.path!r} generates with LTX-Video, which has no LTX-2 sampling "
                "settings: remove policy.sampling (or give an NSP directory on LTX-2)"
            )

    def build(self, output_dir: Path, device: str, dtype: Any) -> Any:
        path = Path(self.path) if self.path else output_dir / "base_tiny_nsp"
        if self.path is None and not (path / "nsp_config.json").is_file():
            # built with the overrides, so its queries and connector are of the kind they ask for
            tiny = TinyNSPSpec(
                ltx=TinyLTXSpec.toy_world(**self.tiny_ltx),
                vae_fit_steps=self.tiny_vae_fit_steps,
                audio_fit_steps=self.tiny_audio_fit_steps,
                generator=self.tiny_generator,
            )
            tiny.nsp = NSPConfig.from_dict({**asdict(tiny.nsp), **self.overrides}, "policy.overrides")
            build_fitted_tiny_nsp(path, tiny, device)
        policy = NSPPolicy.from_pretrained(path, torch_dtype=dtype, device=device, **self.overrides)
        if isinstance(policy, NSPLTX2Policy):
            policy.sampling_overrides = dict(self.sampling)
        return policy


def tiny_ltx_sizes(sizes: dict[str, Any], generator: str) -> dict[str, Any]:
    """``policy.tiny_ltx`` checked against `TinyLTXSpec`'s fields before any model is built, and written
    out in full (the toy-world layout's value of every size not given), so a resolved recipe keeps
    building the same model after a default changes."""
    if generator != "ltx":
        raise InputError(
            f"policy.tiny_ltx: sizes of a tiny LTX-Video, but tiny_generator is {generator!r}: remove it"
        )
    names = {f.name for f in fields(TinyLTXSpec)} - {"seed"}
    unknown = sorted(set(sizes) - names)
    if unknown:
        raise InputError(f"policy.tiny_ltx: unknown size(s) {unknown}; known: {sorted(names)}")
    sizes = {k: tuple(v) if isinstance(v, list) else v for k, v in sizes.items()}
    layout = TinyLTXSpec.toy_world()
    for name, value in sizes.items():
        expected = type(getattr(layout, name))
        if type(value) is not expected or (expected is tuple and not all(type(v) is int for v in value)):
            kind = "a list of ints" if expected is tuple else expected.__name__
            raise InputError(f"policy.tiny_ltx.{name}: expected {kind}, got {value!r}")
    spec = TinyLTXSpec.toy_world(**sizes)
    return {name: getattr(spec, name) for name in sorted(names)}


def resolved_ltx2_sampling(sampling: dict[str, Any]) -> dict[str, Any]:
    """A recipe's ``policy.sampling`` (LTX-2 modalities and guidance) with every LTX-2-only setting
    filled in (what `LTX2Policy.ltx2_sampling` adds to the trainer's `SamplingConfig`), after checking
    its keys and values: the same sampling, pinned in ``resolved_recipe.yaml``."""
    unknown = sorted(set(sampling) - set(LTX2_ONLY_FIELDS))
    if unknown:
        raise InputError(
            f"policy.sampling: unknown key(s) {unknown}; choose from {', '.join(LTX2_ONLY_FIELDS)} "
            "(geometry, steps and CFG scale are trainer settings)"
        )
    config = LTX2SamplingConfig(**sampling)  # bad values fail here, before any model is loaded
    return {name: getattr(config, name) for name in LTX2_ONLY_FIELDS}


@dataclass
class NextClipPolicySpec(VideoPolicySpec):
    """``policy: {type: nextclip, ...}``: an LTX-Video or LTX-2 directory (its ``model_index.json``
    picks which) run as a next-clip (clip-causal) model."""

    type: Literal["nextclip"] = field(default="nextclip", metadata={"help": "policy kind"})
    path: str | None = field(default=None, metadata={"help": "diffusers-format LTX-Video or LTX-2 directory"})
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
    tiny_ltx: dict[str, Any] = field(
        default_factory=dict,
        metadata={
            "help": "with tiny (generator ltx): TinyLTXSpec sizes changed from the toy-world layout, "
            "e.g. {vae_patch_size: 8, num_layers: 4}"
        },
    )

    def __post_init__(self) -> None:
        if self.tiny_ltx or (self.tiny and self.tiny_generator == "ltx"):
            self.tiny_ltx = tiny_ltx_sizes(self.tiny_ltx, self.tiny_generator)

    def check_dir(self) -> None:
        check_nextclip_dir(Path(self.path))

    def build(self, output_dir: Path, device: str, dtype: Any) -> Any:
        path = Path(self.path) if self.path else output_dir / "base_tiny_nextclip"
        changes = {
            k: getattr(self, k) for k in ("clip_frames", "history_sigma") if getattr(self, k) is not None
        }
        if self.path is None and not (path / "model_index.json").is_file():
            if self.tiny_generator == "ltx2":
                toy = TinyLTX2Spec.toy_world()
            else:
                toy = TinyLTXSpec.toy_world(**self.tiny_ltx)
            build_fitted_tiny_nextclip(
                path,
                toy,
                config=NextClipConfig(**changes),
                vae_fit_steps=self.tiny_vae_fit_steps,
                generator=self.tiny_generator,
                device=device,
            )
        return NextClipPolicy.from_pretrained(path, torch_dtype=dtype, device=device, **changes)


@dataclass
class LTX2PolicySpec(VideoPolicySpec):
    """``policy: {type: ltx2, ...}``: an LTX-2 (audio + video) directory, or a tiny random one."""

    type: Literal["ltx2"] = field(default="ltx2", metadata={"help": "policy kind"})
    path: str | None = field(default=None, metadata={"help": "diffusers-format LTX-2 directory"})
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
            "help": "with tiny: the toy-world layout, its audio VAE fitted to the toy world's sound for this "
            "many steps, then its vocoder for half as many (grpo.toy_audio; 0 = random)"
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
        self.sampling = resolved_ltx2_sampling(self.sampling)

    def check(self, recipe: Recipe) -> None:
        """Also, for GRPO, what the directory cannot sample at the trainer's geometry, modalities and
        guidance, from its configs alone: a one-line error at recipe time, not after the first rollout."""
        super().check(recipe)
        if self.path is not None and isinstance(recipe.args, GRPOConfig):
            sampling = LTX2SamplingConfig(
                num_frames=recipe.args.num_frames,
                height=recipe.args.height,
                width=recipe.args.width,
                frame_rate=recipe.args.frame_rate,
                guidance_scale=recipe.args.guidance_scale,
                **self.sampling,
            )
            check_ltx2_checkpoint(Path(self.path), sampling, modalities_option="policy.sampling.modalities")

    def check_dir(self) -> None:
        check_ltx2_dir(Path(self.path))

    def build(self, output_dir: Path, device: str, dtype: Any) -> Any:
        path = Path(self.path) if self.path else output_dir / "base_tiny_ltx2"
        if self.path is None and not (path / "model_index.json").is_file():
            fits = dict(vae_fit_steps=self.tiny_vae_fit_steps, audio_fit_steps=self.tiny_audio_fit_steps)
            build_fitted_tiny_ltx2(path, TinyLTX2Spec.toy_world(**fits) if any(fits.values()) else None)
        policy = LTX2Policy.from_pretrained(path, torch_dtype=dtype, device=device)
        policy.sampling_overrides = dict(self.sampling)
        return policy


def build_policy(spec: VideoPolicySpec, output_dir: Path) -> Any:
    """The policy a spec names: loaded from its directory, or a tiny random one built in the run dir."""
    import torch

    device = spec.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return spec.build(output_dir, device, getattr(torch, spec.torch_dtype))


# ----------------------------------------------------------------------------------------- data


class VideoDataSpec:
    """What every video data section does beyond its fields: check the files it names, and build its
    training and held-out rows (`build_datasets`)."""

    def check(self, recipe: Recipe, policy: VideoPolicySpec) -> None:
        """The dataset files the section names exist."""
        for key in ("path", "eval_path"):
            value = getattr(self, key, None)
            if value is not None and not Path(value).exists():
                raise InputError(f"data.{key}: dataset file {value!r} does not exist")

    def build(self) -> tuple[Any, Any]:
        """Training and held-out rows (held-out: None when the section has none)."""
        raise NotImplementedError(f"{type(self).__name__} has no builder")


@dataclass
class PromptDataSpec(VideoDataSpec):
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

    def check(self, recipe: Recipe, policy: VideoPolicySpec) -> None:
        if (self.prompts is None) == (self.path is None):
            raise InputError("data: give exactly one of data.prompts (a list) or data.path (a file)")
        super().check(recipe, policy)

    def build(self) -> tuple[Any, Any]:
        train = (
            [{"prompt": p} for p in self.prompts]
            if self.prompts is not None
            else _read_prompts(Path(self.path))
        )
        if not train:
            raise InputError("data.prompts: the training set is empty; give at least one prompt")
        evaluation = [{"prompt": p} for p in self.eval_prompts] if self.eval_prompts else None
        return train, evaluation


@dataclass
class ToyWorldDataSpec(VideoDataSpec):
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

    def build(self) -> tuple[Any, Any]:
        config = ToyWorldConfig(
            size=self.size,
            context_frames=self.context_frames,
            next_frames=self.next_frames,
            next_overlap=self.next_overlap,
            fps=self.fps,
            audio=self.audio,
        )
        return _toy_rows(config, scene_row(self.prompt, self.context, self.first_frame), self)


@dataclass
class ManifestDataSpec(VideoDataSpec):
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

    def build(self) -> tuple[Any, Any]:
        config = NSPDataConfig(
            context_frames=self.context_frames,
            next_frames=self.next_frames,
            fps=self.fps,
            height=self.height,
            width=self.width,
            on_error=self.on_error,
        )
        convert = scene_row(self.prompt, self.context)
        evaluation = _Rows(NSPVideoDataset(self.eval_path, config), convert) if self.eval_path else None
        return _Rows(NSPVideoDataset(self.path, config), convert), evaluation


@dataclass
class ToyWorldClipsDataSpec(VideoDataSpec):
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

    def build(self) -> tuple[Any, Any]:
        config = ToyWorldConfig.for_clips(
            self.num_clips,
            clip_frames=self.clip_frames,
            context_clips=self.context_clips,
            size=self.size,
            fps=self.fps,
        )
        return _toy_rows(config, _clip_row(self.prompt), self)


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


def _toy_rows(config: ToyWorldConfig, convert: Any, spec: Any) -> tuple[_Rows, _Rows]:
    """The toy world's training and held-out rows: ``spec.num_train`` / ``spec.num_eval`` samples of
    its train and validation splits, each turned into a row by ``convert``."""
    return (
        _Rows(ToyWorld(config, split="train", num_samples=spec.num_train), convert),
        _Rows(ToyWorld(config, split="validation", num_samples=spec.num_eval), convert),
    )


def build_datasets(spec: VideoDataSpec) -> tuple[Any, Any]:
    """Training and held-out rows for a data spec (its kind's ``build``)."""
    return spec.build()


# ----------------------------------------------------------------------------------------- running


def validate(recipe: Recipe) -> tuple[Any, Any]:
    """Every check that needs no model; returns the policy and data specs (`grpo.schema.section_spec`
    through the recipe's stage entry)."""
    check_output_dir(recipe.args.output_dir, "output_dir")
    policy = section_spec(recipe, "policy")
    data = section_spec(recipe, "data", policy)
    check_resume(recipe.args.resume_from_checkpoint, recipe.args.output_dir)
    return policy, data


def run(recipe: Recipe) -> list[dict[str, Any]]:
    """Train as the recipe says (its stage's runner, after `validate`); returns the logged metrics."""
    return recipe.schema.run(recipe, *validate(recipe))


def train_policy(
    recipe: Recipe, policy_spec: VideoPolicySpec, data_spec: VideoDataSpec
) -> list[dict[str, Any]]:
    """The stages that train a video policy: ``pretrain`` / ``sft`` (`FlowMatchingTrainer`) and
    ``grpo`` (`GRPOTrainer`, then the run's report)."""
    train, evaluation = build_datasets(data_spec)
    flow_matching = not isinstance(recipe.args, GRPOConfig)
    rewards = None
    if not flow_matching:  # before anything is written: a reward that cannot work leaves no run dir
        rewards = build_rewards(recipe.rewards)
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
