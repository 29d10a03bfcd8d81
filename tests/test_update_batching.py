"""``steps_per_forward``: the update's trained steps of every sample in fewer, larger forwards is the
same loss, so the same gradient (fp32, up to summation order) as one step per forward; next-clip's
per-clip advantages go with their steps."""

import pytest
import torch

from grpo.config import ConfigError, GRPOConfig
from grpo.trainer import GRPOTrainer
from policies import LTXPolicy, NextClipPolicy
from policies.nextclip_tiny import build_tiny_nextclip
from policies.tiny import build_tiny_ltx

CLIP = 9


def redness(videos, prompts, contexts, **metadata):
    return [float((v[..., 0] - 0.5 * (v[..., 1] + v[..., 2])).mean()) for v in videos]


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    ltx = build_tiny_ltx(tmp_path_factory.mktemp("ltx"))
    nextclip = build_tiny_nextclip(tmp_path_factory.mktemp("nextclip"))
    context = torch.rand(CLIP, 32, 32, 3, generator=torch.Generator().manual_seed(0))
    return {
        "ltx": (lambda: LTXPolicy.from_pretrained(ltx), [{"prompt": "a ball"}, {"prompt": "a cube"}], 9),
        "nextclip": (lambda: NextClipPolicy.from_pretrained(nextclip), [{"context": context}] * 2, 2 * CLIP),
    }


def _update(tmp_path, case, steps_per_forward):
    make_policy, rows, num_frames = case
    args = GRPOConfig(
        output_dir=str(tmp_path / f"run_{steps_per_forward}"),
        num_generations=3,
        num_prompts_per_iteration=2,
        num_inference_steps=3,  # every step stochastic and trained: 3 (x 2 clips) columns
        num_frames=num_frames,
        use_lora=False,
        beta=0.05,
        steps_per_forward=steps_per_forward,
        sample_every=0,
        save_steps=0,
        seed=1,
    )
    trainer = GRPOTrainer(make_policy(), [redness], args, rows)
    rollout, scores, _ = trainer._rollout_and_score(rows, 0)
    advantages, _ = trainer._advantages(scores)
    grads, real_step = {}, trainer.state.optimizer_step

    def capture():
        named = trainer.policy.transformer.named_parameters()
        grads.update({name: p.grad.detach().clone() for name, p in named if p.grad is not None})
        return real_step()

    trainer.state.optimizer_step = capture
    stats = trainer._update(rollout, advantages, 0)
    return grads, stats


@pytest.mark.parametrize("family", ["ltx", "nextclip"])
def test_all_steps_in_one_forward_is_the_same_gradient(tmp_path, cases, family):
    reference, stats = _update(tmp_path, cases[family], 1)
    assert stats["train/trained_steps_per_sample"] == (6.0 if family == "nextclip" else 3.0)
    assert sum(g.abs().sum() for g in reference.values()) > 0
    for steps_per_forward in (None, 2):
        grads, other = _update(tmp_path, cases[family], steps_per_forward)
        assert grads.keys() == reference.keys()
        for name, grad in reference.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-7, msg=name)
        assert other["train/kl"] == pytest.approx(stats["train/kl"], rel=1e-4, abs=1e-9)


def test_steps_per_forward_must_be_positive():
    with pytest.raises(ConfigError, match="steps_per_forward: must be >= 1 or null"):
        GRPOConfig(output_dir="/tmp/x", steps_per_forward=0)
