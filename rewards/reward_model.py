"""Learned video reward models: a Qwen-VL backbone with one scalar head per aspect.

`VideoRewardModel` reads the end of the context and the candidate next scene as **one clip**
(``context_frames`` frames ending at the last context frame, then ``video_frames`` frames of the
candidate, all on one time grid of ``frame_stride`` frames), so a discontinuity at the cut -- a
ball that jumps, turns back or stops -- is something the vision tower sees directly. The text is
Qwen's chat format with a question (and the prompt, when given) followed by one special token per
aspect (``<|reward_causal|>``...). Each aspect's score is a linear head on either the hidden
state at its token (``head: token``, VideoAlign's choice) or the mean hidden state of the video
tokens (``head: mean``). Frames become Qwen-VL patches with `policies.qwen_vl_inputs` (no
torchvision).

A checkpoint directory holds the backbone in transformers' layout (``config.json``,
``model.safetensors``), ``heads.safetensors``, ``reward_model.json`` (`RewardModelArgs`, with the
calibration statistics) and the tokenizer files. `VideoRewardModel.from_backbone` starts from a
released Qwen2-VL / Qwen2.5-VL checkpoint; `build_tiny_reward_model` builds a random tiny one.

The model is a reward function once trained: ``rewards.build_reward("reward_model", model=DIR)``
(`LearnedReward`), batched, on CPU or GPU, optionally normalised with the stored statistics.
The training losses (Bradley-Terry, Bradley-Terry with ties, regression) are plain functions here;
the trainer is `grpo.reward_modeling.RewardModelTrainer`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from policies.errors import InputError
from policies.files import check_model_weights, check_safetensors
from policies.qwen_vl_inputs import QwenVLInputsConfig, to_uint8, video_inputs
from policies.video_io import as_video
from rewards.registry import register
from rewards.types import RewardOutput

FORMAT_VERSION = 1
ARCHITECTURE = "nextscene.VideoRewardModel"
ARGS_FILE = "reward_model.json"
HEADS_FILE = "heads.safetensors"
BACKBONE_TYPES = ("qwen2_5_vl", "qwen2_vl")
DEFAULT_QUESTION = (
    "The clip shows the end of a scene, then a predicted next scene. Does it continue plausibly?"
)
VIDEO_FPS = 8.0  # frame rate the temporal positions assume (the toy world's)
# vision attention of the backbone: per frame in one batched call ("flash" in the name makes Qwen-VL's
# vision tower hand over its cu_seqlens, see `_frame_attention`)
FRAME_ATTENTION = "nextscene_flash_free_frame_sdpa"


@dataclass
class RewardModelArgs:
    """What a reward model reads and how it scores; saved as ``reward_model.json``."""

    aspects: list[str] = field(
        default_factory=lambda: ["causal"], metadata={"help": "Scored aspects, one scalar head each."}
    )
    head: Literal["token", "mean"] = field(
        default="mean",
        metadata={"help": "Read each score at its aspect token ('token') or from the mean video state."},
    )
    context_frames: int = field(
        default=4, metadata={"help": "Context frames shown, ending at the last one (0: candidate only)."}
    )
    video_frames: int = field(default=4, metadata={"help": "Candidate frames shown, from its start."})
    frame_stride: int = field(
        default=2, metadata={"help": "Frames between two shown frames, on one grid across the cut."}
    )
    video_fps: float | None = field(
        default=None,
        metadata={
            "help": "Frame rate the shown frames are declared at for Qwen-VL's temporal positions "
            "(default: 8 / frame_stride, the toy world's real rate). Qwen2.5-VL steps its temporal ids "
            "by tokens_per_second * temporal_patch_size / video_fps per 2-frame patch; 2.0 makes that "
            "step tokens_per_second on every transformers version (some truncate the seconds to an int)."
        },
    )
    question: str = field(default=DEFAULT_QUESTION, metadata={"help": "Text shown after the clip."})
    use_prompt: bool = field(
        default=False, metadata={"help": "Also show each sample's prompt (caption) after the question."}
    )
    inputs: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "QwenVLInputsConfig fields (patch size, pixel budget)."}
    )
    calibration: dict[str, list[float]] | None = field(
        default=None, metadata={"help": "Per aspect [mean, std] of raw scores, for normalised rewards."}
    )

    def __post_init__(self) -> None:
        self.aspects = list(self.aspects)
        if not self.aspects or len(set(self.aspects)) != len(self.aspects):
            raise InputError(f"aspects {self.aspects!r} must be a non-empty list of distinct names")
        for aspect in self.aspects:
            if not re.fullmatch(r"[a-z][a-z0-9_]*", aspect):
                raise InputError(f"aspect {aspect!r} must be lower-case letters, digits and '_'")
        if self.head not in ("token", "mean"):
            raise InputError(f"head={self.head!r} must be 'token' or 'mean'")
        if self.video_fps is not None and not self.video_fps > 0:
            raise InputError(f"video_fps={self.video_fps} must be > 0 (or null for the real frame rate)")
        if self.context_frames < 0 or self.video_frames < 1 or self.frame_stride < 1:
            raise InputError(
                f"context_frames={self.context_frames} (>= 0), video_frames={self.video_frames} (>= 1) "
                f"and frame_stride={self.frame_stride} (>= 1) are out of range"
            )
        QwenVLInputsConfig(**self.inputs)  # reject unknown pre-processing keys now

    @property
    def inputs_config(self) -> QwenVLInputsConfig:
        return QwenVLInputsConfig(**self.inputs)

    @staticmethod
    def aspect_token(aspect: str) -> str:
        return f"<|reward_{aspect}|>"


# ------------------------------------------------------------------------------------------- losses


def bradley_terry_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | float = 0.0
) -> torch.Tensor:
    """Per-pair ``-log sigmoid(r_chosen - r_rejected - margin)`` (TRL's RewardTrainer loss)."""
    return -F.logsigmoid(chosen - rejected - margin)


def bradley_terry_ties_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, tie: torch.Tensor, theta: float = 5.0
) -> torch.Tensor:
    """Per-pair negative log-likelihood of Rao and Kupper's Bradley-Terry model with ties (VideoAlign).

    With ``d = r_chosen - r_rejected`` and ``eta = log theta`` (``theta > 1``):
    ``P(chosen wins) = sigmoid(d - eta)`` and ``P(tie) = 1 - sigmoid(d - eta) - sigmoid(-d - eta)``,
    computed stably as ``sigmoid(eta - d) * sigmoid(eta + d) * (1 - theta**-2)``. For a tie the
    order of the pair does not matter.
    """
    if not theta > 1:
        raise InputError(f"tie_theta={theta} must be > 1 (1 would make ties impossible)")
    eta = math.log(theta)
    d = chosen - rejected
    win = -F.logsigmoid(d - eta)
    draw = -(F.logsigmoid(eta - d) + F.logsigmoid(eta + d) + math.log1p(-(theta**-2)))
    return torch.where(tie.bool(), draw, win)


def regression_loss(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample squared error to a teacher's score (distilling a judge)."""
    return (predicted - target.to(predicted.dtype)) ** 2


# ------------------------------------------------------------------------------------------- model


def frame_indices(num_frames: int, count: int, stride: int, *, from_end: bool) -> list[int]:
    """Indices of ``count`` frames of a ``num_frames`` clip, ``stride`` apart on one time grid.

    ``from_end``: the last frame and the ones before it (the context). Otherwise the frames at
    ``stride - 1, 2 * stride - 1, ...`` (the candidate, continuing the context's grid past the cut).
    Indices beyond the clip are clamped to it (the edge frame repeats).
    """
    if from_end:
        picks = [num_frames - 1 - stride * k for k in range(count - 1, -1, -1)]
    else:
        picks = [stride - 1 + stride * k for k in range(count)]
    return [min(max(i, 0), num_frames - 1) for i in picks]


class VideoRewardModel(torch.nn.Module):
    """A Qwen2-VL / Qwen2.5-VL backbone (``transformers`` base model) and a linear head per aspect.

    ``forward(**inputs)`` takes the output of `prepare` and returns raw scores ``[B, num_aspects]``;
    `score` does both for videos and applies the calibration when asked.
    """

    def __init__(self, backbone: torch.nn.Module, tokenizer: Any, args: RewardModelArgs) -> None:
        super().__init__()
        model_type = getattr(backbone.config, "model_type", None)
        if model_type not in BACKBONE_TYPES:
            raise InputError(
                f"reward model backbone is a {model_type!r} model; use a Qwen2-VL or Qwen2.5-VL checkpoint"
            )
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.args = args
        text_config = getattr(backbone.config, "text_config", backbone.config)
        self.heads = torch.nn.Linear(text_config.hidden_size, len(args.aspects))
        torch.nn.init.zeros_(self.heads.weight)  # every score starts at 0: the first gradients are clean
        torch.nn.init.zeros_(self.heads.bias)
        self.video_token_id = backbone.config.video_token_id
        self.aspect_token_ids = [self._token_id(args.aspect_token(a)) for a in args.aspects]
        if tokenizer.pad_token_id is None:
            raise InputError("the reward model tokenizer has no pad token; set tokenizer.pad_token")
        _batch_frame_attention(backbone)

    def _token_id(self, token: str) -> int:
        token_id = self.tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == self.tokenizer.unk_token_id:
            raise InputError(
                f"the tokenizer has no {token} token; build the model with VideoRewardModel.from_backbone"
            )
        return int(token_id)

    @property
    def device(self) -> torch.device:
        return self.heads.weight.device

    def enable_gradient_checkpointing(self) -> None:
        """Recompute the backbone's activations in backward (named as diffusers' method, for trainers)."""
        self.backbone.gradient_checkpointing_enable()

    # ------------------------------------------------------------------ inputs
    def clip(self, video: Any, context: Any | None, index: int = 0) -> torch.Tensor:
        """The frames the model sees: the end of ``context`` then the start of ``video``, uint8."""
        args = self.args
        video = to_uint8(as_video(video, name=f"video {index}"))
        frames = video[frame_indices(len(video), args.video_frames, args.frame_stride, from_end=False)]
        if args.context_frames == 0:
            return frames
        if context is None:
            raise InputError(
                f"video {index} has no context; this reward model reads {args.context_frames} context "
                "frames (give contexts, or train one with context_frames: 0)"
            )
        context = to_uint8(as_video(context, name=f"context {index}"))
        if context.shape[1:] != video.shape[1:]:
            raise InputError(
                f"context {index} is {tuple(context.shape[1:3])} pixels but its video "
                f"{tuple(video.shape[1:3])}; give both at one size"
            )
        picks = frame_indices(len(context), args.context_frames, args.frame_stride, from_end=True)
        return torch.cat([context[picks], frames])

    def prompt_text(self, prompt: str | None) -> str:
        shown = prompt if self.args.use_prompt else None
        question = self.args.question + (f" Prompt: {shown}" if shown else "")
        tokens = "".join(self.args.aspect_token(a) for a in self.args.aspects)
        return (
            "<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>"
            f"{question}<|im_end|>\n<|im_start|>assistant\n{tokens}"
        )

    def prepare(
        self,
        videos: Sequence[Any],
        contexts: Sequence[Any] | None = None,
        prompts: Sequence[str | None] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Model inputs (right-padded token ids, video patches, grids) for a batch, on the model's device."""
        n = len(videos)
        if n == 0:
            raise InputError("no videos to score; give at least one")
        for name, column in (("contexts", contexts), ("prompts", prompts)):
            if column is not None and len(column) != n:
                raise InputError(f"{n} videos but {len(column)} {name}; give one per video")
        clips = [self.clip(v, None if contexts is None else contexts[i], i) for i, v in enumerate(videos)]
        config = self.args.inputs_config
        vision = video_inputs(clips, config, fps=self.args.video_fps or VIDEO_FPS / self.args.frame_stride)
        counts = (vision["video_grid_thw"].prod(-1) // config.merge_size**2).tolist()
        rows, tokenized = [], {}
        for i, count in enumerate(counts):
            text = self.prompt_text(None if prompts is None else prompts[i])
            if text not in tokenized:  # one placeholder token, widened to the clip's count below
                tokenized[text] = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            ids = tokenized[text]
            at = ids.index(self.video_token_id)
            rows.append(ids[:at] + [self.video_token_id] * int(count) + ids[at + 1 :])
        length = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([r + [pad] * (length - len(r)) for r in rows], dtype=torch.long)
        attention_mask = torch.tensor([[1] * len(r) + [0] * (length - len(r)) for r in rows])
        device, dtype = self.device, self.heads.weight.dtype
        return {
            "input_ids": input_ids.to(device),
            "attention_mask": attention_mask.to(device),
            "mm_token_type_ids": ((input_ids == self.video_token_id).int() * 2).to(device),
            "pixel_values_videos": vision["pixel_values_videos"].to(device, dtype),
            "video_grid_thw": vision["video_grid_thw"].to(device),
            "second_per_grid_ts": vision["second_per_grid_ts"].to(device),
        }

    # ------------------------------------------------------------------ scoring
    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        """Raw scores ``[B, num_aspects]`` for inputs made by `prepare`."""
        hidden = self.backbone(**inputs, use_cache=False).last_hidden_state
        ids = inputs["input_ids"]
        if self.args.head == "mean":
            mask = (ids == self.video_token_id).unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            return self.heads(pooled)
        weight, bias = self.heads.weight, self.heads.bias
        scores = []
        for a, token_id in enumerate(self.aspect_token_ids):
            position = (ids == token_id).int().argmax(dim=1)
            state = hidden[torch.arange(len(ids), device=ids.device), position]
            scores.append(state @ weight[a] + bias[a])
        return torch.stack(scores, dim=1)

    @torch.no_grad()
    def score(
        self,
        videos: Sequence[Any],
        contexts: Sequence[Any] | None = None,
        prompts: Sequence[str | None] | None = None,
        *,
        normalize: bool = False,
        batch_size: int = 16,
    ) -> torch.Tensor:
        """Scores ``[B, num_aspects]`` (float32, CPU), in batches; ``normalize`` uses the calibration."""
        if normalize and self.args.calibration is None:
            raise InputError(
                "this reward model has no calibration statistics; calibrate it or pass normalize=False"
            )
        was_training = self.training
        self.eval()
        out = []
        for start in range(0, len(videos), batch_size):
            stop = start + batch_size
            inputs = self.prepare(
                videos[start:stop],
                None if contexts is None else contexts[start:stop],
                None if prompts is None else prompts[start:stop],
            )
            out.append(self(**inputs).float().cpu())
        self.train(was_training)
        scores = torch.cat(out)
        if normalize:
            stats = torch.tensor([self.args.calibration[a] for a in self.args.aspects])
            scores = (scores - stats[:, 0]) / stats[:, 1]
        return scores

    def calibrate(
        self,
        videos: Sequence[Any],
        contexts: Sequence[Any] | None = None,
        prompts: Sequence[str | None] | None = None,
        batch_size: int = 16,
    ) -> dict[str, list[float]]:
        """Store each aspect's raw-score mean and std over these videos (typical candidates)."""
        scores = self.score(videos, contexts, prompts, batch_size=batch_size)
        if len(scores) < 2:
            raise InputError("calibration needs at least two videos")
        self.args.calibration = {
            aspect: [float(scores[:, a].mean()), max(float(scores[:, a].std()), 1e-6)]
            for a, aspect in enumerate(self.args.aspects)
        }
        return self.args.calibration

    # ------------------------------------------------------------------ checkpoints
    def save_pretrained(self, path: str | Path) -> Path:
        """Write the checkpoint directory: the backbone in transformers' layout, heads, args, tokenizer."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.backbone.save_pretrained(path)
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in self.heads.state_dict().items()},
            str(path / HEADS_FILE),
        )
        payload = {"architecture": ARCHITECTURE, "format_version": FORMAT_VERSION, **asdict(self.args)}
        (path / ARGS_FILE).write_text(json.dumps(payload, indent=2) + "\n")
        self.tokenizer.save_pretrained(path)
        return path

    @classmethod
    def from_pretrained(
        cls, path: str | Path, *, device: str | torch.device = "cpu", dtype: str | torch.dtype = "float32"
    ) -> VideoRewardModel:
        """Load a directory written by `save_pretrained`; anything else is a one-line `InputError`."""
        from transformers import AutoModel, AutoTokenizer

        path = Path(path)
        args = check_reward_model_dir(path)
        backbone, info = AutoModel.from_pretrained(
            path, dtype=_dtype(dtype), output_loading_info=True, use_safetensors=True
        )
        problems = {
            k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v
        }
        heads = load_file(str(path / HEADS_FILE))
        model = cls(backbone, AutoTokenizer.from_pretrained(path), args)
        expected = model.heads.state_dict()
        if any(k not in heads or heads[k].shape != v.shape for k, v in expected.items()) or set(heads) != set(
            expected
        ):
            problems["heads"] = [f"{k}: {tuple(v.shape)}" for k, v in heads.items()]
        if problems:
            kind, names = next(iter(problems.items()))
            raise InputError(
                f"{path}: the weights do not match config.json / {ARGS_FILE} ({kind}: "
                f"{len(names)}, e.g. {sorted(names)[0]!r}); a checkpoint of another architecture?"
            )
        model.heads.load_state_dict(heads)
        return model.to(device=device, dtype=_dtype(dtype))

    @classmethod
    def from_backbone(
        cls,
        backbone: str | Path | torch.nn.Module,
        tokenizer: Any = None,
        args: RewardModelArgs | None = None,
        *,
        dtype: str | torch.dtype = "float32",
    ) -> VideoRewardModel:
        """A new reward model (zero heads) on a Qwen-VL checkpoint directory or loaded base model.

        Adds one special token per aspect to the tokenizer (and rows to the embedding matrix).
        A directory's ``preprocessor_config.json`` sets the patch size and pixel budget.
        """
        args = args or RewardModelArgs()
        if isinstance(backbone, str | Path):
            from transformers import AutoConfig, AutoModel, AutoTokenizer

            path = Path(backbone)
            if not (path / "config.json").is_file():
                raise InputError(
                    f"{path} is not a model directory (no config.json); give a Qwen-VL checkpoint"
                )
            model_type = AutoConfig.from_pretrained(path).model_type
            if model_type not in BACKBONE_TYPES:
                raise InputError(f"{path} is a {model_type!r} model; reward models use Qwen2-VL / Qwen2.5-VL")
            if not args.inputs and (path / "preprocessor_config.json").is_file():
                args.inputs = asdict(QwenVLInputsConfig.from_pretrained(path))
            tokenizer = tokenizer or AutoTokenizer.from_pretrained(path)
            check_model_weights(path)
            backbone = AutoModel.from_pretrained(path, dtype=_dtype(dtype), use_safetensors=True)
        elif tokenizer is None:
            raise InputError("from_backbone got a model object without its tokenizer; pass tokenizer=...")
        new = [args.aspect_token(a) for a in args.aspects]
        missing = [t for t in new if t not in tokenizer.get_vocab()]
        if missing:
            tokenizer.add_special_tokens({"additional_special_tokens": missing})
        if len(tokenizer) > backbone.get_input_embeddings().num_embeddings:
            backbone.resize_token_embeddings(len(tokenizer))
        return cls(backbone, tokenizer, args).to(_dtype(dtype))


def check_reward_model_dir(path: Path) -> RewardModelArgs:
    """The `RewardModelArgs` of a `VideoRewardModel` directory after checking its files (args, backbone
    config, safetensors headers of the backbone and the heads) without loading any weights."""
    args_file = path / ARGS_FILE
    if not args_file.is_file():
        raise InputError(
            f"{path} is not a reward model checkpoint (no {ARGS_FILE}); "
            "start from a Qwen-VL checkpoint with VideoRewardModel.from_backbone"
        )
    try:
        payload = json.loads(args_file.read_text())
        config = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise InputError(f"{path}: {err}; re-download or regenerate the reward model") from None
    if not isinstance(payload, dict) or payload.pop("architecture", None) != ARCHITECTURE:
        raise InputError(f"{args_file} does not describe a {ARCHITECTURE}; was it written by another tool?")
    if payload.pop("format_version", None) != FORMAT_VERSION:
        raise InputError(f"{args_file}: reward model format is not version {FORMAT_VERSION}")
    known = {f.name for f in fields(RewardModelArgs)}
    args = RewardModelArgs(**{k: v for k, v in payload.items() if k in known})
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type not in BACKBONE_TYPES:
        raise InputError(f"{path} holds a {model_type!r} backbone; reward models use Qwen2-VL / Qwen2.5-VL")
    check_model_weights(path, others=(HEADS_FILE,))
    check_safetensors(path / HEADS_FILE)
    return args


def _frame_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    scaling: float | None = None,
    dropout: float = 0.0,
    cu_seq_lens_q: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Qwen-VL vision attention within each ``cu_seqlens`` block (a frame pair, or a window) via SDPA.

    ``query``/``key``/``value`` are ``[1, heads, seq, dim]``; returns ``[1, seq, heads, dim]``.
    transformers' own non-flash path runs one attention per block in a Python loop -- one per
    temporal patch of every video, thousands of tiny kernels a batch; blocks of one length (frames
    of one size) are a batch dimension here, so the whole batch is one call. Blocks of different
    lengths run one by one, as transformers does. Same numbers either way.
    """
    bounds = cu_seq_lens_q.tolist()
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    _, heads, seq, dim = query.shape
    if len(set(lengths)) == 1:
        blocks, size = len(lengths), lengths[0]
        q, k, v = (t[0].view(heads, blocks, size, dim).transpose(0, 1) for t in (query, key, value))
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling)
        return out.permute(0, 2, 1, 3).reshape(1, seq, heads, dim), None
    splits = (t.split(lengths, dim=2) for t in (query, key, value))
    outs = [
        F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling) for q, k, v in zip(*splits)
    ]
    return torch.cat(outs, dim=2).transpose(1, 2), None


def _batch_frame_attention(backbone: torch.nn.Module) -> None:
    """Route a Qwen-VL vision tower's SDPA attention through `_frame_attention` (flash attention stays)."""
    visual = getattr(backbone, "visual", None)
    if visual is None or getattr(visual.config, "_attn_implementation", None) not in (None, "sdpa"):
        return
    from transformers import AttentionInterface

    AttentionInterface.register(FRAME_ATTENTION, _frame_attention)
    configs = {id(m.config): m.config for m in visual.modules() if hasattr(m, "config")}
    for config in configs.values():
        config._attn_implementation = FRAME_ATTENTION


def _dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype), None)
    if not isinstance(value, torch.dtype):
        raise InputError(f"dtype {dtype!r} is not a torch dtype; use float32, bfloat16 or float16")
    return value


# ------------------------------------------------------------------------------------------- tiny


@dataclass
class TinyRewardModelSpec:
    """Sizes of a random tiny Qwen2.5-VL reward model (CPU tests and the toy world)."""

    hidden_size: int = field(default=64, metadata={"help": "Text model width."})
    num_layers: int = field(default=2, metadata={"help": "Text model layers."})
    vision_hidden_size: int = field(default=32, metadata={"help": "Vision tower width."})
    vision_depth: int = field(default=1, metadata={"help": "Vision tower blocks."})
    patch_size: int = field(default=4, metadata={"help": "Vision patch side in pixels."})
    num_heads: int = field(default=2, metadata={"help": "Text attention heads (head dim a multiple of 16)."})
    rope_theta: float = field(
        default=10000.0,
        metadata={"help": "Text RoPE base; small values keep the mRoPE height/width sections readable."},
    )
    tokens_per_second: int = field(
        default=4,
        metadata={"help": "mRoPE temporal ids per second of video (4: one id per 2-frame patch at 8 fps)."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of the random weights."})


_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
            "<|image_pad|>", "<|video_pad|>"]  # fmt: skip


def build_tiny_tokenizer() -> Any:
    """A byte-level tokenizer (one token per byte, Qwen's special tokens): no download needed."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate(_SPECIAL + alphabet)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    fast.add_special_tokens({"additional_special_tokens": _SPECIAL[1:]})
    return fast


def build_tiny_reward_model(
    args: RewardModelArgs | None = None, spec: TinyRewardModelSpec | None = None
) -> VideoRewardModel:
    """A random tiny Qwen2.5-VL reward model with the byte-level tokenizer (32-px toy frames)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLModel

    args = args or RewardModelArgs()
    spec = spec or TinyRewardModelSpec()
    if spec.num_heads < 1 or spec.hidden_size % (16 * spec.num_heads):
        raise InputError(
            f"tiny hidden_size={spec.hidden_size} must be a multiple of 16 * num_heads={spec.num_heads} "
            "(mRoPE splits each head into temporal, height and width sections)"
        )
    if spec.vision_hidden_size % 16 or spec.rope_theta <= 1 or spec.tokens_per_second <= 0:
        raise InputError(
            f"tiny vision_hidden_size={spec.vision_hidden_size} (a multiple of 16), rope_theta="
            f"{spec.rope_theta} (> 1) or tokens_per_second={spec.tokens_per_second} (> 0) is out of range"
        )
    if not args.inputs:
        args.inputs = asdict(
            QwenVLInputsConfig(patch_size=spec.patch_size, video_min_pixels=16, video_max_pixels=128 * 128)
        )
    tokenizer = build_tiny_tokenizer()
    ids = {name: tokenizer.convert_tokens_to_ids(f"<|{name}|>") for name in ("image_pad", "video_pad")}
    head_dim = spec.hidden_size // spec.num_heads
    quarter = head_dim // 16  # mRoPE sections (temporal, height, width) sum to head_dim / 2
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=spec.hidden_size, intermediate_size=2 * spec.hidden_size,
            num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads, num_key_value_heads=1,
            max_position_embeddings=4096, bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            rope_parameters={"rope_type": "default", "rope_theta": float(spec.rope_theta),
                             "mrope_section": [2 * quarter, 3 * quarter, 3 * quarter]},
        ),
        vision_config=dict(
            depth=spec.vision_depth, hidden_size=spec.vision_hidden_size,
            intermediate_size=2 * spec.vision_hidden_size, num_heads=2, out_hidden_size=spec.hidden_size,
            patch_size=spec.patch_size, temporal_patch_size=2, spatial_merge_size=2,
            window_size=64 * spec.patch_size, fullatt_block_indexes=list(range(spec.vision_depth)),
            tokens_per_second=int(spec.tokens_per_second),
        ),
        image_token_id=ids["image_pad"], video_token_id=ids["video_pad"],
        vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tokenizer.convert_tokens_to_ids("<|vision_end|>"),
    )  # fmt: skip
    torch.manual_seed(spec.seed)
    return VideoRewardModel.from_backbone(Qwen2_5_VLModel(config), tokenizer, args)


# ------------------------------------------------------------------------------------------- reward


@register("reward_model")
class LearnedReward:
    """Reward: a trained `VideoRewardModel` (``model``: its directory, or the model itself).

    ``aspect`` picks the scored aspect (default: the mean over all aspects). ``normalize`` maps
    each aspect's raw score with its calibration ``(s - mean) / std``. Contexts are the clips
    before each video (a model trained with ``context_frames: 0`` needs none); prompts are shown
    to the model if it was trained with ``use_prompt``. Batched (``batch_size``) on ``device``
    (default: cuda when available).
    """

    __name__ = "reward_model"

    def __init__(
        self,
        model: str | Path | VideoRewardModel,
        *,
        aspect: str | None = None,
        normalize: bool = True,
        batch_size: int = 16,
        device: str | None = None,
        dtype: str = "float32",
    ) -> None:
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if isinstance(model, VideoRewardModel):
            self.model = model
        else:
            self.model = VideoRewardModel.from_pretrained(model, device=device, dtype=dtype)
        self.model.eval()
        aspects = self.model.args.aspects
        if aspect is not None and aspect not in aspects:
            raise InputError(f"reward_model: aspect {aspect!r} is not one of the model's {aspects}")
        if normalize and self.model.args.calibration is None:
            raise InputError("reward_model: the model has no calibration statistics; pass normalize: false")
        if batch_size < 1:
            raise InputError(f"reward_model: batch_size={batch_size} must be >= 1")
        self.aspect, self.normalize, self.batch_size = aspect, normalize, batch_size

    def __call__(
        self,
        videos: Sequence[Any],
        prompts: Sequence[str] | None = None,
        contexts: Sequence[Any] | None = None,
        **metadata: Any,
    ) -> RewardOutput:
        if contexts is not None and any(c is None for c in contexts):
            contexts = None if all(c is None for c in contexts) else contexts
            if contexts is not None:
                raise InputError("reward_model: some rows have a context and some not; give all or none")
        scores = self.model.score(
            list(videos),
            contexts,
            prompts,
            normalize=self.normalize,
            batch_size=self.batch_size,
        )
        aspects = self.model.args.aspects
        total = scores[:, aspects.index(self.aspect)] if self.aspect else scores.mean(dim=1)
        columns = {f"aspect_{a}": scores[:, i].tolist() for i, a in enumerate(aspects)}
        return RewardOutput(scores=total.tolist(), metadata=columns)


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties); NaN when either side is constant."""
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or len(a) < 2:
        raise InputError(f"spearman needs two equally long lists of >= 2 numbers, got {a.shape}, {b.shape}")

    def ranks(v: np.ndarray) -> np.ndarray:
        order = np.argsort(v, kind="mergesort")
        r = np.empty(len(v))
        r[order] = np.arange(len(v), dtype=np.float64)
        for value in np.unique(v):  # ties share their average rank
            tied = v == value
            r[tied] = r[tied].mean()
        return r

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = math.sqrt(float((ra**2).sum() * (rb**2).sum()))
    return float((ra * rb).sum() / denom) if denom > 0 else math.nan
