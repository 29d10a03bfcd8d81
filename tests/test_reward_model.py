"""Learned reward models: losses against hand-computed values, checkpoints, the reward function, training."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from grpo.data.toyworld import ToyWorld
from grpo.reward_modeling import RewardModelConfig, RewardModelTrainer
from policies.errors import InputError
from rewards import CompositeReward, build_reward
from rewards.preferences import toyworld_pairs
from rewards.reward_model import (
    ARGS_FILE,
    FRAME_ATTENTION,
    LearnedReward,
    RewardModelArgs,
    TinyRewardModelSpec,
    VideoRewardModel,
    _frame_attention,
    bradley_terry_loss,
    bradley_terry_ties_loss,
    build_tiny_reward_model,
    spearman,
)

ARGS = {"question": "", "frame_stride": 1}


def one_line_error(call, *args, **kwargs) -> str:
    with pytest.raises(InputError) as info:
        call(*args, **kwargs)
    assert "\n" not in str(info.value)
    return str(info.value)


# ------------------------------------------------------------------------------------------- losses
def test_bradley_terry_loss_and_gradients_by_hand():
    chosen = torch.tensor([2.0, -1.0], requires_grad=True)
    rejected = torch.tensor([0.5, 1.0], requires_grad=True)
    loss = bradley_terry_loss(chosen, rejected)
    # -log sigmoid(d) = log(1 + e^-d); d/dchosen = -1 / (1 + e^d)
    assert loss.tolist() == pytest.approx([math.log1p(math.exp(-1.5)), math.log1p(math.exp(2.0))], abs=1e-6)
    loss.sum().backward()
    assert chosen.grad.tolist() == pytest.approx(
        [-1 / (1 + math.exp(1.5)), -1 / (1 + math.exp(-2.0))], abs=1e-6
    )
    assert rejected.grad.tolist() == pytest.approx((-chosen.grad).tolist(), abs=1e-7)
    assert bradley_terry_loss(torch.tensor(1.0), torch.tensor(0.0), margin=1.0).item() == pytest.approx(
        math.log(2)
    )


def rao_kupper(a: float, b: float, theta: float) -> tuple[float, float]:
    """P(a beats b) and P(tie) from the model's definition with strengths e^a, e^b."""
    pa, pb = math.exp(a), math.exp(b)
    win = pa / (pa + theta * pb)
    tie = (theta**2 - 1) * pa * pb / ((pa + theta * pb) * (pb + theta * pa))
    return win, tie


@pytest.mark.parametrize(
    ("a", "b", "theta"), [(1.0, 0.2, 5.0), (-0.3, 0.4, 2.0), (0.0, 0.0, 1.5), (8.0, -6.0, 5.0)]
)
def test_ties_loss_is_the_rao_kupper_likelihood(a, b, theta):
    win, tie = rao_kupper(a, b, theta)
    chosen, rejected = torch.tensor([a, a], dtype=torch.float64), torch.tensor([b, b], dtype=torch.float64)
    loss = bradley_terry_ties_loss(chosen, rejected, torch.tensor([False, True]), theta)
    assert loss.tolist() == pytest.approx([-math.log(win), -math.log(tie)], rel=1e-9)


def test_ties_loss_gradient_by_hand():
    theta, eta = 5.0, math.log(5.0)
    chosen = torch.tensor([0.0, 1.0, 1.0], requires_grad=True)
    rejected = torch.zeros(3)
    bradley_terry_ties_loss(chosen, rejected, torch.tensor([True, True, False]), theta).sum().backward()
    sigmoid = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    # tie: d/dd = sigmoid(d - eta) - sigmoid(-d - eta), zero at d = 0; win: d/dd = -sigmoid(eta - d)
    expected = [0.0, sigmoid(1 - eta) - sigmoid(-1 - eta), -sigmoid(eta - 1)]
    assert chosen.grad.tolist() == pytest.approx(expected, abs=1e-6)
    assert "tie_theta=1.0 must be > 1" in one_line_error(
        bradley_terry_ties_loss, chosen, rejected, torch.tensor([True] * 3), 1.0
    )


def test_spearman_matches_pandas():
    rng = np.random.default_rng(0)
    x = rng.normal(size=50).round(1)  # rounding makes ties
    y = x + rng.normal(size=50)
    expected = np.corrcoef(pd.Series(x).rank(), pd.Series(y).rank())[0, 1]  # Pearson of average ranks
    assert spearman(x, y) == pytest.approx(expected, abs=1e-12)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)


# ------------------------------------------------------------------------------------------- model
@pytest.fixture(scope="module")
def world_pairs():
    return toyworld_pairs(ToyWorld(split="test", num_samples=8)).with_format("numpy")


def clips(rows, column):
    return [np.asarray(v, dtype=np.uint8) for v in rows[column]]


@pytest.fixture(scope="module")
def model():
    m = build_tiny_reward_model(RewardModelArgs(aspects=["causal", "physics"], **ARGS))
    torch.nn.init.normal_(m.heads.weight)  # non-zero heads so that scores differ
    return m


def test_scores_are_batch_independent_and_heads_read_tokens_or_pooled_states(model, world_pairs):
    rows = world_pairs[:4]
    videos, contexts = clips(rows, "chosen"), clips(rows, "context")
    batched = model.score(videos, contexts, batch_size=4)
    single = torch.cat([model.score(videos[i : i + 1], contexts[i : i + 1]) for i in range(4)])
    assert batched.shape == (4, 2) and torch.allclose(batched, single, atol=1e-5)
    assert batched[:, 0].std() > 1e-4
    inputs = model.prepare(videos, contexts)
    hidden = model.backbone(**inputs, use_cache=False).last_hidden_state
    video_mask = inputs["input_ids"] == model.video_token_id
    pooled = torch.stack([hidden[i][video_mask[i]].mean(0) for i in range(4)])
    assert torch.allclose(model(**inputs), model.heads(pooled), atol=1e-5)
    model.args.head = "token"
    try:
        token = model.tokenizer.convert_tokens_to_ids("<|reward_physics|>")
        at = (inputs["input_ids"] == token).int().argmax(1)
        expected = hidden[torch.arange(4), at] @ model.heads.weight[1] + model.heads.bias[1]
        assert torch.allclose(model(**inputs)[:, 1], expected, atol=1e-5)
    finally:
        model.args.head = "mean"


def _vision_attention(model, implementation):
    for config in {
        id(m.config): m.config for m in model.backbone.visual.modules() if hasattr(m, "config")
    }.values():
        config._attn_implementation = implementation


def test_batched_frame_attention_gives_transformers_numbers(world_pairs):
    spec = TinyRewardModelSpec(hidden_size=64, num_heads=2, vision_depth=2, patch_size=2, rope_theta=100.0)
    model = build_tiny_reward_model(RewardModelArgs(context_frames=5, video_frames=3, **ARGS), spec)
    torch.nn.init.normal_(model.heads.weight)
    assert model.backbone.visual.config._attn_implementation == FRAME_ATTENTION
    assert model.backbone.config.text_config._attn_implementation == "sdpa"
    rows = world_pairs[:3]
    inputs = model.prepare(clips(rows, "chosen"), clips(rows, "context"))
    batched = model(**inputs)
    _vision_attention(model, "sdpa")  # transformers' loop over frames
    try:
        assert torch.allclose(batched, model(**inputs), atol=1e-5)
    finally:
        _vision_attention(model, FRAME_ATTENTION)
    q, k, v = torch.randn(3, 1, 2, 10, 8).unbind(0)  # blocks of unequal length run one by one
    out, _ = _frame_attention(None, q, k, v, scaling=0.3, cu_seq_lens_q=torch.tensor([0, 4, 10]))
    expected = torch.cat(
        [
            torch.nn.functional.scaled_dot_product_attention(
                q[..., a:b, :], k[..., a:b, :], v[..., a:b, :], scale=0.3
            )
            for a, b in ((0, 4), (4, 10))
        ],
        dim=2,
    ).transpose(1, 2)
    assert out.shape == (1, 10, 2, 8) and torch.allclose(out, expected, atol=1e-6)


def test_tiny_spec_and_declared_fps_set_the_positions(world_pairs):
    spec = TinyRewardModelSpec(hidden_size=128, num_heads=4, rope_theta=100.0, tokens_per_second=3)
    model = build_tiny_reward_model(RewardModelArgs(video_fps=2.0, **ARGS), spec)
    text = model.backbone.config.text_config
    assert (text.num_attention_heads, text.rope_parameters["rope_theta"]) == (4, 100.0)
    assert text.rope_parameters["mrope_section"] == [4, 6, 6]  # head dim 32
    rows = world_pairs[:1]
    inputs = model.prepare(clips(rows, "chosen"), clips(rows, "context"))
    assert inputs["second_per_grid_ts"].tolist() == [1.0]  # 2 frames per patch at a declared 2 fps
    positions, _ = model.backbone.get_rope_index(
        inputs["input_ids"], inputs["mm_token_type_ids"], None, inputs["video_grid_thw"],
        inputs["second_per_grid_ts"], inputs["attention_mask"],
    )  # fmt: skip
    temporal = positions[0, 0][inputs["input_ids"][0] == model.video_token_id].unique()
    assert temporal.diff().tolist() == [3, 3, 3]  # 8 frames = 4 patches, tokens_per_second apart
    assert "multiple of 16 * num_heads=3" in one_line_error(
        build_tiny_reward_model, None, TinyRewardModelSpec(num_heads=3)
    )
    assert "video_fps=0 must be > 0" in one_line_error(RewardModelArgs, video_fps=0)


def test_checkpoint_round_trip_and_calibrated_reward(model, world_pairs, tmp_path):
    rows = world_pairs[:6]
    videos, contexts = clips(rows, "chosen") + clips(rows, "rejected"), clips(rows, "context") * 2
    stats = model.calibrate(videos, contexts)
    model.save_pretrained(tmp_path / "rm")
    loaded = VideoRewardModel.from_pretrained(tmp_path / "rm")
    assert torch.allclose(loaded.score(videos, contexts), model.score(videos, contexts), atol=1e-6)
    reward = build_reward("reward_model", model=str(tmp_path / "rm"), aspect="physics", device="cpu")
    out = CompositeReward([reward], names=["rm"])(videos, None, contexts)
    raw = model.score(videos, contexts)[:, 1]
    assert out.columns["rm"] == pytest.approx(
        ((raw - stats["physics"][0]) / stats["physics"][1]).tolist(), abs=1e-5
    )
    normalised = torch.tensor(out.columns["rm"])
    assert abs(normalised.mean()) < 1e-4 and normalised.std() == pytest.approx(1.0, abs=1e-4)
    assert "has no context" in one_line_error(reward, videos, None, None)
    assert "aspect 'style' is not one of" in one_line_error(LearnedReward, model, aspect="style")


def test_other_checkpoints_are_one_line_errors(model, tmp_path, judge_tokenizer):
    from transformers import Qwen2Config, Qwen2Model

    assert "not a reward model checkpoint (no reward_model.json)" in one_line_error(
        VideoRewardModel.from_pretrained, tmp_path
    )
    model.save_pretrained(tmp_path / "rm")
    text = tmp_path / "text"
    Qwen2Model(Qwen2Config(vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1)).save_pretrained(text)  # fmt: skip
    (text / ARGS_FILE).write_text((tmp_path / "rm" / ARGS_FILE).read_text())
    assert "holds a 'qwen2' backbone; reward models use Qwen2-VL" in one_line_error(
        VideoRewardModel.from_pretrained, text
    )
    other = build_tiny_reward_model(RewardModelArgs(aspects=["causal"], **ARGS))
    other.save_pretrained(tmp_path / "one_head")
    (tmp_path / "rm" / "heads.safetensors").replace(tmp_path / "mixed_heads")
    (tmp_path / "one_head" / "heads.safetensors").replace(tmp_path / "rm" / "heads.safetensors")
    assert "do not match" in one_line_error(VideoRewardModel.from_pretrained, tmp_path / "rm")
    payload = json.loads((tmp_path / "one_head" / ARGS_FILE).read_text())
    (tmp_path / "one_head" / ARGS_FILE).write_text(json.dumps({**payload, "architecture": "x"}))
    assert "does not describe a nextscene.VideoRewardModel" in one_line_error(
        VideoRewardModel.from_pretrained, tmp_path / "one_head"
    )
    assert "use a Qwen2-VL or Qwen2.5-VL" in one_line_error(
        VideoRewardModel, Qwen2Model(Qwen2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                 num_key_value_heads=1, intermediate_size=64, vocab_size=50)),
        judge_tokenizer, RewardModelArgs(),
    )  # fmt: skip


# ------------------------------------------------------------------------------------------- training
@pytest.mark.slow
def test_trainer_fits_pairs_checkpoints_and_writes_a_calibrated_model(tmp_path):
    pairs = toyworld_pairs(ToyWorld(split="train", num_samples=8), ["frozen"])
    torch.manual_seed(0)
    model = build_tiny_reward_model(RewardModelArgs(**ARGS))
    args = RewardModelConfig(
        output_dir=str(tmp_path), max_steps=30, per_device_train_batch_size=8, learning_rate=3e-3,
        save_steps=15, eval_every=0, seed=0, calibration_samples=16,
    )  # fmt: skip
    trainer = RewardModelTrainer(model, args, pairs, eval_dataset=pairs)
    before = trainer.evaluate()["eval/loss"]
    history = trainer.train()
    after = history[-1]
    assert before == pytest.approx(math.log(2), abs=1e-6)  # zero heads: every pair starts at 1/2
    assert after["eval/loss"] < 0.9 * before and after["eval/accuracy"] >= 0.75
    assert (tmp_path / "checkpoint-00000030").is_dir()
    final = VideoRewardModel.from_pretrained(tmp_path / "final")
    assert final.args.calibration is not None and set(final.args.calibration) == {"causal"}
    rows = pairs.with_format("numpy")[:]
    scores = LearnedReward(final)(clips(rows, "chosen"), None, clips(rows, "context")).scores
    rejected = LearnedReward(final)(clips(rows, "rejected"), None, clips(rows, "context")).scores
    assert sum(c > r for c, r in zip(scores, rejected)) >= 6


def test_trainer_rejects_mismatched_aspects_before_training(tmp_path):
    pairs = toyworld_pairs(ToyWorld(split="train", num_samples=2), ["frozen"], aspect="physics")
    model = build_tiny_reward_model(RewardModelArgs(**ARGS))
    args = RewardModelConfig(output_dir=str(tmp_path), max_steps=1)
    assert "train_dataset has aspect(s) ['physics']" in one_line_error(RewardModelTrainer, model, args, pairs)
    scores_args = RewardModelConfig(output_dir=str(tmp_path), max_steps=1, loss_type="regression")
    assert "lacks column(s) ['video', 'score']" in one_line_error(
        RewardModelTrainer,
        model,
        scores_args,
        toyworld_pairs(ToyWorld(split="train", num_samples=2), ["frozen"]),
    )
