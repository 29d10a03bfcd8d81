"""Qwen-VL inputs without torchvision, the in-process judge on a tiny random Qwen2.5-VL, and the payload that
a vLLM server would get for the same input checked with vLLM's own request model and media loader."""

from __future__ import annotations

import hashlib
import json
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil, smart_resize

from policies.errors import InputError
from policies.qwen_vl_inputs import (
    QwenVLInputsConfig,
    expand_vision_placeholders,
    image_inputs,
    to_uint8,
    video_inputs,
)
from rewards import build_reward
from rewards.judge import InProcessJudge, JudgeConfig
from rewards.judge.local import unpack_media
from rewards.judge.prompts import DEFAULT_SYSTEM_PROMPT, build_requests, render_question

pytestmark = pytest.mark.timeout(300)

SMALL = {"image_min_pixels": 28 * 28 * 4, "image_max_pixels": 28 * 28 * 16}


def rand_frames(seed: int, count: int, height: int, width: int) -> torch.Tensor:
    return torch.rand(count, height, width, 3, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------ Qwen-VL inputs
@pytest.mark.parametrize(("height", "width"), [(56, 84), (40, 64), (200, 300), (33, 47), (20, 20)])
def test_image_inputs_equal_transformers_pil_processor(height, width):
    config = QwenVLInputsConfig(**SMALL)
    images = rand_frames(height * width, 3, height, width)
    reference = Qwen2VLImageProcessorPil(
        min_pixels=SMALL["image_min_pixels"], max_pixels=SMALL["image_max_pixels"]
    )(list(to_uint8(images).numpy()), return_tensors="pt")
    ours = image_inputs(images, config)
    assert torch.equal(ours["image_grid_thw"], reference["image_grid_thw"])
    assert ours["pixel_values"].dtype == torch.float32
    assert torch.equal(ours["pixel_values"], reference["pixel_values"])


def test_image_inputs_of_mixed_sizes_are_concatenated_in_order():
    config = QwenVLInputsConfig(**SMALL)
    images = [rand_frames(1, 1, 56, 56)[0], rand_frames(2, 1, 84, 112)[0]]
    reference = Qwen2VLImageProcessorPil(
        min_pixels=SMALL["image_min_pixels"], max_pixels=SMALL["image_max_pixels"]
    )([to_uint8(i).numpy() for i in images], return_tensors="pt")
    ours = image_inputs(images, config)
    assert ours["image_grid_thw"].tolist() == [[1, 4, 4], [1, 6, 8]]
    assert torch.equal(ours["pixel_values"], reference["pixel_values"])


def reference_video_patches(video_u8: np.ndarray, config: QwenVLInputsConfig) -> tuple[np.ndarray, list[int]]:
    """Qwen-VL video patches by explicit loops over (t, block row, block col, merge row, merge col)."""
    height, width = smart_resize(
        video_u8.shape[1], video_u8.shape[2], 28, config.video_min_pixels, config.video_max_pixels
    )
    frames = [
        np.asarray(Image.fromarray(f).resize((width, height), Image.Resampling.BICUBIC)) for f in video_u8
    ]
    x = (np.stack(frames).astype(np.float64) * (1 / 255)).astype(np.float32)
    x = ((x - np.array(config.image_mean, np.float32)) / np.array(config.image_std, np.float32)).transpose(
        0, 3, 1, 2
    )
    tp, p, m = config.temporal_patch_size, config.patch_size, config.merge_size
    while len(x) % tp:
        x = np.concatenate([x, x[-1:]])
    gt, gh, gw = len(x) // tp, height // p, width // p
    rows = []
    for t in range(gt):
        for bh in range(gh // m):
            for bw in range(gw // m):
                for mh in range(m):
                    for mw in range(m):
                        h0, w0 = (bh * m + mh) * p, (bw * m + mw) * p
                        patch = x[t * tp : (t + 1) * tp, :, h0 : h0 + p, w0 : w0 + p]  # [tp, C, p, p]
                        rows.append(patch.transpose(1, 0, 2, 3).reshape(-1))  # channel-major, as the conv3d
    return np.stack(rows), [gt, gh, gw]


@pytest.mark.parametrize(("count", "height", "width"), [(5, 56, 84), (4, 30, 50), (1, 60, 60)])
def test_video_inputs_equal_an_independent_reference(count, height, width):
    config = QwenVLInputsConfig(video_min_pixels=28 * 28 * 2, video_max_pixels=28 * 28 * 6)
    video = rand_frames(count, count, height, width)
    ours = video_inputs([video, video[: max(1, count - 1)]], config, fps=2.0)
    expected, grid = reference_video_patches(to_uint8(video).numpy(), config)
    expected_b, grid_b = reference_video_patches(to_uint8(video[: max(1, count - 1)]).numpy(), config)
    assert ours["video_grid_thw"].tolist() == [grid, grid_b]
    assert torch.equal(ours["pixel_values_videos"], torch.from_numpy(np.concatenate([expected, expected_b])))
    assert ours["second_per_grid_ts"].tolist() == [1.0, 1.0]  # temporal_patch_size / fps


def test_placeholders_are_expanded_per_grid():
    grid_i = torch.tensor([[1, 4, 6], [1, 2, 2]])
    grid_v = torch.tensor([[2, 4, 4]])
    text = "a <|image_pad|> b <|video_pad|> c <|image_pad|>"
    out = expand_vision_placeholders(text, image_grid_thw=grid_i, video_grid_thw=grid_v, merge_size=2)
    assert out == "a " + "<|image_pad|>" * 6 + " b " + "<|video_pad|>" * 8 + " c " + "<|image_pad|>" * 1
    with pytest.raises(InputError, match="2 <|image_pad|> placeholders for 1 inputs"):
        expand_vision_placeholders(text, image_grid_thw=grid_i[:1], video_grid_thw=grid_v)


def test_inputs_config_reads_a_checkpoints_preprocessor_config(tmp_path):
    Qwen2VLImageProcessorPil(min_pixels=1234, max_pixels=56789, patch_size=16, merge_size=2).save_pretrained(
        tmp_path
    )
    config = QwenVLInputsConfig.from_pretrained(tmp_path)
    assert (config.image_min_pixels, config.image_max_pixels, config.patch_size) == (1234, 56789, 16)
    with pytest.raises(InputError, match="preprocessor_config.json not found"):
        QwenVLInputsConfig.from_pretrained(tmp_path / "missing")


# ----------------------------------------------------------------------------------- in-process judge
@pytest.fixture(scope="module")
def tiny_vlm(judge_tokenizer):
    """A random Qwen2.5-VL (2 text layers, 2 vision blocks) whose special ids are the tokenizer's."""
    tok = judge_tokenizer
    names = ("image_pad", "video_pad", "vision_start", "vision_end")
    ids = {name: tok.convert_tokens_to_ids(f"<|{name}|>") for name in names}
    torch.manual_seed(0)
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096, bos_token_id=None,
            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]},
        ),
        vision_config=dict(
            depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, window_size=56,
            fullatt_block_indexes=[1], tokens_per_second=2,
        ),
        image_token_id=ids["image_pad"], video_token_id=ids["video_pad"],
        vision_start_token_id=ids["vision_start"], vision_end_token_id=ids["vision_end"],
    )  # fmt: skip
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def batch(n: int = 2) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    return [rand_frames(10 + i, 5, 32, 40) for i in range(n)], [
        rand_frames(20 + i, 5, 32, 40) for i in range(n)
    ]


def manual_score(model, tokenizer, context: torch.Tensor, prediction: torch.Tensor) -> float:
    """P(yes)/(P(yes)+P(no)) by hand: transformers' image processor, token ids found by scanning the vocab."""
    index = [0, 4]  # 2 frames evenly spaced over 5
    frames = list(to_uint8(context[index]).numpy()) + list(to_uint8(prediction[index]).numpy())
    pixels = Qwen2VLImageProcessorPil(
        min_pixels=SMALL["image_min_pixels"], max_pixels=SMALL["image_max_pixels"]
    )(frames, return_tensors="pt")
    scene = [{"type": "image"}] * 2
    question = render_question(None, aspects=(), choices=("yes", "no"), prompt="", rating=False)
    messages = [
        {"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
        {"role": "user", "content": [{"type": "text", "text": "First scene (2 frames, in order):"}, *scene,
                                     {"type": "text", "text": "Second scene (2 frames, in order):"}, *scene,
                                     {"type": "text", "text": question}]},
    ]  # fmt: skip
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    tokens_per_image = int(pixels["image_grid_thw"][0].prod()) // 4
    text = text.replace("<|image_pad|>", "<|image_pad|>" * tokens_per_image)
    encoded = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    image_pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    token_types = (encoded["input_ids"] == image_pad).int()  # transformers' M-RoPE needs them (image: 1)
    with torch.no_grad():
        logits = model(**encoded, mm_token_type_ids=token_types, **pixels).logits[0, -1]
    probs = torch.softmax(logits.double(), dim=-1)
    vocab = {i: tokenizer.decode([i]) for i in range(len(tokenizer))}
    p_yes = sum(probs[i].item() for i, t in vocab.items() if t in ("y", "ye", "yes"))
    p_no = sum(probs[i].item() for i, t in vocab.items() if t in ("n", "no"))
    return p_yes / (p_yes + p_no)


def test_in_process_judge_scores_frames_like_a_manual_forward(tiny_vlm, judge_tokenizer):
    judge = InProcessJudge(tiny_vlm, judge_tokenizer, num_frames=2, inputs_config=QwenVLInputsConfig(**SMALL))
    videos, contexts = batch()
    out = judge(videos, None, contexts)
    expected = [manual_score(tiny_vlm, judge_tokenizer, c, v) for c, v in zip(contexts, videos)]
    assert out.scores == pytest.approx(expected, abs=1e-5)
    assert all(0 < s < 1 for s in out.scores) and out.scores[0] != pytest.approx(out.scores[1], abs=1e-7)
    assert out.metadata["p_yes"] == out.scores and out.metadata["reason"] == [None, None]


def test_in_process_judge_loads_a_checkpoint_directory(tiny_vlm, judge_tokenizer, tmp_path):
    tiny_vlm.save_pretrained(tmp_path)
    judge_tokenizer.save_pretrained(tmp_path)
    Qwen2VLImageProcessorPil(
        min_pixels=SMALL["image_min_pixels"], max_pixels=SMALL["image_max_pixels"]
    ).save_pretrained(tmp_path)
    loaded = build_reward("causal_consistency_local", model=str(tmp_path), dtype="float32", num_frames=2)
    assert isinstance(loaded, InProcessJudge)
    direct = InProcessJudge(
        tiny_vlm, judge_tokenizer, num_frames=2, inputs_config=QwenVLInputsConfig(**SMALL)
    )
    videos, contexts = batch(1)
    assert loaded(videos, None, contexts).scores == pytest.approx(
        direct(videos, None, contexts).scores, abs=1e-6
    )


def test_in_process_video_and_rating_modes(tiny_vlm, judge_tokenizer):
    inputs = QwenVLInputsConfig(video_min_pixels=28 * 28 * 2, video_max_pixels=28 * 28 * 4)
    videos, contexts = batch(1)
    video = InProcessJudge(tiny_vlm, judge_tokenizer, mode="video", num_frames=4, inputs_config=inputs)
    assert 0 < video(videos, None, contexts).scores[0] < 1
    rating = InProcessJudge(tiny_vlm, judge_tokenizer, scoring="rating", num_frames=2, inputs_config=inputs)
    out = rating(videos, None, contexts)
    assert 0 <= out.scores[0] <= 1 and out.metadata["rating"][0] == pytest.approx(1 + 4 * out.scores[0])


def test_in_process_binary_scoring_thresholds_p_yes(tiny_vlm, judge_tokenizer):
    """'binary' gives 1.0 where the 'choice' score P(yes) reaches binary_threshold, else 0.0; with the
    threshold between two samples' P(yes), one verdict is yes and the other no."""
    inputs = QwenVLInputsConfig(**SMALL)
    videos, contexts = batch()
    p_yes = InProcessJudge(tiny_vlm, judge_tokenizer, num_frames=2, inputs_config=inputs)(
        videos, None, contexts
    ).scores
    threshold = (p_yes[0] + p_yes[1]) / 2
    binary = InProcessJudge(
        tiny_vlm,
        judge_tokenizer,
        scoring="binary",
        binary_threshold=threshold,
        num_frames=2,
        inputs_config=inputs,
    )
    out = binary(videos, None, contexts)
    assert out.scores == [float(p >= threshold) for p in p_yes] and sorted(out.scores) == [0.0, 1.0]
    assert out.metadata["p_yes"] == pytest.approx(p_yes, abs=1e-7)


@pytest.mark.parametrize("mode", ["images", "video"])
def test_in_process_judge_runs_qwen2_vl(tmp_path, mode):
    """Qwen2-VL's forward refuses frames without ``mm_token_type_ids`` (the M-RoPE token types)."""
    from policies.tiny_qwen_vl import TinyQwenVLSpec, build_tiny_qwen_vl

    path = build_tiny_qwen_vl(tmp_path, TinyQwenVLSpec(architecture="qwen2_vl"))
    videos, contexts = batch()
    out = InProcessJudge(str(path), dtype="float32", mode=mode, num_frames=2)(videos, None, contexts)
    assert all(0 < s < 1 for s in out.scores) and out.scores[0] != out.scores[1]


@pytest.mark.parametrize(("window_size", "width"), [(32, 32), (64, 40)])
def test_a_window_as_large_as_the_frame_is_whole_frame_attention(tmp_path, window_size, width):
    """``window_size`` >= the frame side (the judge recipe's 32 on 32 x 32 frames; 64 on 32 x 40):
    Qwen2.5-VL's windowed block sees the whole frame, so the judge scores what the same weights score
    with every block on full attention (transformers' other path); 4-patch windows score otherwise; a
    window that is not a whole number of merged tokens is refused."""
    import json

    from policies.errors import InputError
    from policies.tiny_qwen_vl import TinyQwenVLSpec, build_tiny_qwen_vl

    videos = [rand_frames(10 + i, 5, 32, width) for i in range(2)]
    contexts = [rand_frames(20 + i, 5, 32, width) for i in range(2)]

    def score(path) -> list[float]:
        judge = InProcessJudge(str(path), dtype="float32", mode="clip", num_frames=2)
        return judge(videos, None, contexts).scores

    def scores(window_size: int | None) -> tuple[list[float], list[float]]:
        spec = TinyQwenVLSpec(patch_size=2, window_size=window_size)
        path = build_tiny_qwen_vl(tmp_path / str(window_size), spec)
        config = json.loads((path / "config.json").read_text())
        assert config["vision_config"]["window_size"] == (window_size or 8)
        assert config["vision_config"]["fullatt_block_indexes"] == [1]
        windowed = score(path)
        config["vision_config"]["fullatt_block_indexes"] = [0, 1]
        (path / "config.json").write_text(json.dumps(config))
        return windowed, score(path)

    windowed, full = scores(window_size)
    assert windowed == pytest.approx(full, abs=1e-6)
    windowed, full = scores(None)
    assert max(abs(a - b) for a, b in zip(windowed, full)) > 1e-5
    for bad in (0, 6):
        with pytest.raises(InputError, match="multiple of 4 px"):
            TinyQwenVLSpec(patch_size=2, window_size=bad)
    with pytest.raises(InputError, match="only qwen2_5_vl"):
        TinyQwenVLSpec(architecture="qwen3_vl", patch_size=2, window_size=32)


# ------------------------------------------------------------------------- payload vs vLLM's own models
VLLM_CHECK = r"""
import hashlib, json, sys
import numpy as np
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.multimodal.utils import MediaConnector

media, results = MediaConnector(), []
for body in json.load(open(sys.argv[1])):
    request = ChatCompletionRequest.model_validate(body)
    params = request.to_sampling_params(request.max_completion_tokens, {})
    decoded = []
    for message in request.messages:
        for part in message["content"] if isinstance(message["content"], list) else []:
            if part["type"] == "image_url":
                array = np.asarray(media.fetch_image(part["image_url"]["url"]).media)
            elif part["type"] == "video_url":
                array = media.fetch_video(part["video_url"]["url"]).media[0]
            else:
                continue
            decoded.append([part["type"], list(array.shape), hashlib.sha256(array.tobytes()).hexdigest()])
    results.append({
        "ignored_fields": sorted(request.model_extra or {}),
        "choice": params.structured_outputs.choice, "logprobs": params.logprobs,
        "max_tokens": params.max_tokens, "temperature": params.temperature, "media": decoded,
        "max_completion_tokens": request.max_completion_tokens,
    })
print(json.dumps(results))
"""


def test_request_payload_is_what_vllm_accepts_and_decodes(vllm_python, tmp_path):
    videos, contexts = batch(1)
    bodies, ours = [], []
    for mode, scoring in (("images", "choice"), ("video", "choice"), ("images", "rating")):
        config = JudgeConfig(mode=mode, scoring=scoring, num_frames=3)
        body = build_requests(config, videos, ["the ball falls"], contexts, {}, model="judge")[0]
        bodies.append(body)
        _, images, clips = unpack_media(body["messages"])
        ours.append(
            [[list(a.shape), hashlib.sha256(a.numpy().tobytes()).hexdigest()] for a in images + clips]
        )
    text_config = JudgeConfig(mode="text")
    bodies += build_requests(
        text_config, None, None, None, {"context_caption": ["a"], "prediction_caption": ["b"]}
    )
    path = tmp_path / "bodies.json"
    path.write_text(json.dumps(bodies))
    run = subprocess.run(
        [vllm_python, "-c", VLLM_CHECK, str(path)], capture_output=True, text=True, timeout=240
    )
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(run.stdout.strip().splitlines()[-1])
    for result in results:
        assert result["ignored_fields"] == []  # every field we send is one vLLM reads
        assert (
            result["logprobs"] == 20
            and result["max_completion_tokens"] == result["max_tokens"] == 1
            and result["temperature"] == 0.0
        )
    assert [r["choice"] for r in results] == [
        ["yes", "no"],
        ["yes", "no"],
        ["1", "2", "3", "4", "5"],
        ["yes", "no"],
    ]
    assert [len(r["media"]) for r in results] == [6, 2, 6, 0]
    for result, expected in zip(results, ours):  # vLLM decodes exactly the pixels the in-process backend sees
        assert [[shape, digest] for _, shape, digest in result["media"]] == expected
    assert results[1]["media"][0][:2] == ["video_url", [3, 32, 40, 3]]
