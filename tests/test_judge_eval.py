"""Judging the judge: AUROC of P(yes) against "verifiable reward >= 0.5" and Spearman with it, on
held-out toy candidates (true, perturbed, the shipped policy's own samples)."""

from __future__ import annotations

import math

import pytest

from grpo.data import ToyWorld, ToyWorldConfig
from grpo.judge_training import HeldOutCandidates, auroc, held_out_candidates, judge_auroc, verifier_ceiling
from policies.errors import InputError
from policies.tiny_qwen_vl import build_tiny_qwen_vl
from rewards.judge.config import JudgeConfig
from rewards.judge.local import InProcessJudge
from rewards.types import RewardOutput
from rewards.verifiable import ToyWorldVerifiableReward


def test_auroc_is_the_chance_a_positive_outscores_a_negative():
    assert auroc([0.9, 0.8, 0.1, 0.2], [True, True, False, False]) == 1.0
    assert auroc([0.1, 0.2, 0.9, 0.8], [True, True, False, False]) == 0.0
    assert auroc([0.5, 0.5, 0.5], [True, False, False]) == 0.5
    # positives 0.7, 0.3 vs negatives 0.5, 0.3: pairs (>, >), (<, =) -> (1 + 1 + 0 + 0.5) / 4
    assert auroc([0.7, 0.3, 0.5, 0.3], [True, True, False, False]) == pytest.approx(0.625)
    assert math.isnan(auroc([0.1, 0.2], [True, True]))


class OracleJudge:
    """A stand-in judge whose P(yes) is a given function of the candidate index."""

    def __init__(self, values, **config):
        self.config = JudgeConfig(**config)
        self.values = values

    def __call__(self, videos, prompts=None, contexts=None, **metadata):
        assert len(videos) == len(contexts) == len(self.values)
        return RewardOutput(list(self.values), {self.config.label_column: list(self.values)})


def test_held_out_candidates_span_good_and_bad_and_the_metrics_read_them():
    held_out = held_out_candidates(3, generations=2, seed=5)
    kinds = held_out.kinds
    assert kinds.count("true") == 3 and kinds.count("policy") == 6 and kinds.count("frozen") == 3
    true = [v for v, k in zip(held_out.verifiable, kinds) if k == "true"]
    assert min(true) > 0.95  # the truth scores ~1; other_sample (another scene's future) ~0
    assert max(v for v, k in zip(held_out.verifiable, kinds) if k == "other_sample") < 0.5
    assert all(c.shape[0] == held_out.contexts[0].shape[0] for c in held_out.contexts)
    oracle = judge_auroc(OracleJudge(held_out.verifiable), held_out)
    assert oracle["auroc"] == 1.0 and oracle["spearman"] == pytest.approx(1.0)
    assert oracle["positives"] >= 3 and oracle["candidates"] == len(kinds)
    assert sum(oracle[f"positives/{k}"] for k in set(kinds)) == oracle["positives"]
    assert oracle["p_yes_pass/true"] == pytest.approx(sum(true) / 3)  # the oracle's P is the verifier's
    assert oracle["p_yes_fail/other_sample"] < 0.5 and "p_yes_pass/other_sample" not in oracle
    anti = judge_auroc(OracleJudge([-v for v in held_out.verifiable]), held_out)
    assert anti["auroc"] == 0.0 and anti["spearman"] == pytest.approx(-1.0)
    reward = ToyWorldVerifiableReward()  # each candidate's world is the truth it was scored against
    scores = [reward.score_video(c, w)["score"] for c, w in zip(held_out.candidates, held_out.worlds)]
    assert scores == pytest.approx(held_out.verifiable, abs=1e-12)
    # the default judge is shown candidate frames 0, 3, 5, 8 of 9
    assert {k: v for k, v in oracle.items() if k.startswith("ceiling/")} == verifier_ceiling(
        held_out, [0, 3, 5, 8]
    )
    assert set(anti) - set(oracle) == set() and "ceiling/policy/auroc" in oracle


def test_misranked_pairs_say_where_the_auroc_is_lost():
    """Each (passing kind, failing kind) share counts the pairs a judge orders wrongly, by hand here,
    and the shares add up to what `auroc` misses."""
    held_out = held_out_candidates(3, generations=2, seed=5)
    kinds, passing = held_out.kinds, [v >= 0.5 for v in held_out.verifiable]
    # a judge that ranks every candidate by its index: half right, half wrong, some ties
    values = [round(i / 7) for i in range(len(kinds))]
    result = judge_auroc(OracleJudge(values), held_out)
    good = [i for i, ok in enumerate(passing) if ok]
    bad = [i for i, ok in enumerate(passing) if not ok]
    shares = {k: v for k, v in result.items() if k.startswith("misranked/")}
    assert set(shares) == {f"misranked/{kinds[g]}/{kinds[b]}" for g in good for b in bad}
    for key, share in shares.items():
        _, a, b = key.split("/")
        counted = sum(
            1.0 if values[i] < values[j] else 0.5 if values[i] == values[j] else 0.0
            for i in good if kinds[i] == a for j in bad if kinds[j] == b
        )  # fmt: skip
        assert share == pytest.approx(counted / (len(good) * len(bad)))
    assert 0 < sum(shares.values()) < 1
    assert sum(shares.values()) == pytest.approx(1 - result["auroc"])
    oracle = judge_auroc(OracleJudge(held_out.verifiable), held_out)
    assert all(v == 0 for k, v in oracle.items() if k.startswith("misranked/"))


def _spliced_candidates(policy_context: int = 1) -> HeldOutCandidates:
    """Two toy contexts, each with its true next scene, another scene's (``other``) and ``other``
    with the true frames 1, 3, 5 spliced in; the candidates of context ``policy_context`` are kind
    ``policy``."""
    world = ToyWorld(ToyWorldConfig(size=32, next_overlap=1), split="test", num_samples=3)
    reward = ToyWorldVerifiableReward()
    out = HeldOutCandidates([], [], [], [], [])
    for i in range(2):
        sample, other = world[i], world[i + 1]["next"]
        spliced = other.clone()
        spliced[[1, 3, 5]] = sample["next"][[1, 3, 5]]
        for kind, video in (("true", sample["next"]), ("spliced", spliced), ("other_sample", other)):
            out.contexts.append(sample["context"])
            out.candidates.append(video)
            out.worlds.append(sample["world"])
            out.kinds.append("policy" if i == policy_context else kind)
            out.verifiable.append(reward.score_video(video, sample["world"])["score"])
    return out


def test_verifier_ceiling_is_the_verifier_on_the_shown_frames_only():
    """A candidate right on the shown frames and wrong between them (``spliced``) fails the verifier
    but looks as good as the truth there: the ceiling counts that pair a tie. By hand from
    `score_frames`, pair by pair."""
    held_out = _spliced_candidates()
    passing = [v >= 0.5 for v in held_out.verifiable]
    assert passing == [True, False, False] * 2  # the spliced scenes fail over all frames
    # shown everything, the verifier ranks itself perfectly: every passing score is >= 0.5 > every failing one
    assert verifier_ceiling(held_out, range(9)) == {"ceiling/auroc": 1.0, "ceiling/policy/auroc": 1.0}
    reward = ToyWorldVerifiableReward()
    shown = [reward.score_frames(c, w, [1, 3, 5]) for c, w in zip(held_out.candidates, held_out.worlds)]
    good = [s for s, ok in zip(shown, passing) if ok]
    bad = [s for s, ok in zip(shown, passing) if not ok]
    pairs = [1.0 if g > b else 0.5 if g == b else 0.0 for g in good for b in bad]
    by_hand = sum(pairs) / len(pairs)
    ceiling = verifier_ceiling(held_out, [1, 3, 5])
    assert ceiling["ceiling/auroc"] == pytest.approx(by_hand) and by_hand < 0.9
    # the policy's three: the truth ties its spliced copy on frames 1, 3, 5 and beats the other scene
    assert ceiling["ceiling/policy/auroc"] == 0.75
    assert verifier_ceiling(held_out, [5, 3, 1, 3]) == ceiling  # the frames shown, as a set
    assert "ceiling/policy/auroc" not in verifier_ceiling(_spliced_candidates(policy_context=2), [1, 3, 5])


def test_judge_auroc_reports_the_ceiling_of_the_frames_its_judge_is_shown():
    held_out = held_out_candidates(2, policy=None)
    values = list(held_out.verifiable)
    clip = judge_auroc(OracleJudge(values, mode="clip", num_frames=3, frame_stride=2), held_out)
    assert clip["ceiling/auroc"] == verifier_ceiling(held_out, [1, 3, 5])["ceiling/auroc"]
    assert clip["ceiling/auroc"] < 1 and "ceiling/policy/auroc" not in clip  # frames 7, 8 unseen
    every = judge_auroc(OracleJudge(values, mode="images", num_frames=9), held_out)
    assert every["ceiling/auroc"] == 1.0
    text = judge_auroc(OracleJudge(values, mode="text"), held_out)  # shown no frames: no ceiling
    assert text["auroc"] == 1.0 and not any(k.startswith("ceiling/") for k in text)
    held_out.candidates[0] = held_out.candidates[0][:8]
    with pytest.raises(InputError, match=r"the candidates have \[8, 9\] frames"):
        judge_auroc(OracleJudge(values), held_out)
    text = judge_auroc(OracleJudge(values, mode="text"), held_out)  # shown no frames: any length will do
    assert text["auroc"] == 1.0


def test_a_real_tiny_judge_is_scored(tmp_path):
    held_out = held_out_candidates(2, policy=None)
    judge = InProcessJudge(str(build_tiny_qwen_vl(tmp_path / "judge")), dtype="float32", num_frames=2)
    result = judge_auroc(judge, held_out)
    assert 0.0 <= result["auroc"] <= 1.0 and "policy/auroc" not in result
    assert all(0 < result[f"p_yes/{k}"] < 1 for k in ("true", "frozen", "other_sample"))


def test_benchmark_writes_results_and_the_judges_provenance(tmp_path, monkeypatch):
    """benchmarks/judge_auroc.py --provenance DIR: DIR/provenance.json holds the command that trains
    (the recipe) and measures (this invocation) the judge and the figures it printed."""
    import importlib.util
    import json
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("judge_auroc", repo / "benchmarks" / "judge_auroc.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    judge = str(build_tiny_qwen_vl(tmp_path / "run" / "final"))
    other = str(build_tiny_qwen_vl(tmp_path / "other_run" / "final"))  # scored, not this judge's run
    recipe = "recipes/toy_judge_sft_gpu.yaml"
    out = tmp_path / "auroc.json"
    argv = ["--recipe", recipe, "--judge", judge, other, "--contexts", "2", "--generations", "0"]
    argv += ["--json", str(out), "--provenance", judge, "--train-overrides", "trainer.learning_rate=1e-4"]
    monkeypatch.chdir(repo)
    monkeypatch.setattr(sys, "argv", ["judge_auroc.py", *argv])
    bench.main()
    results = json.loads(out.read_text())
    assert results[0]["judge_kwargs"]["mode"] == "clip"  # the recipe's question
    provenance = json.loads((Path(judge) / "provenance.json").read_text())
    train = f"nextscene train {recipe} trainer.learning_rate=1e-4"
    assert provenance["command"].startswith(f"{train} && python benchmarks/judge_auroc.py ")
    assert f"--judge {judge} --contexts 2 --generations 0" in provenance["command"]
    assert f"--provenance {judge}" in provenance["command"] and other not in provenance["command"]
    assert set(provenance["measured"]) == {judge, other, "held_out"}
    assert provenance["judge_kwargs"] == results[0]["judge_kwargs"]
    assert provenance["measured"][judge]["auroc"] == results[0]["auroc"]
    with pytest.raises(SystemExit):  # a provenance needs the recipe that trained the judge
        monkeypatch.setattr(sys, "argv", ["judge_auroc.py", "--judge", judge, "--provenance", judge])
        bench.main()
