"""What the judge is shown: prompt templates and the OpenAI chat messages built from them.

The messages are plain OpenAI chat content parts, so the same list feeds a vLLM server (``image_url``
/ ``video_url`` data URLs) and the in-process backend (which renders it with the checkpoint's chat
template and feeds the frames itself). Three modes:

* ``images`` (default): ``num_frames`` frames sampled evenly from the context and from the
  predicted next scene, each an ``image_url`` data URL (PNG by default, lossless).
* ``video``: each scene as one ``video_url`` in vLLM's ``data:video/jpeg;base64,<frame>,<frame>...``
  form (JPEG frames separated by commas), which vLLM decodes without a video codec.
* ``clip``: the end of the context and the start of the predicted next scene as **one** ``video_url``
  (``context_frames`` frames ending at the context's last, then ``num_frames`` frames of the next
  scene, all ``frame_stride`` frames apart on one time grid across the cut; `rewards.reward_model`'s
  layout). With an odd ``context_frames`` the cut falls inside one 2-frame temporal patch of a
  Qwen-VL vision tower, which then sees the last context frame and the first new frame together: a
  ball that jumps, turns back or stops is visible to the vision tower itself, not only to attention
  across two separate videos.
* ``text``: captions only — metadata ``context_caption`` and ``prediction_caption``.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from PIL import Image

from policies.errors import InputError
from policies.qwen_vl_inputs import to_uint8
from rewards.reward_model import frame_indices

if TYPE_CHECKING:
    from rewards.judge.config import JudgeConfig

DEFAULT_SYSTEM_PROMPT = (
    "You are a careful judge of video continuations. You are shown a first scene and a second scene "
    "and decide whether the second scene is a plausible continuation of the first."
)

ASPECTS: dict[str, str] = {
    "physics": "objects move in a physically plausible way (gravity, momentum, collisions)",
    "continuity": "objects, positions, colours and the camera carry over from the end of the first "
    "scene without jumps",
    "semantics": "what happens makes sense given what happened before",
}

DEFAULT_QUESTION = (
    "Does the second scene causally follow from the first scene, i.e. could it be what happens next?"
    "{aspects} Answer with one word: {choices}."
)

RATING_QUESTION = (
    "How well does the second scene causally follow from the first scene, i.e. how likely is it to be "
    "what happens next?{aspects} Answer with one number from {low} (not at all) to {high} (certainly)."
)

MODES = ("images", "video", "clip", "text")


def render_question(
    template: str | None,
    *,
    aspects: Sequence[str],
    choices: Sequence[str],
    prompt: str,
    rating: bool,
) -> str:
    """The question text: ``template`` (or the default for the scoring kind) with its fields filled.

    Fields a template may use: ``{aspects}`` (a sentence listing what to check, empty if none),
    ``{choices}`` ("yes or no"), ``{low}``/``{high}`` (rating bounds) and ``{prompt}`` (the
    generation prompt / instruction of the sample).
    """
    unknown = [a for a in aspects if a not in ASPECTS]
    if unknown:
        raise InputError(f"unknown judge aspect(s) {unknown}; choose from {', '.join(ASPECTS)}")
    aspect_text = ""
    if aspects:
        aspect_text = " Check in particular that " + "; ".join(ASPECTS[a] for a in aspects) + "."
    template = template or (RATING_QUESTION if rating else DEFAULT_QUESTION)
    try:
        return template.format(
            aspects=aspect_text,
            choices=" or ".join(choices),
            low=choices[0],
            high=choices[-1],
            prompt=prompt,
        )
    except (KeyError, IndexError, ValueError) as err:
        raise InputError(
            f"judge template cannot be filled ({err!r}); use only the fields "
            "{aspects}, {choices}, {low}, {high}, {prompt}"
        ) from None


def shown_frames(count: int, mode: str, num_frames: int, frame_stride: int) -> list[int]:
    """Indices of the frames of a ``count``-frame predicted scene that the judge is shown in ``mode``.

    ``images``/``video``: ``num_frames`` evenly spaced, first and last included (all if the scene is
    short; the last if one). ``clip``: the scene's first ``num_frames`` on the ``frame_stride`` grid
    (`rewards.reward_model.frame_indices`). ``text``: none. A judge sees no more of a scene than
    these frames (`grpo.judge_training.verifier_ceiling`).
    """
    if mode == "text":
        return []
    if mode == "clip":
        return frame_indices(count, num_frames, frame_stride, from_end=False)
    if mode not in MODES:
        raise InputError(f"judge mode {mode!r} is not one of {', '.join(MODES)}")
    if num_frames >= count:
        return list(range(count))
    if num_frames == 1:
        return [count - 1]
    return torch.linspace(0, count - 1, num_frames).round().long().tolist()


def sample_frames(video: torch.Tensor, num_frames: int) -> torch.Tensor:
    """``num_frames`` frames evenly spaced over the video, first and last included (fewer if it is short)."""
    return video[shown_frames(video.shape[0], "images", num_frames, 1)]


def encode_image(frame: torch.Tensor, image_format: str) -> bytes:
    """One ``[H, W, 3]`` frame (float in [0, 1] or uint8) as PNG or JPEG bytes."""
    buffer = io.BytesIO()
    image = Image.fromarray(to_uint8(frame).cpu().numpy())
    if image_format == "png":
        image.save(buffer, format="PNG")
    else:
        image.save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def image_data_url(frame: torch.Tensor, image_format: str) -> str:
    """A frame as a ``data:image/...;base64,`` URL."""
    data = base64.b64encode(encode_image(frame, image_format)).decode("ascii")
    return f"data:image/{image_format};base64,{data}"


def video_data_url(frames: torch.Tensor) -> str:
    """Frames as vLLM's ``data:video/jpeg;base64,`` URL: base64 JPEG frames joined by commas."""
    parts = [base64.b64encode(encode_image(frame, "jpeg")).decode("ascii") for frame in frames]
    return "data:video/jpeg;base64," + ",".join(parts)


def _scene_parts(
    label: str, video: torch.Tensor, mode: str, num_frames: int, image_format: str
) -> list[dict[str, object]]:
    frames = sample_frames(video, num_frames)
    if mode == "video":
        return [
            {"type": "text", "text": f"{label} ({frames.shape[0]} frames):"},
            {"type": "video_url", "video_url": {"url": video_data_url(frames)}},
        ]
    parts: list[dict[str, object]] = [
        {"type": "text", "text": f"{label} ({frames.shape[0]} frames, in order):"}
    ]
    parts += [{"type": "image_url", "image_url": {"url": image_data_url(f, image_format)}} for f in frames]
    return parts


def clip_frames(
    context: torch.Tensor, prediction: torch.Tensor, context_frames: int, num_frames: int, frame_stride: int
) -> torch.Tensor:
    """The ``clip`` mode's frames: the context's last ``context_frames`` frames, then ``num_frames`` of
    the prediction, ``frame_stride`` apart on one grid (`rewards.reward_model.frame_indices`)."""
    if context.shape[1:] != prediction.shape[1:]:
        raise InputError(
            f"judge mode 'clip' shows both scenes in one video, but the context is "
            f"{tuple(context.shape[1:3])} px and the prediction {tuple(prediction.shape[1:3])}; "
            "give both at one size (or use mode 'video')"
        )
    before = frame_indices(len(context), context_frames, frame_stride, from_end=True)
    after = shown_frames(len(prediction), "clip", num_frames, frame_stride)
    return torch.cat([to_uint8(context[before]), to_uint8(prediction[after])])


def build_messages(
    *,
    mode: str,
    question: str,
    system_prompt: str | None,
    context: torch.Tensor | None = None,
    prediction: torch.Tensor | None = None,
    context_caption: str | None = None,
    prediction_caption: str | None = None,
    num_frames: int = 4,
    image_format: str = "png",
    context_frames: int = 5,
    frame_stride: int = 2,
) -> list[dict[str, object]]:
    """The chat messages that ask the judge about one (context, predicted next scene) pair."""
    messages: list[dict[str, object]] = []
    if system_prompt:
        messages.append({"role": "system", "content": system_prompt})
    if mode == "text":
        text = f"First scene: {context_caption}\nSecond scene: {prediction_caption}\n{question}"
        messages.append({"role": "user", "content": text})
        return messages
    if mode == "clip":
        frames = clip_frames(context, prediction, context_frames, num_frames, frame_stride)
        content: list[dict[str, object]] = [
            {"type": "text", "text": f"Scenes ({context_frames} + {num_frames} frames):"},
            {"type": "video_url", "video_url": {"url": video_data_url(frames)}},
        ]
    else:
        content = _scene_parts("First scene", context, mode, num_frames, image_format)
        content += _scene_parts("Second scene", prediction, mode, num_frames, image_format)
    content.append({"type": "text", "text": question})
    messages.append({"role": "user", "content": content})
    return messages


def _as_frames(value: object, what: str, index: int) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.ndim != 4 or value.shape[-1] != 3 or value.shape[0] < 1:
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise InputError(f"judge: {what}[{index}] must be a tensor [F, H, W, 3] with F >= 1, got {shape}")
    return value


def _as_captions(metadata: dict[str, object], key: str, n: int) -> list[str]:
    column = metadata.get(key)
    if column is None or len(column) != n:
        got = "none" if column is None else f"{len(column)} entries"
        raise InputError(f"judge mode 'text' needs a {key!r} metadata column with {n} captions, got {got}")
    for i, caption in enumerate(column):
        if not isinstance(caption, str) or not caption.strip():
            raise InputError(f"judge: {key}[{i}] must be a non-empty caption string, got {caption!r}")
    return list(column)


def build_requests(
    config: JudgeConfig,
    videos: Sequence[torch.Tensor] | None,
    prompts: Sequence[str] | None,
    contexts: Sequence[torch.Tensor] | None,
    metadata: dict[str, object],
    model: str | None = None,
) -> list[dict[str, object]]:
    """Validate a reward batch (before any expensive work) and build one chat-completion body per sample.

    Each body asks for one token constrained to the configured answers, with the first token's
    top logprobs, at temperature 0.
    """
    if config.mode == "text":
        n = len(metadata.get("context_caption") or videos or prompts or [])
        context_captions = _as_captions(metadata, "context_caption", n)
        prediction_captions = _as_captions(metadata, "prediction_caption", n)
        videos = contexts = [None] * n
    else:
        if videos is None or contexts is None or len(videos) != len(contexts):
            raise InputError(
                f"judge mode {config.mode!r} needs videos and contexts of equal length (got "
                f"{None if videos is None else len(videos)} and "
                f"{None if contexts is None else len(contexts)}); use mode='text' for captions only"
            )
        n = len(videos)
        videos = [_as_frames(v, "videos", i) for i, v in enumerate(videos)]
        contexts = [_as_frames(c, "contexts", i) for i, c in enumerate(contexts)]
        context_captions = prediction_captions = [None] * n
    prompts = list(prompts) if prompts is not None else [""] * n
    if len(prompts) != n:
        raise InputError(f"judge: got {len(prompts)} prompts for {n} samples; give one per sample")
    requests = []
    for i in range(n):
        question = render_question(
            config.template,
            aspects=config.aspects,
            choices=config.labels,
            prompt=prompts[i] or "",
            rating=config.rating,
        )
        messages = build_messages(
            mode=config.mode,
            question=question,
            system_prompt=config.system_prompt,
            context=contexts[i],
            prediction=videos[i],
            context_caption=context_captions[i],
            prediction_caption=prediction_captions[i],
            num_frames=config.num_frames,
            image_format=config.image_format,
            context_frames=config.context_frames,
            frame_stride=config.frame_stride,
        )
        requests.append(
            {
                "model": model,
                "messages": messages,
                "max_completion_tokens": 1,
                "temperature": 0.0,
                "logprobs": True,
                "top_logprobs": config.top_logprobs,
                "structured_outputs": {"choice": list(config.labels)},
            }
        )
    return requests
