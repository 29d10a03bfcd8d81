"""The NSP paper's connector (``connector: paper``): Linear - SiLU - Linear - RMSNorm with a learnable
output scale initialised at 0.01, with the paper's 256 queries; stored in the NSP directory's config,
loaded as the kind its weights are, and a one-line error when the two disagree."""

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from grpo.data import ToyWorld, ToyWorldConfig
from policies import SamplingConfig
from policies.errors import InputError
from policies.nsp import Connector, NSPConfig, NSPPolicy, PaperConnector, check_nsp_dir
from policies.tiny_nsp import TinyNSPSpec, build_tiny_nsp

PAPER = NSPConfig(num_queries=256, connector="paper")


@pytest.fixture(scope="module")
def paper_dir(tmp_path_factory):
    return build_tiny_nsp(tmp_path_factory.mktemp("paper_nsp"), TinyNSPSpec(nsp=PAPER))


@pytest.fixture(scope="module")
def rows():
    world = ToyWorld(ToyWorldConfig(next_overlap=1), split="train", num_samples=2)
    return [{"context": s["context"], "instruction": s["instruction"], "fps": s["fps"]} for s in world]


def test_paper_connector_is_linear_silu_linear_rmsnorm_times_a_small_scale():
    """Against the closed form: ``0.01 * h / sqrt(mean(h^2) + eps)`` with ``h = W2 silu(W1 x + b1) + b2``;
    hidden states of std 100 (Qwen-VL's are large) come out with RMS 0.01 per token."""
    torch.manual_seed(0)
    connector = PaperConnector(64, 48)
    states = 100 * torch.randn(3, 256, 64)
    out = connector(states)
    assert out.shape == (3, 256, 48)
    first, second = connector.mlp[0], connector.mlp[2]
    h = F.linear(F.silu(F.linear(states, first.weight, first.bias)), second.weight, second.bias)
    expected = 0.01 * h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-7)
    rms = out.pow(2).mean(-1).sqrt()
    torch.testing.assert_close(rms, torch.full_like(rms, 0.01), rtol=1e-4, atol=0)
    assert out.std() / states.std() < 1e-3
    assert torch.equal(connector.scale.detach(), torch.full((48,), 0.01))
    names = {n for n, p in connector.named_parameters() if p.requires_grad}
    assert names == {"mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias", "scale"}


def test_the_default_connector_is_unchanged():
    assert NSPConfig().connector == "transformer"
    with pytest.raises(InputError, match="nsp connector must be one of 'transformer', 'paper', got 'mlp'"):
        NSPConfig(connector="mlp")


def test_256_queries_through_the_paper_connector_into_ltx(paper_dir, rows):
    policy = NSPPolicy.from_pretrained(paper_dir)
    assert isinstance(policy.connector, PaperConnector) and policy.queries.shape == (256, 64)
    assert json.loads((paper_dir / "nsp_config.json").read_text())["connector"] == "paper"
    with torch.no_grad():
        condition = policy.prepare_condition(rows)
        assert condition["vlm_states"].shape == (2, 256, 64)
        embeds, mask = policy.text_inputs(condition, torch.tensor([0, 0, 1]), 1.0)
        sampling = SamplingConfig(num_inference_steps=2, num_frames=9, height=32, width=32)
        rollout = policy.rollout(condition, num_generations=2, sampling=sampling, seeds=[0, 1, 2, 3])
    caption = policy.transformer.config.caption_channels
    assert embeds.shape == (3, 256, caption) and mask.shape == (3, 256) and bool(mask.all())
    rms = embeds.pow(2).mean(-1).sqrt()  # the 0.01 output scale, whatever the VLM's state scale
    torch.testing.assert_close(rms, torch.full_like(rms, 0.01), rtol=1e-3, atol=0)
    assert embeds.std() < condition["vlm_states"].std() / 50  # output std tiny relative to the input
    assert rollout.num_samples == 4 and torch.isfinite(rollout.log_probs).all()


def test_save_load_round_trip_is_bitwise(tmp_path, paper_dir, rows):
    policy = NSPPolicy.from_pretrained(paper_dir)
    with torch.no_grad():  # trained away from the initial values
        policy.connector.scale.mul_(torch.linspace(0.5, 3.0, policy.connector.scale.numel()))
        policy.connector.mlp[2].bias.add_(0.1)
        policy.queries.add_(0.05)
    policy.save_pretrained(tmp_path / "copy")
    loaded = NSPPolicy.from_pretrained(tmp_path / "copy")
    assert isinstance(loaded.connector, PaperConnector)
    saved, restored = policy.trained_state_dict(), loaded.trained_state_dict()
    assert saved.keys() == restored.keys() and "connector.scale" in saved
    assert all(torch.equal(saved[k], restored[k]) for k in saved)
    with torch.no_grad():
        a = policy.text_inputs(policy.prepare_condition(rows[:1]), torch.tensor([0]), 1.0)[0]
        b = loaded.text_inputs(loaded.prepare_condition(rows[:1]), torch.tensor([0]), 1.0)[0]
    assert torch.equal(a, b)


def test_a_connector_kind_that_does_not_match_the_weights_is_one_line(tmp_path, paper_dir):
    with pytest.raises(InputError) as err:
        check_nsp_dir(paper_dir, connector="transformer")  # before any model loads
    message = str(err.value)
    assert "holds a 'paper' connector but the NSP config says connector: 'transformer'" in message
    assert "set connector: 'paper'" in message and "\n" not in message
    shutil.copytree(paper_dir, tmp_path / "nsp")
    config_file = tmp_path / "nsp" / "nsp_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "connector": "transformer"}))
    with pytest.raises(InputError, match="holds a 'paper' connector"):
        NSPPolicy.from_pretrained(tmp_path / "nsp")
    transformer_dir = build_tiny_nsp(tmp_path / "transformer")
    assert isinstance(NSPPolicy.from_pretrained(transformer_dir).connector, Connector)
    with pytest.raises(InputError, match="holds a 'transformer' connector .* set connector: 'transformer'"):
        NSPPolicy.from_pretrained(transformer_dir, connector="paper")


def test_a_tiny_recipe_policy_is_built_with_the_connector_its_overrides_name(tmp_path):
    from grpo.train import NSPPolicySpec, build_policy

    spec = NSPPolicySpec(tiny=True, overrides={"connector": "paper", "num_queries": 256})
    policy = build_policy(spec, tmp_path)
    assert isinstance(policy.connector, PaperConnector) and policy.queries.shape[0] == 256
    saved = json.loads((tmp_path / "base_tiny_nsp" / "nsp_config.json").read_text())
    assert saved["connector"] == "paper" and saved["num_queries"] == 256
