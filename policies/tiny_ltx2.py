"""Tiny random LTX-2 checkpoints, written in the diffusers directory layout real ones have.

LTX-2 is an audio+video model: one transformer (`LTX2VideoTransformer3DModel`) denoises a video and an
audio latent stream that attend to each other in every block; a video VAE (`AutoencoderKLLTX2Video`),
an audio VAE over mel spectrograms (`AutoencoderKLLTX2Audio`) and a vocoder (`LTX2Vocoder`) decode them;
a Gemma-3 text encoder's per-layer hidden states pass through `LTX2TextConnectors` to condition both
streams. `build_tiny_ltx2` writes every one of those components, built from the real classes at small
widths, with ``save_pretrained`` (safetensors) plus a ``model_index.json``, so that
``diffusers.LTX2Pipeline.from_pretrained(directory)`` (and ``LTX2ImageToVideoPipeline``) load it exactly as
they load a real LTX-2 checkpoint. The transformer and connectors have the LTX-2.0 layout (one shared text
projection; LTX-2.3's per-modality projections are a config switch of the same classes).

Sizes are tiny; the *ratios* that code around a checkpoint relies on are the real ones: the video VAE
compresses 32x in space and 8x in time (4x4 pixel patches, then the real four down-sampling stages), the
audio VAE takes 64-bin mel spectrograms of 16 kHz audio at hop 160 and compresses them 4x in time and in
mel bins, and the vocoder upsamples 240x to 24 kHz stereo. `TinyLTX2Spec.toy_world` is the layout whose
video VAE `grpo.toy_vae` fits to the 32x32 toy world.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from policies.errors import InputError
from policies.tiny import _scheduler_config
from policies.tiny_qwen_vl import TOY_CORPUS, train_bpe

if TYPE_CHECKING:
    from diffusers import AutoencoderKLLTX2Audio, AutoencoderKLLTX2Video
    from diffusers.pipelines.ltx2 import LTX2Vocoder
    from transformers import GemmaTokenizer

# Gemma's special tokens (ids 0-4 as in Gemma's vocabulary), its chat-turn and image markers, and the 256
# byte tokens its SentencePiece-style BPE falls back to.
GEMMA_SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
GEMMA_EXTRA_TOKENS = [
    "<start_of_turn>",
    "<end_of_turn>",
    "<start_of_image>",
    "<end_of_image>",
    "<image_soft_token>",
]
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<start_of_turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% elif part['type'] == 'image' %}<start_of_image>{% endif %}{% endfor %}{% endif %}"
    "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)

# The real LTX-2 video VAE's encoder stages after its 4x4 pixel patches (each halves what it names):
# 32x in space, 8x in time. (The real decoder has three space-time stages; the tiny one mirrors these four,
# which gives the same overall ratios.)
_LTX2_DOWNSAMPLE_TYPES = ("spatial", "temporal", "spatiotemporal", "spatiotemporal")


def build_tiny_gemma_tokenizer(corpus: Sequence[str] = TOY_CORPUS, vocab_size: int = 400) -> GemmaTokenizer:
    """A `GemmaTokenizer` (the real class) with a BPE trained on ``corpus``: Gemma's special tokens and
    ids (pad 0, eos 1, bos 2), a BOS prepended to every text, spaces as ``▁``, byte fallback for
    anything unseen, left padding and a Gemma-style chat template."""
    from tokenizers import Tokenizer, models, normalizers
    from transformers import GemmaTokenizer

    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    bpe = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    bpe.normalizer = normalizers.Replace(" ", "\u2581")
    train_bpe(bpe, corpus, vocab_size, GEMMA_SPECIAL_TOKENS + GEMMA_EXTRA_TOKENS + byte_tokens)
    merges = [tuple(pair) for pair in json.loads(bpe.to_str())["model"]["merges"]]
    tokenizer = GemmaTokenizer(
        vocab=bpe.get_vocab(),
        merges=merges,
        extra_special_tokens=GEMMA_EXTRA_TOKENS,
        add_bos_token=True,
        model_max_length=1024,
    )
    tokenizer.chat_template = GEMMA_CHAT_TEMPLATE
    return tokenizer


@dataclass
class TinyLTX2Spec:
    """Sizes of a tiny LTX-2 checkpoint (defaults: ~0.8 M parameters; real compression ratios)."""

    num_layers: int = field(default=2, metadata={"help": "Transformer blocks (audio+video each)."})
    num_attention_heads: int = field(default=2, metadata={"help": "Video attention heads (real: 32)."})
    attention_head_dim: int = field(default=16, metadata={"help": "Video channels per head (real: 128)."})
    audio_num_attention_heads: int = field(default=2, metadata={"help": "Audio attention heads (real: 32)."})
    audio_attention_head_dim: int = field(default=8, metadata={"help": "Audio channels per head (real: 64)."})
    latent_channels: int = field(default=16, metadata={"help": "Video VAE latent channels (real: 128)."})
    vae_channels: tuple[int, ...] = field(
        default=(8, 8, 16, 16),
        metadata={
            "help": "Video VAE encoder widths after each stage of vae_downsample (the decoder mirrors it)."
        },
    )
    vae_downsample: tuple[str, ...] = field(
        default=_LTX2_DOWNSAMPLE_TYPES,
        metadata={
            "help": "What each encoder stage halves: spatial, temporal, spatiotemporal (real: these four) "
            "or none (the stage keeps its input's width)."
        },
    )
    vae_patch_size: int = field(default=4, metadata={"help": "Video VAE pixel patch side (real: 4)."})
    audio_latent_channels: int = field(default=2, metadata={"help": "Audio VAE latent channels (real: 8)."})
    mel_bins: int = field(
        default=64, metadata={"help": "Mel bins of the audio VAE's spectrograms (real: 64)."}
    )
    audio_sample_rate: int = field(
        default=16000, metadata={"help": "Audio VAE sample rate in Hz (real: 16000)."}
    )
    mel_hop_length: int = field(default=160, metadata={"help": "Mel hop length in samples (real: 160)."})
    vocoder_channels: int = field(
        default=32, metadata={"help": "Vocoder width (real: 1024; halves per stage)."}
    )
    caption_channels: int = field(default=32, metadata={"help": "Gemma-3 hidden size (real: 3840)."})
    text_layers: int = field(default=2, metadata={"help": "Gemma-3 decoder layers (real: 48)."})
    connector_layers: int = field(default=1, metadata={"help": "Layers of each text connector (real: 2)."})
    connector_registers: int = field(
        default=8,
        metadata={"help": "Learnable registers per connector (real: 128; divides the prompt length)."},
    )
    vae_fit_steps: int = field(
        default=0,
        metadata={"help": "Steps fitting the video VAE to toy-world clips (grpo.toy_vae; 0: random)."},
    )
    audio_fit_steps: int = field(
        default=0,
        metadata={
            "help": "Steps fitting the audio VAE, then half as many the vocoder, to toy-world sounds "
            "(grpo.toy_audio; 0: random)."
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed for the random weights (and the fits' batches)."})

    @classmethod
    def toy_world(cls, **overrides) -> TinyLTX2Spec:
        """The toy-world layout of `TinyLTXSpec.toy_world`: 4x4 pixel patches and no temporal
        compression (8x8 latents of 16 channels per 32x32 frame), through one LTX-2 stage that keeps the
        resolution; the 8x space-time layouts could not learn to move the balls between frames in a CPU
        fitting budget. Fitted by `grpo.toy_vae` for 1,500 steps (~200 s on 2 shared CPU cores) it
        reconstructs held-out clips to a verifiable reward of 0.93 (0.44 after 500 steps, 0.88 after
        1,000; LTX-Video's layout, whose encoder is twice as wide, had 0.83 after 500 and 0.97 at
        1,500): ``python -m grpo.toy_vae --layout ltx2``. Its vocoder is 256 wide (halving per stage to 8
        channels; the default 32 ends at 1, which `grpo.toy_audio` could not fit to voice the tones):
        fitted with its audio VAE (``audio_fit_steps=300``) it voices the toy world's tones at the right
        frames (``python -m grpo.toy_audio``)."""
        toy = dict(
            latent_channels=16,
            vae_channels=(16,),
            vae_downsample=("none",),
            vae_patch_size=4,
            vocoder_channels=256,
        )
        return cls(**{**toy, **overrides})

    def __post_init__(self) -> None:
        kinds = {"spatial", "temporal", "spatiotemporal", "none"}
        if len(self.vae_channels) != len(self.vae_downsample) or not set(self.vae_downsample) <= kinds:
            raise InputError(
                f"TinyLTX2Spec: vae_downsample {self.vae_downsample} must name one of {sorted(kinds)} per "
                f"entry of vae_channels {self.vae_channels}"
            )
        widths = (self.latent_channels, *self.vae_channels)  # LTX-2's encoder starts latent_channels wide
        for i, kind in enumerate(self.vae_downsample):
            if kind == "none" and widths[i + 1] != widths[i]:
                raise InputError(
                    f"TinyLTX2Spec: vae_channels[{i}] must be {widths[i]}: an LTX-2 VAE stage that does not "
                    "down-sample cannot change the width (set it to the previous width or latent_channels)"
                )
        if self.text_layers < 1:
            raise InputError(
                "TinyLTX2Spec: text_layers must be >= 1 (LTX-2 always encodes prompts with Gemma-3)"
            )
        if self.mel_bins % 4:
            raise InputError(
                f"TinyLTX2Spec: mel_bins {self.mel_bins} must be a multiple of 4 (the audio VAE's 4x)"
            )

    @property
    def audio_token_channels(self) -> int:
        """Width of one packed audio token: every latent channel of every latent mel bin (the audio VAE
        compresses mel bins 4x)."""
        return self.audio_latent_channels * (self.mel_bins // 4)

    @property
    def vae_compression(self) -> tuple[int, int]:
        """(spatial, temporal) compression of the video VAE this spec builds."""
        spatial = sum(kind in ("spatial", "spatiotemporal") for kind in self.vae_downsample)
        temporal = sum(kind in ("temporal", "spatiotemporal") for kind in self.vae_downsample)
        return self.vae_patch_size * 2**spatial, 2**temporal


def build_video_vae(spec: TinyLTX2Spec) -> AutoencoderKLLTX2Video:
    """A random `AutoencoderKLLTX2Video` at ``spec``'s widths (seed the global RNG first). The encoder
    widens to ``vae_channels`` in its stages; the decoder mirrors them in reverse and, as the class's
    residual up-samplers require, starts twice as wide as the encoder ends and halves its width in each
    stage that up-samples."""
    from diffusers import AutoencoderKLLTX2Video

    n = len(spec.vae_channels)
    scaling = tuple(kind != "none" for kind in spec.vae_downsample)
    kinds = tuple(kind if kind != "none" else "spatial" for kind in spec.vae_downsample)  # unused if none
    width, decoder_channels = 2 * spec.vae_channels[-1], []
    for scales in reversed(scaling):  # deepest stage first
        decoder_channels.append(width)
        width //= 2 if scales else 1
    spatial, temporal = spec.vae_compression
    return AutoencoderKLLTX2Video(
        latent_channels=spec.latent_channels,
        block_out_channels=spec.vae_channels,
        down_block_types=("LTX2VideoDownBlock3D",) * n,
        decoder_block_out_channels=tuple(reversed(decoder_channels)),
        layers_per_block=(1,) * (n + 1),
        decoder_layers_per_block=(1,) * (n + 1),
        spatio_temporal_scaling=scaling,
        decoder_spatio_temporal_scaling=scaling,
        decoder_inject_noise=(False,) * (n + 1),
        downsample_type=kinds,
        upsample_type=tuple(reversed(kinds)),  # the decoder reverses its other per-stage settings itself
        upsample_residual=scaling,
        upsample_factor=tuple(2 if scales else 1 for scales in scaling),
        patch_size=spec.vae_patch_size,
        decoder_causal=False,  # as in the real LTX-2 VAE
        spatial_compression_ratio=spatial,
        temporal_compression_ratio=temporal,
    )


def build_audio_vae(spec: TinyLTX2Spec) -> AutoencoderKLLTX2Audio:
    """A random `AutoencoderKLLTX2Audio` at ``spec``'s sizes (seed the global RNG first): three levels (the
    real 4x in time and in mel bins), its latent statistics as wide as one packed audio token."""
    from diffusers import AutoencoderKLLTX2Audio

    return AutoencoderKLLTX2Audio(
        base_channels=spec.audio_token_channels,  # its latents_mean/std normalise packed tokens this wide
        ch_mult=(1, 1, 1),  # three levels: the real 4x in time and in mel bins
        num_res_blocks=1,
        latent_channels=spec.audio_latent_channels,
        sample_rate=spec.audio_sample_rate,
        mel_hop_length=spec.mel_hop_length,
        mel_bins=spec.mel_bins,
    )


def build_vocoder(spec: TinyLTX2Spec) -> LTX2Vocoder:
    """A random `LTX2Vocoder` at ``spec``'s width (seed the global RNG first): stereo mels in, the real
    240x up-sampling (100 mel frames/s -> 24 kHz) out."""
    from diffusers.pipelines.ltx2 import LTX2Vocoder

    return LTX2Vocoder(
        in_channels=2 * spec.mel_bins,  # stereo mel spectrograms
        hidden_channels=spec.vocoder_channels,
        upsample_kernel_sizes=[16, 15, 8, 4, 4],
        upsample_factors=[6, 5, 2, 2, 2],  # 240x: 100 mel frames/s -> 24 kHz
        resnet_kernel_sizes=[3],
        resnet_dilations=[[1, 3, 5]],
        output_sampling_rate=spec.audio_sample_rate // spec.mel_hop_length * 240,
    )


def _text_encoder(spec: TinyLTX2Spec, tokenizer):
    """A tiny `Gemma3ForConditionalGeneration` (the class LTX-2 uses), with an 8-pixel-patch vision tower."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    heads = 2
    head_dim = spec.caption_channels // heads
    ids = tokenizer.convert_tokens_to_ids
    config = Gemma3Config(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=spec.caption_channels,
            intermediate_size=2 * spec.caption_channels,
            num_hidden_layers=spec.text_layers,
            num_attention_heads=heads,
            num_key_value_heads=1,
            head_dim=head_dim,
            query_pre_attn_scalar=head_dim,
            max_position_embeddings=4096,
            sliding_window=64,
            layer_types=["sliding_attention"] * (spec.text_layers - 1) + ["full_attention"],
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        ),
        vision_config=dict(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        mm_tokens_per_image=4,
        boi_token_index=ids("<start_of_image>"),
        eoi_token_index=ids("<end_of_image>"),
        image_token_index=ids("<image_soft_token>"),
    )
    return Gemma3ForConditionalGeneration(config)


def build_tiny_ltx2(directory: str | Path, spec: TinyLTX2Spec | None = None, seed: int | None = None) -> Path:
    """Write a random tiny LTX-2 checkpoint (diffusers layout, safetensors) to ``directory``; return it.

    ``seed`` overrides ``spec.seed``; the same spec and seed write bitwise-identical weights. A spec asking
    for fits (``vae_fit_steps``, ``audio_fit_steps``) is built by `grpo.toy_checkpoints`."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        LTX2Pipeline,
        LTX2VideoTransformer3DModel,
    )
    from diffusers.pipelines.ltx2 import LTX2TextConnectors

    spec = spec or TinyLTX2Spec()
    if seed is not None:
        spec = TinyLTX2Spec(**{**asdict(spec), "seed": seed})
    if spec.vae_fit_steps or spec.audio_fit_steps:
        raise NotImplementedError(
            "build_tiny_ltx2 writes random weights; fitting them to the toy world trains: build with "
            "grpo.toy_checkpoints.build_fitted_tiny_ltx2"
        )
    path = Path(directory)
    tokenizer = build_tiny_gemma_tokenizer()
    inner = spec.num_attention_heads * spec.attention_head_dim
    audio_inner = spec.audio_num_attention_heads * spec.audio_attention_head_dim
    audio_channels = spec.audio_token_channels
    spatial, temporal = spec.vae_compression
    # Each component from its own seeded stream, so that changing one component's size leaves the others.
    components = {}
    torch.manual_seed(spec.seed)
    components["text_encoder"] = _text_encoder(spec, tokenizer)
    torch.manual_seed(spec.seed + 1)
    components["connectors"] = LTX2TextConnectors(
        caption_channels=spec.caption_channels,
        text_proj_in_factor=spec.text_layers + 1,  # Gemma's embedding output + every layer's
        video_connector_num_attention_heads=2,
        video_connector_attention_head_dim=spec.caption_channels // 2,
        video_connector_num_layers=spec.connector_layers,
        video_connector_num_learnable_registers=spec.connector_registers,
        audio_connector_num_attention_heads=2,
        audio_connector_attention_head_dim=spec.caption_channels // 2,
        audio_connector_num_layers=spec.connector_layers,
        audio_connector_num_learnable_registers=spec.connector_registers,
        connector_rope_base_seq_len=1024,
    )
    torch.manual_seed(spec.seed + 2)
    components["transformer"] = LTX2VideoTransformer3DModel(
        in_channels=spec.latent_channels,
        out_channels=spec.latent_channels,
        num_attention_heads=spec.num_attention_heads,
        attention_head_dim=spec.attention_head_dim,
        cross_attention_dim=inner,
        vae_scale_factors=(temporal, spatial, spatial),
        audio_in_channels=audio_channels,
        audio_out_channels=audio_channels,
        audio_num_attention_heads=spec.audio_num_attention_heads,
        audio_attention_head_dim=spec.audio_attention_head_dim,
        audio_cross_attention_dim=audio_inner,
        audio_sampling_rate=spec.audio_sample_rate,
        audio_hop_length=spec.mel_hop_length,
        num_layers=spec.num_layers,
        caption_channels=spec.caption_channels,
    )
    torch.manual_seed(spec.seed + 3)
    components["vae"] = build_video_vae(spec)
    torch.manual_seed(spec.seed + 4)
    components["audio_vae"] = build_audio_vae(spec)
    torch.manual_seed(spec.seed + 5)
    components["vocoder"] = build_vocoder(spec)
    components["tokenizer"] = tokenizer
    components["scheduler"] = FlowMatchEulerDiscreteScheduler(**_scheduler_config())
    # The pipeline writes each component's folder and the model_index.json a real checkpoint has.
    LTX2Pipeline(**components).save_pretrained(path, safe_serialization=True)
    (path / "tiny_spec.json").write_text(json.dumps(asdict(spec), indent=2))
    return path
