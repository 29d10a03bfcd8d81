"""`nextscene eval`: a checkpoint scored on a recipe's held-out set reproduces the trainer's own
held-out evaluation of the same weights, and bad requests fail before any model loads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from grpo.cli import main
from grpo.evaluation import EvalResults
from policies.tiny import build_tiny_ltx


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return build_tiny_ltx(tmp_path_factory.mktemp("tiny_ltx"))


def _recipe(tmp_path: Path, tiny_dir: Path, **changes) -> Path:
    recipe = {
        "name": "eval-test",
        "stage": "grpo",
        "policy": {"type": "ltx", "path": str(tiny_dir)},
        "data": {"type": "toyworld", "size": 32, "num_train": 4, "num_eval": 3},
        "rewards": [{"name": "toyworld_verifiable", "weight": 1.0}, {"name": "redness", "weight": 0.0}],
        "trainer": {
            "output_dir": str(tmp_path / "run"),
            "num_generations": 2,
            "num_prompts_per_iteration": 1,
            "num_inference_steps": 3,
            "save_eval_videos": 2,
            "seed": 5,
            # the trainer compiles on CUDA (compile auto), `nextscene eval` runs eager: the comparisons
            # below are about weights and noise, and compiled kernels round differently from eager ones
            "compile": False,
        },
    }
    for key, value in changes.items():
        section, _, field = key.partition("__")
        recipe[section] = value if not field else {**recipe[section], field: value}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.mark.slow
def test_eval_reproduces_the_trainers_evaluation(tmp_path, tiny_dir, capsys):
    from grpo.recipe import load_recipe
    from grpo.train import build_datasets, build_policy, validate
    from grpo.trainer import GRPOTrainer
    from rewards.composite import CompositeReward

    recipe = load_recipe(_recipe(tmp_path, tiny_dir))
    policy_spec, data_spec = validate(recipe)
    train, heldout = build_datasets(data_spec)
    rewards = CompositeReward.from_specs([{"name": r.name, "weight": r.weight} for r in recipe.rewards])
    trainer = GRPOTrainer(
        build_policy(policy_spec, tmp_path), rewards, recipe.args, train, eval_dataset=heldout
    )
    metrics = trainer.evaluate()  # what the trainer logs and writes at iteration 0
    theirs = EvalResults.load(tmp_path / "run" / "eval" / "step_000000")

    out = tmp_path / "checked"
    assert main(["eval", str(tmp_path / "recipe.yaml"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    ours = EvalResults.load(out)
    assert ours.rows == theirs.rows == [0, 1, 2]
    assert ours.scores == theirs.scores  # same weights, same noise: the same numbers
    assert sorted(ours.videos) == [0, 1] and set(ours.videos[0]) == {"generated", "true"}
    assert all((out / f).is_file() for files in ours.videos.values() for f in files.values())

    summary = json.loads((out / "summary.json").read_text())
    for name in ("toyworld_verifiable", "redness"):
        values = np.array([v for row in ours.scores[name] for v in row if v is not None])
        assert summary["rewards"][name]["mean"] == pytest.approx(values.mean(), abs=1e-12)
        assert summary["rewards"][name]["mean"] == pytest.approx(metrics[f"eval/{name}/mean"], abs=1e-12)
        assert f"{values.mean():.4f}" in printed or f"{values.mean():.3e}" in printed
    verifiable = np.array([v for row in ours.scores["toyworld_verifiable"] for v in row])
    assert summary["rewards"]["toyworld_verifiable"]["success_rate"] == pytest.approx(
        (verifiable >= 0.5).mean()
    )
    assert summary["num_rows"] == 3 and summary["num_generations"] == 2


@pytest.mark.slow
def test_with_ema_the_held_out_evaluation_is_that_of_final(tmp_path, tiny_dir):
    """The trainer evaluates the EMA weights, which are what ``final`` holds (not the raw policy)."""
    from grpo.checkpoint import latest_checkpoint, load_checkpoint

    recipe = _recipe(tmp_path, tiny_dir)
    training = ["trainer.max_iterations=2", "trainer.eval_every=2", "trainer.save_steps=2"]
    training += ["trainer.ema_decay=0.5", "trainer.learning_rate=3e-3"]
    assert main(["train", str(recipe), *training]) == 0
    ckpt = load_checkpoint(latest_checkpoint(tmp_path / "run"))
    assert any(not torch.equal(ckpt.ema_state[n], ckpt.model_state[n]) for n in ckpt.ema_state)

    out = tmp_path / "final_eval"
    final = tmp_path / "run" / "final"
    assert main(["eval", str(recipe), f"policy.path={final}", "--out", str(out)]) == 0
    assert EvalResults.load(out).scores == EvalResults.load(tmp_path / "run" / "eval" / "step_000002").scores


@pytest.mark.parametrize(
    ("changes", "argv", "message"),
    [
        ({"stage": "sft", "rewards": [], "trainer": {}}, [], "needs a grpo recipe"),
        ({"data": {"type": "prompts", "prompts": ["a ball"]}}, [], "no held-out rows"),
        ({}, ["--threshold", "nan"], "--threshold must be a finite number"),
        ({}, ["--videos", "-1"], "--videos must be >= 0"),
        ({}, ["trainer.num_generatons=2"], "did you mean 'trainer.num_generations'"),
    ],
)
def test_bad_requests_fail_fast_with_one_line(tmp_path, changes, argv, message, capsys):
    recipe = _recipe(
        tmp_path, tmp_path / "no_checkpoint_needed", policy={"type": "ltx", "tiny": True}, **changes
    )
    assert main(["eval", str(recipe), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()  # nothing built or written
