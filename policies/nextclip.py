"""Next-clip diffusion (Video-GPT, arXiv 2505.12489) over LTX-Video: clip-causal attention, teacher
forcing, and autoregressive rollouts with a cached clean history and per-(clip, step) log-probs.

A video is a sequence of clips of ``clip_frames`` pixel frames (``8k + 1``). Each clip is encoded and
decoded by the causal LTX VAE on its own, so every clip is ``K = (clip_frames - 1) / 8 + 1`` latent
frames and the latent video is the clips' token blocks one after another (``T = K * h * w`` tokens a
clip, packed as `LTXPolicy` packs a video). One latent grid for the whole video would not work: a
causal VAE's first latent frame holds one pixel frame and the others eight, so a clip-sequence video
(the toy world's ``clips`` view: equal clips) does not split into equal latent clips.

The denoiser is diffusers' `LTXVideoTransformer3DModel` itself (same class, same checkpoint layout as
LTX-Video; `policies.clip_attention` installs the clip-causal mask and the key/value cache):

* **Positions.** RoPE gets every token's true place: time = the pixel frame a latent frame starts at
  (``clip * clip_frames + max(0, 8 i - 7)`` for latent frame ``i`` of a clip) divided by the
  checkpoint's ``rope_frame_rate``; space = latent row/column times the VAE's spatial ratio (LTX's own
  convention). Training and rollouts use the same positions whatever frame rate a video is labelled with.
* **Timesteps** are per token: clean history at ``history_sigma`` (0 = clean; Video-GPT keeps its
  history lightly noised, a fixed small level here, the same in training and rollout, drawn fresh in
  training and from the sample's seed in rollouts), noisy clip ``k`` at its own level.
* **Prediction** is the flow-matching velocity ``eps - x0`` (Video-GPT predicts ``x0``; the velocity
  keeps the SDE samplers and log-probs of `policies.sde` unchanged).
* **Text** goes through cross-attention as in LTX: a row's ``prompt`` through T5 when the checkpoint
  has a text encoder; rows without a prompt get the empty prompt's T5 embedding, or one zero token
  when there is no text encoder (video-only conditioning, as Video-GPT). No CFG.

Teacher forcing (`flow_matching_loss`): the sequence is the clean copies of clips ``a .. N-2`` followed
by noisy copies of clips ``a .. N-1``; each noisy clip has its own independent noise level and the
loss is the velocity error on every noisy clip. ``a`` (the first clip kept, a random clip boundary)
varies the history length and the clips' absolute positions, as rollouts continuing from any clip need.

Rollout: given the context's clean clips, the next clips are generated one after another, each by
its own stochastic denoising chain. The history's keys/values are computed once (prefill), reused at
every step of the clip and extended by each finished clip, so a step costs one forward of the ``T``
new tokens. The record flattens (clip, step): record position ``j`` is step ``j % S`` of generated
clip ``j // S`` (``S`` stochastic steps per clip); ``Rollout.step_clips[j]`` names the clip, which
the GRPO trainer uses for per-clip advantages. `log_prob` recomputes any (clip, step) from the record
(the history is the context plus the record's earlier generated clips) with the full clip-causal
mask, no cache, so gradients reach the history's keys and values too.

**LTX-2.** The checkpoint picks the generator (its ``model_index.json`` ``_class_name``):
`NextClipPolicy.from_pretrained` on an LTX-2 directory returns `NextClipLTX2Policy`, the same next-clip
policy over diffusers' `LTX2VideoTransformer3DModel` (`LTX2Policy`'s loading, saving, text connectors
and VAE). What differs is kept in small hooks: the transformer call (`_denoise`), the RoPE coordinates
(LTX-2's rope takes each token's ``[start, end)`` bounds in pixel frames / rows / columns, time divided
by ``rope_frame_rate``: the same places as LTX-Video's), the schedule's shift defaults and the empty text's
width. Clip-causal attention and the cache are on the video stream's self-attention (``attn1``). The
audio stream is not generated (``modalities: video`` only; ``audio_video`` would need clip-causal audio and
is a `NotImplementedError`): every forward runs with the audio <-> video cross-attentions off
(``isolate_modalities``, as LTX-2's modality-isolation branch) and one silent audio token the video
never sees, so the video velocities depend on the video tokens, their timesteps and the text only.
(`LTX2Policy`'s ``video`` modality instead denoises a whole-video audio track by ODE alongside; that
track would let every clip see later clips through the cross-attentions.) Per-token timesteps reach
LTX-2's per-token AdaLN as in its image-to-video pipeline. LTX-2.3's prompt modulation takes one sigma
per sample, which would make the history depend on the clip being denoised: refused.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch

from policies import sde as sde_lib
from policies.clip_attention import (
    AttentionPlan,
    KVCache,
    attention_plan,
    clip_causal_mask,
    install_clip_attention,
)
from policies.errors import InputError
from policies.ltx import LTXPolicy, SamplingConfig, check_ltx_dir
from policies.ltx2 import LTX2Policy, LTX2SamplingConfig, check_ltx2_dir, checkpoint_family
from policies.rollout import Rollout
from policies.sampler import ChainRecord, draw_noise, recorded_steps, rescore, run_chain, sample_plan
from policies.schedules import LTX2_SHIFT_DEFAULTS, LTX_SHIFT_DEFAULTS, ltx_sigmas

CONFIG_NAME = "nextclip.json"
# conditioning key of a branched rollout: per row, the generated clips every sample of the row's group
# continues (its first sample's), ``[P, num_clips * T, C]``
BRANCH_HISTORY = "branch_history_latents"


@dataclass
class NextClipConfig:
    """How a checkpoint cuts videos into clips and treats its history (saved as ``nextclip.json``)."""

    clip_frames: int = field(
        default=9, metadata={"help": "Pixel frames per clip (8k+1); each clip is one VAE encode/decode."}
    )
    history_sigma: float = field(
        default=0.0, metadata={"help": "Noise level of the clean history tokens (0 = clean), in [0, 0.5]."}
    )
    rope_frame_rate: float = field(
        default=25.0, metadata={"help": "Frame rate that turns frame indices into RoPE time (seconds)."}
    )

    def __post_init__(self) -> None:
        if self.clip_frames < 1:
            raise InputError(f"clip_frames must be >= 1, got {self.clip_frames}")
        if not 0.0 <= self.history_sigma <= 0.5:
            raise InputError(f"history_sigma={self.history_sigma} is outside [0, 0.5]; use e.g. 0 or 0.05")
        if not self.rope_frame_rate > 0:
            raise InputError(f"rope_frame_rate must be > 0, got {self.rope_frame_rate}")


def _mix_seed(seed: int) -> int:
    """A second stream's seed from a sample seed (the history noise), not equal to any nearby seed."""
    return int.from_bytes(hashlib.sha256(f"history:{int(seed)}".encode()).digest()[:8], "little") >> 1


def check_nextclip_dir(path: Path) -> NextClipConfig:
    """The clip config of a next-clip directory (its ``nextclip.json``, or the defaults for a plain
    LTX-Video or LTX-2 checkpoint) after checking its layout and weight files, without loading anything."""
    if path.is_dir() and checkpoint_family(path) == "ltx2":
        check_ltx2_dir(path)
    else:
        check_ltx_dir(path)
    file = path / CONFIG_NAME
    if not file.is_file():
        return NextClipConfig()
    try:
        stored = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise InputError(f"{file} is not valid JSON ({err}): re-download or regenerate it") from None
    known = {f.name for f in fields(NextClipConfig)}
    if not isinstance(stored, dict) or set(stored) - known:
        raise InputError(
            f"{file} must be a JSON object of NextClipConfig fields ({', '.join(sorted(known))})"
        )
    return NextClipConfig(**stored)


class NextClipPolicy(LTXPolicy):
    """LTX-Video with clip-causal attention, as an autoregressive next-clip policy (module docstring).

    Honours the policy contract of `LTXPolicy` (``rollout``, ``log_prob``, ``reference``, ``decode``,
    ``from_pretrained`` / ``save_pretrained``, ``flow_matching_loss``, ``prepare_condition``); the
    rollout's steps are (clip, step) pairs. `NextClipLTX2Policy` is the same on LTX-2.
    """

    shift_defaults: tuple[int, int, float, float] = LTX_SHIFT_DEFAULTS  # the schedule's (`ltx_sigmas`)
    # DiffusionNFT (`nft_velocity`) runs on the video stream alone, so on LTX-2 too: this overrides
    # `LTX2Policy`'s refusal (its joint audio + video velocity) for `NextClipLTX2Policy`
    nft_unsupported: str | None = None

    def __init__(
        self, transformer, vae, scheduler, *generator_parts: Any, config: NextClipConfig | None = None
    ) -> None:
        """``generator_parts``: the generator policy's own further arguments (LTX-Video: text encoder
        and tokenizer; LTX-2: connectors, audio VAE, vocoder, text encoder, tokenizer)."""
        super().__init__(transformer, vae, scheduler, *generator_parts)
        self.use_config(config or NextClipConfig())
        install_clip_attention(self.transformer)

    def use_config(self, config: NextClipConfig) -> None:
        """Adopt a clip config, checking that its clips fit the VAE."""
        temporal = self.temporal_compression
        if (config.clip_frames - 1) % temporal:
            k = max(1, round((config.clip_frames - 1) / temporal))
            raise InputError(
                f"clip_frames={config.clip_frames} is not {temporal}k+1 (each clip is one VAE encode): "
                f"use {temporal * k + 1}"
            )
        self.clip_config = config

    # ------------------------------------------------------------------ loading and saving
    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        torch_dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        load_text_encoder: bool = True,
        config: NextClipConfig | None = None,
        **changes: Any,
    ) -> NextClipPolicy:
        """Load a diffusers-format LTX-Video or LTX-2 directory (its ``model_index.json`` picks the
        class returned: `NextClipPolicy` or `NextClipLTX2Policy`); its ``nextclip.json`` (if any) sets
        the clip config unless ``config`` is given (a plain checkpoint starts with the defaults);
        ``changes`` override single `NextClipConfig` fields (e.g. ``history_sigma=0.05``)."""
        path = Path(path)
        stored = check_nextclip_dir(path)
        policy_class = NextClipLTX2Policy if checkpoint_family(path) == "ltx2" else NextClipPolicy
        if not issubclass(policy_class, cls):
            raise InputError(
                f"{str(path)!r} is a next-clip checkpoint of {policy_class.__name__}, not {cls.__name__}: "
                "load it with NextClipPolicy.from_pretrained"
            )
        config = config or stored
        unknown = sorted(set(changes) - {f.name for f in fields(NextClipConfig)})
        if unknown:
            raise InputError(f"unknown NextClipConfig fields {unknown}; use clip_frames, history_sigma, ...")
        config = replace(config, **changes)
        generator = super(NextClipPolicy, policy_class)  # LTXPolicy's or LTX2Policy's loader
        policy = generator.from_pretrained(
            path, torch_dtype=torch_dtype, device=device, load_text_encoder=load_text_encoder
        )
        policy.use_config(config)
        return policy

    def save_pretrained(
        self, path: str | Path, transformer_state_dict: dict[str, torch.Tensor] | None = None
    ) -> None:
        """The LTX-Video layout (loadable by diffusers' pipelines) plus ``nextclip.json``."""
        super().save_pretrained(path, transformer_state_dict)
        (Path(path) / CONFIG_NAME).write_text(json.dumps(asdict(self.clip_config), indent=2))

    def compile(self, *, attention_backend: str | None = None, **options: Any) -> NextClipPolicy:
        """`LTXPolicy.compile` (regional ``torch.compile`` of the blocks); the self-attention keeps the
        clip-causal processor, so ``attention_backend`` is not available here."""
        if attention_backend is not None:
            raise NotImplementedError(
                "NextClipPolicy runs its own clip-causal self-attention (SDPA with a mask and the history "
                "cache); attention_backend cannot replace it: call compile() without it"
            )
        return super().compile(**options)

    # ------------------------------------------------------------------ geometry
    @property
    def latent_clip_frames(self) -> int:
        """Latent frames per clip, ``K``."""
        return (self.clip_config.clip_frames - 1) // self.temporal_compression + 1

    def clip_latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """Latent (frames, height, width) of one clip."""
        return super().latent_shape(self.clip_config.clip_frames, height, width)

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int]:
        """Latent (frames, height, width) of ``num_frames / clip_frames`` clips, clip after clip."""
        clip = self.clip_config.clip_frames
        if num_frames < clip or num_frames % clip:
            k = max(1, round(num_frames / clip))
            raise InputError(
                f"num_frames={num_frames} is not a multiple of clip_frames={clip} (videos are sequences "
                f"of clips): use {k * clip}"
            )
        frames, h, w = self.clip_latent_shape(height, width)
        return frames * (num_frames // clip), h, w

    def _clip_tokens(self, latent_shape: tuple[int, int, int]) -> tuple[int, int]:
        """(tokens per clip, number of clips) of a latent video of this shape."""
        per_clip = self.latent_clip_frames
        frames, h, w = latent_shape
        if frames % per_clip:
            raise InputError(
                f"latent video of {frames} frames is not whole clips of {per_clip} latent frames"
            )
        return per_clip * h * w, frames // per_clip

    def pixel_grid(
        self, first_clip: int, num_clips: int, latent_hw: tuple[int, int], shift: int = 0
    ) -> torch.Tensor:
        """Pixel (frame, row, column) ``[3, num_clips * T]`` at which each token of clips
        ``first_clip ..`` starts (``shift=1``: where the next latent cell starts, i.e. its end)."""
        per_clip = self.latent_clip_frames
        r_t, r_s = self.temporal_compression, self.spatial_compression
        h, w = latent_hw
        i = torch.arange(per_clip, dtype=torch.float32) + shift
        start = (i * r_t + 1 - r_t).clamp(min=0)  # pixel frame each latent frame of a clip starts at
        clips = torch.arange(first_clip, first_clip + num_clips, dtype=torch.float32)
        frames = (clips[:, None] * self.clip_config.clip_frames + start[None, :]).flatten()
        t, y, x = torch.meshgrid(
            frames,
            (torch.arange(h, dtype=torch.float32) + shift) * r_s,
            (torch.arange(w, dtype=torch.float32) + shift) * r_s,
            indexing="ij",
        )
        return torch.stack([t.flatten(), y.flatten(), x.flatten()])

    def positions(self, first_clip: int, num_clips: int, latent_hw: tuple[int, int]) -> torch.Tensor:
        """RoPE coordinates ``[3, num_clips * T]`` (time in seconds, row, column) of clips
        ``first_clip ..``: where each token starts (`pixel_grid`), time over ``rope_frame_rate``."""
        grid = self.pixel_grid(first_clip, num_clips, latent_hw)
        grid[0] /= self.clip_config.rope_frame_rate
        return grid.to(self.device)

    # ------------------------------------------------------------------ VAE
    @torch.no_grad()
    def encode_video(self, videos: torch.Tensor) -> torch.Tensor:
        """Latents ``[B, N * T, C]`` of clip videos ``[B, N * clip_frames, H, W, 3]``, clip by clip."""
        if videos.ndim != 5 or videos.shape[-1] != 3:
            raise InputError(f"videos must be [B, F, H, W, 3] in [0, 1], got shape {tuple(videos.shape)}")
        batch, frames = videos.shape[:2]
        self.latent_shape(frames, videos.shape[2], videos.shape[3])
        clips = videos.reshape(-1, self.clip_config.clip_frames, *videos.shape[2:])
        return super().encode_video(clips).reshape(batch, -1, self.transformer.config.in_channels)

    @torch.no_grad()
    def decode(
        self, latents: torch.Tensor, latent_shape: tuple[int, int, int], batch_size: int = 8
    ) -> torch.Tensor:
        """Videos ``[B, N * clip_frames, H, W, 3]`` in [0, 1] from clip-sequence latents ``[B, N * T, C]``;
        all clips of all videos go through the VAE decoder together (``batch_size`` clips a call)."""
        tokens, num_clips = self._clip_tokens(latent_shape)
        clip_shape = (latent_shape[0] // num_clips, *latent_shape[1:])
        clips = latents.reshape(-1, tokens, latents.shape[-1])
        videos = LTXPolicy.decode(self, clips, clip_shape, batch_size)  # token latents, either family
        return videos.reshape(latents.shape[0], -1, *videos.shape[2:])

    # ------------------------------------------------------------------ conditioning
    def prepare_condition(
        self, rows: list[dict], *, guidance_scale: float = 1.0, max_sequence_length: int = 128
    ) -> dict[str, torch.Tensor]:
        """Conditioning rows: text (``prompt`` through T5, precomputed ``prompt_embeds``, or the empty
        prompt) and, when rows have a ``context`` video ``[Nc * clip_frames, H, W, 3]``, its clean clips'
        latents ``context_latents [P, Nc * T, C]``."""
        _no_cfg(guidance_scale)
        if "prompt_embeds" in rows[0] or any(isinstance(r.get("prompt"), str) for r in rows):
            condition = super().prepare_condition(rows, max_sequence_length=max_sequence_length)
        elif self.text_encoder is not None:
            condition = self.encode_prompt([""] * len(rows), max_sequence_length=max_sequence_length)
        else:
            width = self._text_width()
            condition = {
                "prompt_embeds": torch.zeros(
                    len(rows), 1, width, device=self.device, dtype=self.transformer.dtype
                ),
                "prompt_attention_mask": torch.ones(len(rows), 1, dtype=torch.bool, device=self.device),
            }
        if "context" in rows[0]:
            contexts = [torch.as_tensor(r["context"]) for r in rows]
            if len({tuple(c.shape) for c in contexts}) != 1:
                raise InputError("context videos of one batch must have the same shape")
            condition["context_latents"] = self.encode_video(torch.stack(contexts))
        return condition

    def _text_width(self) -> int:
        """Width of the ``prompt_embeds`` this checkpoint takes (the empty text's, without an encoder)."""
        return self.transformer.config.caption_channels

    def _check_next_clip_condition(self, condition: dict[str, torch.Tensor], tokens: int) -> tuple[int, int]:
        """(rows, context clips) of a conditioning dict, or an `InputError`."""
        rows = self._check_condition(condition, 1.0)
        context = condition.get("context_latents")
        if context is None:
            return rows, 0
        channels = self.transformer.config.in_channels
        if context.ndim != 3 or context.shape[0] != rows or context.shape[-1] != channels:
            raise InputError(
                f"context_latents must be [{rows}, Nc * T, {channels}], got {tuple(context.shape)}"
            )
        if context.shape[1] % tokens:
            raise InputError(
                f"context_latents has {context.shape[1]} tokens, not whole clips of {tokens}: encode the "
                "context at the sampling height/width with encode_video"
            )
        return rows, context.shape[1] // tokens

    # ------------------------------------------------------------------ the denoiser
    def _forward(
        self,
        tokens: torch.Tensor,
        timestep: torch.Tensor,
        coords: torch.Tensor,
        text: Any,
        plan: AttentionPlan,
    ) -> torch.Tensor:
        """Velocity ``[B, S, C]`` (fp32) of ``tokens`` with per-token ``timestep [B, S]`` and RoPE
        ``coords [3, S, ...]`` (`positions`) under the attention ``plan``; ``text`` is `text_inputs`'."""
        use_wrapper = self._wrapped_transformer is not None and not self._in_reference
        transformer = self._wrapped_transformer if use_wrapper else self.transformer
        coords = coords.expand(tokens.shape[0], *coords.shape)
        with attention_plan(plan):
            out = self._denoise(transformer, tokens.to(self.transformer.dtype), timestep, coords, text)
        return out.float()

    def _denoise(
        self,
        transformer: torch.nn.Module,
        tokens: torch.Tensor,
        timestep: torch.Tensor,
        coords: torch.Tensor,
        text: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        """One call of LTX-Video's transformer (``coords [B, 3, S]``)."""
        embeds, mask = text
        return transformer(
            hidden_states=tokens,
            encoder_hidden_states=embeds,
            timestep=timestep,
            encoder_attention_mask=mask,
            video_coords=coords,
            return_dict=False,
        )[0]

    def _history_input(self, history: torch.Tensor, history_noise: torch.Tensor | None) -> torch.Tensor:
        """Clean history latents as the denoiser sees them (noised to ``history_sigma``)."""
        s = self.clip_config.history_sigma
        if s == 0 or history_noise is None:
            return history
        return (1 - s) * history + s * history_noise[:, : history.shape[1]]

    def _history_timestep(self) -> float:
        return self.clip_config.history_sigma * self.scheduler.config.num_train_timesteps

    def clip_velocity(
        self,
        noisy: torch.Tensor,
        timestep: torch.Tensor,
        clip: int,
        history: torch.Tensor,
        text: Any,
        latent_hw: tuple[int, int],
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Velocity ``[B, T, C]`` of noisy clip ``clip`` at ``timestep [B]`` given its clean history.

        Without ``cache``: one forward of ``[history clips 0..clip-1 ; noisy clip]`` under the
        clip-causal mask (``history [B, clip * T, C]``, as the denoiser sees it). With ``cache`` (the
        history's keys/values, `extend_history`): one forward of the ``T`` noisy tokens.
        """
        tokens = noisy.shape[1]
        coords = self.positions(clip, 1, latent_hw)
        step_t = timestep.to(torch.float32).reshape(-1, 1).expand(noisy.shape[0], tokens)
        if cache is not None:
            return self._forward(noisy, step_t, coords, text, AttentionPlan(cache=cache))
        if clip == 0:
            return self._forward(noisy, step_t, coords, text, AttentionPlan())
        history = history[:, : clip * tokens]
        ids = torch.arange(clip + 1, device=noisy.device).repeat_interleave(tokens)
        clean = ids < clip
        hist_t = torch.full((noisy.shape[0], history.shape[1]), self._history_timestep(), device=noisy.device)
        velocity = self._forward(
            torch.cat([history.to(noisy.dtype), noisy], dim=1),
            torch.cat([hist_t, step_t], dim=1),
            torch.cat([self.positions(0, clip, latent_hw), coords], dim=1),
            text,
            AttentionPlan(mask=clip_causal_mask(ids, clean)),
        )
        return velocity[:, -tokens:]

    def extend_history(
        self,
        cache: KVCache,
        clips: torch.Tensor,
        first_clip: int,
        text: Any,
        latent_hw: tuple[int, int],
        tokens: int,
    ) -> None:
        """Append the keys/values of clean clips ``first_clip ..`` (``clips [B, n * T, C]``, as the
        denoiser sees them) to ``cache``; they attend to the cached clips and clip-causally to each other."""
        n = clips.shape[1] // tokens
        ids = torch.arange(first_clip, first_clip + n, device=clips.device).repeat_interleave(tokens)
        past = torch.ones(cache.num_tokens, dtype=torch.bool, device=clips.device)
        clean = torch.ones_like(ids, dtype=torch.bool)
        mask = None
        if n > 1:
            own = clip_causal_mask(ids, clean)
            mask = torch.cat([past[None, None, None].expand(1, 1, len(ids), -1), own], dim=-1)
        timestep = torch.full(clips.shape[:2], self._history_timestep(), device=clips.device)
        coords = self.positions(first_clip, n, latent_hw)
        self._forward(clips, timestep, coords, text, AttentionPlan(mask=mask, cache=cache, extend_cache=True))

    # ------------------------------------------------------------------ rollout
    @torch.no_grad()
    def rollout(
        self,
        condition: dict[str, torch.Tensor],
        *,
        num_generations: int = 1,
        sampling: SamplingConfig | None = None,
        seeds: list[int] | None = None,
        use_cache: bool = True,
        branch: bool = False,
    ) -> Rollout:
        """Generate ``sampling.num_frames / clip_frames`` clips after the context, ``num_generations``
        videos per conditioning row, each clip by its own stochastic chain (module docstring).

        ``branch``: a tree rollout. For every clip the ``num_generations`` samples of a row continue
        one shared history, the context plus the clips of the row's first sample (the trunk, itself
        a whole video), so each sample's clip ``k`` differs from the others' only by its own chain:
        per-clip group advantages then compare clips with the same history. Sample ``b``'s
        ``final_latents`` are its own clips (clip ``k`` continuing the trunk's clips ``< k``); the
        trunk's clips are kept per row as ``condition["branch_history_latents"]``, which `log_prob`
        uses as the history. Same cost as whole videos (G chains per clip).

        ``condition``: `prepare_condition`'s dict (``context_latents`` optional: without it the first
        clip has no history). Sample ``b`` uses row ``b // num_generations`` and ``seeds[b]``.
        ``final_latents`` hold the generated clips only (what `decode` turns into the predicted
        future). ``use_cache=False`` recomputes the history at every step (the reference the cache
        is tested against).
        """
        sampling = sampling or SamplingConfig(num_frames=self.clip_config.clip_frames)
        _no_cfg(sampling.guidance_scale)
        latent_shape = self.latent_shape(sampling.num_frames, sampling.height, sampling.width)
        latent_hw = latent_shape[1:]
        tokens, num_clips = self._clip_tokens(latent_shape)
        rows, num_context = self._check_next_clip_condition(condition, tokens)
        device = self.device
        seeds, condition_index, generators = sample_plan(rows, num_generations, seeds, device)
        batch = len(seeds)
        # a branched rollout's shared clips are its own output, never an input
        condition = {k: v.to(device) for k, v in condition.items() if k != BRANCH_HISTORY}
        history_noise = self._history_noise(seeds, (num_context + num_clips) * tokens)
        sigmas, timesteps = ltx_sigmas(
            self.scheduler, sampling.num_inference_steps, tokens, self.shift_defaults
        )
        sigmas, timesteps = sigmas.to(device), timesteps.to(device)
        stochastic = sampling.stochastic_steps()
        text = self.text_inputs(condition, condition_index, 1.0)
        channels = self.transformer.config.in_channels

        history = torch.zeros(batch, 0, channels, device=device)
        if num_context:
            history = condition["context_latents"][condition_index].to(torch.float32)
        cache = KVCache() if use_cache else None
        if cache is not None and num_context:
            self.extend_history(
                cache, self._history_input(history, history_noise), 0, text, latent_hw, tokens
            )

        record, finals = ChainRecord(), []
        trunk = torch.div(torch.arange(batch, device=device), num_generations, rounding_mode="floor")
        trunk = trunk * num_generations  # the first sample of each sample's group
        for g in range(num_clips):
            clip = num_context + g
            seen = self._history_input(history, history_noise)
            latents = draw_noise(generators, (tokens, channels), device)

            def velocity(state: torch.Tensor, i: int, clip: int = clip, seen: torch.Tensor = seen):
                timestep = timesteps[i].expand(batch)
                return self.clip_velocity(state, timestep, clip, seen, text, latent_hw, cache)

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
            )
            finals.append(latents)
            history = torch.cat([history, latents[trunk] if branch else latents], dim=1)
            if cache is not None and g < num_clips - 1:  # the last clip is never anyone's history
                new = self._history_input(history, history_noise)[:, -tokens:]
                self.extend_history(cache, new, clip, text, latent_hw, tokens)

        final = torch.cat(finals, dim=1)
        if branch:
            condition = {**condition, BRANCH_HISTORY: final[trunk[::num_generations]]}
        return Rollout(
            **record.stacked(final.new_zeros((batch, tokens, channels))),
            final_latents=final,
            step_indices=torch.tensor(stochastic * num_clips, dtype=torch.long),
            sigmas=sigmas,
            timesteps=timesteps,
            condition=condition,
            condition_index=condition_index,
            generated_mask=torch.ones(final.shape[:2], dtype=torch.bool, device=device),
            seeds=torch.tensor(seeds, dtype=torch.long),
            guidance_scale=1.0,
            kind=sampling.kind,
            noise_level=float(sampling.noise_level),
            reduction=sampling.reduction,
            latent_shape=latent_shape,
            frame_rate=float(sampling.frame_rate),
            extras={
                "num_context_clips": num_context,
                "clip_tokens": tokens,
                "history_sigma": self.clip_config.history_sigma,
            },
            num_clips=num_clips,
            step_clips=[g for g in range(num_clips) for _ in stochastic],
        )

    def _history_noise(self, seeds: list[int] | torch.Tensor, length: int) -> torch.Tensor | None:
        """Per-sample noise ``[B, length, C]`` of the lightly noised history (None when it is clean)."""
        if self.clip_config.history_sigma == 0:
            return None
        channels = self.transformer.config.in_channels
        return torch.stack(
            [
                torch.randn(
                    length,
                    channels,
                    generator=torch.Generator(self.device).manual_seed(_mix_seed(int(s))),
                    device=self.device,
                )
                for s in seeds
            ]
        )

    # ------------------------------------------------------------------ log-prob recomputation
    def log_prob(
        self, rollout: Rollout, step: int | torch.Tensor, *, guidance_scale: float | None = None
    ) -> sde_lib.StepOutput:
        """Re-score recorded (clip, step) ``step`` (a record position, int or ``[b]``) under the current
        weights: ``latents[:, step]`` of clip ``step_clips[step]`` with its history (context
        plus the record's earlier generated clips, or a branched rollout's shared clips) under the
        full clip-causal mask. Samples at different clips are batched per clip. ``guidance_scale``
        may only be None or 1 (no CFG)."""
        _no_cfg(1.0 if guidance_scale is None else guidance_scale)
        device = rollout.latents.device
        steps = recorded_steps(step, rollout.num_samples, rollout.latents.shape[1], device)
        num_context = rollout.extras["num_context_clips"]
        latent_hw = rollout.latent_shape[1:]
        clips = torch.tensor(rollout.step_clips, dtype=torch.long, device=device)[steps]
        history = self._rollout_history(rollout)
        text = self.text_inputs(rollout.condition, rollout.condition_index, 1.0)
        rows = torch.arange(rollout.num_samples, device=device)

        parts, order = [], []
        for g in clips.unique().tolist():
            idx = rows[clips == g]

            def velocity(
                latents: torch.Tensor, schedule: torch.Tensor, g: int = g, idx: torch.Tensor = idx
            ) -> torch.Tensor:
                return self.clip_velocity(
                    latents,
                    rollout.timesteps[schedule],
                    num_context + g,
                    history[idx],
                    _rows(text, idx),
                    latent_hw,
                )

            parts.append(rescore(rollout, steps[idx], velocity, rows=idx)[0])
            order.append(idx)
        inverse = torch.argsort(torch.cat(order))
        return sde_lib.StepOutput(
            *(torch.cat(field_parts)[inverse] for field_parts in zip(*parts, strict=True))
        )

    def _rollout_history(self, rollout: Rollout) -> torch.Tensor:
        """The clean clips ``[B, (Nc + K) * T, C]`` the rollout's clips were sampled after, as the
        denoiser saw them: the context, then the sample's own clips or a branched rollout's shared
        clips, with the sample's history noise."""
        tokens, num_context = rollout.extras["clip_tokens"], rollout.extras["num_context_clips"]
        length = (num_context + rollout.num_clips) * tokens
        history_noise = self._history_noise(rollout.seeds.tolist(), length)
        context = rollout.condition.get("context_latents")
        history = rollout.final_latents
        if BRANCH_HISTORY in rollout.condition:  # a branched rollout: the group's shared clips
            history = rollout.condition[BRANCH_HISTORY][rollout.condition_index].to(history.dtype)
        if context is not None:
            history = torch.cat([context[rollout.condition_index].to(history.dtype), history], dim=1)
        return self._history_input(history, history_noise)

    # ------------------------------------------------------------------ teacher forcing
    @staticmethod
    def teacher_forcing_draws(
        sigmas: torch.Tensor, num_clips: int
    ) -> tuple[int, torch.Tensor, torch.Generator]:
        """The random choices of one teacher-forcing batch, all from a generator seeded by ``sigmas``.

        Returns the first clip kept, ``a`` (uniform on ``0 .. N - 2``: a random clip boundary, so the
        model learns to continue from any clip with any amount of history), the noise levels
        ``[B, N - a]`` of clips ``a ..`` (independent and uniform on (0, 1): every clip its own level),
        and the generator, which then draws the history noise. Seeding by the trainer's ``sigmas``
        (its own draw, from its seed and step) keeps a step reproducible and resume exact; the
        trainer's ``timestep_sampling`` seeds the levels but does not shape them.
        """
        digest = hashlib.sha256(sigmas.detach().cpu().double().numpy().tobytes()).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
        first = int(torch.randint(0, max(1, num_clips - 1), (1,), generator=generator))
        levels = torch.rand(len(sigmas), num_clips - first, generator=generator)
        return first, levels, generator

    def flow_matching_loss(
        self,
        condition: dict[str, torch.Tensor],
        target: torch.Tensor,
        sigmas: torch.Tensor,
        noise: torch.Tensor,
        latent_shape: tuple[int, int, int],
        frame_rate: float | None = None,
    ) -> torch.Tensor:
        """Teacher-forcing loss ``[B]``: mean ``||v - (eps - x0)||^2`` over the noisy clips.

        ``frame_rate`` (the trainer's) does not change the loss: a next-clip model's RoPE time is its
        checkpoint's ``rope_frame_rate`` in training and in rollouts alike (`positions`).

        ``target`` ``[B, N * T, C]`` are the clean latents of whole clip sequences (`encode_video`),
        ``noise`` their ``eps``; the clips' noise levels and the first clip kept come from
        `teacher_forcing_draws`, seeded by the trainer's ``sigmas [B]``. The conditioning's text is
        used; its ``context_latents`` (if any) are not: the whole clip sequence is the target.
        """
        tokens, num_clips = self._clip_tokens(latent_shape)
        device = target.device
        first, levels, generator = self.teacher_forcing_draws(sigmas, num_clips)
        levels = levels.to(device)
        s = levels.repeat_interleave(tokens, dim=1)[..., None]  # [B, kept * T, 1]
        clean = target[:, first * tokens :]
        noisy = (1 - s) * clean + s * noise[:, first * tokens :]
        history = target[:, first * tokens : (num_clips - 1) * tokens]
        if self.clip_config.history_sigma > 0:
            h_noise = torch.randn(history.shape, generator=generator).to(device)
            history = self._history_input(history, h_noise)
        rows = torch.arange(target.shape[0], device=device)
        velocity = self._teacher_forced_velocity(
            history,
            first,
            noisy,
            s[..., 0] * self.scheduler.config.num_train_timesteps,
            self.text_inputs(condition, rows, 1.0),
            latent_shape[1:],
            tokens,
        )
        return ((velocity - (noise[:, first * tokens :] - clean)) ** 2).mean(dim=(1, 2))

    def _teacher_forced_velocity(
        self,
        history: torch.Tensor,
        first: int,
        noisy: torch.Tensor,
        noisy_timestep: torch.Tensor,
        text: Any,
        latent_hw: tuple[int, int],
        tokens: int,
    ) -> torch.Tensor:
        """Velocity ``[B, n * T, C]`` of ``n`` noisy clips, each under its clean history, in one forward.

        ``history [B, m * T, C]`` holds clean clips ``first .. first + m - 1`` as the denoiser sees
        them; ``noisy`` the last ``n`` of the clips ``first .. first + m`` at per-token
        ``noisy_timestep [B, n * T]``. Under the clip-causal mask noisy clip ``k`` sees itself and
        the clean clips ``< k``: what `clip_velocity` gives clip ``k`` (tested against it), for
        every clip at once. Teacher forcing and DiffusionNFT's update (`nft_velocity`) use it.
        """
        device = noisy.device
        m, n = history.shape[1] // tokens, noisy.shape[1] // tokens
        noisy_first = first + m + 1 - n
        ids = (
            torch.cat([torch.arange(first, first + m), torch.arange(noisy_first, noisy_first + n)])
            .repeat_interleave(tokens)
            .to(device)
        )
        is_clean = torch.arange(len(ids), device=device) < history.shape[1]
        timestep = torch.cat(
            [torch.full(history.shape[:2], self._history_timestep(), device=device), noisy_timestep], dim=1
        )
        coords = torch.cat(
            [self.positions(first, m, latent_hw), self.positions(noisy_first, n, latent_hw)], dim=1
        )
        velocity = self._forward(
            torch.cat([history.to(noisy.dtype), noisy], dim=1),
            timestep,
            coords,
            text,
            AttentionPlan(mask=clip_causal_mask(ids, is_clean)),
        )
        return velocity[:, history.shape[1] :]

    # ------------------------------------------------------------------ DiffusionNFT
    def nft_velocity(self, rollout: Rollout, sigmas: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """DiffusionNFT's velocity ``[b, K * T, C]`` at the forward-noised clips of ``rollout``.

        Each generated clip is noised at its own level (``sigmas`` ``[b, K]``; ``[b]``: one level for
        all of a sample's clips) with ``noise`` ``[b, K * T, C]``, and denoised under the clean
        history it was sampled after: the context and the sample's own earlier clips, or a branched
        rollout's shared clips (``branch_history_latents``), shown at ``history_sigma`` with the
        sample's history noise, as in `rollout` and `log_prob`. One forward for all clips.
        """
        extras = rollout.extras
        tokens, num_context = extras["clip_tokens"], extras["num_context_clips"]
        num_clips, device = rollout.num_clips, rollout.final_latents.device
        clean = rollout.final_latents.to(torch.float32)
        levels = sigmas.to(device, torch.float32).reshape(len(clean), -1).expand(-1, num_clips)
        s = levels.repeat_interleave(tokens, dim=1)[..., None]  # [b, K * T, 1]
        noisy = (1 - s) * clean + s * noise.to(device, torch.float32)
        history = self._rollout_history(rollout)[:, : (num_context + num_clips - 1) * tokens]
        return self._teacher_forced_velocity(
            history.to(torch.float32),
            0,
            noisy,
            s[..., 0] * self.scheduler.config.num_train_timesteps,
            self.text_inputs(rollout.condition, rollout.condition_index, 1.0),
            rollout.latent_shape[1:],
            tokens,
        )


def _rows(text: Any, index: torch.Tensor) -> Any:
    """Rows ``index`` of `text_inputs`' output (a tuple of tensors, or a dict of them for LTX-2)."""
    if isinstance(text, dict):
        return {k: v[index] for k, v in text.items()}
    return tuple(t[index] for t in text)


def _no_cfg(guidance_scale: float) -> None:
    if guidance_scale > 1.0:
        raise InputError(
            f"guidance_scale={guidance_scale}: next-clip policies sample without CFG; use guidance_scale 1"
        )


class NextClipLTX2Policy(NextClipPolicy, LTX2Policy):
    """`NextClipPolicy` on an LTX-2 checkpoint: its clips, cache, rollout, recompute and teacher forcing
    over diffusers' `LTX2VideoTransformer3DModel` (video stream; module docstring), with `LTX2Policy`'s
    loading, saving, text connectors and VAE."""

    shift_defaults = LTX2_SHIFT_DEFAULTS

    def __init__(
        self, transformer, vae, scheduler, *generator_parts: Any, config: NextClipConfig | None = None
    ):
        if getattr(transformer, "prompt_modulation", False) and transformer.config.use_prompt_adaln_single:
            raise NotImplementedError(
                "next-clip on LTX-2.3 (prompt modulation by one sigma per sample) is not available: its "
                "history would depend on the clip being denoised; use an LTX-2.0 checkpoint"
            )
        super().__init__(transformer, vae, scheduler, *generator_parts, config=config)

    def _text_width(self) -> int:
        config = self.connectors.config
        return config.caption_channels * config.text_proj_in_factor

    def positions(self, first_clip: int, num_clips: int, latent_hw: tuple[int, int]) -> torch.Tensor:
        """LTX-2 RoPE coordinates ``[3, num_clips * T, 2]``: each token's ``[start, end)`` pixel frame
        (over ``rope_frame_rate``), row and column, as `LTX2AudioVideoRotaryPosEmbed.prepare_video_coords`
        lays out one video."""
        grid = torch.stack(
            [self.pixel_grid(first_clip, num_clips, latent_hw, shift) for shift in (0, 1)], dim=-1
        )
        grid[0] /= self.clip_config.rope_frame_rate
        return grid.to(self.device)

    def _denoise(
        self,
        transformer: torch.nn.Module,
        tokens: torch.Tensor,
        timestep: torch.Tensor,
        coords: torch.Tensor,
        text: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        """One call of LTX-2's transformer on the video tokens, audio <-> video cross-attention off and
        one silent audio token (module docstring); returns the video velocity."""
        batch = tokens.shape[0]
        audio = tokens.new_zeros(batch, 1, self.transformer.config.audio_in_channels)
        silent = timestep.new_zeros(batch)
        return transformer(
            hidden_states=tokens,
            audio_hidden_states=audio,
            encoder_hidden_states=text["video"],
            audio_encoder_hidden_states=text["audio"],
            timestep=timestep,
            audio_timestep=silent,
            sigma=silent,
            encoder_attention_mask=text["mask"],
            audio_encoder_attention_mask=text["mask"],
            video_coords=coords,
            audio_num_frames=1,
            isolate_modalities=True,
            use_cross_timestep=True,
            return_dict=False,
        )[0]

    @torch.no_grad()
    def rollout(
        self,
        condition: dict[str, torch.Tensor],
        *,
        num_generations: int = 1,
        sampling: SamplingConfig | None = None,
        seeds: list[int] | None = None,
        use_cache: bool = True,
        branch: bool = False,
    ) -> Rollout:
        """`NextClipPolicy.rollout` (video only: ``modalities: video``, no STG or modality guidance)."""
        settings = dict(self.sampling_overrides)
        if isinstance(sampling, LTX2SamplingConfig):
            settings.update(asdict(sampling))
        if settings.get("modalities", "video") != "video":
            raise NotImplementedError(
                "next-clip on LTX-2 generates the video stream only: audio_video would need clip-causal "
                "audio, which is not implemented; use modalities: video"
            )
        if settings.get("stg_scale", 0.0) or settings.get("modality_scale", 1.0) > 1.0:
            raise InputError(
                "next-clip policies sample without guidance: set stg_scale 0 and modality_scale 1"
            )
        rollout = super().rollout(
            condition,
            num_generations=num_generations,
            sampling=sampling,
            seeds=seeds,
            use_cache=use_cache,
            branch=branch,
        )
        rollout.extras["modalities"] = "video"
        return rollout
