"""``rollout_batch_size``: several contexts per rollout call, or each group in parts, changes no sample.
Every sample keeps its noise seed and its place, so the latents, log-probs, conditioning and rewards are
those of one group per call (fp32 on one device; a larger batch may round a matmul differently, hence
1e-5), and a context is still encoded once per iteration however its group is split."""

import pytest
import torch

from grpo.config import ConfigError, GRPOConfig
from grpo.train import ToyWorldDataSpec, build_datasets
from grpo.trainer import GRPOTrainer
from policies import LTXPolicy, NextClipPolicy
from policies.nextclip_tiny import build_tiny_nextclip
from policies.nsp import NSPPolicy
from policies.tiny import build_tiny_ltx
from policies.tiny_nsp import build_tiny_nsp

G = 4


def redness(videos, prompts, contexts, **metadata):
    return [float((v[..., 0] - 0.5 * (v[..., 1] + v[..., 2])).mean()) for v in videos]


@pytest.fixture(scope="module")
def toy_contexts():
    spec = ToyWorldDataSpec(num_train=8, num_eval=2, next_overlap=1, context=True)
    return list(build_datasets(spec)[0])[:3]


@pytest.fixture(scope="module")
def cases(tmp_path_factory, toy_contexts):
    """(policy factory, rows, num_frames) per family: text prompts, NSP contexts, next-clip contexts."""
    ltx = build_tiny_ltx(tmp_path_factory.mktemp("ltx"))
    nsp = build_tiny_nsp(tmp_path_factory.mktemp("nsp"))
    nextclip = build_tiny_nextclip(tmp_path_factory.mktemp("nextclip"))
    clip_context = [
        {"context": torch.rand(9, 32, 32, 3, generator=torch.Generator().manual_seed(i))} for i in range(3)
    ]
    return {
        "ltx": (
            lambda: LTXPolicy.from_pretrained(ltx),
            [{"prompt": p} for p in ("a ball", "a cube", "a cat")],
            9,
        ),
        "nsp": (lambda: NSPPolicy.from_pretrained(nsp), toy_contexts, 9),
        "nextclip": (lambda: NextClipPolicy.from_pretrained(nextclip), clip_context, 18),
    }


def _rollout(tmp_path, make_policy, rows, num_frames, rollout_batch_size):
    args = GRPOConfig(
        output_dir=str(tmp_path / f"run_{rollout_batch_size}"),
        num_generations=G,
        num_prompts_per_iteration=len(rows),
        num_inference_steps=3,
        num_frames=num_frames,
        rollout_batch_size=rollout_batch_size,
        sample_every=0,
        save_steps=0,
        seed=7,
    )
    policy = make_policy()
    trainer = GRPOTrainer(policy, [redness], args, rows)
    rollout, scores, _ = trainer._rollout_and_score(rows, iteration=2)
    return policy, rollout, scores


@pytest.mark.parametrize("family", ["ltx", "nsp", "nextclip"])
def test_chunked_rollouts_give_every_sample_its_one_group_result(tmp_path, cases, family):
    make_policy, rows, num_frames = cases[family]
    _, reference, reference_scores = _rollout(tmp_path, make_policy, rows, num_frames, None)
    # 3 rows: 2 rows per call then 1 (8 = 2G), and each group in 2 halves (2 = G / 2)
    for size in (2 * G, G // 2):
        policy, rollout, scores = _rollout(tmp_path, make_policy, rows, num_frames, size)
        assert rollout.num_samples == reference.num_samples == len(rows) * G
        assert torch.equal(rollout.seeds, reference.seeds)
        for name in ("final_latents", "log_probs", "latents"):
            torch.testing.assert_close(getattr(rollout, name), getattr(reference, name), rtol=0, atol=1e-5)
        for key, value in reference.condition.items():  # each sample's own conditioning row
            mine = rollout.condition[key][rollout.condition_index]
            torch.testing.assert_close(mine, value[reference.condition_index], rtol=0, atol=1e-5)
        assert scores.columns["redness"] == pytest.approx(reference_scores.columns["redness"], abs=1e-5)
        if family == "nsp":
            assert policy.vlm_forwards == len(rows)  # once per context, however the group is split
        # and the recompute of the chunked record is the record's own log-prob
        with torch.no_grad():
            for step in range(rollout.step_indices.numel()):
                recomputed = policy.log_prob(rollout, step).log_prob
                torch.testing.assert_close(recomputed, rollout.log_probs[:, step], rtol=0, atol=1e-5)


@pytest.mark.parametrize("size", [0, 3, 6])
def test_rollout_batch_size_must_divide_or_be_a_multiple_of_the_group(size):
    with pytest.raises(
        ConfigError, match="rollout_batch_size: must be a multiple or a divisor of num_generations 4"
    ) as info:
        GRPOConfig(output_dir="/tmp/x", num_generations=4, rollout_batch_size=size)
    assert "\n" not in str(info.value)
    assert GRPOConfig(output_dir="/tmp/x", num_generations=4, rollout_batch_size=12).rollout_batch_size == 12


def test_held_out_rows_rolled_out_together_score_as_one_at_a_time(cases):
    from grpo.evaluation import evaluate
    from policies import SamplingConfig
    from rewards.composite import CompositeReward

    make_policy, rows, _ = cases["nsp"]
    policy, reward = make_policy(), CompositeReward.from_specs([{"name": redness, "weight": 1.0}])
    sampling = SamplingConfig(
        num_frames=9, height=32, width=32, num_inference_steps=3, kind="ode", noise_level=0.0
    )
    one, together = (
        evaluate(policy, reward, rows, sampling, num_generations=G, seed=3, num_videos=3, rows_per_call=n)
        for n in (1, 2)
    )
    assert one.results.rows == together.results.rows == [0, 1, 2]
    (name,) = one.results.reward_names
    for a, b in zip(one.results.scores[name], together.results.scores[name], strict=True):
        assert b == pytest.approx(a, abs=1e-5)
    for k, video in one.videos.items():
        # kept videos are 8-bit (as their files): a 1e-5 difference may round to the next level
        torch.testing.assert_close(together.videos[k], video, rtol=0, atol=1 / 255 + 1e-6)
