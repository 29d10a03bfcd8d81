"""The NSP policy under the trainers: the VLM stays frozen (bitwise, no optimizer state), the VLM runs
once per context per GRPO iteration however large G, and SFT trains the queries through the VLM."""

import pytest
import torch

import rewards
from grpo.config import FlowMatchingConfig, GRPOConfig
from grpo.sft import FlowMatchingTrainer
from grpo.train import ToyWorldDataSpec, build_datasets
from grpo.trainer import GRPOTrainer
from policies.nsp import NSPConfig, NSPPolicy
from policies.tiny_nsp import TinyNSPSpec, build_tiny_nsp


@rewards.register("test_nsp_redness")
def redness(videos, prompts, contexts, **metadata):
    return [float((v[..., 0] - 0.5 * (v[..., 1] + v[..., 2])).mean()) for v in videos]


@pytest.fixture(scope="module")
def nsp_dir(tmp_path_factory):
    return build_tiny_nsp(tmp_path_factory.mktemp("tiny_nsp"))


@pytest.fixture(scope="module")
def paper_nsp_dir(tmp_path_factory):
    """The NSP paper's connector and its 256 queries."""
    spec = TinyNSPSpec(nsp=NSPConfig(num_queries=256, connector="paper"))
    return build_tiny_nsp(tmp_path_factory.mktemp("paper_nsp"), spec)


@pytest.fixture(scope="module")
def data():
    spec = ToyWorldDataSpec(num_train=64, num_eval=8, next_overlap=1, context=True)
    return build_datasets(spec)


def _cpu(tensor: torch.Tensor) -> torch.Tensor:
    """A CPU copy: the trainers move the policy to the GPU when there is one, snapshots stay here."""
    return tensor.detach().to("cpu", copy=True)


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: _cpu(v) for k, v in module.state_dict().items()}


def _changed(before: dict[str, torch.Tensor], module: torch.nn.Module) -> bool:
    return any(not torch.equal(before[k], v) for k, v in _snapshot(module).items())


def _assert_vlm_frozen(policy, before, optimizer):
    after = _snapshot(policy.vlm)
    assert all(torch.equal(before[k], after[k]) for k in before)
    vlm_params = {id(p) for p in policy.vlm.parameters()}
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert not vlm_params & optimized
    assert not vlm_params & {id(p) for p in optimizer.state}


@pytest.mark.parametrize("directory", ["nsp_dir", "paper_nsp_dir"])
def test_sft_step_trains_queries_and_connector_through_a_frozen_vlm(tmp_path, request, directory, data):
    policy = NSPPolicy.from_pretrained(request.getfixturevalue(directory))
    vlm, queries, connector = (
        _snapshot(policy.vlm),
        _cpu(policy.queries),
        _snapshot(policy.connector),
    )
    args = FlowMatchingConfig(
        output_dir=str(tmp_path / "sft"), max_steps=1, batch_size=2, learning_rate=1e-3, save_steps=0
    )
    trainer = FlowMatchingTrainer(policy, args, data[0])
    trainer.train()
    _assert_vlm_frozen(policy, vlm, trainer.state.optimizer)
    assert (_cpu(policy.queries) - queries).abs().max() > 0
    after = _snapshot(policy.connector)
    assert all(not torch.equal(connector[k], after[k]) for k in connector)  # every connector weight
    saved = NSPPolicy.from_pretrained(tmp_path / "sft" / "final")
    assert torch.equal(saved.queries, _cpu(policy.queries))
    assert saved.config.connector == policy.config.connector


def test_grpo_iteration_runs_the_vlm_once_per_context_and_keeps_it_frozen(tmp_path, nsp_dir, data):
    policy = NSPPolicy.from_pretrained(nsp_dir)
    vlm, queries, connector = (
        _snapshot(policy.vlm),
        _cpu(policy.queries),
        _snapshot(policy.connector),
    )
    args = GRPOConfig(
        output_dir=str(tmp_path / "grpo"),
        num_generations=6,
        num_prompts_per_iteration=2,
        max_iterations=1,
        num_inference_steps=4,
        learning_rate=1e-2,
        beta=0.01,
        eval_every=0,
        save_steps=0,
        sample_every=0,
    )
    trainer = GRPOTrainer(policy, ["test_nsp_redness"], args, data[0])
    before = policy.vlm_forwards
    trainer.train()
    assert policy.vlm_forwards - before == 2  # 2 contexts, 6 samples each, 4 recomputed steps each
    _assert_vlm_frozen(policy, vlm, trainer.state.optimizer)
    assert _changed(connector, policy.connector)
    # the RL gradient stops at the cached VLM states: the queries are trained by the supervised stages
    assert torch.equal(_cpu(policy.queries), queries)


@pytest.mark.slow
def test_toy_sft_lowers_held_out_flow_matching_loss(tmp_path, nsp_dir, data):
    train, held_out = data
    args = FlowMatchingConfig(
        output_dir=str(tmp_path / "run"),
        max_steps=25,
        batch_size=8,
        learning_rate=1e-3,
        eval_every=25,
        save_steps=0,
        logging_steps=10,
    )
    history = FlowMatchingTrainer(NSPPolicy.from_pretrained(nsp_dir), args, train, held_out).train()
    evals = [m["eval/loss"] for m in history if "eval/loss" in m]
    print(f"NSP held-out flow-matching loss {evals[0]:.4f} -> {evals[-1]:.4f}")
    assert len(evals) == 2 and evals[-1] < 0.7 * evals[0]
