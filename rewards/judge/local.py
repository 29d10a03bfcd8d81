"""The judge without a server: the same question and score, computed by a transformers Qwen-VL in-process.

For single-GPU and CPU runs where a vLLM server is overkill. The backend consumes the very request
body the vLLM client would send (`rewards.judge.prompts.build_requests`): it decodes the frames back
from the data URLs (PNG is lossless, so it sees the pixels the server would), renders the messages
with the checkpoint's chat template, turns the frames into Qwen-VL inputs with
`policies.qwen_vl_inputs` (no torchvision), runs one forward pass and reads the next-token
distribution. The answer constraint is mirrored exactly: only first tokens whose text is a prefix of
an allowed answer count, as vLLM's structured-output mask allows, so ``P(yes)/(P(yes)+P(no))`` is the
same number a vLLM server computes for the same model and input.
"""

from __future__ import annotations

import base64
import io
import json
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from policies.errors import InputError
from policies.qwen_vl_inputs import QwenVLInputsConfig, expand_vision_placeholders, image_inputs, video_inputs
from rewards.judge.config import JudgeConfig
from rewards.judge.prompts import build_requests
from rewards.judge.scoring import ScoredAnswer
from rewards.registry import register
from rewards.types import RewardOutput

VIDEO_FPS = 1.0  # vLLM's frame rate for data:video/jpeg frame lists


def allowed_first_tokens(tokenizer: Any, labels: Sequence[str]) -> list[tuple[str, int]]:
    """``(text, id)`` of tokens whose text is a non-empty prefix of a label (as a choice grammar allows)."""
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    allowed = [
        (text, i) for i, text in enumerate(texts) if text and any(label.startswith(text) for label in labels)
    ]
    if not allowed:
        raise InputError(
            f"the judge tokenizer has no token that starts any of {list(labels)}; change `choices`"
        )
    return allowed


def _decode_image(url: str) -> torch.Tensor:
    header, _, data = url.partition(",")
    if not header.startswith("data:image/") or ";base64" not in header:
        raise InputError(f"in-process judge takes data:image/...;base64 URLs only, got {url[:40]!r}")
    return _decode_base64_image(data)


def _decode_base64_image(data: str) -> torch.Tensor:
    image = Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")
    return torch.from_numpy(np.asarray(image).copy())


def unpack_media(
    messages: list[dict[str, Any]],
) -> tuple[list[dict[str, Any]], list[torch.Tensor], list[torch.Tensor]]:
    """Messages with data URLs -> (template-ready messages, images ``[H, W, 3]``, videos ``[F, H, W, 3]``)."""
    images: list[torch.Tensor] = []
    videos: list[torch.Tensor] = []
    out = []
    for message in messages:
        content = message["content"]
        if isinstance(content, str):
            out.append(message)
            continue
        parts = []
        for part in content:
            if part["type"] == "image_url":
                images.append(_decode_image(part["image_url"]["url"]))
                parts.append({"type": "image"})
            elif part["type"] == "video_url":
                header, _, data = part["video_url"]["url"].partition(",")
                if header != "data:video/jpeg;base64":
                    raise InputError(
                        f"in-process judge takes data:video/jpeg;base64 videos only, got {header!r}"
                    )
                videos.append(torch.stack([_decode_base64_image(frame) for frame in data.split(",")]))
                parts.append({"type": "video"})
            else:
                parts.append(part)
        out.append({**message, "content": parts})
    return out, images, videos


def encode_request(
    request: dict[str, Any], tokenizer: Any, inputs_config: QwenVLInputsConfig, model_config: Any
) -> dict[str, torch.Tensor]:
    """The Qwen-VL inputs of one request body, on the CPU: the prompt's token ids (chat template with
    the generation prompt, vision placeholders expanded per grid, as vLLM builds them), the M-RoPE
    token types and the frames' pixels. Shared by the judge's scoring and its training
    (`grpo.judge_training`), so both see the same tokens."""
    messages, images, videos = unpack_media(request["messages"])
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    vision: dict[str, torch.Tensor] = {}
    if images:
        vision.update(image_inputs(images, inputs_config))
    if videos:
        vision.update(video_inputs(videos, inputs_config, fps=VIDEO_FPS))
    text = expand_vision_placeholders(
        text,
        image_grid_thw=vision.get("image_grid_thw"),
        video_grid_thw=vision.get("video_grid_thw"),
        merge_size=inputs_config.merge_size,
    )
    encoded = dict(tokenizer(text, return_tensors="pt", add_special_tokens=False))
    ids = encoded["input_ids"]
    if vision:  # text 0, image 1, video 2; without it transformers uses 1-D positions (no M-RoPE)
        video_tokens = ids == getattr(model_config, "video_token_id", -1)
        encoded["mm_token_type_ids"] = (ids == model_config.image_token_id).int() + 2 * video_tokens.int()
    return {**encoded, **vision}


@register("causal_consistency_local")
class InProcessJudge:
    """Reward: the causal-consistency judge computed by a transformers (Qwen-VL) model in this process.

    ``model`` is a checkpoint directory (loaded with its tokenizer, chat template and
    pre-processing config, so a recipe can name it) or an already loaded model with its
    ``tokenizer``. Same call and output as `CausalConsistencyJudge` (columns
    ``p_<positive>``/``rating``, ``latency_s``, ``reason``); the network fields of the config are
    ignored. ``device: auto`` puts the model on the GPU when there is one (a recipe that runs on
    both).
    """

    def __init__(
        self,
        model: str | Path | torch.nn.Module,
        tokenizer: Any = None,
        config: JudgeConfig | None = None,
        inputs_config: QwenVLInputsConfig | None = None,
        *,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "bfloat16",
        **overrides: Any,
    ) -> None:
        if config is not None and overrides:
            config = JudgeConfig(**{**asdict(config), **overrides})
        self.config = config or JudgeConfig(**overrides)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if isinstance(model, str | Path):
            model, tokenizer, inputs_config = self.load_checkpoint(Path(model), device, dtype, inputs_config)
        elif tokenizer is None:
            raise InputError("InProcessJudge got a model object without its tokenizer; pass tokenizer=...")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.inputs_config = inputs_config or QwenVLInputsConfig()
        if getattr(tokenizer, "chat_template", None) is None:
            raise InputError("the judge tokenizer has no chat template; load one from the checkpoint")
        self._allowed = allowed_first_tokens(tokenizer, self.config.labels)

    @staticmethod
    def load_checkpoint(
        path: Path,
        device: str | torch.device,
        dtype: str | torch.dtype,
        inputs_config: QwenVLInputsConfig | None,
    ) -> tuple[torch.nn.Module, Any, QwenVLInputsConfig]:
        """Model, tokenizer (with the chat template) and pre-processing config of a checkpoint directory."""
        from transformers import AutoModelForImageTextToText, AutoTokenizer

        if not (path / "config.json").is_file():
            raise InputError(
                f"{path} is not a model directory (no config.json); pass a Qwen-VL checkpoint folder"
            )
        if isinstance(dtype, str):
            if not isinstance(getattr(torch, dtype, None), torch.dtype):
                raise InputError(f"dtype {dtype!r} is not a torch dtype; use bfloat16, float16 or float32")
            dtype = getattr(torch, dtype)
        tokenizer = AutoTokenizer.from_pretrained(path)
        template_file = path / "chat_template.json"
        if tokenizer.chat_template is None and template_file.is_file():
            tokenizer.chat_template = json.loads(template_file.read_text())["chat_template"]
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype).to(device)
        return model, tokenizer, inputs_config or QwenVLInputsConfig.from_pretrained(path)

    def encode(self, request: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The model inputs for one request body (`encode_request`), on the model's device and dtype."""
        device = next(self.model.parameters()).device
        dtype = next(self.model.parameters()).dtype
        return {
            key: value.to(device, dtype=dtype if value.is_floating_point() else value.dtype)
            for key, value in encode_request(
                request, self.tokenizer, self.inputs_config, self.model.config
            ).items()
        }

    @torch.no_grad()
    def score_request(self, request: dict[str, Any]) -> ScoredAnswer:
        """Score one request body (as the vLLM client would send it)."""
        inputs = self.encode(request)
        logits = self.model(**inputs).logits[0, -1].float()
        logprobs = torch.log_softmax(logits, dim=-1)
        candidates = [(token, logprobs[i].item()) for token, i in self._allowed]
        return self.config.score_candidates(candidates)

    def __call__(
        self, videos: Any, prompts: Sequence[str] | None = None, contexts: Any = None, **metadata: Any
    ) -> RewardOutput:
        """Score a batch, one forward pass per sample."""
        cfg = self.config
        answers, latencies = [], []
        for request in build_requests(cfg, videos, prompts, contexts, metadata):
            start = time.perf_counter()
            answers.append(self.score_request(request))
            latencies.append(time.perf_counter() - start)
        return RewardOutput(
            [cfg.reward_value(a.score) for a in answers],
            {
                cfg.label_column: [cfg.label_value(a.score) for a in answers],
                "latency_s": latencies,
                "reason": [a.reason for a in answers],
            },
        )
