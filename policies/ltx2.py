"""LTX-2 (audio + video) as a stochastic policy, on the shared sampler core (`policies.sampler`).

The denoiser, VAEs, text connectors, vocoder and scheduler are diffusers' own LTX-2 classes, loaded
from a diffusers-format directory whose ``model_index.json`` names ``LTX2Pipeline``. What differs
from LTX-Video is only how a sample is packed for the transformer and how guidance is combined:

* **State.** LTX-2 denoises video and audio latents together (audio <-> video cross-attention in
  every block). A sample's state is one flat tensor ``[B, Nv + Na]``: the packed video tokens
  ``[Sv, Cv]`` flattened, then the packed audio tokens ``[La, Da]`` flattened, each stepped by
  `policies.sde` with the one schedule both streams share (as `LTX2Pipeline` steps them).
* **Modalities.** ``audio_video``: both streams are sampled stochastically and the step log-prob
  covers both (``mean`` over all stochastic elements by default; per-modality log-probs are kept in
  `Rollout.part_log_probs`). ``video``: the transformer still denoises the audio stream (it cannot
  run without it), but by deterministic Euler (ODE) steps from the sample's seeded audio noise, so
  the audio is a function of the seed and the video path; the video transitions are then the only
  random variables and the log-prob is exactly theirs (audio excluded).
* **Guidance** is `LTX2Pipeline`'s: in x0 space, ``x0 = x0_cond + (cfg - 1)(x0_cond - x0_uncond)
  + stg (x0_cond - x0_stg) + (modality - 1)(x0_cond - x0_isolated)``, then guidance rescale
  (``rescale_noise_cfg`` against ``x0_cond``), per stream with its own scales. The unconditional
  (CFG) and perturbed (STG, through the transformer's per-sample ``perturbation_mask``) branches run
  in one batched forward with the conditional one; modality isolation switches audio <-> video
  cross-attention off for the whole batch, so it is a second forward. The rollout records the
  guidance it used (``extras["guidance"]``); `log_prob` recomputes with it or without any guidance.
* **Image-to-video**: the first latent frame is the encoded image, kept clean (per-token timestep 0,
  sigma 0: no noise, no log-prob), as `LTX2ImageToVideoPipeline` does (without its H.264 re-compression
  of the conditioning image, i.e. its ``image_crf=0``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any
from unittest import mock

import torch

from policies import sde as sde_lib
from policies.context_parallel import install_ulysses_backward, scale_grad
from policies.errors import InputError
from policies.files import check_model_weights, check_safetensors
from policies.ltx import LORA_WEIGHTS, LTXPolicy, SamplingConfig, latent_shape
from policies.rollout import Rollout
from policies.sampler import ChainRecord, Part, recorded_steps, rescore, run_chain, sample_plan
from policies.schedules import LTX2_SHIFT_DEFAULTS, ltx_sigmas

LTX2_PIPELINES = ("LTX2Pipeline", "LTX2ImageToVideoPipeline", "LTX2ConditionPipeline")
MODALITIES = ("video", "audio_video")
MEL_N_FFT = 1024  # LTX-2's audio preprocessing: 1024-point STFT (window 1024) at the VAE's hop


@dataclass
class LTX2SamplingConfig(SamplingConfig):
    """`SamplingConfig` plus LTX-2's modalities and guidance (names as in `LTX2Pipeline.__call__`).

    Guidance is off by default (one forward a step); `LTX2Pipeline`'s own defaults are
    ``guidance_scale=3, stg_scale=1, stg_blocks=[28], modality_scale=3, guidance_rescale=0.7,
    audio_guidance_scale=7``. An ``audio_*`` setting left at None takes the video one.
    """

    modalities: str = field(
        default="audio_video",
        metadata={"help": "audio_video: sample and score both streams; video: audio by ODE, not scored."},
    )
    stg_scale: float = field(default=0.0, metadata={"help": "Spatio-temporal guidance scale (0: off)."})
    stg_blocks: list[int] | None = field(
        default=None,
        metadata={"help": "Transformer blocks perturbed by STG (spatio_temporal_guidance_blocks)."},
    )
    modality_scale: float = field(default=1.0, metadata={"help": "Modality-isolation guidance (<= 1: off)."})
    guidance_rescale: float = field(default=0.0, metadata={"help": "Guidance rescale factor (0: off)."})
    audio_guidance_scale: float | None = field(default=None, metadata={"help": "Audio CFG scale."})
    audio_stg_scale: float | None = field(default=None, metadata={"help": "Audio STG scale."})
    audio_modality_scale: float | None = field(default=None, metadata={"help": "Audio modality scale."})
    audio_guidance_rescale: float | None = field(default=None, metadata={"help": "Audio guidance rescale."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.modalities not in MODALITIES:
            raise InputError(f"modalities must be one of {', '.join(MODALITIES)}, got {self.modalities!r}")
        self.stg_blocks = list(self.stg_blocks or [])

    def guidance(self) -> Guidance:
        """The resolved per-stream guidance of this config."""

        def audio(value: float | None, video: float) -> float:
            return float(video if value is None else value)

        return Guidance(
            cfg=(float(self.guidance_scale), audio(self.audio_guidance_scale, self.guidance_scale)),
            stg=(float(self.stg_scale), audio(self.audio_stg_scale, self.stg_scale)),
            modality=(float(self.modality_scale), audio(self.audio_modality_scale, self.modality_scale)),
            rescale=(float(self.guidance_rescale), audio(self.audio_guidance_rescale, self.guidance_rescale)),
            stg_blocks=list(self.stg_blocks),
        )


# LTX2SamplingConfig's own fields (beyond SamplingConfig's): what a recipe's policy.sampling may set
LTX2_ONLY_FIELDS = tuple(
    f.name for f in fields(LTX2SamplingConfig) if f.name not in {g.name for g in fields(SamplingConfig)}
)


@dataclass
class Guidance:
    """`LTX2Pipeline`'s guidance, resolved: ``(video, audio)`` scale pairs and the STG blocks."""

    cfg: tuple[float, float] = (1.0, 1.0)
    stg: tuple[float, float] = (0.0, 0.0)
    modality: tuple[float, float] = (1.0, 1.0)
    rescale: tuple[float, float] = (0.0, 0.0)
    stg_blocks: list[int] = field(default_factory=list)

    @property
    def uses_cfg(self) -> bool:
        return max(self.cfg) > 1.0

    @property
    def uses_stg(self) -> bool:
        return max(self.stg) > 0.0

    @property
    def uses_modality(self) -> bool:
        return max(self.modality) > 1.0

    def to_dict(self) -> dict:
        """JSON-able form (recorded in `Rollout.extras`)."""
        return {k: list(v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict) -> Guidance:
        return cls(**{k: tuple(v) if k != "stg_blocks" else list(v) for k, v in values.items()})


@dataclass(frozen=True)
class Geometry:
    """Where a sample's streams sit in its flat state, and the shapes the transformer needs."""

    latent_shape: tuple[int, int, int]
    video_channels: int
    audio_frames: int
    audio_width: int

    @property
    def video_elements(self) -> int:
        return math.prod(self.latent_shape) * self.video_channels

    @property
    def audio_elements(self) -> int:
        return self.audio_frames * self.audio_width

    def parts(self, modalities: str) -> tuple[Part, Part]:
        return (
            Part("video", self.video_elements),
            Part("audio", self.audio_elements, stochastic=modalities == "audio_video"),
        )

    def split(self, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat ``[b, N]`` -> video tokens ``[b, Sv, Cv]`` and audio tokens ``[b, La, Da]``."""
        video, audio = state.split([self.video_elements, self.audio_elements], dim=1)
        return video.unflatten(1, (-1, self.video_channels)), audio.unflatten(1, (-1, self.audio_width))

    @staticmethod
    def join(video: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        return torch.cat([video.flatten(1), audio.flatten(1)], dim=1)


def read_model_index(path: Path) -> dict:
    """A diffusers directory's ``model_index.json`` ({} without one), or a one-line error if unreadable."""
    index = path / "model_index.json"
    if not index.is_file():
        return {}
    try:
        values = json.loads(index.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{index} is not valid JSON ({err}): re-download or regenerate it") from None
    if not isinstance(values, dict):
        raise InputError(f"{index} is not a JSON object: re-download or regenerate it")
    return values


def checkpoint_family(path: Path) -> str:
    """``ltx2`` when a checkpoint directory's ``model_index.json`` ``_class_name`` is an LTX-2 pipeline,
    else ``ltx`` (LTX-Video 0.9: its own checks then judge the directory)."""
    return "ltx2" if read_model_index(path).get("_class_name") in LTX2_PIPELINES else "ltx"


def check_ltx2_dir(path: Path, weights: bool = True) -> None:
    """An `InputError` unless ``path`` is a diffusers-format LTX-2 directory; with ``weights``, its
    weight files too (safetensors only, headers readable); loads nothing."""
    if not path.is_dir():
        raise InputError(f"LTX-2 checkpoint directory {str(path)!r} does not exist")
    name = read_model_index(path).get("_class_name")
    if name is not None and name not in LTX2_PIPELINES:
        fix = (
            "load it with LTXPolicy (policy type ltx)"
            if name.startswith("LTX")
            else "give an LTX-2 directory"
        )
        raise InputError(
            f"{str(path)!r} is a {name} checkpoint, not LTX-2 (model_index.json _class_name "
            f"LTX2Pipeline): {fix}"
        )
    for sub in ("transformer", "vae", "connectors", "scheduler"):
        if not (path / sub / ("scheduler_config.json" if sub == "scheduler" else "config.json")).is_file():
            raise InputError(
                f"LTX-2 checkpoint {str(path)!r} has no {sub}/ subfolder with its config: expected a "
                "diffusers-format LTX-2 directory (transformer/, vae/, connectors/, scheduler/, "
                "audio_vae/, vocoder/)"
            )
    if not weights:
        return
    for sub in ("transformer", "vae", "connectors", "audio_vae", "vocoder", "text_encoder"):
        if (path / sub / "config.json").is_file():
            check_model_weights(path / sub)
    if (path / "transformer_lora").is_dir():
        check_safetensors(path / "transformer_lora" / LORA_WEIGHTS)


def check_ltx2_sampling(
    sampling: LTX2SamplingConfig, transformer_config: Mapping[str, Any], has_audio_vae: bool
) -> None:
    """Refuse what a checkpoint cannot sample, from its transformer's config and whether it has an
    audio VAE: no weights needed, so a command can check before loading the model."""
    if sampling.modalities == "audio_video" and not has_audio_vae:
        raise InputError(
            "modalities='audio_video' needs an audio VAE (audio_vae/) to give the audio a meaning, and "
            "this checkpoint has none: use modalities='video'"
        )
    guidance = sampling.guidance()
    if guidance.uses_stg:
        layers = transformer_config["num_layers"]
        if not transformer_config.get("perturbed_attn", False):
            raise InputError(
                f"stg_scale {guidance.stg} needs a transformer with perturbed attention "
                "(config perturbed_attn: true, LTX-2.3), which this checkpoint lacks: set stg_scale 0"
            )
        bad = [b for b in guidance.stg_blocks if not 0 <= b < layers]
        if not guidance.stg_blocks or bad:
            raise InputError(
                f"stg_blocks {guidance.stg_blocks} must be a non-empty list of blocks in [0, {layers}) "
                "for STG on this checkpoint"
            )


def check_ltx2_size(sampling: SamplingConfig, vae_config: Mapping[str, Any]) -> None:
    """Refuse a geometry the checkpoint's video VAE cannot encode or decode, from its config alone: frames
    8k+1 and sizes a multiple of its compression, and (with the decoder's default ``reflect`` padding,
    which needs a neighbour on each side) at least 2 latent cells in height and width."""
    spatial = vae_config.get("spatial_compression_ratio", 32)
    temporal = vae_config.get("temporal_compression_ratio", 8)
    shape = latent_shape(sampling.num_frames, sampling.height, sampling.width, spatial, temporal)
    if vae_config.get("decoder_spatial_padding_mode", "reflect") != "reflect":
        return
    for name, size, cells in (("height", sampling.height, shape[1]), ("width", sampling.width, shape[2])):
        if cells < 2:
            raise InputError(
                f"{name}={size} is {cells} latent cell; the LTX-2 VAE decoder (reflect padding) needs >= 2: "
                f"use {name} >= {2 * spatial}"
            )


def _config(path: Path) -> dict:
    """A sub-model's ``config.json`` (the layout check has found it)."""
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{path} is not valid JSON ({err}): re-download or regenerate it") from None


def check_ltx2_checkpoint(
    path: Path, sampling: LTX2SamplingConfig, modalities_option: str = "modalities"
) -> None:
    """Everything about an LTX-2 directory that can refuse ``sampling``, from its configs and weight
    headers alone (loads no model): layout, geometry, sound, guidance. ``modalities_option`` is how the
    caller's user sets the modalities (a CLI flag or a recipe key), for the message."""
    check_ltx2_dir(path)
    check_ltx2_size(sampling, _config(path / "vae" / "config.json"))
    if sampling.modalities == "audio_video":
        missing = [
            f"{sub}/" for sub in ("audio_vae", "vocoder") if not (path / sub / "config.json").is_file()
        ]
        if missing:
            raise InputError(
                f"{modalities_option} audio_video decodes the generated sound, which needs the checkpoint's "
                f"audio_vae/ and vocoder/; {str(path)!r} has no {' or '.join(missing)}: "
                f"use {modalities_option} video"
            )
    check_ltx2_sampling(
        sampling,
        _config(path / "transformer" / "config.json"),
        (path / "audio_vae" / "config.json").is_file(),
    )


class LTX2Policy(LTXPolicy):
    """LTX-2 (text/image-to-video with audio) wrapped as a policy with per-step log-probs.

    Reference model, LoRA, compilation and the training wrapper are `LTXPolicy`'s (they act on
    ``self.transformer``); rollouts and recomputation run on `policies.sampler`.
    """

    nft_unsupported = (
        "DiffusionNFT's update is not wired to LTX-2's joint video + audio state and velocity yet; "
        "train LTX-2 with trainer.algorithm grpo"
    )

    def __init__(
        self,
        transformer,
        vae,
        scheduler,
        connectors,
        audio_vae=None,
        vocoder=None,
        text_encoder=None,
        tokenizer=None,
    ) -> None:
        super().__init__(transformer, vae, scheduler, text_encoder, tokenizer)
        self.connectors = connectors.requires_grad_(False)
        self.audio_vae = audio_vae.requires_grad_(False) if audio_vae is not None else None
        self.vocoder = vocoder.requires_grad_(False) if vocoder is not None else None
        # LTX2SamplingConfig fields applied when a rollout is given a plain SamplingConfig (e.g. the
        # GRPO trainer's): modalities and guidance from the recipe's policy section
        self.sampling_overrides: dict = {}
        self.context_parallel = 1  # ranks each denoiser forward's video and text tokens are split over

    def enable_context_parallel(self) -> None:
        """Split every denoiser forward's video and text tokens over all ranks (Ulysses attention).

        Through diffusers' context parallelism: the transformer's ``_cp_plan`` shards the video tokens,
        text tokens and video RoPE over the ranks, attention exchanges heads for tokens (all-to-all),
        and the output is gathered, so every rank gets the full velocity. The plan is extended with the
        video RoPE of the audio<->video cross-attention (``cross_attn_rope``), which diffusers' plan
        leaves whole; the audio stream stays whole on every rank (its attention sees each audio token
        once per rank, which leaves softmax-weighted averages unchanged). Every rank must call this and
        then run the same forwards on the same inputs. Training forwards work too: each rank's
        gradients are its share, and summed over the ranks they are the one-process gradients
        (`policies.context_parallel`: diffusers' Ulysses backward fixed for cross-attention, the
        replicated audio stream's gradient divided by the ranks); averaging them instead, as DDP
        and FSDP do, needs the loss multiplied by the number of ranks. Runs on CPU (gloo) as on GPU.
        """
        import torch.distributed as dist
        from diffusers.models._modeling_parallel import ContextParallelConfig

        if not dist.is_initialized() or dist.get_world_size() < 2:
            raise InputError("context parallelism needs several processes (launch with torchrun)")
        degree = dist.get_world_size()
        config = self.transformer.config
        for name in ("num_attention_heads", "audio_num_attention_heads"):
            if getattr(config, name) % degree:
                raise InputError(
                    f"context parallelism over {degree} ranks splits attention heads: the transformer's "
                    f"{name} {getattr(config, name)} is not divisible by {degree}; use a divisor of it"
                )
        plan = dict(self.transformer._cp_plan)
        plan["cross_attn_rope"] = plan["rope"]
        mesh = dist.device_mesh.init_device_mesh(
            self.transformer.device.type, (1, degree), mesh_dim_names=("ring", "ulysses")
        )
        cp_config = ContextParallelConfig(ulysses_degree=degree, mesh=mesh)
        if torch.accelerator.device_count() == 0:
            # diffusers picks the rank's device as rank % device_count(): give CPU ranks one "device"
            with mock.patch.object(torch.accelerator, "device_count", return_value=1):
                self.transformer.enable_parallelism(config=cp_config, cp_plan=plan)
        else:
            self.transformer.enable_parallelism(config=cp_config, cp_plan=plan)
        install_ulysses_backward()
        self.context_parallel = degree

    def _check_context_parallel(
        self, video: torch.Tensor, video_timestep: torch.Tensor, text_mask: torch.Tensor
    ) -> None:
        """What a context-parallel forward cannot do, as one-line errors before any collective."""
        degree = self.context_parallel
        for what, length in (("video", video.shape[1]), ("text", text_mask.shape[-1])):
            if length % degree:
                raise InputError(
                    f"context parallelism over {degree} ranks splits the {what} tokens: {length} is not "
                    f"divisible by {degree}; choose a size (num_frames/height/width, prompt length) "
                    "that is"
                )
        if video_timestep.ndim > 1:
            raise NotImplementedError(
                "context parallelism with per-token timesteps (image conditioning) is not supported: "
                "diffusers' plan does not split them"
            )
        if not bool(text_mask.bool().all()):
            raise NotImplementedError(
                "context parallelism needs unpadded text (the connectors' learnable registers fill "
                "the padding): diffusers' Ulysses attention cannot split an attention mask over heads"
            )

    # ------------------------------------------------------------------ loading and saving
    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        torch_dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        load_text_encoder: bool = True,
    ) -> LTX2Policy:
        """Load a diffusers-format LTX-2 directory (``model_index.json`` ``_class_name: LTX2Pipeline``)."""
        from diffusers import (
            AutoencoderKLLTX2Audio,
            AutoencoderKLLTX2Video,
            FlowMatchEulerDiscreteScheduler,
            LTX2VideoTransformer3DModel,
        )
        from diffusers.pipelines.ltx2 import LTX2TextConnectors
        from diffusers.pipelines.ltx2.vocoder import LTX2Vocoder

        path = Path(path)
        check_ltx2_dir(path)
        transformer = LTX2VideoTransformer3DModel.from_pretrained(
            path / "transformer", torch_dtype=torch_dtype, use_safetensors=True
        )
        vae = AutoencoderKLLTX2Video.from_pretrained(
            path / "vae", torch_dtype=torch_dtype, use_safetensors=True
        )
        connectors = LTX2TextConnectors.from_pretrained(
            path / "connectors", torch_dtype=torch_dtype, use_safetensors=True
        )
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(path / "scheduler")
        audio_vae = vocoder = text_encoder = tokenizer = None
        if (path / "audio_vae" / "config.json").is_file():
            audio_vae = AutoencoderKLLTX2Audio.from_pretrained(
                path / "audio_vae", torch_dtype=torch_dtype, use_safetensors=True
            )
        if (path / "vocoder" / "config.json").is_file():
            vocoder = LTX2Vocoder.from_pretrained(
                path / "vocoder", torch_dtype=torch_dtype, use_safetensors=True
            )
        if load_text_encoder and (path / "text_encoder" / "config.json").is_file():
            import transformers

            encoder_class = getattr(
                transformers, read_model_index(path).get("text_encoder", [None, "AutoModel"])[1]
            )
            text_encoder = encoder_class.from_pretrained(
                path / "text_encoder", torch_dtype=torch_dtype, use_safetensors=True
            )
            tokenizer = transformers.AutoTokenizer.from_pretrained(path / "tokenizer")
        policy = cls(transformer, vae, scheduler, connectors, audio_vae, vocoder, text_encoder, tokenizer)
        policy._load_lora(path)
        policy.remember_source(path)
        return policy.to(device)

    def saved_components(self) -> dict[str, torch.nn.Module]:
        """LTX-Video's, plus the text connectors, the audio VAE and the vocoder."""
        parts = {"connectors": self.connectors, "audio_vae": self.audio_vae, "vocoder": self.vocoder}
        return {**super().saved_components(), **{k: v for k, v in parts.items() if v is not None}}

    def save_pretrained(
        self, path: str | Path, transformer_state_dict: dict[str, torch.Tensor] | None = None
    ) -> None:
        """Write a diffusers-format LTX-2 directory (loadable by `LTX2Pipeline.from_pretrained`);
        LoRA adapters go to ``transformer_lora/`` next to the base, as for `LTXPolicy`."""
        path = Path(path)
        self._save_components(path, transformer_state_dict)
        index = {"_class_name": "LTX2Pipeline"}
        for name in ("processor", "prompt_enhancer", "duration_head", "text_encoder", "tokenizer"):
            index[name] = [None, None]
        index.update(
            scheduler=["diffusers", type(self.scheduler).__name__],
            transformer=["diffusers", type(self.transformer).__name__],
            vae=["diffusers", type(self.vae).__name__],
            connectors=["ltx2", type(self.connectors).__name__],
            audio_vae=[None, None],
            vocoder=[None, None],
        )
        self._save_component("connectors", path)
        if self.audio_vae is not None:
            self._save_component("audio_vae", path)
            index["audio_vae"] = ["diffusers", type(self.audio_vae).__name__]
        if self.vocoder is not None:
            self._save_component("vocoder", path)
            index["vocoder"] = ["ltx2", type(self.vocoder).__name__]
        if self.text_encoder is not None:
            index["text_encoder"] = ["transformers", type(self.text_encoder).__name__]
            index["tokenizer"] = ["transformers", type(self.tokenizer).__name__]
        (path / "model_index.json").write_text(json.dumps(index, indent=2))

    # ------------------------------------------------------------------ geometry
    def geometry(self, sampling: LTX2SamplingConfig) -> Geometry:
        """Video latent grid and audio latent length/width of a rollout, or an `InputError`.

        The audio length follows `LTX2Pipeline`: ``round(num_frames / frame_rate * sample_rate /
        hop_length / audio temporal compression)`` latent frames.
        """
        latent_shape = self.latent_shape(sampling.num_frames, sampling.height, sampling.width)
        config = self.transformer.config
        audio_frames = self._audio_frames(sampling.num_frames, sampling.frame_rate)
        return Geometry(latent_shape, config.in_channels, audio_frames, config.audio_in_channels)

    def _audio_frames(self, num_frames: int, frame_rate: float) -> int:
        """Audio latent frames of ``num_frames`` video frames at ``frame_rate`` (`LTX2Pipeline`'s rule)."""
        config = self.transformer.config
        if self.audio_vae is not None:
            rate, hop = self.audio_vae.config.sample_rate, self.audio_vae.config.mel_hop_length
            compression = self.audio_vae.temporal_compression_ratio
        else:
            rate, hop, compression = (
                config.audio_sampling_rate,
                config.audio_hop_length,
                config.audio_scale_factor,
            )
        audio_frames = round(num_frames / frame_rate * rate / hop / float(compression))
        if audio_frames < 1:
            raise InputError(
                f"{num_frames} frames at {frame_rate} fps give no audio latent frame: "
                "generate more frames or lower frame_rate"
            )
        return audio_frames

    def _audio_noise_shape(self, geometry: Geometry) -> tuple[int, int, int]:
        """(channels, frames, mel bins) of the audio noise, drawn as `LTX2Pipeline` draws it."""
        if self.audio_vae is None:  # no pipeline to match: one channel of the packed width
            return 1, geometry.audio_frames, geometry.audio_width
        mel = self.audio_vae.config.mel_bins // self.audio_vae.mel_compression_ratio
        return self.audio_vae.config.latent_channels, geometry.audio_frames, mel

    # ------------------------------------------------------------------ conditioning
    @torch.no_grad()
    def encode_prompt(
        self, prompts: list[str], *, negative_prompt: str | None = None, max_sequence_length: int = 1024
    ) -> dict[str, torch.Tensor]:
        """Gemma hidden states of every layer, stacked as `LTX2Pipeline` feeds its connectors
        (left padding), one row per prompt (and for ``negative_prompt``, for CFG)."""
        if self.text_encoder is None:
            raise InputError(
                "this checkpoint has no text_encoder/: pass precomputed prompt_embeds instead of prompts"
            )
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

        def encode(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
            tokens = self.tokenizer(
                [t.strip() for t in texts],
                padding="max_length",
                max_length=max_sequence_length,
                truncation=True,
                add_special_tokens=True,
                return_tensors="pt",
            )
            ids, mask = tokens.input_ids.to(self.device), tokens.attention_mask.to(self.device)
            states = self.text_encoder(
                input_ids=ids, attention_mask=mask, output_hidden_states=True
            ).hidden_states
            return torch.stack(states, dim=-1).flatten(2, 3).to(self.transformer.dtype), mask

        condition = dict(zip(("prompt_embeds", "prompt_attention_mask"), encode(list(prompts)), strict=True))
        if negative_prompt is not None:
            neg, neg_mask = encode([negative_prompt] * len(prompts))
            condition.update(negative_prompt_embeds=neg, negative_prompt_attention_mask=neg_mask)
        return condition

    def _check_condition(self, condition: dict[str, torch.Tensor], guidance_scale: float) -> int:
        if "prompt_embeds" not in condition or "prompt_attention_mask" not in condition:
            raise InputError("condition needs 'prompt_embeds' [P, L, D] and 'prompt_attention_mask' [P, L]")
        embeds = condition["prompt_embeds"]
        width = self.connectors.config.caption_channels * self.connectors.config.text_proj_in_factor
        if embeds.ndim != 3 or embeds.shape[-1] != width:
            raise InputError(
                f"prompt_embeds must be [P, L, {width}] (text-encoder hidden states of every layer, "
                f"stacked) for this checkpoint's connectors, got {tuple(embeds.shape)}"
            )
        if guidance_scale > 1.0 and "negative_prompt_embeds" not in condition:
            raise InputError(
                f"CFG (guidance scale {guidance_scale}) needs negative_prompt_embeds "
                "(or use guidance_scale=1)"
            )
        return embeds.shape[0]

    def text_inputs(
        self, condition: dict[str, torch.Tensor], condition_index: torch.Tensor, guidance_scale: float
    ) -> dict[str, torch.Tensor]:
        """Per-sample connector outputs (video and audio text streams, mask), and with CFG the
        negative prompt's. The connectors run once per conditioning row, not once per step."""
        padding_side = (
            getattr(self.tokenizer, "padding_side", "left") if self.tokenizer is not None else "left"
        )
        dtype = self.transformer.dtype
        text = {}
        prefixes = ("", "negative_") if guidance_scale > 1.0 else ("",)
        for prefix in prefixes:
            embeds = condition[f"{prefix}prompt_embeds"].to(dtype)
            mask = condition[f"{prefix}prompt_attention_mask"]
            video, audio, attention = self.connectors(embeds, mask, padding_side=padding_side)
            text[f"{prefix}video"] = video[condition_index]
            text[f"{prefix}audio"] = audio[condition_index]
            text[f"{prefix}mask"] = attention[condition_index]
        return text

    # ------------------------------------------------------------------ the denoiser
    def _forward(
        self,
        video: torch.Tensor,
        audio: torch.Tensor,
        video_timestep: torch.Tensor,
        timestep: torch.Tensor,
        text: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        geometry: Geometry,
        frame_rate: float,
        **guidance_kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        use_wrapper = self._wrapped_transformer is not None and not self._in_reference
        dtype = self.transformer.dtype
        frames, height, width = geometry.latent_shape
        mask = text[2]
        if self.context_parallel > 1:
            self._check_context_parallel(video, video_timestep, mask)
            mask = None  # all ones (checked): no bias, and nothing the Ulysses split would break
        video_out, audio_out = (self._wrapped_transformer if use_wrapper else self.transformer)(
            hidden_states=video.to(dtype),
            audio_hidden_states=audio.to(dtype),
            encoder_hidden_states=text[0],
            audio_encoder_hidden_states=text[1],
            timestep=video_timestep,
            audio_timestep=timestep,
            sigma=timestep,
            encoder_attention_mask=mask,
            audio_encoder_attention_mask=mask,
            num_frames=frames,
            height=height,
            width=width,
            fps=frame_rate,
            audio_num_frames=geometry.audio_frames,
            use_cross_timestep=True,
            return_dict=False,
            **guidance_kwargs,
        )
        if self.context_parallel > 1 and torch.is_grad_enabled():
            audio_out = scale_grad(audio_out, 1.0 / self.context_parallel)  # computed whole on every rank
        return video_out.float(), audio_out.float()

    def velocity(
        self,
        state: torch.Tensor,
        video_timestep: torch.Tensor,
        timestep: torch.Tensor,
        sigma: torch.Tensor,
        text: dict[str, torch.Tensor],
        guidance: Guidance,
        geometry: Geometry,
        frame_rate: float,
    ) -> torch.Tensor:
        """The guided velocity ``[b, N]`` (fp32) of flat states ``[b, N]``, as `LTX2Pipeline` combines it.

        ``video_timestep`` is ``[b]`` or per token ``[b, Sv]`` (I2V), ``timestep`` / ``sigma``
        ``[b]`` the step's timestep and sigma (the latter converts velocities to x0 and back).
        """
        video, audio = geometry.split(state)
        b = state.shape[0]
        cond = (text["video"], text["audio"], text["mask"])
        branches = [cond]
        if guidance.uses_cfg:
            branches.insert(0, (text["negative_video"], text["negative_audio"], text["negative_mask"]))
        if guidance.uses_stg:
            branches.append(cond)
        n = len(branches)
        kwargs = {}
        if guidance.uses_stg:  # the last branch perturbed, the others not: one batched forward
            perturb = torch.ones(n * b, device=state.device, dtype=self.transformer.dtype)
            perturb[-b:] = 0
            kwargs = {"spatio_temporal_guidance_blocks": guidance.stg_blocks, "perturbation_mask": perturb}
        batched = tuple(torch.cat(parts) for parts in zip(*branches, strict=True))
        outs = self._forward(
            video.repeat(n, 1, 1),
            audio.repeat(n, 1, 1),
            video_timestep.repeat(n, *([1] * (video_timestep.ndim - 1))),
            timestep.repeat(n),
            batched,
            geometry,
            frame_rate,
            **kwargs,
        )
        preds = [list(out.chunk(n)) for out in outs]  # [stream][branch]
        if guidance.uses_modality:
            isolated = self._forward(
                video, audio, video_timestep, timestep, cond, geometry, frame_rate, isolate_modalities=True
            )
            for stream, out in enumerate(isolated):
                preds[stream].append(out)
        from diffusers.pipelines.ltx2.pipeline_ltx2 import rescale_noise_cfg

        s = sigma.float().view(-1, 1, 1)
        velocities = []
        for stream, x in enumerate((video.float(), audio.float())):
            x0 = [x - v * s for v in preds[stream]]
            k = 1 if guidance.uses_cfg else 0  # index of the conditional branch
            x0_cond, guided = x0[k], x0[k]
            if guidance.uses_cfg:
                guided = guided + (guidance.cfg[stream] - 1) * (x0_cond - x0[0])
            if guidance.uses_stg:
                guided = guided + guidance.stg[stream] * (x0_cond - x0[k + 1])
            if guidance.uses_modality:
                guided = guided + (guidance.modality[stream] - 1) * (x0_cond - x0[-1])
            if guidance.rescale[stream] > 0:
                guided = rescale_noise_cfg(guided, x0_cond, guidance_rescale=guidance.rescale[stream])
            velocities.append((x - guided) / s)
        return Geometry.join(*velocities)

    # ------------------------------------------------------------------ rollout
    def _initial_state(
        self,
        condition: dict[str, torch.Tensor],
        condition_index: torch.Tensor,
        geometry: Geometry,
        generators: list[torch.Generator],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat noise ``[B, N]`` (video then audio, drawn per sample as `LTX2Pipeline` draws them) and
        the per-element sigma scale ``[B, N]`` (0 on clean I2V conditioning tokens, 1 elsewhere)."""
        from diffusers.utils.torch_utils import randn_tensor

        video, video_generated = self._initial_latents(
            condition, condition_index, geometry.latent_shape, generators
        )
        channels, frames, mel = self._audio_noise_shape(geometry)
        audio = randn_tensor(
            (len(generators), channels, frames, mel),
            generator=generators,
            device=self.device,
            dtype=torch.float32,
        )
        audio = audio.transpose(1, 2).flatten(2, 3)  # [B, C, L, M] -> [B, L, C*M] (LTX2Pipeline's packing)
        scale = Geometry.join(video_generated.unsqueeze(-1).expand_as(video).float(), torch.ones_like(audio))
        return Geometry.join(video, audio), scale

    @torch.no_grad()
    def rollout(
        self,
        condition: dict[str, torch.Tensor],
        *,
        num_generations: int = 1,
        sampling: SamplingConfig | None = None,
        seeds: list[int] | None = None,
    ) -> Rollout:
        """Denoise ``num_generations`` audio-video samples per conditioning row, recording the
        stochastic steps (state ``[B, N]``: video then audio, see the module docstring).

        ``condition``: ``prompt_embeds`` [P, L, D] (text-encoder layers stacked) and
        ``prompt_attention_mask``, for CFG their ``negative_`` twins, for I2V ``image_latents``
        [P, C, 1, h, w] from `encode_image`. Sample ``b`` uses row ``b // num_generations`` and
        seed ``seeds[b]``.
        """
        sampling = self.ltx2_sampling(sampling)
        guidance = sampling.guidance()
        rows = self._check_condition(condition, max(guidance.cfg))
        check_ltx2_sampling(sampling, self.transformer.config, self.audio_vae is not None)
        check_ltx2_size(sampling, self.vae.config)
        geometry = self.geometry(sampling)
        device = self.device
        seeds, condition_index, generators = sample_plan(rows, num_generations, seeds, device)
        condition = {k: v.to(device) for k, v in condition.items()}

        state, scale = self._initial_state(condition, condition_index, geometry, generators)
        sigmas, timesteps = ltx_sigmas(
            self.scheduler,
            sampling.num_inference_steps,
            math.prod(geometry.latent_shape),
            LTX2_SHIFT_DEFAULTS,
        )
        sigmas, timesteps = sigmas.to(device), timesteps.to(device)
        text = self.text_inputs(condition, condition_index, max(guidance.cfg))
        video_mask = self._video_mask(scale, geometry)
        stochastic = sampling.stochastic_steps()
        batch = len(seeds)

        def velocity(x: torch.Tensor, i: int) -> torch.Tensor:
            t = timesteps[i].expand(batch)
            return self.velocity(
                x,
                self._video_timestep(t, video_mask),
                t,
                sigmas[i].expand(batch),
                text,
                guidance,
                geometry,
                sampling.frame_rate,
            )

        record = ChainRecord()
        parts = geometry.parts(sampling.modalities)
        final = run_chain(
            state,
            velocity,
            sigmas,
            kind=sampling.kind,
            noise_level=sampling.noise_level,
            stochastic=stochastic,
            generators=generators,
            reduction=sampling.reduction,
            record=record,
            sigma_scale=scale,
            parts=parts,
        )
        return Rollout(
            **record.stacked(final),
            final_latents=final,
            step_indices=torch.tensor(stochastic, dtype=torch.long),
            sigmas=sigmas,
            timesteps=timesteps,
            condition=condition,
            condition_index=condition_index,
            generated_mask=scale > 0,
            seeds=torch.tensor(seeds, dtype=torch.long),
            guidance_scale=float(sampling.guidance_scale),
            kind=sampling.kind,
            noise_level=float(sampling.noise_level),
            reduction=sampling.reduction,
            latent_shape=geometry.latent_shape,
            frame_rate=float(sampling.frame_rate),
            extras={
                "family": "ltx2",
                "modalities": sampling.modalities,
                "guidance": guidance.to_dict(),
                "audio_frames": geometry.audio_frames,
            },
            part_log_probs={
                p.name: torch.stack(record.part_log_probs[p.name], 1)
                if record.log_probs
                else final.new_zeros((batch, 0))
                for p in parts
            },
        )

    def ltx2_sampling(self, sampling: SamplingConfig | None) -> LTX2SamplingConfig:
        """``sampling`` as an `LTX2SamplingConfig`: a plain `SamplingConfig` (or None) gets
        ``sampling_overrides`` (modalities, STG, modality guidance, rescale, audio scales) added."""
        if isinstance(sampling, LTX2SamplingConfig):
            return sampling
        base = asdict(sampling) if sampling is not None else {}
        return LTX2SamplingConfig(**{**base, **self.sampling_overrides})

    def _video_mask(self, scale: torch.Tensor, geometry: Geometry) -> torch.Tensor | None:
        """Per-token generated mask ``[b, Sv]`` of the video, or None when every token is generated."""
        per_token = scale[:, : geometry.video_elements : geometry.video_channels]
        return None if bool((per_token > 0).all()) else per_token

    @staticmethod
    def _video_timestep(timestep: torch.Tensor, video_mask: torch.Tensor | None) -> torch.Tensor:
        """Clean conditioning tokens are shown to the denoiser at timestep 0 (as in I2V pipelines)."""
        return timestep if video_mask is None else timestep[:, None] * video_mask

    def _rollout_geometry(self, rollout: Rollout) -> Geometry:
        config = self.transformer.config
        return Geometry(
            rollout.latent_shape, config.in_channels, rollout.extras["audio_frames"], config.audio_in_channels
        )

    # ------------------------------------------------------------------ log-prob recomputation
    def log_prob(
        self, rollout: Rollout, step: int | torch.Tensor, *, guidance_scale: float | None = None
    ) -> sde_lib.StepOutput:
        """Re-score recorded step ``step`` (int, or ``[b]`` per sample) under the current weights.

        ``guidance_scale`` None recomputes with the rollout's recorded guidance (CFG, STG, modality,
        rescale: unchanged weights give back the recorded log-prob); <= 1 trains without any guidance
        (one conditional forward). The joint log-prob is returned; `log_prob_parts` also gives each
        modality's.
        """
        return self.log_prob_parts(rollout, step, guidance_scale=guidance_scale)[0]

    def log_prob_parts(
        self, rollout: Rollout, step: int | torch.Tensor, *, guidance_scale: float | None = None
    ) -> tuple[sde_lib.StepOutput, dict[str, torch.Tensor]]:
        """`log_prob` and the per-modality log-probs ``{"video": [b], "audio": [b]}``."""
        if guidance_scale is not None and guidance_scale > 1.0:
            raise InputError(
                f"LTX-2 recomputes with the rollout's own guidance (guidance_scale None) or none "
                f"(guidance_scale <= 1), got {guidance_scale}"
            )
        guidance = Guidance.from_dict(rollout.extras["guidance"]) if guidance_scale is None else Guidance()
        device = rollout.latents.device
        steps = recorded_steps(step, rollout.num_samples, rollout.latents.shape[1], device)
        geometry = self._rollout_geometry(rollout)
        scale = rollout.generated_mask.float()
        video_mask = self._video_mask(scale, geometry)
        text = self.text_inputs(rollout.condition, rollout.condition_index, max(guidance.cfg))

        def velocity(states: torch.Tensor, schedule: torch.Tensor) -> torch.Tensor:
            t = rollout.timesteps[schedule]
            return self.velocity(
                states,
                self._video_timestep(t, video_mask),
                t,
                rollout.sigmas[schedule],
                text,
                guidance,
                geometry,
                rollout.frame_rate,
            )

        return rescore(
            rollout, steps, velocity, sigma_scale=scale, parts=geometry.parts(rollout.extras["modalities"])
        )

    # ------------------------------------------------------------------ decoding
    @torch.no_grad()
    def decode(
        self, latents: torch.Tensor, latent_shape: tuple[int, int, int], batch_size: int = 8
    ) -> torch.Tensor:
        """Videos ``[B, F, H, W, 3]`` in [0, 1] from flat states ``[B, N]`` (the video stream)."""
        video_elements = math.prod(latent_shape) * self.transformer.config.in_channels
        tokens = latents[:, :video_elements].unflatten(1, (-1, self.transformer.config.in_channels))
        return super().decode(tokens, latent_shape, batch_size)

    @torch.no_grad()
    def decode_audio(self, latents: torch.Tensor, latent_shape: tuple[int, int, int]) -> torch.Tensor:
        """Waveforms ``[B, channels, samples]`` from flat states ``[B, N]``: the audio stream
        denormalised, unpacked, decoded to a mel spectrogram by the audio VAE and voiced by the vocoder."""
        if self.audio_vae is None or self.vocoder is None:
            raise InputError("this checkpoint has no audio_vae/ and vocoder/ to decode audio with")
        video_elements = math.prod(latent_shape) * self.transformer.config.in_channels
        audio = (
            latents[:, video_elements:].unflatten(1, (-1, self.transformer.config.audio_in_channels)).float()
        )
        mean = self.audio_vae.latents_mean.to(audio)
        std = self.audio_vae.latents_std.to(audio)
        audio = audio * std + mean
        mel = self.audio_vae.config.mel_bins // self.audio_vae.mel_compression_ratio
        audio = audio.unflatten(2, (-1, mel)).transpose(1, 2)  # [B, L, C*M] -> [B, C, L, M]
        spectrogram = self.audio_vae.decode(audio.to(self.audio_vae.dtype), return_dict=False)[0]
        return self.vocoder(spectrogram).float()

    @torch.no_grad()
    def rollout_audio(self, rollout: Rollout) -> tuple[torch.Tensor, int] | None:
        """The generated sound of an ``audio_video`` rollout for rewards: waveforms ``[B, channels,
        samples]`` (CPU, fp32) and the vocoder's sample rate (Hz); None for a ``video`` rollout (its
        audio is not a scored variable) or a checkpoint that cannot voice audio."""
        if (
            rollout.extras.get("modalities") != "audio_video"
            or self.audio_vae is None
            or self.vocoder is None
        ):
            return None
        waveforms = self.decode_audio(rollout.final_latents, rollout.latent_shape).cpu()
        return waveforms, int(self.vocoder.config.output_sampling_rate)

    # ------------------------------------------------------------------ supervised (flow matching)
    def prepare_condition(
        self, rows: list[dict], *, guidance_scale: float = 1.0, max_sequence_length: int = 1024
    ) -> dict[str, torch.Tensor]:
        """`LTXPolicy.prepare_condition` with `LTX2Pipeline`'s prompt length (1024 Gemma tokens); rows
        carrying a target waveform (``audio`` ``[channels, samples]`` and ``sample_rate``) also give
        ``audio_latents`` ``[P, La, Da]`` (`encode_audio`), the audio half of a supervised target."""
        condition = super().prepare_condition(
            rows, guidance_scale=guidance_scale, max_sequence_length=max_sequence_length
        )
        condition.update(self.audio_condition(rows))
        return condition

    def audio_condition(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        """``{"audio_latents": [P, La, Da]}`` (`encode_audio`) when the rows carry a target waveform
        (``audio`` ``[channels, samples]`` and ``sample_rate``), else nothing."""
        if "audio" not in rows[0]:
            return {}
        rates = {int(r.get("sample_rate", 0)) for r in rows}
        if len(rates) != 1:
            raise InputError(f"rows with audio need one common 'sample_rate', got {sorted(rates)}")
        return {"audio_latents": self.encode_audio([r["audio"] for r in rows], rates.pop())}

    @torch.no_grad()
    def encode_audio(self, waveforms: list[torch.Tensor], sample_rate: int) -> torch.Tensor:
        """Packed, normalised audio latents ``[B, La, Da]`` of waveforms ``[channels, samples]``: the
        log-mel spectrogram LTX-2's audio VAE was trained on (`log_mel_spectrogram`), encoded (mode),
        packed and normalised as `LTX2Pipeline.prepare_audio_latents` takes given latents. Mono is
        duplicated to the VAE's channels; the waveforms must be at the VAE's sample rate."""
        if self.audio_vae is None:
            raise InputError("this checkpoint has no audio_vae/ to encode target audio with")
        config = self.audio_vae.config
        if sample_rate != config.sample_rate:
            raise InputError(
                f"target audio is at {sample_rate} Hz but the audio VAE takes {config.sample_rate} Hz: "
                f"resample it (e.g. the toy world's sample_rate: {config.sample_rate})"
            )
        lengths = {torch.as_tensor(w).shape for w in waveforms}
        if len(lengths) != 1 or len(next(iter(lengths))) != 2:
            raise InputError(f"waveforms must share one shape [channels, samples], got {sorted(lengths)}")
        audio = torch.stack([torch.as_tensor(w) for w in waveforms]).to(self.device, torch.float32)
        channels = config.in_channels
        if audio.shape[1] not in (1, channels):
            raise InputError(f"waveforms have {audio.shape[1]} channels; the audio VAE takes 1 or {channels}")
        mel = log_mel_spectrogram(
            audio.expand(-1, channels, -1), config.sample_rate, config.mel_bins, config.mel_hop_length
        )
        latents = self.audio_vae.encode(mel.to(self.audio_vae.dtype)).latent_dist.mode().float()
        # LTX2Pipeline's length for this duration (the causal encoder yields one more for a partial tail)
        frames = round(audio.shape[-1] / config.mel_hop_length / self.audio_vae.temporal_compression_ratio)
        latents = latents[:, :, :frames]
        packed = latents.transpose(1, 2).flatten(2, 3)  # [B, C, L, M] -> [B, L, C*M]
        return (packed - self.audio_vae.latents_mean.to(packed)) / self.audio_vae.latents_std.to(packed)

    def flow_matching_noise(
        self, condition: dict[str, torch.Tensor], generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        """``audio_noise``, the audio stream's noise, when the condition carries target audio latents."""
        audio = condition.get("audio_latents")
        if audio is None:
            return {}
        return {"audio_noise": torch.randn(audio.shape, generator=generator).to(audio.device)}

    def flow_matching_loss(
        self,
        condition: dict[str, torch.Tensor],
        target: torch.Tensor,
        sigmas: torch.Tensor,
        noise: torch.Tensor,
        latent_shape: tuple[int, int, int],
        frame_rate: float = 25.0,
        audio_noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Per-sample ``mean ||v_theta(x_s, s) - (eps - x0)||^2`` over the generated elements ``[B]``.

        ``target`` / ``noise``: clean video tokens ``[B, Sv, Cv]`` (`encode_video`) and their ``eps``;
        ``condition["audio_latents"]`` / ``audio_noise``: the audio stream's ``[B, La, Da]``; both
        streams are noised to the same ``sigmas`` ``[B]``, as sampling steps them together. With
        ``modalities`` ``audio_video`` the loss covers both streams (every element weighs the same,
        as the ``mean`` log-prob reduction); with ``video`` only the video (the audio is seen, not
        learned: the noised target audio when rows carry sound, else the all-zero normalised latent).
        With ``image_latents`` the first latent frame is clean conditioning, left out of the loss.
        """
        modalities = self.ltx2_sampling(None).modalities
        b, device = target.shape[0], target.device
        if "audio_latents" in condition:
            if audio_noise is None or audio_noise.shape != condition["audio_latents"].shape:
                raise InputError("audio_latents in the condition need an audio_noise draw of their shape")
            audio_target, audio_noise = condition["audio_latents"].to(device), audio_noise.to(device)
            num_frames = (latent_shape[0] - 1) * self.temporal_compression + 1
            expected = self._audio_frames(num_frames, frame_rate)
            if audio_target.shape[1] != expected:
                raise InputError(
                    f"the target audio has {audio_target.shape[1]} latent frames but {num_frames} video "
                    f"frames at {frame_rate} fps take {expected}: give the clip's own audio, and the "
                    "data's fps as the recipe's frame_rate"
                )
        elif modalities == "audio_video":
            raise InputError(
                "modalities audio_video trains on sound: give rows an 'audio' waveform and 'sample_rate' "
                "(toyworld data: audio: true), or use policy.sampling.modalities: video"
            )
        else:
            frames = self._audio_frames((latent_shape[0] - 1) * self.temporal_compression + 1, frame_rate)
            audio_target = audio_noise = target.new_zeros(
                b, frames, self.transformer.config.audio_in_channels
            )
        s = sigmas.to(device, torch.float32)[:, None, None]
        noisy, noisy_audio = (1 - s) * target + s * noise, (1 - s) * audio_target + s * audio_noise
        timestep = sigmas.to(device, torch.float32) * self.scheduler.config.num_train_timesteps
        generated = torch.ones(target.shape[:2], device=device)
        if "image_latents" in condition:
            first = latent_shape[1] * latent_shape[2]
            generated[:, :first] = 0
            noisy[:, :first] = target[:, :first]
        geometry = Geometry(latent_shape, target.shape[-1], audio_target.shape[1], audio_target.shape[-1])
        text = self.text_inputs(condition, torch.arange(b, device=device), 1.0)
        video_out, audio_out = self._forward(
            noisy,
            noisy_audio,
            self._video_timestep(timestep, None if "image_latents" not in condition else generated),
            timestep,
            (text["video"], text["audio"], text["mask"]),
            geometry,
            frame_rate,
        )
        error = ((video_out - (noise - target)) ** 2).sum(-1) * generated
        total, count = error.sum(1), generated.sum(1) * target.shape[-1]
        if modalities == "audio_video":
            total = total + ((audio_out - (audio_noise - audio_target)) ** 2).flatten(1).sum(1)
            count = count + audio_target[0].numel()
        return total / count


def log_mel_spectrogram(
    waveforms: torch.Tensor, sample_rate: int, mel_bins: int, hop_length: int, n_fft: int = MEL_N_FFT
) -> torch.Tensor:
    """Log-mel spectrograms ``[B, C, frames, mel_bins]`` of waveforms ``[B, C, samples]``, as LTX-2's
    audio VAE was trained on them: magnitude STFT (Hann window of ``n_fft``, centred, reflect padding),
    Slaney mel filterbank over 0..sample_rate/2 with Slaney area normalisation, ``log(max(mel, 1e-5))``;
    ``samples // hop_length + 1`` frames. (LTX-2's trainer computes it with torchaudio's
    ``MelSpectrogram``; diffusers ships only the decode side, and its vocoder's ``MelSTFT`` is a
    different, causal transform with a learned filterbank, so it is written out here with torch.stft.)"""
    window = torch.hann_window(n_fft, device=waveforms.device, dtype=waveforms.dtype)
    spectrum = torch.stft(
        waveforms.flatten(0, 1),
        n_fft,
        hop_length=hop_length,
        win_length=n_fft,
        window=window,
        center=True,
        pad_mode="reflect",
        return_complex=True,
    ).abs()  # [B*C, n_fft // 2 + 1, frames]
    banks = slaney_mel_filterbank(n_fft // 2 + 1, sample_rate, mel_bins).to(spectrum)
    mel = torch.log(torch.clamp(banks.T @ spectrum, min=1e-5))
    return mel.unflatten(0, waveforms.shape[:2]).transpose(2, 3)


def slaney_mel_filterbank(num_freqs: int, sample_rate: int, mel_bins: int) -> torch.Tensor:
    """Triangular mel filters ``[num_freqs, mel_bins]`` on the Slaney mel scale (linear below 1 kHz,
    logarithmic above) over 0..sample_rate/2, each scaled to unit area (Slaney normalisation)."""
    f_sp, knee_hz, knee_mel, log_step = 200.0 / 3, 1000.0, 15.0, math.log(6.4) / 27.0

    def to_mel(hz: torch.Tensor) -> torch.Tensor:
        return torch.where(
            hz < knee_hz, hz / f_sp, knee_mel + torch.log(hz.clamp(min=knee_hz) / knee_hz) / log_step
        )

    def to_hz(mel: torch.Tensor) -> torch.Tensor:
        return torch.where(mel < knee_mel, mel * f_sp, knee_hz * torch.exp(log_step * (mel - knee_mel)))

    freqs = torch.linspace(0, sample_rate // 2, num_freqs, dtype=torch.float64)
    top = to_mel(torch.tensor(sample_rate / 2.0, dtype=torch.float64))
    edges = to_hz(torch.linspace(0.0, float(top), mel_bins + 2, dtype=torch.float64))
    slopes = edges[None, :] - freqs[:, None]
    widths = edges[1:] - edges[:-1]
    down, up = -slopes[:, :-2] / widths[:-1], slopes[:, 2:] / widths[1:]
    banks = torch.clamp(torch.minimum(down, up), min=0)
    return (banks * (2.0 / (edges[2:] - edges[:-2]))[None, :]).float()
