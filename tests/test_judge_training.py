"""Stage ``judge_sft``: the causal-consistency judge fine-tuned with TRL's SFTTrainer on verdict data.

End to end through ``nextscene train`` on the toy recipe (a tiny random Qwen2.5-VL judge, CPU): the
loss falls, the saved judge loads in the in-process judge and scores differently from the base. The
training prompt is checked token for token against what the judge sends when it scores. Bad inputs
(a manifest line with a missing video or a verdict that is neither label, a non-VL checkpoint) end
in one line and exit code 2, writing nothing.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from grpo.cli import main
from grpo.data import ToyWorld, ToyWorldConfig
from grpo.data.judge_data import read_verdict_manifest, toyworld_verdicts
from grpo.judge_training import JudgeCollator, frames, pair_order, verdict_loss
from policies.tiny_qwen_vl import build_tiny_qwen_vl
from policies.video_io import write_video
from rewards.judge.local import InProcessJudge
from rewards.judge.prompts import build_requests

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "toy_judge_sft.yaml"


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def p_yes(judge: InProcessJudge, table) -> list[float]:
    rows = [table[i] for i in range(len(table))]
    return judge([frames(r["candidate"]) for r in rows], None, [frames(r["context"]) for r in rows]).scores


def test_toy_recipe_trains_a_judge_that_loads_and_scores(tmp_path):
    run = tmp_path / "run"
    overrides = [f"output_dir={run}", "trainer.max_steps=20", "data.num_train=32", "data.num_eval=4"]
    assert main(["train", str(RECIPE), *overrides]) == 0
    logged = metrics(run)
    losses = [m["loss"] for m in logged if "loss" in m]
    assert len(losses) == 20
    assert sum(losses[-3:]) / 3 < 0.5 * sum(losses[:3]) / 3  # measured: ~5.5 -> ~1.0
    final = run / "final"
    assert (final / "model.safetensors").is_file() and not list(final.glob("*.bin")) + list(
        final.glob("*.pt")
    )
    trained = InProcessJudge(str(final), dtype="float32", num_frames=2)
    base = InProcessJudge(str(run / "base"), dtype="float32", num_frames=2)
    held_out = toyworld_verdicts(ToyWorld(ToyWorldConfig(), split="validation", num_samples=4), ["frozen"])
    before, after = p_yes(base, held_out), p_yes(trained, held_out)
    assert all(0 < p < 1 for p in after)
    # the verdicts are half yes: P(yes) moves from the random base (~0.41) towards 0.5 and beyond
    assert min(abs(a - b) for a, b in zip(after, before)) > 0.03
    assert {"base/separation", "eval/separation", "eval/accuracy"} <= set().union(*logged)


@pytest.mark.parametrize("mode", ["images", "clip"])
def test_training_prompt_is_exactly_what_the_judge_scores(tmp_path, mode):
    """The collator's prompt tokens (and pixels) equal the in-process judge's for the same request;
    the only label is the verdict's first token, one the judge counts for that answer."""
    path = build_tiny_qwen_vl(tmp_path / "judge")
    judge = InProcessJudge(str(path), dtype="float32", mode=mode, num_frames=3, aspects=("physics",))
    table = toyworld_verdicts(ToyWorld(ToyWorldConfig(), split="train", num_samples=2), ["shuffled"])
    collator = JudgeCollator(judge.tokenizer, judge.inputs_config, judge.config, judge.model.config)
    allowed = dict((i, text) for text, i in judge._allowed)
    for i in range(len(table)):
        row = table[i]
        encoded = collator.encode(row)
        request = build_requests(
            judge.config, [frames(row["candidate"])], [row["prompt"]], [frames(row["context"])], {}
        )[0]
        expected = judge.encode(request)
        prompt_length = expected["input_ids"].shape[1]
        assert torch.equal(encoded["input_ids"][:, :prompt_length], expected["input_ids"])
        pixels = "pixel_values" if mode == "images" else "pixel_values_videos"
        assert torch.equal(encoded[pixels], expected[pixels])
        labelled = (encoded["labels"][0] != -100).nonzero().flatten().tolist()
        assert labelled == [prompt_length]  # the verdict's first token, nothing else
        first = int(encoded["labels"][0, prompt_length])
        assert first == int(encoded["input_ids"][0, prompt_length])
        assert row["verdict"].startswith(allowed[first])  # the token the judge reads as this verdict
    batch = collator([table[0], table[1]])
    assert batch["input_ids"].shape[0] == 2 and batch["labels"].shape == batch["input_ids"].shape
    if mode == "images":
        assert batch["image_grid_thw"].shape[0] == 2 * 6  # 3 frames of each scene, both rows
    else:  # one video a row: 5 context + 3 candidate frames = 4 temporal patches
        assert batch["video_grid_thw"][:, 0].tolist() == [4, 4]


def test_aimed_verdict_rows_start_every_input_at_one_half_and_take_the_mass(tmp_path):
    """`aim_verdict_rows`: the verdicts' first-token rows become one vector, so P(yes) = P(no) for any
    input (held-out rows too), and those two tokens hold nearly all the answer's probability."""
    from grpo.judge_training import aim_verdict_rows

    judge = InProcessJudge(str(build_tiny_qwen_vl(tmp_path / "judge")), dtype="float32", mode="clip")
    collator = JudgeCollator(judge.tokenizer, judge.inputs_config, judge.config, judge.model.config)
    world = ToyWorld(ToyWorldConfig(next_overlap=1), split="train", num_samples=4)
    train = toyworld_verdicts(world, ["frozen", "other_sample"])
    before = p_yes(judge, train)
    aim_verdict_rows(judge.model, collator, [train[i] for i in range(len(train))])
    yes, no = (collator._completions[label][0] for label in ("yes", "no"))
    rows = judge.model.get_output_embeddings().weight
    assert torch.equal(rows[yes], rows[no])
    held_out = toyworld_verdicts(
        ToyWorld(ToyWorldConfig(next_overlap=1), split="validation", num_samples=2), ["frozen"]
    )
    batch = collator([held_out[i] for i in range(len(held_out))])
    labels = batch.pop("labels")
    with torch.no_grad():
        logits = judge.model(**batch).logits
    at = (labels != -100).nonzero()
    probs = logits[at[:, 0], at[:, 1] - 1].softmax(-1)
    assert (probs[:, yes] + probs[:, no]).min() > 0.9 and torch.allclose(probs[:, yes], probs[:, no])
    after = p_yes(judge, held_out)  # other first tokens of "yes"/"no" ("ye", "no") keep a little mass
    assert all(abs(p - 0.5) < 0.02 for p in after) and max(abs(p - 0.5) for p in before) > 0.05


def test_clip_mode_shows_the_end_of_the_context_then_the_next_scene_as_one_video():
    """``mode: clip``: one video of context frames 0, 2, 4, 6, 8 then candidate frames 1, 3, 5 (one
    2-frame grid across the cut, the last context frame and the first new one in one temporal patch);
    scenes of two sizes are a one-line error."""
    from policies.errors import InputError
    from rewards.judge.config import JudgeConfig
    from rewards.judge.local import unpack_media

    context = torch.arange(9).mul(10).view(9, 1, 1, 1).expand(9, 16, 16, 3).to(torch.uint8)
    candidate = (context + 100).to(torch.uint8)
    config = JudgeConfig(mode="clip", num_frames=3, context_frames=5, frame_stride=2)
    request = build_requests(config, [candidate], None, [context], {})[0]
    _, images, videos = unpack_media(request["messages"])
    assert not images and len(videos) == 1
    levels = videos[0].float().mean(dim=(1, 2, 3)).tolist()  # JPEG of a flat frame: within a level
    assert levels == pytest.approx([0, 20, 40, 60, 80, 110, 130, 150], abs=1.5)
    with pytest.raises(InputError, match="one size"):
        build_requests(config, [candidate[:, :8]], None, [context], {})


def test_shown_frames_are_the_candidate_frames_each_mode_shows():
    """`shown_frames`, by hand: ``clip`` the first frames on the stride grid (clamped at the end),
    ``images``/``video`` evenly spaced with first and last, ``text`` none; the requests show exactly
    those frames of the candidate."""
    from policies.errors import InputError
    from rewards.judge.config import JudgeConfig
    from rewards.judge.local import unpack_media
    from rewards.judge.prompts import sample_frames, shown_frames

    assert shown_frames(9, "clip", 3, 2) == [1, 3, 5]
    assert shown_frames(9, "clip", 5, 2) == [1, 3, 5, 7, 8]
    assert shown_frames(9, "clip", 2, 3) == [2, 5]
    for mode in ("images", "video"):
        assert shown_frames(9, mode, 4, 2) == [0, 3, 5, 8]
        assert shown_frames(6, mode, 3, 2) == [0, 2, 5]
        assert shown_frames(9, mode, 1, 2) == [8]
        assert shown_frames(3, mode, 4, 2) == [0, 1, 2]
    assert shown_frames(9, "text", 4, 2) == []
    with pytest.raises(InputError, match="judge mode 'audio'"):
        shown_frames(9, "audio", 4, 2)
    video = torch.arange(9).view(9, 1, 1, 1).expand(9, 2, 2, 3)
    assert sample_frames(video, 4)[:, 0, 0, 0].tolist() == [0, 3, 5, 8]
    # what a clip request shows of a candidate whose frame f has level 100 + 10 f
    context = torch.zeros(9, 16, 16, 3, dtype=torch.uint8)
    candidate = torch.arange(9).mul(10).add(100).view(9, 1, 1, 1).expand(9, 16, 16, 3).to(torch.uint8)
    config = JudgeConfig(mode="clip", num_frames=5, context_frames=1, frame_stride=2)
    _, _, videos = unpack_media(build_requests(config, [candidate], None, [context], {})[0]["messages"])
    levels = videos[0].float().mean(dim=(1, 2, 3)).tolist()[1:]
    assert levels == pytest.approx([100 + 10 * f for f in [1, 3, 5, 7, 8]], abs=1.5)


def test_gpu_recipe_validates_and_runs_two_steps_with_batches_built_by_worker_processes(tmp_path):
    """recipes/toy_judge_sft_gpu.yaml as is (the reward model's tiny size, clip mode, the policy's own
    samples), shrunk to two steps of 4 rows whose batches two dataloader processes build."""
    run = tmp_path / "run"
    overrides = [f"output_dir={run}", "trainer.max_steps=2", "trainer.per_device_train_batch_size=4"]
    overrides += ["trainer.warmup_steps=0", "trainer.logging_steps=1", "trainer.dataloader_num_workers=2"]
    overrides += ["data.num_train=4", "data.num_eval=2", "data.num_workers=0", "data.policy_contexts=1"]
    overrides += ["data.policy_eval_contexts=1", "data.policy_generations=2"]
    assert main(["train", str(REPO / "recipes" / "toy_judge_sft_gpu.yaml"), *overrides]) == 0
    losses = [m["loss"] for m in metrics(run) if "loss" in m]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    config = json.loads((run / "final" / "config.json").read_text())
    assert config["text_config"]["hidden_size"] == 256 and config["vision_config"]["patch_size"] == 2
    assert config["vision_config"]["window_size"] == 32  # one window a frame
    judge = InProcessJudge(str(run / "final"), dtype="float32", mode="clip", num_frames=3)
    table = toyworld_verdicts(
        ToyWorld(ToyWorldConfig(next_overlap=1), split="test", num_samples=2), ["frozen"]
    )
    assert all(0 < p < 1 for p in p_yes(judge, table))


def test_pair_order_puts_a_yes_and_a_no_of_one_context_side_by_side():
    """Every row appears; at even positions, a yes followed by a no is always one group's pair, and
    each group gives min(#yes, #no) such pairs (leftovers never form a yes-then-no unit)."""
    groups = ["a", "a", "a", "b", "b", "c", "c", "c", "c", None, None, "d"]
    yes = [True, False, False, True, True, False, True, True, False, True, False, False]
    for n in (12, 11):  # 6 leftover rows; 5, one of which then comes twice
        order = pair_order(groups[:n], yes[:n], torch.Generator().manual_seed(n))
        assert set(order) == set(range(n)) and len(order) == 12
        pairs = [(i, j) for i, j in zip(order[0::2], order[1::2]) if yes[i] and not yes[j]]
        assert all(groups[i] == groups[j] for i, j in pairs)
        assert sorted(groups[i] for i, _ in pairs) == ["a", "c", "c"]
        assert pair_order(groups[:n], yes[:n], torch.Generator().manual_seed(n)) == order  # seeded


def test_verdict_loss_is_the_cross_entropy_plus_bradley_terry_on_the_pairs():
    """Checked against transformers' own loss (weight 0) and a closed-form Bradley-Terry term."""
    torch.manual_seed(0)
    yes_id, no_id, vocab = 3, 5, 9
    logits = torch.randn(4, 6, vocab)
    labels = torch.full((4, 6), -100)
    labels[:, 4] = torch.tensor([yes_id, no_id, no_id, yes_id])  # pair (0, 1); (2, 3) is no-then-yes
    out = type("Out", (), {"logits": logits})()
    from transformers.loss.loss_utils import ForCausalLMLoss

    ce = ForCausalLMLoss(logits, labels, vocab)
    assert verdict_loss(out, labels, [yes_id, no_id], 0.0) == pytest.approx(ce.item(), abs=1e-6)
    at = logits[:, 3]
    d = torch.log_softmax(at, -1)[:, yes_id] - torch.log_softmax(at, -1)[:, no_id]
    bt = -torch.nn.functional.logsigmoid(d[0] - d[1])
    assert verdict_loss(out, labels, [yes_id, no_id], 0.5) == pytest.approx((ce + 0.5 * bt).item(), abs=1e-6)


def test_cross_context_pairs_fall_by_the_margin_and_the_mask_picks_what_the_pair_term_counts():
    """``trainer.cross_pair_margin``: `pair_order` adds share / (1 - share) x as many units of two
    scored rows of any groups, the first's score above the second's by more than the margin (every
    such pair is drawn, unscored rows never); `JudgeCollator.pair_mask` marks those and the yes-no
    units; `verdict_loss` then averages the Bradley-Terry term over exactly the marked pairs."""
    from grpo.judge_training import cross_pairs

    groups = ["a", "a", "b", "b", "c", "c", "d"]
    yes = [True, False, True, False, False, False, False]
    scores = [None, None, 0.9, 0.3, 0.45, 0.1, 0.2]
    valid = {(2, 3), (2, 4), (2, 5), (2, 6), (4, 5), (4, 6)}  # score[i] - score[j] > 0.2
    drawn = cross_pairs(scores, 0.2, 400, torch.Generator().manual_seed(0))
    assert len(drawn) == 400 and {tuple(p) for p in drawn} == valid
    assert cross_pairs([0.5, 0.4, None], 0.2, 10, torch.Generator()) == []
    plain = pair_order(groups, yes, torch.Generator().manual_seed(1))
    order = pair_order(groups, yes, torch.Generator().manual_seed(1), scores, 0.2, share=0.75)
    assert len(order) == 4 * len(plain)  # 4 units, then 12 cross ones
    units = list(zip(order[0::2], order[1::2]))
    assert sum(u in valid for u in units) >= 12
    assert order == pair_order(groups, yes, torch.Generator().manual_seed(1), scores, 0.2, share=0.75)

    collator = JudgeCollator.__new__(JudgeCollator)
    collator.config, collator.pair_margin = type("C", (), {"choices": ("yes", "no")})(), 0.2
    rows = [{"verdict": "yes" if y else "no", "score": s} for y, s in zip(yes, scores)]
    batch = [rows[i] for i in (0, 1, 4, 5, 5, 4, 2, 6, 1, 0)]
    assert collator.pair_mask(batch).tolist() == [True, True, False, True, False]

    torch.manual_seed(0)
    yes_id, no_id, vocab = 3, 5, 9
    logits = torch.randn(10, 6, vocab)
    labels = torch.full((10, 6), -100)
    labels[:, 4] = torch.tensor([yes_id if r["verdict"] == "yes" else no_id for r in batch])
    out = type("Out", (), {"logits": logits})()
    ce = verdict_loss(out, labels, [yes_id, no_id], 0.0)
    log_p = torch.log_softmax(logits[:, 3], -1)
    d = log_p[:, yes_id] - log_p[:, no_id]
    bt = [-torch.nn.functional.logsigmoid(d[i] - d[i + 1]) for i in (0, 2, 6)]  # the marked pairs
    mask = collator.pair_mask(batch)
    got = verdict_loss(out, labels, [yes_id, no_id], 1.0, pair_mask=mask)
    assert got == pytest.approx((ce + sum(bt) / 3).item(), abs=1e-6)


def test_cross_pairs_without_the_pair_term_fail_in_one_line(tmp_path, capsys):
    argv = ["train", str(RECIPE), f"output_dir={tmp_path / 'run'}", "trainer.cross_pair_margin=0.2"]
    fails_in_one_line(capsys, tmp_path, argv, "cross_pair_margin", "pair_loss_weight")


def test_pair_term_sees_a_yes_and_a_no_of_one_context_in_every_batch(tmp_path):
    """Through ``nextscene train``: with the verdict rows aimed (P(yes) = P(no) for every input) and a
    learning rate too small to move them, every step's loss is the verdict's (ln 2 and the little
    mass left to other tokens: 0.009 here) + ln 2 (the pair term) when each batch holds a true and a
    perturbed continuation of one context side by side; TRL's shuffled rows rarely do (then ~0.70)."""
    run = tmp_path / "run"
    overrides = [f"output_dir={run}", "policy.aim_verdict=true", "trainer.pair_loss_weight=1.0"]
    overrides += [
        "trainer.max_steps=4",
        "trainer.per_device_train_batch_size=4",
        "trainer.learning_rate=1e-12",
    ]
    overrides += ["data.num_train=8", "data.num_eval=2", "trainer.logging_steps=1"]
    assert main(["train", str(RECIPE), *overrides]) == 0
    losses = [m["loss"] for m in metrics(run) if "loss" in m]
    assert losses == pytest.approx([2 * math.log(2)] * 4, abs=0.02)


def test_pair_term_with_an_odd_batch_fails_in_one_line(tmp_path, capsys):
    argv = ["train", str(RECIPE), f"output_dir={tmp_path / 'run'}", "trainer.pair_loss_weight=1"]
    fails_in_one_line(
        capsys,
        tmp_path,
        [*argv, "trainer.per_device_train_batch_size=3"],
        "per_device_train_batch_size",
        "even",
    )


# ------------------------------------------------------------------------------------------ bad inputs
def fails_in_one_line(capsys, root: Path, argv: list[str], *messages: str) -> None:
    before = sorted(p for p in root.rglob("*"))
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for message in messages:
        assert message in err, err
    assert sorted(p for p in root.rglob("*")) == before


def manifest_recipe(tmp_path: Path, lines: list[dict]) -> Path:
    video = torch.rand(5, 32, 32, 3)
    write_video(tmp_path / "a.npz", video, fps=8)
    write_video(tmp_path / "b.npz", video.flip(0), fps=8)
    manifest = tmp_path / "verdicts.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    recipe = yaml.safe_load(RECIPE.read_text())
    recipe["data"] = {"type": "verdict_manifest", "path": str(manifest)}
    recipe["output_dir"] = str(tmp_path / "run")
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_verdict_manifest_reads_rows(tmp_path):
    manifest_recipe(tmp_path, [{"context": "a.npz", "candidate": "b.npz", "verdict": "no"}])
    table = read_verdict_manifest(tmp_path / "verdicts.jsonl")
    assert (
        len(table) == 1
        and table[0]["verdict"] == "no"
        and tuple(table[0]["candidate"].shape) == (5, 32, 32, 3)
    )


def test_manifest_with_a_missing_video_fails_naming_file_and_line(tmp_path, capsys):
    good = {"context": "a.npz", "candidate": "b.npz", "verdict": "yes"}
    recipe = manifest_recipe(tmp_path, [good, {**good, "candidate": "gone.npz"}])
    fails_in_one_line(capsys, tmp_path, ["train", str(recipe)], "verdicts.jsonl:2", "gone.npz", "not found")


def test_manifest_with_a_bad_verdict_fails_naming_file_and_line(tmp_path, capsys):
    good = {"context": "a.npz", "candidate": "b.npz", "verdict": "yes"}
    recipe = manifest_recipe(tmp_path, [good, good, {**good, "verdict": "maybe"}])
    fails_in_one_line(capsys, tmp_path, ["train", str(recipe)], "verdicts.jsonl:3", "'maybe'", "neither")


def test_non_vl_checkpoint_fails_before_training(tmp_path, capsys):
    llm = tmp_path / "llm"
    llm.mkdir()
    (llm / "config.json").write_text(
        json.dumps({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]})
    )
    save_file({"w": torch.zeros(1)}, str(llm / "model.safetensors"))
    recipe = yaml.safe_load(RECIPE.read_text())
    recipe["policy"] = {"type": "qwen_vl_judge", "path": str(llm)}
    recipe["output_dir"] = str(tmp_path / "run")
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    fails_in_one_line(capsys, tmp_path, ["train", str(path)], "'qwen2' checkpoint", "Qwen2-VL / Qwen2.5-VL")


def test_unknown_judge_key_is_a_did_you_mean_error(tmp_path, capsys):
    fails_in_one_line(
        capsys, tmp_path, ["train", str(RECIPE), f"output_dir={tmp_path / 'run'}", "policy.tiny_spc={}"],
        "tiny_spec",
    )  # fmt: skip


@pytest.mark.parametrize("stage_listed", ["judge_sft"])
def test_train_help_lists_the_stage(capsys, stage_listed):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert stage_listed in capsys.readouterr().out


def test_policy_samples_join_the_verdicts_labelled_by_the_verifiable_reward(tmp_path, capsys):
    """``data.policy``: the shipped NSP policy's own samples become rows of kind 'policy', "yes"
    exactly when toyworld_verifiable gives them >= 0.5 (rescored here from the stored frames)."""
    from grpo.config import ConfigError
    from grpo.data.video import to_uint8
    from grpo.judge_training import build_rows
    from grpo.recipe import load_recipe
    from grpo.train import validate
    from rewards.verifiable import ToyWorldVerifiableReward

    overrides = [
        f"output_dir={tmp_path / 'run'}",
        "data.num_train=2",
        "data.num_eval=2",
        "data.next_overlap=1",
    ]
    overrides += ["data.policy=checkpoints/toy_nsp", "data.policy_contexts=2", "data.policy_eval_contexts=1"]
    overrides += ["data.policy_generations=3"]
    _, data = validate(load_recipe(RECIPE, overrides))
    train, held_out = build_rows(data, ("yes", "no"))
    reward = ToyWorldVerifiableReward()
    config = ToyWorldConfig(next_overlap=1)
    for table, split, contexts in ((train, "train", 2), (held_out, "validation", 1)):
        kinds = list(table["kind"])
        assert kinds[:4] == ["true", "wrong_direction", "true", "frozen"]
        rows = [table[i] for i in range(len(table)) if kinds[i] == "policy"]
        assert len(rows) == 3 * contexts
        world = ToyWorld(config, split=split, num_samples=contexts)
        for i, row in enumerate(rows):
            sample = world[i // 3]
            assert torch.equal(frames(row["context"]), torch.as_tensor(to_uint8(sample["context"])))
            score = reward([frames(row["candidate"])], world=[sample["world"]]).scores[0]
            if abs(score - 0.5) > 0.02:  # scored on float videos; uint8 storage moves scores a little
                assert row["verdict"] == ("yes" if score >= 0.5 else "no")
    bad = load_recipe(RECIPE, [*overrides, "data.policy=recipes"])
    with pytest.raises(ConfigError, match="is not an NSP checkpoint"):
        validate(bad)


def test_synthetic_failures_damage_the_truth_as_specified():
    """`synthetic_failure` against hand computations: fade blends the balls into the context's empty
    scene by the drawn keep-ramp, blur is a replicate-padded Gaussian (recomputed here by explicit
    neighbour sums), shift moves only the balls; frame 0 (the context's last) is kept."""
    import numpy as np

    from grpo.data.judge_data import synthetic_failure
    from grpo.data.video import to_uint8

    sample = ToyWorld(ToyWorldConfig(next_overlap=1), split="train", num_samples=1)[0]
    context = np.asarray(to_uint8(sample["context"]), dtype=np.float64)
    truth = np.asarray(to_uint8(sample["next"]), dtype=np.float64)
    frames_, ramp = len(truth), np.linspace(0, 1, len(truth))
    chroma = context.max(-1) - context.min(-1)
    static = np.take_along_axis(context, chroma.argmin(0)[None, ..., None], 0)[0]

    def draw(kind, seed=3):
        out = synthetic_failure(sample["context"], sample["next"], kind, np.random.default_rng(seed))
        assert out.dtype == torch.uint8 and out.shape == truth.shape
        assert torch.equal(out[0], torch.as_tensor(truth[0]).to(torch.uint8))  # frame 0 untouched
        return out.numpy().astype(np.float64)

    gone_at = np.random.default_rng(3).uniform(0.25, 1.25)
    keep = np.clip(1 - ramp / gone_at, 0, None)[:, None, None, None]
    assert np.abs(draw("fade") - np.round(static + keep * (truth - static))).max() <= 1

    sigma = ramp * np.random.default_rng(3).uniform(1.0, 4.0)
    size = truth.shape[1]
    expected = np.zeros_like(truth)
    for f in range(frames_):
        w = np.exp(-(np.arange(-4, 5) ** 2) / (2 * max(sigma[f], 1e-3) ** 2))
        w /= w.sum()
        for dy in range(-4, 5):
            for dx in range(-4, 5):
                rows = np.clip(np.arange(size) + dy, 0, size - 1)
                cols = np.clip(np.arange(size) + dx, 0, size - 1)
                expected[f] += w[dy + 4] * w[dx + 4] * truth[f][rows][:, cols]
    assert np.abs(draw("blur") - np.round(expected)).max() <= 1
    assert np.abs(draw("blur")[-1] - truth[-1]).max() > 20  # visibly blurred by the last frame

    shifted = draw("shift")
    balls = lambda video: (video.max(-1) - video.min(-1)) > 60  # noqa: E731
    assert (balls(shifted[-1]) != balls(truth[-1])).any()  # the balls moved ...
    assert np.array_equal(shifted[-1][static.max(-1) > 60], static[static.max(-1) > 60])  # the walls not
    smeared = draw("smear")
    assert not np.array_equal(smeared, truth) and smeared[-1].sum() > 0


def test_synthetic_verdicts_are_labelled_by_the_verifier_and_reproducible(tmp_path):
    """``data.synthetic_failures``: each training and held-out sample gets one row per listed failure,
    in its context's group, "yes" exactly when toyworld_verifiable gives it >= 0.5 (fades pass or fail
    by scene: both labels occur); the rows follow the recipe's seed; an unknown kind is a ConfigError."""
    from grpo.config import ConfigError
    from grpo.data.video import to_uint8
    from grpo.judge_training import build_rows
    from grpo.recipe import load_recipe
    from grpo.train import validate
    from rewards.verifiable import ToyWorldVerifiableReward

    overrides = [f"output_dir={tmp_path / 'run'}", "data.num_train=6", "data.num_eval=2"]
    overrides += ["data.next_overlap=1", "data.synthetic_failures=[fade,fade,shift]"]
    _, data = validate(load_recipe(RECIPE, overrides))
    train, held_out = build_rows(data, ("yes", "no"), seed=0)
    reward = ToyWorldVerifiableReward()
    verdicts = []
    for table, split, n in ((train, "train", 6), (held_out, "validation", 2)):
        rows = [table[i] for i in range(len(table)) if table[i]["kind"].startswith("synthetic_")]
        assert [r["kind"] for r in rows] == ["synthetic_fade", "synthetic_fade", "synthetic_shift"] * n
        world = ToyWorld(ToyWorldConfig(next_overlap=1), split=split, num_samples=n)
        for j, row in enumerate(rows):
            sample = world[j // 3]
            assert row["group"] == f"pair{j // 3}"
            assert torch.equal(frames(row["context"]), torch.as_tensor(to_uint8(sample["context"])))
            score = reward([frames(row["candidate"])], world=[sample["world"]]).scores[0]
            assert row["verdict"] == ("yes" if score >= 0.5 else "no")
            verdicts.append(row["verdict"])
    assert {"yes", "no"} <= set(verdicts)
    again, _ = build_rows(data, ("yes", "no"), seed=0)
    other, _ = build_rows(data, ("yes", "no"), seed=1)
    fade = [i for i in range(len(train)) if train[i]["kind"] == "synthetic_fade"]
    assert all(torch.equal(again[i]["candidate"], train[i]["candidate"]) for i in fade)
    assert not all(torch.equal(other[i]["candidate"], train[i]["candidate"]) for i in fade)
    with pytest.raises(ConfigError, match="synthetic_failures"):
        validate(load_recipe(RECIPE, [*overrides[:-1], "data.synthetic_failures=[melt]"]))


def test_verified_perturbations_are_labelled_by_the_verifier_in_worker_processes_too():
    """``data.verify_perturbed``: true and perturbed rows get the verifier's score and its verdict (a
    shuffled future of a scene whose balls barely move passes: both labels occur among the perturbed);
    without it every perturbed row is "no" and unscored. Scoring in worker processes gives the same."""
    from grpo.data.judge_data import _verify
    from grpo.data.video import to_uint8
    from rewards.verifiable import ToyWorldVerifiableReward

    world = ToyWorld(ToyWorldConfig(next_overlap=1), split="test", num_samples=12)
    plain = toyworld_verdicts(world, ["shuffled", "frozen"])
    verified = toyworld_verdicts(world, ["shuffled", "frozen"], verify=True)
    assert [plain[i]["verdict"] for i in range(1, 24, 2)] == ["no"] * 12 and plain[1]["score"] is None
    reward = ToyWorldVerifiableReward()
    for i in range(24):
        row, sample = verified[i], world[i // 2]
        assert torch.equal(frames(row["candidate"]), frames(plain[i]["candidate"]))
        truth = reward([frames(row["candidate"])], world=[sample["world"]]).scores[0]
        assert row["score"] == pytest.approx(truth) and row["verdict"] == ("yes" if truth >= 0.5 else "no")
    assert {verified[i]["verdict"] for i in range(1, 24, 2)} == {"yes", "no"}
    videos = [torch.as_tensor(to_uint8(world[i % 12]["next"])) for i in range(256)]
    worlds = [json.dumps(world[i % 12]["world"]) for i in range(256)]
    assert _verify(videos, worlds, num_workers=2) == _verify(videos[:12], worlds[:12], num_workers=0) * 21 + (
        _verify(videos[:4], worlds[:4], num_workers=0)
    )


def test_a_recipe_with_verify_perturbed_builds_verified_rows(tmp_path):
    """``data.verify_perturbed: true`` reaches the training and held-out tables: every true and
    perturbed row carries a verifiable score and the verdict it implies."""
    from grpo.judge_training import build_rows
    from grpo.recipe import load_recipe
    from grpo.train import validate

    overrides = [f"output_dir={tmp_path / 'run'}", "data.num_train=6", "data.num_eval=2"]
    _, data = validate(load_recipe(RECIPE, [*overrides, "data.verify_perturbed=true"]))
    for table in build_rows(data, ("yes", "no"), seed=0):
        rows = [table[i] for i in range(len(table))]
        assert rows and all(r["score"] is not None for r in rows)
        assert all(r["verdict"] == ("yes" if r["score"] >= 0.5 else "no") for r in rows)
    _, plain = validate(load_recipe(RECIPE, overrides))
    assert all(plain_row["score"] is None for plain_row in build_rows(plain, ("yes", "no"), seed=0)[0])
