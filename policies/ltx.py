"""LTX-Video as a stochastic policy: group rollouts with per-step log-probs, and their recomputation.

The denoiser, VAE and scheduler are diffusers' own classes, loaded from a diffusers-format
checkpoint directory (`model_index.json`, `transformer/`, `vae/`, `scheduler/`, and optionally
`text_encoder/` + `tokenizer/`). With every step deterministic the rollout reproduces
`LTXPipeline`; with stochastic steps each step's Gaussian log-prob is recorded so GRPO can
recompute it under new weights (`log_prob`) and under the frozen reference (`reference`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from policies import sde as sde_lib
from policies.errors import InputError
from policies.files import check_model_weights, check_safetensors, fresh_dir, link_tree
from policies.rollout import Rollout
from policies.sampler import ChainRecord, cfg_batch, recorded_steps, rescore, run_chain, sample_plan
from policies.schedules import ltx_sigmas

LORA_ADAPTER = "nextscene_lora"
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"


@dataclass
class SamplingConfig:
    """How a rollout samples: video geometry, schedule, CFG and which steps are stochastic."""

    num_frames: int = field(
        default=9, metadata={"help": "Frames to generate: k * (VAE temporal compression) + 1."}
    )
    height: int = field(
        default=32, metadata={"help": "Height in pixels, a multiple of the VAE spatial compression."}
    )
    width: int = field(
        default=32, metadata={"help": "Width in pixels, a multiple of the VAE spatial compression."}
    )
    frame_rate: float = field(default=25.0, metadata={"help": "Frame rate (sets the temporal RoPE scale)."})
    num_inference_steps: int = field(default=8, metadata={"help": "Denoising steps."})
    guidance_scale: float = field(
        default=1.0, metadata={"help": "CFG scale; <= 1 disables CFG (one forward)."}
    )
    kind: str = field(default="sde", metadata={"help": "Stochastic step: sde | cps | dance | ode."})
    noise_level: float = field(default=0.7, metadata={"help": "Noise of the stochastic steps (a or eta)."})
    sde_steps: list[int] | None = field(
        default=None,
        metadata={"help": "Schedule indices sampled stochastically; None = all (cps: all but last)."},
    )
    reduction: str = field(default="mean", metadata={"help": "Log-prob reduction over elements: mean | sum."})
    max_sequence_length: int = field(default=128, metadata={"help": "Prompt tokens for the T5 text encoder."})

    def __post_init__(self) -> None:
        if self.num_inference_steps < 1:
            raise InputError(f"num_inference_steps must be >= 1, got {self.num_inference_steps}")
        if self.kind != "ode" and self.noise_level == 0:
            self.kind = "ode"  # a zero-noise SDE is the ODE; treat it as such
        sde_lib.check_kind_and_noise(self.kind, self.noise_level)
        if self.reduction not in ("mean", "sum"):
            raise InputError(f"reduction must be 'mean' or 'sum', got {self.reduction!r}")
        if self.sde_steps is not None:
            bad = [i for i in self.sde_steps if not 0 <= i < self.num_inference_steps]
            if bad:
                raise InputError(
                    f"sde_steps {bad} are outside [0, {self.num_inference_steps}) denoising steps"
                )
            self.sde_steps = sorted(set(self.sde_steps))

    def stochastic_steps(self) -> list[int]:
        if self.kind == "ode":
            return []
        if self.sde_steps is not None:
            return list(self.sde_steps)
        last = self.num_inference_steps - (
            1 if self.kind == "cps" else 0
        )  # cps into sigma 0 is deterministic
        return list(range(last))


def vae_compression(path: str | Path) -> tuple[int, int]:
    """(spatial, temporal) compression of a checkpoint's LTX VAE, from its config (no weights loaded)."""
    path = Path(path)
    check_ltx_dir(path, weights=False)
    config = json.loads((path / "vae" / "config.json").read_text())
    scaling = config.get("spatio_temporal_scaling", (True, True, True, False))
    spatial = config.get("spatial_compression_ratio") or config.get("patch_size", 4) * 2 ** sum(scaling)
    temporal = config.get("temporal_compression_ratio") or config.get("patch_size_t", 1) * 2 ** sum(scaling)
    return spatial, temporal


def latent_shape(
    num_frames: int, height: int, width: int, spatial: int, temporal: int
) -> tuple[int, int, int]:
    """Latent (frames, height, width) of a video, or an `InputError` naming the geometry that cannot work."""
    if num_frames < 1 or (num_frames - 1) % temporal != 0:
        k = max(0, round((num_frames - 1) / temporal))
        raise InputError(
            f"num_frames={num_frames} is not {temporal}k+1 (the VAE compresses time {temporal}x): "
            f"use {temporal * k + 1} or {temporal * (k + 1) + 1}"
        )
    for name, size in (("height", height), ("width", width)):
        if size < spatial or size % spatial != 0:
            fix = max(spatial, round(size / spatial) * spatial)
            raise InputError(
                f"{name}={size} is not a multiple of {spatial} (the VAE's spatial compression): use {fix}"
            )
    return (num_frames - 1) // temporal + 1, height // spatial, width // spatial


def check_ltx_dir(path: Path, weights: bool = True) -> None:
    """Layout and, with ``weights``, weight files (safetensors only, headers readable) of an LTX
    directory; loads nothing."""
    if not path.is_dir():
        raise InputError(f"LTX checkpoint directory {str(path)!r} does not exist")
    index = path / "model_index.json"
    name = json.loads(index.read_text()).get("_class_name", "") if index.is_file() else ""
    if name.startswith("LTX2"):
        raise InputError(
            f"{str(path)!r} is an LTX-2 checkpoint ({name}), not LTX-Video: load it with LTX2Policy "
            "(policy type ltx2)"
        )
    for sub in ("transformer", "vae", "scheduler"):
        config = path / sub / ("scheduler_config.json" if sub == "scheduler" else "config.json")
        if not config.is_file():
            raise InputError(
                f"LTX checkpoint {str(path)!r} has no {sub}/ subfolder with its config: "
                "expected a diffusers-format LTX-Video directory (transformer/, vae/, scheduler/)"
            )
        try:
            json.loads(config.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise InputError(f"{config} is not valid JSON ({err}): re-download or regenerate it") from None
    if (path / "text_encoder" / "config.json").is_file() and not (path / "tokenizer").is_dir():
        raise InputError(
            f"LTX checkpoint {str(path)!r} has a text_encoder/ but no tokenizer/: copy the tokenizer of its "
            "text encoder into tokenizer/"
        )
    if not weights:
        return
    for sub in ("transformer", "vae", "text_encoder"):
        if (path / sub / "config.json").is_file():
            check_model_weights(path / sub)
    if (path / "transformer_lora").is_dir():
        check_safetensors(path / "transformer_lora" / LORA_WEIGHTS)


def weights_identity(module: nn.Module) -> dict[str, tuple[int, int]]:
    """Which tensors a module holds and how often each was changed in place: ``(id, version)`` per
    weight, LoRA adapters left out and LoRA-wrapped names as unwrapped. Equal before and after means
    no weight was replaced or written (optimizer steps, ``copy_``, ``load_state_dict`` all count);
    moving or casting the module keeps it."""
    return {
        name.replace(".base_layer", ""): (id(tensor), tensor._version)
        for name, tensor in module.state_dict(keep_vars=True).items()
        if "lora_" not in name
    }


class LTXPolicy(nn.Module):
    """LTX-Video (text-to-video and image-to-video) wrapped as a policy with per-step log-probs.

    Saving writes only what changed: a component still holding the weights it was loaded with (the
    VAE, the text encoder, the base transformer under LoRA) is hard-linked from the directory it was
    loaded from (`remember_source`) instead of written again (copied where links cannot be made).
    """

    # why `nft_velocity` (DiffusionNFT's update) is not available on this family; None: it is
    nft_unsupported: str | None = None

    def __init__(self, transformer, vae, scheduler, text_encoder=None, tokenizer=None) -> None:
        super().__init__()
        if transformer.config.patch_size != 1 or transformer.config.patch_size_t != 1:
            raise InputError(
                "only LTX transformers with patch_size 1 and patch_size_t 1 are supported (all releases)"
            )
        cache_rope(transformer)
        cache_time_embedding(transformer)
        self.transformer = transformer
        self.vae = vae
        self.scheduler = scheduler
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.vae.requires_grad_(False)
        if self.text_encoder is not None:
            self.text_encoder.requires_grad_(False)
        self._reference_transformer: nn.Module | None = None
        self._wrapped_transformer: nn.Module | None = None
        self._in_reference = False
        self._compile_options: dict | None = None
        self._source: tuple[Path, dict[str, dict[str, tuple[int, int]]]] | None = None

    # ------------------------------------------------------------------ loading and saving
    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        torch_dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        load_text_encoder: bool = True,
    ) -> LTXPolicy:
        """Load a diffusers-format LTX-Video directory (real, or tiny from `policies.tiny`)."""
        from diffusers import (
            AutoencoderKLLTXVideo,
            FlowMatchEulerDiscreteScheduler,
            LTXVideoTransformer3DModel,
        )

        path = Path(path)
        check_ltx_dir(path)
        transformer = LTXVideoTransformer3DModel.from_pretrained(
            path / "transformer", torch_dtype=torch_dtype, use_safetensors=True
        )
        vae = AutoencoderKLLTXVideo.from_pretrained(
            path / "vae", torch_dtype=torch_dtype, use_safetensors=True
        )
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(path / "scheduler")
        text_encoder = tokenizer = None
        if load_text_encoder and (path / "text_encoder" / "config.json").is_file():
            from transformers import AutoTokenizer, T5EncoderModel

            text_encoder = T5EncoderModel.from_pretrained(
                path / "text_encoder", torch_dtype=torch_dtype, use_safetensors=True
            )
            tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer")
        policy = cls(transformer, vae, scheduler, text_encoder, tokenizer)
        policy._load_lora(path)
        policy.remember_source(path)
        return policy.to(device)

    def saved_components(self) -> dict[str, nn.Module]:
        """The components saved as model folders of their own (name = folder), when present."""
        parts = {"transformer": self.transformer, "vae": self.vae, "text_encoder": self.text_encoder}
        return {name: module for name, module in parts.items() if module is not None}

    def remember_source(self, path: str | Path, source: LTXPolicy | None = None) -> None:
        """Record that the components now in memory are those saved under ``path`` (or, with
        ``source``, take over what ``source`` recorded for the same modules), so that saving can link
        the ones still unchanged."""
        if source is not None:
            self._source = source._source
            return
        self._source = (
            Path(path).resolve(),
            {name: weights_identity(module) for name, module in self.saved_components().items()},
        )

    def _linkable(self, name: str) -> Path | None:
        """The folder component ``name`` was loaded from, if it still holds exactly those weights."""
        if self._source is None or name not in self.saved_components():
            return None
        root, identities = self._source
        unchanged = identities.get(name) == weights_identity(self.saved_components()[name])
        return root / name if unchanged and (root / name / "config.json").is_file() else None

    def _save_component(self, name: str, path: Path) -> None:
        """``path/name``: hard links to the folder it was loaded from when the component is unchanged
        since loading, else the module's own ``save_pretrained``."""
        source = self._linkable(name)
        if source is None:
            self.saved_components()[name].save_pretrained(fresh_dir(path / name))
        elif source.resolve() != (path / name).resolve():
            link_tree(source, path / name)

    def _load_lora(self, path: Path) -> None:
        """Attach the LoRA adapter saved in ``path/transformer_lora``, if there is one."""
        if (path / "transformer_lora").is_dir():
            self.transformer.load_lora_adapter(
                str(path / "transformer_lora"),
                adapter_name=LORA_ADAPTER,
                weight_name=LORA_WEIGHTS,
                use_safetensors=True,
                prefix=None,
            )

    def save_pretrained(
        self, path: str | Path, transformer_state_dict: dict[str, torch.Tensor] | None = None
    ) -> None:
        """Write a diffusers-format directory; LoRA adapters go to ``transformer_lora/`` next to the base.

        ``transformer_state_dict`` replaces the transformer's own weights (e.g. the full state
        gathered from FSDP shards, which the module itself cannot save).
        """
        path = Path(path)
        self._save_components(path, transformer_state_dict)
        index = {
            "_class_name": "LTXPipeline",
            "scheduler": ["diffusers", type(self.scheduler).__name__],
            "transformer": ["diffusers", type(self.transformer).__name__],
            "vae": ["diffusers", type(self.vae).__name__],
            "text_encoder": [None, None],
            "tokenizer": [None, None],
        }
        if self.text_encoder is not None:
            index["text_encoder"] = ["transformers", type(self.text_encoder).__name__]
            index["tokenizer"] = ["transformers", type(self.tokenizer).__name__]
        (path / "model_index.json").write_text(json.dumps(index, indent=2))

    def _save_components(self, path: Path, transformer_state_dict: dict[str, torch.Tensor] | None) -> None:
        """Transformer (base + ``transformer_lora/``), VAE, scheduler and text encoder into ``path``."""
        from safetensors.torch import save_file

        path.mkdir(parents=True, exist_ok=True)
        if self.has_lora:
            self.transformer.save_lora_adapter(str(path / "transformer_lora"), adapter_name=LORA_ADAPTER)
        if transformer_state_dict is None and self.has_lora and self._linkable("transformer") is None:
            base = {k: v for k, v in self.transformer.state_dict().items() if "lora_" not in k}
            transformer_state_dict = {k.replace(".base_layer", ""): v for k, v in base.items()}
        if transformer_state_dict is not None:
            self.transformer.save_config(fresh_dir(path / "transformer"))
            save_file(
                {k: v.detach().cpu().contiguous() for k, v in transformer_state_dict.items()},
                str(path / "transformer" / "diffusion_pytorch_model.safetensors"),
            )
        else:  # the base under LoRA, or the whole transformer: linked when unchanged since loading
            self._save_component("transformer", path)
        self._save_component("vae", path)
        self.scheduler.save_pretrained(path / "scheduler")
        if self.text_encoder is not None:
            self._save_component("text_encoder", path)
            self.tokenizer.save_pretrained(path / "tokenizer")

    # ------------------------------------------------------------------ geometry
    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def spatial_compression(self) -> int:
        return self.vae.spatial_compression_ratio

    @property
    def temporal_compression(self) -> int:
        return self.vae.temporal_compression_ratio

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int]:
        """Latent (frames, height, width) for a video, or an `InputError` if the geometry cannot work."""
        return latent_shape(num_frames, height, width, self.spatial_compression, self.temporal_compression)

    # ------------------------------------------------------------------ conditioning
    @torch.no_grad()
    def encode_prompt(
        self, prompts: list[str], *, negative_prompt: str | None = None, max_sequence_length: int = 128
    ) -> dict[str, torch.Tensor]:
        """T5 embeddings of the prompts (and of ``negative_prompt`` for CFG), one row per prompt."""
        if self.text_encoder is None:
            raise InputError(
                "this checkpoint has no text_encoder/: pass precomputed prompt_embeds instead of prompts"
            )

        def encode(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
            tokens = self.tokenizer(
                texts,
                padding="max_length",
                max_length=max_sequence_length,
                truncation=True,
                add_special_tokens=True,
                return_tensors="pt",
            )
            ids = tokens.input_ids.to(self.text_encoder.device)
            embeds = self.text_encoder(ids)[0].to(self.transformer.dtype)
            return embeds, tokens.attention_mask.bool().to(embeds.device)

        condition = dict(zip(("prompt_embeds", "prompt_attention_mask"), encode(list(prompts)), strict=True))
        if negative_prompt is not None:
            neg, neg_mask = encode([negative_prompt] * len(prompts))
            condition.update(negative_prompt_embeds=neg, negative_prompt_attention_mask=neg_mask)
        return condition

    def prepare_condition(
        self, rows: list[dict], *, guidance_scale: float = 1.0, max_sequence_length: int = 128
    ) -> dict[str, torch.Tensor]:
        """Conditioning rows for `rollout` from dataset rows: ``prompt`` (T5-encoded, or precomputed
        ``prompt_embeds`` / ``prompt_attention_mask``), optional ``negative_prompt`` for CFG and
        ``image`` ([H, W, 3] in [0, 1]) for image-to-video."""
        if "prompt_embeds" in rows[0]:
            condition = {
                k: torch.stack([torch.as_tensor(r[k]) for r in rows]).to(self.device)
                for k in ("prompt_embeds", "prompt_attention_mask")
            }
        else:
            missing = [i for i, r in enumerate(rows) if not isinstance(r.get("prompt"), str)]
            if missing:
                raise InputError(f"dataset rows {missing[:5]} have no 'prompt' text (or 'prompt_embeds')")
            negative = rows[0].get("negative_prompt", "") if guidance_scale > 1.0 else None
            condition = self.encode_prompt(
                [r["prompt"] for r in rows], negative_prompt=negative, max_sequence_length=max_sequence_length
            )
        if "image" in rows[0]:
            condition["image_latents"] = self.encode_image(
                torch.stack([torch.as_tensor(r["image"]) for r in rows])
            )
        return condition

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised VAE latents ``[P, C, 1, h, w]`` of first frames ``[P, H, W, 3]`` in [0, 1] (I2V)."""
        if images.ndim != 4 or images.shape[-1] != 3:
            raise InputError(f"images must be [P, H, W, 3] in [0, 1], got shape {tuple(images.shape)}")
        pixels = images.permute(0, 3, 1, 2).unsqueeze(2).to(self.device, self.vae.dtype) * 2 - 1
        latents = self.vae.encode(pixels).latent_dist.mode()
        return self._normalize(latents)

    @torch.no_grad()
    def encode_video(self, videos: torch.Tensor) -> torch.Tensor:
        """Packed, normalised latents ``[B, S, C]`` of videos ``[B, F, H, W, 3]`` in [0, 1] (targets)."""
        if videos.ndim != 5 or videos.shape[-1] != 3:
            raise InputError(f"videos must be [B, F, H, W, 3] in [0, 1], got shape {tuple(videos.shape)}")
        self.latent_shape(videos.shape[1], videos.shape[2], videos.shape[3])
        pixels = videos.permute(0, 4, 1, 2, 3).to(self.device, self.vae.dtype) * 2 - 1
        return _pack(self._normalize(self.vae.encode(pixels).latent_dist.mode()).float())

    def flow_matching_loss(
        self,
        condition: dict[str, torch.Tensor],
        target: torch.Tensor,
        sigmas: torch.Tensor,
        noise: torch.Tensor,
        latent_shape: tuple[int, int, int],
        frame_rate: float = 25.0,
    ) -> torch.Tensor:
        """Per-sample ``mean ||v_theta(x_s, s) - (eps - x0)||^2`` over generated tokens ``[B]``.

        ``target`` are clean latents ``[B, S, C]`` (one conditioning row per sample), ``sigmas``
        ``[B]`` the noise levels, ``noise`` the ``eps`` draw. With ``image_latents`` in the condition
        the first latent frame is clean conditioning and is left out of the loss, as in sampling.
        """
        rows = torch.arange(target.shape[0], device=target.device)
        generated = torch.ones(target.shape[:2], dtype=torch.bool, device=target.device)
        if "image_latents" in condition:
            generated[:, : latent_shape[1] * latent_shape[2]] = False
        velocity = self.noised_velocity(
            condition, rows, target, sigmas, noise, generated, latent_shape, frame_rate
        )
        error = ((velocity - (noise - target)) ** 2).mean(dim=-1)
        return (error * generated).sum(dim=1) / generated.sum(dim=1)

    def noised_velocity(
        self,
        condition: dict[str, torch.Tensor],
        condition_index: torch.Tensor,
        clean: torch.Tensor,
        sigmas: torch.Tensor,
        noise: torch.Tensor,
        generated_mask: torch.Tensor,
        latent_shape: tuple[int, int, int],
        frame_rate: float,
    ) -> torch.Tensor:
        """The velocity ``[B, S, C]`` (fp32, no CFG) at the forward-process point of clean latents.

        ``clean`` ``[B, S, C]`` are noised to ``x_s = (1 - s) x0 + s eps`` at ``sigmas`` ``[B]`` with
        ``noise`` on the tokens ``generated_mask`` ``[B, S]`` marks; the others (an I2V / continuity
        first frame) stay clean and are shown at timestep 0, as in sampling. Sample ``b`` is
        conditioned on row ``condition_index[b]``. Flow matching (`flow_matching_loss`) and
        DiffusionNFT's update (`grpo.trainer`, ``algorithm: nft``) regress it.
        """
        if self.nft_unsupported:
            raise NotImplementedError(f"{type(self).__name__}.noised_velocity: {self.nft_unsupported}")
        s = sigmas.to(clean.device, torch.float32)[:, None, None]
        generated = generated_mask.to(clean.device)
        noisy = torch.where(generated[..., None], (1 - s) * clean + s * noise, clean)
        timestep = sigmas.to(clean.device, torch.float32) * self.scheduler.config.num_train_timesteps
        if "image_latents" in condition:  # per token: clean conditioning tokens at timestep 0
            timestep = timestep[:, None] * generated.float()
        text = self.text_inputs(condition, condition_index, 1.0)
        return self.velocity(noisy, timestep, text, 1.0, latent_shape, frame_rate)

    def nft_velocity(self, rollout: Rollout, sigmas: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """DiffusionNFT's velocity ``[b, S, C]`` at the forward-noised clean samples of ``rollout``.

        ``sigmas`` ``[b]`` are the samples' noise levels and ``noise`` ``[b, S, C]`` their ``eps``
        (`grpo.trainer`, ``algorithm: nft``); `noised_velocity` of the rollout's own conditioning.
        """
        return self.noised_velocity(
            rollout.condition, rollout.condition_index, rollout.final_latents, sigmas, noise,
            rollout.generated_mask, rollout.latent_shape, rollout.frame_rate,
        )  # fmt: skip

    def _normalize(self, latents: torch.Tensor) -> torch.Tensor:
        mean = self.vae.latents_mean.view(1, -1, 1, 1, 1).to(latents)
        std = self.vae.latents_std.view(1, -1, 1, 1, 1).to(latents)
        return (latents - mean) * self.vae.config.scaling_factor / std

    def _check_condition(self, condition: dict[str, torch.Tensor], guidance_scale: float) -> int:
        if "prompt_embeds" not in condition or "prompt_attention_mask" not in condition:
            raise InputError("condition needs 'prompt_embeds' [P, L, D] and 'prompt_attention_mask' [P, L]")
        embeds = condition["prompt_embeds"]
        width = self.transformer.config.caption_channels
        if embeds.ndim != 3 or embeds.shape[-1] != width:
            raise InputError(
                f"prompt_embeds must be [P, L, {width}] for this transformer, got {tuple(embeds.shape)}"
            )
        if guidance_scale > 1.0 and "negative_prompt_embeds" not in condition:
            raise InputError(
                f"guidance_scale={guidance_scale} needs negative_prompt_embeds (or use guidance_scale=1)"
            )
        return embeds.shape[0]

    # ------------------------------------------------------------------ the denoiser
    @staticmethod
    def text_inputs(
        condition: dict[str, torch.Tensor], condition_index: torch.Tensor, guidance_scale: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample text embeddings and mask for `velocity` (``[uncond; cond]`` stacked for CFG).

        Computed once per rollout or recomputed step, not once per denoising step.
        """
        embeds = condition["prompt_embeds"][condition_index]
        mask = condition["prompt_attention_mask"][condition_index]
        if guidance_scale > 1.0:
            embeds = torch.cat([condition["negative_prompt_embeds"][condition_index], embeds])
            mask = torch.cat([condition["negative_prompt_attention_mask"][condition_index], mask])
        return embeds, mask

    def velocity(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        text: tuple[torch.Tensor, torch.Tensor],
        guidance_scale: float,
        latent_shape: tuple[int, int, int],
        frame_rate: float,
    ) -> torch.Tensor:
        """The (CFG-combined) velocity ``[b, S, C]`` in fp32; CFG runs as one batched forward.

        ``text`` is `text_inputs` for the same samples and guidance scale.
        """
        embeds, mask = text
        mask = _text_mask(mask)
        cfg = guidance_scale > 1.0
        latents, timestep = cfg_batch(latents, cfg), cfg_batch(timestep, cfg)
        frames, height, width = latent_shape
        r_t, r_s = self.temporal_compression, self.spatial_compression
        use_wrapper = self._wrapped_transformer is not None and not self._in_reference
        out = (self._wrapped_transformer if use_wrapper else self.transformer)(
            hidden_states=latents.to(self.transformer.dtype),
            encoder_hidden_states=embeds,
            timestep=timestep,
            encoder_attention_mask=mask,
            num_frames=frames,
            height=height,
            width=width,
            rope_interpolation_scale=(r_t / frame_rate, r_s, r_s),
            return_dict=False,
        )[0].float()
        if cfg:
            uncond, cond = out.chunk(2)
            out = uncond + guidance_scale * (cond - uncond)
        return out

    def _timestep(
        self, rollout_timestep: torch.Tensor, generated_mask: torch.Tensor, per_token: bool
    ) -> torch.Tensor:
        if per_token:  # clean conditioning tokens are shown to the denoiser at timestep 0
            return rollout_timestep * generated_mask.to(torch.float32)
        return rollout_timestep.expand(generated_mask.shape[0])

    # ------------------------------------------------------------------ rollout
    @torch.no_grad()
    def rollout(
        self,
        condition: dict[str, torch.Tensor],
        *,
        num_generations: int = 1,
        sampling: SamplingConfig | None = None,
        seeds: list[int] | None = None,
    ) -> Rollout:
        """Denoise ``num_generations`` videos per conditioning row, recording the stochastic steps.

        ``condition`` holds one row per prompt: ``prompt_embeds`` [P, L, D], ``prompt_attention_mask``
        [P, L], for CFG ``negative_prompt_embeds`` / ``negative_prompt_attention_mask``, and for I2V
        ``image_latents`` [P, C, 1, h, w] from `encode_image` (the first latent frame is then kept
        clean). Sample ``b`` uses row ``b // num_generations`` and seed ``seeds[b]``.
        """
        sampling = sampling or SamplingConfig()
        rows = self._check_condition(condition, sampling.guidance_scale)
        latent_shape = self.latent_shape(sampling.num_frames, sampling.height, sampling.width)
        device = self.device
        seeds, condition_index, generators = sample_plan(rows, num_generations, seeds, device)
        condition = {k: v.to(device) for k, v in condition.items()}

        latents, generated_mask = self._initial_latents(condition, condition_index, latent_shape, generators)
        seq_len = math.prod(latent_shape)
        sigmas, timesteps = ltx_sigmas(self.scheduler, sampling.num_inference_steps, seq_len)
        sigmas, timesteps = sigmas.to(device), timesteps.to(device)
        per_token = "image_latents" in condition
        token_scale = (
            generated_mask.unsqueeze(-1).to(torch.float32) if per_token else torch.ones(1, device=device)
        )
        stochastic = sampling.stochastic_steps()

        text = self.text_inputs(condition, condition_index, sampling.guidance_scale)

        def velocity(state: torch.Tensor, i: int) -> torch.Tensor:
            timestep = self._timestep(timesteps[i], generated_mask, per_token)
            return self.velocity(
                state, timestep, text, sampling.guidance_scale, latent_shape, sampling.frame_rate
            )

        record = ChainRecord()
        latents = run_chain(
            latents,
            velocity,
            sigmas,
            kind=sampling.kind,
            noise_level=sampling.noise_level,
            stochastic=stochastic,
            generators=generators,
            reduction=sampling.reduction,
            record=record,
            sigma_scale=token_scale,
        )
        return Rollout(
            **record.stacked(latents),
            final_latents=latents,
            step_indices=torch.tensor(stochastic, dtype=torch.long),
            sigmas=sigmas,
            timesteps=timesteps,
            condition=condition,
            condition_index=condition_index,
            generated_mask=generated_mask,
            seeds=torch.tensor(seeds, dtype=torch.long),
            guidance_scale=float(sampling.guidance_scale),
            kind=sampling.kind,
            noise_level=float(sampling.noise_level),
            reduction=sampling.reduction,
            latent_shape=latent_shape,
            frame_rate=float(sampling.frame_rate),
        )

    def _initial_latents(
        self,
        condition: dict[str, torch.Tensor],
        condition_index: torch.Tensor,
        latent_shape: tuple[int, int, int],
        generators: list[torch.Generator],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Packed noise ``[B, S, C]`` drawn as `LTXPipeline` draws it, and the generated mask ``[B, S]``."""
        from diffusers.utils.torch_utils import randn_tensor

        channels = self.transformer.config.in_channels
        shape = (len(generators), channels, *latent_shape)
        noise = randn_tensor(shape, generator=generators, device=self.device, dtype=torch.float32)
        generated = torch.ones((len(generators), 1, *latent_shape), device=self.device)
        if "image_latents" in condition:
            image = condition["image_latents"][condition_index].to(torch.float32)
            if image.shape[1:] != (channels, 1, *latent_shape[1:]):
                raise InputError(
                    f"image_latents {tuple(image.shape[1:])} do not match the latent grid "
                    f"{(channels, 1, *latent_shape[1:])}: encode images at the sampling height/width"
                )
            generated[:, :, 0] = 0.0
            noise = image * (1 - generated) + noise * generated
        return _pack(noise), _pack(generated).squeeze(-1) > 0.5

    # ------------------------------------------------------------------ log-prob recomputation
    def log_prob(
        self, rollout: Rollout, step: int | torch.Tensor, *, guidance_scale: float | None = None
    ) -> sde_lib.StepOutput:
        """Re-score recorded step ``step`` of every sample under the current weights.

        ``step`` indexes the rollout's record (0 <= step < K): one int for all samples, or a ``[b]``
        tensor giving each sample its own step (Flow-GRPO trains a random subset per sample).
        Gradients reach the trainable weights through the returned ``log_prob`` ``[b]`` and
        ``mean``. ``guidance_scale`` overrides the rollout's CFG scale (e.g. 1.0 to train without
        CFG); by default the rollout's own is used, so unchanged weights give back the recorded
        log-prob.
        """
        device = rollout.latents.device
        steps = recorded_steps(step, rollout.num_samples, rollout.latents.shape[1], device)
        scale = rollout.guidance_scale if guidance_scale is None else guidance_scale
        per_token = "image_latents" in rollout.condition
        text = self.text_inputs(rollout.condition, rollout.condition_index, scale)

        def velocity(latents: torch.Tensor, schedule: torch.Tensor) -> torch.Tensor:
            timestep = rollout.timesteps[schedule]
            if per_token:
                timestep = timestep[:, None] * rollout.generated_mask.to(torch.float32)
            return self.velocity(latents, timestep, text, scale, rollout.latent_shape, rollout.frame_rate)

        token_scale = rollout.generated_mask.to(torch.float32) if per_token else None
        return rescore(rollout, steps, velocity, sigma_scale=token_scale)[0]

    # ------------------------------------------------------------------ reference model and LoRA
    def rollout_audio(self, rollout: Rollout) -> tuple[torch.Tensor, int] | None:
        """The generated sound of a rollout, ``(waveforms, sample_rate)``, for rewards: None (LTX-Video
        generates no sound; `LTX2Policy` voices an ``audio_video`` rollout)."""
        return None

    def flow_matching_noise(
        self, condition: dict[str, torch.Tensor], generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        """Noise `flow_matching_loss` takes besides the video's (keyword arguments), drawn from
        ``generator`` after it: none for a video-only model."""
        return {}

    def extra_trainable_parameters(self) -> dict[str, nn.Parameter]:
        """Trained weights outside ``transformer``: none (a policy with conditioning weights of its own,
        e.g. NSP's queries and connector, returns them)."""
        return {}

    def wrap_transformer(self, wrapped: nn.Module | None) -> None:
        """Route training forwards through ``wrapped`` (e.g. accelerate's DDP / FSDP module).

        ``self.transformer`` stays the plain module (configs, saving, LoRA switches).
        """
        self._wrapped_transformer = wrapped

    @property
    def has_lora(self) -> bool:
        return LORA_ADAPTER in getattr(self.transformer, "peft_config", {})

    def add_lora(
        self, rank: int = 16, alpha: float | None = None, target_modules: list[str] | None = None
    ) -> None:
        """Attach a LoRA adapter (peft) to the transformer; only its weights stay trainable.

        A policy loaded with an adapter (the ``final`` of a LoRA run) first folds it into the
        transformer's weights (`merge_lora`): the new adapter trains on top of the policy as loaded,
        which is also what the adapter-off KL reference computes."""
        from peft import LoraConfig

        if self.has_lora:
            self.merge_lora()
        targets = target_modules or ["to_q", "to_k", "to_v", "to_out.0"]
        self.transformer.requires_grad_(False)
        self.transformer.add_adapter(
            LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=targets, init_lora_weights=True),
            adapter_name=LORA_ADAPTER,
        )

    @torch.no_grad()
    def merge_lora(self) -> None:
        """Fold the LoRA adapter into the transformer's weights and remove it (the model computes the
        same; saving then writes the merged transformer instead of linking the loaded base)."""
        from peft.tuners.lora import LoraLayer

        for module in self.transformer.modules():
            if isinstance(module, LoraLayer) and LORA_ADAPTER in module.lora_A:
                weight = module.get_base_layer().weight
                weight.add_(module.get_delta_weight(LORA_ADAPTER).to(weight.dtype))  # in place: a new version
        self.transformer.delete_adapters(LORA_ADAPTER)

    def keep_reference_copy(self) -> None:
        """For full fine-tuning: keep a frozen copy of the current transformer as the KL reference."""
        import copy

        reference = copy.deepcopy(self.transformer).requires_grad_(False).eval()
        if self._compile_options is not None:
            # a deep copy drops the blocks' compiled callables: compile the copy's own
            _compile_blocks(reference, self._compile_options)
        self._reference_transformer = reference

    # ------------------------------------------------------------------ speed
    def compile(
        self,
        *,
        mode: str | None = None,
        backend: str = "inductor",
        attention_backend: str | None = None,
        emulate_precision_casts: bool = True,
    ) -> LTXPolicy:
        """Compile the denoiser for speed; results are those of the eager model up to kernel rounding.

        Regional compilation (diffusers' ``_repeated_blocks``): each transformer block is compiled
        in place with ``torch.compile(mode=mode, backend=backend, dynamic=False)``; the 28 blocks of
        a real checkpoint share one compiled graph, so compiling takes about a minute, not the
        model's depth times that. Shapes are specialised, not symbolic: a rollout (batch ``G``, or
        ``2G`` with CFG) and the update's micro-batches each get their own static graph, compiled
        once and reused for every denoising step and iteration. ``attention_backend`` (a diffusers
        attention backend name, e.g. ``"_native_cudnn"``) is set on the self-attention of every
        block; cross-attention keeps the default SDPA, which takes its text mask. Call it after
        `add_lora` if training LoRA (adapters added later trigger one recompilation) and before
        moving on; the frozen reference copy of full fine-tuning is compiled too. Eager is the
        default everywhere: nothing is compiled unless this is called.

        ``emulate_precision_casts`` (inductor only) rounds intermediates to bf16 wherever eager
        would. Without it the inference graph (rollout) and the training graph (recomputation with
        gradients) fuse differently and disagree by more than bf16 rounding: measured at 2B / 121
        frames, the recomputed log-prob moved by 1.3e-3 without it and 1.8e-4 with it, at no speed
        cost (benchmarks/results/gpu_rollout_121x512x768_train.json, ..._no_emulate_casts.json).
        """
        if attention_backend is not None:
            for block in repeated_blocks(self.transformer):
                block.attn1.set_attention_backend(attention_backend)
        options: dict = {"backend": backend, "dynamic": False}
        if backend == "inductor" and emulate_precision_casts:
            from torch._inductor import list_mode_options

            options["options"] = {**list_mode_options(mode or "default"), "emulate_precision_casts": True}
        else:
            options["mode"] = mode
        self._compile_options = options
        _compile_blocks(self.transformer, self._compile_options)
        if self._reference_transformer is not None:
            if attention_backend is not None:
                for block in repeated_blocks(self._reference_transformer):
                    block.attn1.set_attention_backend(attention_backend)
            _compile_blocks(self._reference_transformer, self._compile_options)
        return self

    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        """Within this context the policy computes with the reference model (LoRA off, or the frozen copy).

        Reference forwards never go through a training wrapper (DDP / FSDP), whose module holds
        the trained weights.
        """
        if not self.has_lora and self._reference_transformer is None:
            raise InputError(
                "no reference model: call add_lora() or keep_reference_copy() before using reference()"
            )
        self._in_reference = True
        try:
            if self.has_lora:
                self.transformer.disable_adapters()
                try:
                    yield
                finally:
                    self.transformer.enable_adapters()
            else:
                trained, self.transformer = self.transformer, self._reference_transformer
                try:
                    yield
                finally:
                    self.transformer = trained
        finally:
            self._in_reference = False

    # ------------------------------------------------------------------ decoding
    @torch.no_grad()
    def decode(
        self, latents: torch.Tensor, latent_shape: tuple[int, int, int], batch_size: int = 8
    ) -> torch.Tensor:
        """Videos ``[B, F, H, W, 3]`` float32 in [0, 1] from packed latents ``[B, S, C]``."""
        videos = []
        mean = self.vae.latents_mean.view(1, -1, 1, 1, 1)
        std = self.vae.latents_std.view(1, -1, 1, 1, 1)
        for chunk in latents.split(batch_size):
            unpacked = _unpack(chunk, latent_shape).to(torch.float32)
            unpacked = unpacked * std.to(unpacked) / self.vae.config.scaling_factor + mean.to(unpacked)
            temb = None
            if self.vae.config.timestep_conditioning:
                temb = torch.zeros(unpacked.shape[0], device=unpacked.device, dtype=self.vae.dtype)
            video = self.vae.decode(unpacked.to(self.vae.dtype), temb, return_dict=False)[0]
            videos.append((video.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 4, 1))
        return torch.cat(videos)


class CachedRope(nn.Module):
    """LTX-Video's rotary embedding (``LTXVideoRotaryPosEmbed``), computed for one sample and once per
    geometry.

    The transformer recomputes its rotary tables (a coordinate grid, then cos / sin of every token's
    frequencies) in every forward, for every sample of the batch, though they depend only on the
    latent grid and the frame rate: the same tables for every sample, every denoising step, every
    recomputed step and every iteration. This wrapper computes them for one sample and returns them
    expanded to the batch (a view whose batch stride is 0): every value is bitwise what the
    transformer computes, and the blocks' fused RoPE kernels read one sample's tables instead of the
    batch's (at a real rollout batch, gigabytes of fp32 per block). On CPU, where a small model's
    forward spends ~4 % of its time computing them (the Quickstart), it also keeps the tables of the
    first forward of a geometry for the next ones. Explicit ``video_coords`` (one grid per sample)
    pass through unchanged; inference mode (whose tensors autograd could not reuse) is not cached.
    """

    def __init__(self, rope: nn.Module, max_entries: int = 4) -> None:
        super().__init__()
        self.rope = rope
        self.max_entries = max_entries
        self._tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def forward(
        self,
        hidden_states: torch.Tensor,
        num_frames: int | None = None,
        height: int | None = None,
        width: int | None = None,
        rope_interpolation_scale: tuple[float, float, float] | None = None,
        video_coords: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if video_coords is not None:
            return self.rope(hidden_states, num_frames, height, width, rope_interpolation_scale, video_coords)
        args = (hidden_states[:1], num_frames, height, width, rope_interpolation_scale)
        if hidden_states.device.type != "cpu" or torch.is_inference_mode_enabled():
            tables = self.rope(*args)
        else:
            scale = rope_interpolation_scale and tuple(float(s) for s in rope_interpolation_scale)
            key = (num_frames, height, width, scale)
            if key not in self._tables:
                if len(self._tables) >= self.max_entries:
                    self._tables.clear()
                self._tables[key] = self.rope(*args)
            tables = self._tables[key]
        batch = hidden_states.shape[0]
        return tuple(table.expand(batch, *table.shape[1:]) for table in tables)


def cache_rope(transformer: nn.Module) -> None:
    """Wrap an LTX-Video transformer's rotary embedding in `CachedRope` (once; other models untouched).
    The wrapper holds no weights, so state dicts, saving and LoRA are unchanged."""
    rope = getattr(transformer, "rope", None)
    if type(rope).__name__ == "LTXVideoRotaryPosEmbed":
        transformer.rope = CachedRope(rope)


class TimeEmbeddingCache:
    """Mixin of LTX-Video's timestep embedding (``AdaLayerNormSingle``) that embeds each distinct
    timestep once (`cache_time_embedding` puts it under the module's own class). CPU only, like
    `CachedRope`.

    With a clean conditioning frame (NSP's continuity, image-to-video) every token carries its own
    timestep, so the embedding's MLP would run on all ``B * S`` tokens of every forward (about 8 % of a
    Quickstart forward on toy_nsp), though a forward holds two values (0 and the step's).

    - Frozen weights (LoRA, inference): the outputs for a timestep tensor seen before are reused: a
      denoising step's timesteps are the same for every context of a rollout, the update recomputes
      the rollout's steps and the reference forward the policy's, and every iteration walks the same
      schedule. An equal tensor (shape, dtype and values) under the same weights gets back the very
      tensors computed for it, so every result is bitwise the uncached embedding's. Computed afresh
      after the weights changed (their versions: EMA swaps, loading).
    - Weights that train (full fine-tuning; FSDP2 also re-gathers them without bumping their versions,
      so nothing is kept across forwards), and inference mode (whose tensors autograd could not
      reuse): the MLP runs on the distinct values and its rows are gathered per token. Equal to the
      per-token MLP up to float rounding (a 2-row matmul rounds unlike a 9,216-row one: ~1e-6); the
      gradient sums the tokens' contributions per value, in token order (bitwise reproducible).
    """

    max_cached_timesteps = 16

    def forward(
        self,
        timestep: torch.Tensor,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
        batch_size: int | None = None,
        hidden_dtype: torch.dtype | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        args = (timestep, added_cond_kwargs, batch_size, hidden_dtype)
        if added_cond_kwargs is not None or timestep.device.type != "cpu":
            return super().forward(*args)
        params = list(self.parameters())
        if torch.is_inference_mode_enabled() or any(p.requires_grad for p in params):
            return self._per_distinct_value(*args)
        key = (
            batch_size,
            hidden_dtype,
            timestep.shape,
            timestep.dtype,
            [(id(p), p._version) for p in params],
        )
        entries = self.__dict__.setdefault("_cached_timesteps", [])
        for entry_key, seen, outputs in entries:
            if entry_key == key and torch.equal(seen, timestep):
                return outputs
        outputs = super().forward(*args)
        if len(entries) >= self.max_cached_timesteps:
            entries.pop(0)
        entries.append((key, timestep.detach().clone(), outputs))
        return outputs

    def _per_distinct_value(
        self,
        timestep: torch.Tensor,
        added_cond_kwargs: None,
        batch_size: int | None,
        hidden_dtype: torch.dtype | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The embedding of each distinct value of ``timestep``, gathered back to its positions."""
        values, positions = torch.unique(timestep, return_inverse=True)
        if values.numel() == timestep.numel():
            return super().forward(timestep, added_cond_kwargs, batch_size, hidden_dtype)
        temb, embedded = super().forward(values, added_cond_kwargs, batch_size, hidden_dtype)
        # index_select: its backward (index_add_) sums each value's tokens in order, bitwise the same
        # every run; plain indexing's (index_put_ with accumulate) does not on a multi-threaded CPU
        return temb.index_select(0, positions), embedded.index_select(0, positions)


@functools.cache
def _with_time_cache(cls: type) -> type:
    return type(f"Cached{cls.__name__}", (TimeEmbeddingCache, cls), {})


def cache_time_embedding(transformer: nn.Module) -> None:
    """Give an LTX-Video transformer's timestep embedding `TimeEmbeddingCache` (once; other models
    untouched). Only the module's class changes: its weights, names, state dict and saving do not."""
    embed = getattr(transformer, "time_embed", None)
    if type(embed).__name__ == "AdaLayerNormSingle" and type(getattr(transformer, "rope", None)).__name__ in (
        "CachedRope",
        "LTXVideoRotaryPosEmbed",
    ):
        embed.__class__ = _with_time_cache(type(embed))


def _text_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    """The text attention mask a forward needs: None where it marks every token valid, on CPU.

    The transformer turns a mask into an additive bias of zeros there, which changes no bit of the
    cross-attention but sends it through the masked attention kernel: about 1.6x the unmasked one's
    time at the Quickstart's shape (8 x 4 heads x 576 tokens over 8 text tokens, one CPU thread).
    NSP's connector output is always fully valid. On a GPU the two paths may take different attention
    kernels (not bitwise the same), so the mask is kept there.
    """
    if mask is not None and mask.device.type == "cpu" and bool(mask.all()):
        return None
    return mask


def repeated_blocks(transformer: nn.Module) -> list[nn.Module]:
    """The transformer's blocks of the classes diffusers names in ``_repeated_blocks`` (what
    regional compilation compiles and FP8 rollouts quantize); empty if it names none."""
    names = set(getattr(transformer, "_repeated_blocks", ()))
    return [m for m in transformer.modules() if type(m).__name__ in names]


def _compile_blocks(transformer: nn.Module, options: dict) -> None:
    """``torch.compile`` every repeated block of ``transformer`` in place (regional compilation)."""
    blocks = repeated_blocks(transformer)
    if not blocks:
        raise InputError(f"{type(transformer).__name__} declares no _repeated_blocks to compile")
    for block in blocks:
        block.compile(**options)


def _pack(latents: torch.Tensor) -> torch.Tensor:
    """``[B, C, F, H, W]`` -> tokens ``[B, F*H*W, C]`` (LTX's 1x1x1 patching)."""
    return latents.flatten(2).transpose(1, 2)


def _unpack(tokens: torch.Tensor, latent_shape: tuple[int, int, int]) -> torch.Tensor:
    """Tokens ``[B, S, C]`` -> ``[B, C, F, H, W]``."""
    return tokens.transpose(1, 2).unflatten(2, latent_shape)
