"""Tiny random Qwen-VL checkpoints (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) in the layout real ones have.

A checkpoint directory holds ``config.json`` + safetensors weights (transformers' own classes),
a byte-level BPE tokenizer with Qwen's special tokens and chat template, and
``preprocessor_config.json``; it loads through exactly the code a real Qwen-VL takes
(``AutoModelForImageTextToText``, ``AutoTokenizer``, `policies.qwen_vl_inputs.QwenVLInputsConfig`).
The vision tower uses 8-pixel patches so that 32x32 toy-world frames make a few tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch

from policies.errors import InputError
from policies.qwen_vl_inputs import QwenVLInputsConfig

if TYPE_CHECKING:
    from tokenizers import Tokenizer

# Qwen-style chat template: text parts verbatim, one vision placeholder per image/video part.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% elif part['type'] in ['image', 'image_url'] %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] in ['video', 'video_url'] %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
    "<|video_pad|>",
]  # fmt: skip
TOY_CORPUS = [
    "What happens next? Continue the scene. user assistant system",
    "a red ball moves left and bounces off the wall; the blue ball falls and strikes the green ball",
    "yellow purple orange cyan ball balls rolls up down right enters leaves the frame stops rests",
]


def train_bpe(
    tokenizer: Tokenizer,
    corpus: Sequence[str],
    vocab_size: int,
    special_tokens: Sequence[str],
    **trainer_kwargs,
) -> Tokenizer:
    """Train ``tokenizer`` (a `tokenizers.Tokenizer` with a BPE model, normalizer and pre-tokenizer already
    set) on ``corpus`` in place, ``special_tokens`` first in the vocabulary; returns it. Shared by the tiny
    tokenizers of each model family, which differ only in how they split and normalise text."""
    from tokenizers import trainers

    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(special_tokens), **trainer_kwargs
    )
    tokenizer.train_from_iterator(list(corpus) * 20, trainer)
    return tokenizer


def build_tiny_qwen_tokenizer(corpus: Sequence[str] = TOY_CORPUS, vocab_size: int = 400):
    """A byte-level BPE tokenizer (Qwen's kind) trained on ``corpus``, with Qwen's special tokens and
    chat template; any text still tokenizes (byte fallback)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    train_bpe(
        tokenizer, corpus, vocab_size, SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


@dataclass
class TinyQwenVLSpec:
    """Sizes of a tiny Qwen-VL checkpoint (defaults: ~0.2 M parameters)."""

    architecture: Literal["qwen2_vl", "qwen2_5_vl", "qwen3_vl"] = field(
        default="qwen2_5_vl", metadata={"help": "Which transformers Qwen-VL class to build."}
    )
    hidden_size: int = field(default=64, metadata={"help": "Language-model width."})
    num_layers: int = field(default=2, metadata={"help": "Language-model layers."})
    num_heads: int = field(default=2, metadata={"help": "Language-model attention heads."})
    rope_theta: float = field(
        default=10000.0,
        metadata={"help": "Text RoPE base; small values keep the mRoPE height/width sections readable."},
    )
    vision_width: int = field(default=32, metadata={"help": "Vision-tower width."})
    vision_depth: int = field(default=2, metadata={"help": "Vision-tower blocks."})
    patch_size: int = field(default=8, metadata={"help": "Vision patch side in pixels."})
    max_pixels: int = field(default=32 * 32, metadata={"help": "Largest resized frame area."})
    window_size: int | None = field(
        default=None,
        metadata={
            "help": "Qwen2.5-VL's vision attention window in pixels (None: 4 patches); a window as large as "
            "the frame makes every block attend over the whole frame, in one attention call per frame "
            "instead of one per window."
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed for the random weights."})

    def __post_init__(self) -> None:
        if self.window_size is not None and self.architecture != "qwen2_5_vl":
            raise InputError(
                f"tiny_spec.window_size: only qwen2_5_vl's vision tower has attention windows, not "
                f"{self.architecture}'s; drop window_size or set architecture: qwen2_5_vl"
            )
        merged = 2 * self.patch_size  # one merged token: 2 x 2 patches
        if self.window_size is not None and (self.window_size < merged or self.window_size % merged):
            raise InputError(
                f"tiny_spec.window_size {self.window_size}: give a positive multiple of {merged} px "
                f"(2 x patch_size, one merged token), or leave it out for 4 patches"
            )


def _model(spec: TinyQwenVLSpec, tokenizer):
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
    )

    ids = {
        f"{name}_token_id": tokenizer.convert_tokens_to_ids(f"<|{token}|>")
        for name, token in (
            ("image", "image_pad"),
            ("video", "video_pad"),
            ("vision_start", "vision_start"),
            ("vision_end", "vision_end"),
        )
    }
    heads = spec.num_heads
    head_dim = spec.hidden_size // heads
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=2 * spec.hidden_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=heads,
        num_key_value_heads=1,
        max_position_embeddings=4096,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    section = [head_dim // 8, head_dim * 3 // 16, head_dim * 3 // 16]  # Qwen's 16:24:24 split of head_dim/2
    rope = {"rope_type": "default", "rope_theta": float(spec.rope_theta), "mrope_section": section}
    vision = dict(
        depth=spec.vision_depth,
        num_heads=2,
        patch_size=spec.patch_size,
        spatial_merge_size=2,
        temporal_patch_size=2,
    )
    if spec.architecture == "qwen2_vl":
        config = Qwen2VLConfig(
            text_config={**text, "rope_parameters": rope},
            vision_config={**vision, "embed_dim": spec.vision_width, "hidden_size": spec.hidden_size},
            **ids,
        )
        return Qwen2VLForConditionalGeneration(config)
    if spec.architecture == "qwen2_5_vl":
        config = Qwen2_5_VLConfig(
            text_config={**text, "rope_parameters": rope},
            vision_config={
                **vision,
                "hidden_size": spec.vision_width,
                "intermediate_size": 2 * spec.vision_width,
                "out_hidden_size": spec.hidden_size,
                "window_size": 4 * spec.patch_size if spec.window_size is None else spec.window_size,
                "fullatt_block_indexes": [spec.vision_depth - 1],
            },
            **ids,
        )
        return Qwen2_5_VLForConditionalGeneration(config)
    rope3 = {
        "rope_type": "default",
        "rope_theta": float(spec.rope_theta),
        "mrope_section": section,
        "mrope_interleaved": True,
    }
    config = Qwen3VLConfig(
        text_config={**text, "head_dim": head_dim, "rope_parameters": rope3},
        vision_config={
            **vision,
            "hidden_size": spec.vision_width,
            "intermediate_size": 2 * spec.vision_width,
            "out_hidden_size": spec.hidden_size,
            "num_position_embeddings": 64,
            "deepstack_visual_indexes": [0],
        },
        **ids,
    )
    return Qwen3VLForConditionalGeneration(config)


def build_tiny_qwen_vl(path: str | Path, spec: TinyQwenVLSpec | None = None) -> Path:
    """Write a random tiny Qwen-VL checkpoint (model, tokenizer, pre-processing config) to ``path``."""
    spec = spec or TinyQwenVLSpec()
    path = Path(path)
    tokenizer = build_tiny_qwen_tokenizer()
    torch.manual_seed(spec.seed)
    _model(spec, tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    clip = {} if spec.architecture != "qwen3_vl" else {"image_mean": (0.5,) * 3, "image_std": (0.5,) * 3}
    QwenVLInputsConfig(
        patch_size=spec.patch_size,
        image_min_pixels=(2 * spec.patch_size) ** 2,
        image_max_pixels=spec.max_pixels,
        video_min_pixels=(2 * spec.patch_size) ** 2,
        video_max_pixels=spec.max_pixels,
        **clip,
    ).save_pretrained(path)
    return path
