"""Tiny random LTX-Video checkpoints, written in the diffusers directory layout real ones have.

No weights can be downloaded here, so tests, demos and the toy world run on small random models
of the *real* architectures (`LTXVideoTransformer3DModel`, `AutoencoderKLLTXVideo`,
`T5EncoderModel`, `FlowMatchEulerDiscreteScheduler`). They are saved with `save_pretrained` and
loaded back through exactly the code path a real LTX-Video checkpoint takes.
"""

from __future__ import annotations

import string
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch


@dataclass
class TinyLTXSpec:
    """Sizes of a tiny LTX-Video checkpoint (defaults: ~0.9 M parameters; VAE 8x in space and time)."""

    latent_channels: int = field(
        default=8, metadata={"help": "VAE latent channels = transformer in/out channels."}
    )
    num_layers: int = field(default=2, metadata={"help": "Transformer blocks."})
    num_attention_heads: int = field(default=4, metadata={"help": "Attention heads per block."})
    attention_head_dim: int = field(default=16, metadata={"help": "Channels per attention head."})
    caption_channels: int = field(default=32, metadata={"help": "Text-embedding width (T5 d_model)."})
    vae_channels: tuple[int, ...] = field(
        default=(8, 16, 32), metadata={"help": "VAE block widths (see vae_scaling)."}
    )
    vae_patch_size: int = field(
        default=1, metadata={"help": "VAE spatial patch size (compression multiplier)."}
    )
    vae_scaling: bool = field(
        default=True,
        metadata={"help": "Each VAE block halves space and time (False: only the patch size compresses)."},
    )
    text_layers: int = field(default=2, metadata={"help": "T5 encoder layers (0: no text encoder)."})
    seed: int = field(default=0, metadata={"help": "Seed for the random weights."})

    @classmethod
    def toy_world(cls, **overrides) -> TinyLTXSpec:
        """The layout of the toy-world checkpoints: VAE 4x4 pixel patches, no temporal compression.

        Fitted to the toy world (`grpo.toy_vae`, 1,500 steps, ~1.5 min on 2 CPU cores), this VAE
        reconstructs held-out clips to a verifiable reward of 0.94; the 4x and 8x space-time layouts
        stayed below 0.15 in the same budget (they must learn to move balls between frames).
        """
        toy = dict(text_layers=0, latent_channels=16, vae_channels=(32,), vae_patch_size=4, vae_scaling=False)
        return cls(**{**toy, **overrides})

    @property
    def vae_compression(self) -> tuple[int, int]:
        """(spatial, temporal) compression of the VAE this spec builds."""
        halvings = len(self.vae_channels) if self.vae_scaling else 0
        return self.vae_patch_size * 2**halvings, 2**halvings


def _scheduler_config() -> dict:
    """The LTX-Video 0.9.x scheduler settings (dynamic exponential shift, terminal 0.1)."""
    return dict(
        num_train_timesteps=1000,
        shift=1.0,
        use_dynamic_shifting=True,
        base_shift=0.95,
        max_shift=2.05,
        base_image_seq_len=1024,
        max_image_seq_len=4096,
        shift_terminal=0.1,
        invert_sigmas=False,
        time_shift_type="exponential",
    )


def _character_tokenizer():
    """A T5 tokenizer over printable ASCII characters (a real T5 vocabulary needs a download)."""
    from transformers import T5TokenizerFast

    chars = [c for c in string.printable if not c.isspace()]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    vocab += [(c, -2.0) for c in chars] + [("\u2581" + c, -2.5) for c in chars]
    return T5TokenizerFast(vocab=vocab, extra_ids=0)


def build_tiny_ltx(path: str | Path, spec: TinyLTXSpec | None = None) -> Path:
    """Write a random tiny LTX-Video checkpoint (diffusers layout) to ``path`` and return it."""
    from diffusers import AutoencoderKLLTXVideo, FlowMatchEulerDiscreteScheduler, LTXVideoTransformer3DModel
    from transformers import T5Config, T5EncoderModel

    spec = spec or TinyLTXSpec()
    path = Path(path)
    torch.manual_seed(spec.seed)
    inner = spec.num_attention_heads * spec.attention_head_dim
    transformer = LTXVideoTransformer3DModel(
        in_channels=spec.latent_channels,
        out_channels=spec.latent_channels,
        num_attention_heads=spec.num_attention_heads,
        attention_head_dim=spec.attention_head_dim,
        cross_attention_dim=inner,
        num_layers=spec.num_layers,
        caption_channels=spec.caption_channels,
    )
    n_blocks = len(spec.vae_channels)
    vae = AutoencoderKLLTXVideo(
        latent_channels=spec.latent_channels,
        block_out_channels=spec.vae_channels,
        decoder_block_out_channels=spec.vae_channels,
        down_block_types=("LTXVideoDownBlock3D",) * n_blocks,
        layers_per_block=(1,) * (n_blocks + 1),
        decoder_layers_per_block=(1,) * (n_blocks + 1),
        spatio_temporal_scaling=(spec.vae_scaling,) * n_blocks,
        decoder_spatio_temporal_scaling=(spec.vae_scaling,) * n_blocks,
        decoder_inject_noise=(False,) * (n_blocks + 1),
        downsample_type=("conv",) * n_blocks,
        upsample_residual=(False,) * n_blocks,
        upsample_factor=(1,) * n_blocks,
        patch_size=spec.vae_patch_size,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(**_scheduler_config())
    transformer.save_pretrained(path / "transformer")
    vae.save_pretrained(path / "vae")
    scheduler.save_pretrained(path / "scheduler")
    index = {
        "_class_name": "LTXPipeline",
        "_diffusers_version": "0.42.1",
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "transformer": ["diffusers", "LTXVideoTransformer3DModel"],
        "vae": ["diffusers", "AutoencoderKLLTXVideo"],
        "text_encoder": [None, None],
        "tokenizer": [None, None],
    }
    if spec.text_layers > 0:
        tokenizer = _character_tokenizer()
        text_encoder = T5EncoderModel(
            T5Config(
                vocab_size=len(tokenizer),
                d_model=spec.caption_channels,
                d_kv=8,
                d_ff=2 * spec.caption_channels,
                num_layers=spec.text_layers,
                num_heads=4,
                relative_attention_num_buckets=8,
            )
        )
        text_encoder.save_pretrained(path / "text_encoder")
        tokenizer.save_pretrained(path / "tokenizer")
        index["text_encoder"] = ["transformers", "T5EncoderModel"]
        index["tokenizer"] = ["transformers", "T5TokenizerFast"]
    import json

    (path / "model_index.json").write_text(json.dumps(index, indent=2))
    (path / "tiny_spec.json").write_text(json.dumps(asdict(spec), indent=2))
    return path
