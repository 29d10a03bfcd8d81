"""Preference data: toy-world pairs, pairs and score rows from teacher scores, and one-line input errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from grpo.data.toyworld import ToyWorld
from grpo.recipe import load_recipe
from grpo.train import validate
from policies.errors import InputError
from rewards.preferences import (
    check_preferences,
    pairs_from_scores,
    preference_dataset,
    score_candidates,
    score_rows,
    toyworld_pairs,
)
from rewards.verifiable import ToyWorldVerifiableReward


@pytest.fixture(scope="module")
def world() -> ToyWorld:
    return ToyWorld(split="test", num_samples=8)


@pytest.fixture(scope="module")
def pairs(world):
    return toyworld_pairs(world)


def one_line_error(call, *args, **kwargs) -> str:
    with pytest.raises(InputError) as info:
        call(*args, **kwargs)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_toyworld_pairs_put_the_true_future_first(world, pairs):
    assert len(pairs) == len(world)
    assert list(pairs["kind"]) == ["wrong_direction", "frozen", "shuffled", "other_sample"] * 2
    rows = pairs.with_format("numpy")
    reward = ToyWorldVerifiableReward()
    for i in range(len(world)):
        sample = world[i]
        row = rows[i]
        assert np.array_equal(row["chosen"], (sample["next"].numpy() * 255).round().astype(np.uint8))
        assert not np.array_equal(row["chosen"], row["rejected"])
        scores = reward(
            [
                torch.from_numpy(row["chosen"].astype(np.uint8)),
                torch.from_numpy(row["rejected"].astype(np.uint8)),
            ],
            world=[row["world"]] * 2,
        ).scores
        assert scores[0] > scores[1] + 0.2, (row["kind"], scores)
    frozen = rows[1]
    assert (frozen["rejected"] == frozen["context"][-1]).all()
    check_preferences(pairs, ["causal"], pairs=True)


def test_pairs_from_scores_rank_ties_and_skip_unscored():
    videos = [torch.full((3, 4, 4, 3), v) for v in (0.1, 0.2, 0.3, 0.4)]
    context = torch.zeros(3, 4, 4, 3)
    table = pairs_from_scores([context], [videos], [[0.9, 0.2, 0.25, None]], tie_margin=0.1, margin=0.0)
    rows = table.with_format("numpy")
    assert len(table) == 3  # (0,1), (0,2), (1,2); the unscored candidate makes no pair
    assert [bool(t) for t in rows["tie"]] == [False, False, True]
    assert [float(s) for s in rows["chosen_score"]] == [0.9, 0.9, 0.25]
    assert int(rows[0]["chosen"][0, 0, 0, 0]) == round(0.1 * 255)
    strict = pairs_from_scores([context], [videos], [[0.9, 0.2, 0.25, None]], margin=0.1)
    assert len(strict) == 2 and not any(strict["tie"])
    regression = score_rows([context], [videos], [[0.9, 0.2, 0.25, None]])
    assert list(regression["score"]) == [0.9, 0.2, 0.25]


def test_score_candidates_uses_any_reward(world):
    samples = [world[0], world[1]]
    scores = score_candidates(
        ToyWorldVerifiableReward(),
        [s["context"] for s in samples],
        [[s["next"], s["context"][-1:].expand_as(s["next"])] for s in samples],
        metadata=[{"world": s["world"]} for s in samples],
    )
    assert [len(g) for g in scores] == [2, 2]
    assert all(g[0] > g[1] for g in scores)


def test_bad_preference_tables_are_one_line_errors(pairs):
    rows = [{"context": torch.rand(3, 8, 8, 3), "chosen": torch.rand(3, 8, 8, 3), "rejected": None}]
    rows.append({**rows[0], "rejected": torch.rand(3, 8, 8, 3)})
    missing = preference_dataset(rows)
    assert "row 0 has no 'rejected' video" in one_line_error(
        check_preferences, missing, ["causal"], pairs=True
    )
    empty = preference_dataset([{**rows[1], "chosen": torch.rand(0, 8, 8, 3)}, rows[1]])
    assert "empty 'chosen' video" in one_line_error(check_preferences, empty, ["causal"], pairs=True)
    assert "aspect(s) ['causal'] but the reward model scores ['physics']" in one_line_error(
        check_preferences, pairs, ["physics"], pairs=True
    )
    assert "lacks column(s) ['video', 'score']" in one_line_error(
        check_preferences, pairs, ["causal"], pairs=False
    )
    assert "resize videos to one size" in one_line_error(
        preference_dataset, [rows[1], {**rows[1], "chosen": torch.rand(3, 4, 4, 3)}]
    )


def test_reward_model_recipe_validates_without_models(tmp_path):
    recipe = load_recipe("recipes/toy_reward_model.yaml", [f"output_dir={tmp_path}"])
    spec, data = validate(recipe)
    assert spec.tiny and data.perturbations == ["wrong_direction", "frozen", "shuffled", "other_sample"]
    assert recipe.args.loss_type == "bradley_terry" and recipe.args.per_device_train_batch_size == 64
    assert spec.tiny_spec["patch_size"] == 2 and spec.video_fps == 2.0 and data.num_workers == 8
    stray = load_recipe("recipes/toy_reward_model.yaml", ["policy.tiny=false", "policy.backbone=."])
    assert "policy.tiny_spec: sizes a tiny backbone" in one_line_error(validate, stray)
    bad = load_recipe("recipes/toy_reward_model.yaml", ["policy.type=ltx"])
    assert "trains a 'video_reward_model'" in one_line_error(validate, bad)
    assert "trainer.tie_theta: must be > 1" in one_line_error(
        load_recipe, "recipes/toy_reward_model.yaml", ["trainer.tie_theta=1"]
    )
    wrong = load_recipe("recipes/toy_reward_model.yaml", ["data.aspect=physics"])
    assert "'physics' is not one of policy.aspects" in one_line_error(validate, wrong)


@pytest.mark.slow
def test_toyworld_pairs_in_worker_processes_are_the_same_table():
    world = ToyWorld(split="validation", num_samples=130)
    one, many = (toyworld_pairs(world, num_workers=n).with_format("numpy")[:] for n in (0, 2))
    assert list(one) == list(many)
    for column in one:
        assert np.array_equal(np.asarray(one[column]), np.asarray(many[column])), column


def test_on_policy_pairs_rank_the_policys_own_samples_by_the_verifiable_reward(tmp_path):
    """``data.policy``: the shipped NSP policy's samples, paired within each context, better one first;
    the table joins the true-vs-perturbed pairs (same columns) as kind 'policy'."""
    from grpo.reward_modeling import build_tables

    overrides = ["data.num_train=4", "data.num_eval=4", "data.num_workers=0", "data.policy_contexts=2"]
    overrides += ["data.policy_eval_contexts=1", "data.policy_generations=4", "data.policy_margin=0.01"]
    recipe = load_recipe("recipes/toy_reward_model_on_policy.yaml", [f"output_dir={tmp_path}", *overrides])
    _, data = validate(recipe)
    assert data.policy == "checkpoints/toy_nsp" and data.next_overlap == 1
    train, held_out = build_tables(data)
    for table, contexts in ((train, 2), (held_out, 1)):
        kinds = list(table["kind"])
        assert kinds[:4] == ["wrong_direction", "frozen", "shuffled", "other_sample"]
        policy = table.select([i for i, k in enumerate(kinds) if k == "policy"]).with_format("numpy")
        assert 0 < len(policy) <= 6 * contexts  # at most 4 * 3 / 2 pairs per context
        reward = ToyWorldVerifiableReward()
        for row in policy:
            videos = [torch.from_numpy(row[c].astype(np.uint8)) for c in ("chosen", "rejected")]
            chosen, rejected = reward(videos, world=[row["world"]] * 2).scores
            assert chosen > rejected - 0.02  # ranked on float videos; uint8 storage moves scores a little
            assert not np.array_equal(row["chosen"], row["rejected"])
            # a sample continues its context: frame 0 repeats the last context frame (next_overlap 1)
            assert np.abs(row["chosen"][0].astype(int) - row["context"][-1].astype(int)).mean() < 40
    check_preferences(train, ["causal"], pairs=True)
    not_nsp = load_recipe("recipes/toy_reward_model_on_policy.yaml", ["data.policy=recipes"])
    assert "is not an NSP checkpoint" in one_line_error(validate, not_nsp)
