"""``trainer.overlap_update`` (one step off-policy: iteration t updates on batch t-1 while batch t
is decoded and scored) and ``trainer.compile``: the update at iteration t uses exactly batch t-1
(checked against a hand-driven sequence of rollouts and updates), a resumed run is bitwise the
uninterrupted one, decode + reward hide behind the update, and the combinations that cannot work
fail with one line."""

import time

import pytest
import torch

from grpo.config import ConfigError, GRPOConfig
from grpo.trainer import GRPOTrainer
from policies import LTXPolicy
from policies.errors import InputError
from policies.tiny import build_tiny_ltx

ROWS = [{"prompt": "a ball"}, {"prompt": "a red cube"}, {"prompt": "two cats"}]


def redness(videos, prompts, contexts, **metadata):
    return [float((v[..., 0] - 0.5 * (v[..., 1] + v[..., 2])).mean()) for v in videos]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_ltx(tmp_path_factory.mktemp("tiny_ltx"))


def _args(out, **changes) -> GRPOConfig:
    settings = dict(
        output_dir=str(out),
        num_generations=2,
        num_prompts_per_iteration=1,
        num_inference_steps=3,
        learning_rate=3e-3,
        epsilon=1e-3,
        beta=0.0,
        sample_every=0,
        save_steps=0,
        seed=5,
        compile=False,  # on a GPU too: these tests are about the pipeline, not the kernels
    )
    return GRPOConfig(**{**settings, **changes})


def _weights(trainer: GRPOTrainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in trainer.policy.transformer.named_parameters()}


def _trainer(tiny_dir, args, rewards=(redness,), **kwargs) -> GRPOTrainer:
    return GRPOTrainer(LTXPolicy.from_pretrained(tiny_dir), list(rewards), args, ROWS, **kwargs)


def test_overlap_updates_each_batch_one_iteration_late(tmp_path, tiny_dir):
    """Three pipelined iterations are: roll out 0; roll out 1, update on 0 (still on-policy: no step
    came between); roll out 2 (weights after batch 0), update on 1 (off-policy), and, the run ending,
    drain: update on 2. Driven by hand on a plain trainer, that sequence gives bitwise the weights."""
    pipelined = _trainer(tiny_dir, _args(tmp_path / "a", overlap_update=True, max_iterations=3))
    history = pipelined.train()

    manual = _trainer(tiny_dir, _args(tmp_path / "b", max_iterations=3))

    def batch(iteration):
        rollout, scores, _ = manual._rollout_and_score(manual._rows_for(iteration), iteration)
        return rollout, manual._advantages(scores)[0]

    b0, b1 = batch(0), batch(1)
    manual._update(*b0, 0)
    b2 = batch(2)
    off_policy = manual._update(*b1, 1, stale=True)
    manual._update(*b2, 2, stale=True)

    a, b = _weights(pipelined), _weights(manual)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert [m["train/updated_batches"] for m in history] == [0.0, 1.0, 2.0]
    assert "train/loss" not in history[0]  # the first iteration only rolls out
    assert history[1]["train/ratio_first_step"] == 1.0  # batch 0 is updated by the weights it saw
    # batch 1 was rolled out before batch 0's step: its ratio starts away from 1 and is clipped
    assert abs(off_policy["train/ratio_first_step"] - 1) > 1e-4 and off_policy["train/clip_frac"] > 0
    assert history[2]["train/clip_frac"] > 0

    plain = _trainer(tiny_dir, _args(tmp_path / "c", max_iterations=3))
    plain.train()  # on-policy: every batch updated in its own iteration, so other weights
    c = _weights(plain)
    assert any(not torch.equal(a[n], c[n]) for n in a)


class _Killed(Exception):
    pass


def test_overlap_resumed_from_a_checkpoint_is_bitwise_the_uninterrupted_run(tmp_path, tiny_dir):
    """The pipeline drains before every checkpoint, so a run killed after checkpoint-3 and resumed
    from it ends with the weights (and logs the rewards) of the run that was never interrupted."""
    changes = dict(overlap_update=True, max_iterations=5, save_steps=3)
    straight = _trainer(tiny_dir, _args(tmp_path / "run", **changes))
    history = straight.train()

    class KillAt:
        def on_iteration_end(self, trainer, step, metrics):
            if step == 4:
                raise _Killed

    out = tmp_path / "killed"
    with pytest.raises(_Killed):
        _trainer(tiny_dir, _args(out, **changes), callbacks=[KillAt()]).train()
    assert (out / "checkpoint-00000003").is_dir() and not (out / "final").exists()
    resumed = _trainer(tiny_dir, _args(out, **changes, resume_from_checkpoint="auto"))
    rest = resumed.train()

    a, b = _weights(straight), _weights(resumed)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert [m["reward/mean"] for m in rest] == [m["reward/mean"] for m in history[3:]]
    # iterations 2 and 4 drain (a checkpoint, the end follows); 3 restarts the pipeline
    assert [m["train/updated_batches"] for m in history] == [0.0, 1.0, 2.0, 0.0, 2.0]


STREAMS = []  # the CUDA stream each call of slow_redness ran on (on a GPU)


def test_a_preemption_drains_the_pipeline_into_its_checkpoint(tmp_path, tiny_dir):
    """SIGTERM after iteration 1: the checkpoint written on the way out holds batch 1's update too,
    bitwise the checkpoint a run that saves after iteration 1 writes (where the iteration drains)."""
    import signal

    from grpo.checkpoint import latest_checkpoint, load_checkpoint

    class Preempt:
        def on_iteration_end(self, trainer, step, metrics):
            if step == 1:
                signal.raise_signal(signal.SIGTERM)

    preempted = _trainer(
        tiny_dir, _args(tmp_path / "a", overlap_update=True, max_iterations=4), callbacks=[Preempt()]
    )
    history = preempted.train()
    assert [m["train/updated_batches"] for m in history] == [0.0, 1.0]  # batch 1 pending when stopped
    assert preempted.pending is None and not (tmp_path / "a" / "final").exists()
    saved = _trainer(tiny_dir, _args(tmp_path / "b", overlap_update=True, max_iterations=4, save_steps=2))
    saved.train()
    a = load_checkpoint(latest_checkpoint(tmp_path / "a"), restore_rng=False)
    b = load_checkpoint(tmp_path / "b" / "checkpoint-00000002", restore_rng=False)
    assert a.step == b.step == 2 and a.model_state.keys() == b.model_state.keys()
    assert all(torch.equal(a.model_state[k], b.model_state[k]) for k in a.model_state)


def slow_redness(videos, prompts, contexts, **metadata):
    if torch.cuda.is_available():
        STREAMS.append(torch.cuda.current_stream())
    time.sleep(0.15)  # long beside the context exits after a rollout, which hide a few ms
    return redness(videos, prompts, contexts)


def test_decode_and_reward_hide_behind_the_previous_batchs_update(tmp_path, tiny_dir):
    """One group per iteration leaves no rollout to score behind: without overlap_update the slow
    reward is all waited for; with it, the update of the previous batch runs meanwhile: the scoring
    time the main thread did not wait for is most of that update's time (or of the scoring's, if
    shorter), however fast the machine makes either."""
    hidden = {}
    for overlap in (False, True):
        args = _args(tmp_path / str(overlap), overlap_update=overlap, max_iterations=3, num_inference_steps=6)
        STREAMS.clear()
        trainer = _trainer(tiny_dir, args, rewards=(slow_redness,))
        history = trainer.train()
        # on CUDA the scorer (decode and rewards, in their own threads too) runs on its own stream
        assert all(stream == trainer._score_stream for stream in STREAMS)
        update_s, reward_s = history[1]["time/update_s"], history[1]["time/reward_s"]
        assert update_s > 0 and reward_s >= 0.15  # the reward sleeps 0.15 s
        hidden[overlap] = history[1]["time/reward_hidden_frac"] * reward_s  # seconds not waited for
        print(f"overlap_update {overlap}: hidden {hidden[overlap]:.3f} s, update {update_s:.3f} s")
        if overlap:
            assert hidden[True] > 0.5 * min(update_s, reward_s)
    assert hidden[False] < 0.05 * reward_s


def test_decode_batch_size_sets_the_videos_per_vae_call(tmp_path, tiny_dir):
    """``trainer.decode_batch_size`` reaches the VAE for the rewards and the held-out evaluation, and
    the scores are those of one call per group (up to float32 rounding: other conv batch sizes)."""
    runs = {}
    for size in (1, 8):
        args = _args(
            tmp_path / str(size), num_generations=3, max_iterations=1, eval_every=1, decode_batch_size=size
        )
        trainer = _trainer(tiny_dir, args, eval_dataset=ROWS[:1])
        calls, decode = [], trainer.policy.vae.decode

        def spy(z, *rest, decode=decode, calls=calls, **kwargs):
            calls.append(z.shape[0])
            return decode(z, *rest, **kwargs)

        trainer.policy.vae.decode = spy
        runs[size] = (calls, trainer.train())
    (one, one_history), (eight, eight_history) = runs[1], runs[8]
    assert one == [1] * len(one) and len(one) >= 6  # 3 training and 3 held-out videos, one by one
    assert eight[0] == 3 and max(eight) == 3  # each group's videos in one call
    for key in ("reward/mean", "eval/redness/mean"):
        assert one_history[0][key] == pytest.approx(eight_history[0][key], rel=1e-4, abs=1e-6)


def test_overlap_and_compile_fail_with_one_line(tmp_path, tiny_dir):
    with pytest.raises(ConfigError, match="save_steps 1 would hide nothing") as err:
        _args(tmp_path, overlap_update=True, save_steps=1)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="trainer.compile|compile: must be 'auto', true or false"):
        _args(tmp_path, compile="yes")
    # auto leaves a CPU policy eager; true insists and says why it cannot
    auto = _trainer(tiny_dir, _args(tmp_path / "auto", compile="auto"))
    assert auto.compiled is torch.cuda.is_available()
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="trainer.compile true: the policy runs on the CPU") as err:
            _trainer(tiny_dir, _args(tmp_path / "true", compile=True))
        assert "\n" not in str(err.value)
    assert _trainer(tiny_dir, _args(tmp_path / "false", compile=False)).compiled is False


def test_the_rehearsal_table_reports_the_pipeline_and_its_steady_iterations():
    """benchmarks/real_scale.py: with overlap_update the medians skip the iterations that start (no
    update) or drain (two updates) the pipeline, and the table names the pipeline."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks import real_scale

    def record(step, update_s, batches, wait_s):
        return {
            "step": step,
            "time/iteration_s": 10.0 + update_s + wait_s,
            "time/rollout_s": 10.0,
            "time/reward_s": 4.0,
            "time/reward_wait_s": wait_s,
            "time/reward_hidden_frac": 1 - wait_s / 4.0,
            "time/update_s": update_s,
            "train/updated_batches": batches,
        }

    records = [record(0, 0.0, 0.0, 4.0), record(1, 6.0, 1.0, 0.2), record(2, 6.0, 1.0, 0.0)]
    records.append(record(3, 12.0, 2.0, 0.0))
    metrics = real_scale.summarise_metrics(records, "grpo")
    assert metrics["median_over"] == "iterations >= 1 that updated one batch"
    assert metrics["median"]["update_s"] == 6.0 and metrics["median"]["hidden_frac"] == pytest.approx(0.975)
    metrics["pipeline"] = {"overlap_update": True, "compile": "auto"}
    table = real_scale.format_table(
        [real_scale.Result("nsp_qwen25vl7b_ltx2b_grpo", ok=True, metrics=metrics)]
    )
    assert "| one step off-policy, compile auto |" in table and "| 98% |" in table
    plain = real_scale.summarise_metrics([record(0, 5.0, 1.0, 4.0), record(1, 6.0, 1.0, 4.0)], "grpo")
    assert plain["median_over"] == "iterations >= 1" and plain["median"]["hidden_frac"] == 0.0


def test_the_rehearsal_runs_a_recipe_variant_with_its_own_overrides(tmp_path):
    """``--recipes R,R@overlap`` runs R twice in one call; ``--set R:...`` reaches both runs,
    ``--set R@overlap:...`` the variant only."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks import real_scale

    name = "nsp_qwen25vl7b_ltx2b_grpo"
    args = real_scale.parse_args(
        [
            "--out",
            str(tmp_path),
            "--recipes",
            f"{name},{name}@overlap",
            "--set",
            f"{name}:trainer.eval_every=0",
        ]
        + ["--set", f"{name}@overlap:trainer.overlap_update=true"]
    )
    assert args.recipes == [name, f"{name}@overlap"] and real_scale.recipe_of(args.recipes[1]) == name
    assert real_scale.extra_overrides(args, name) == ["trainer.eval_every=0"]
    both = ["trainer.eval_every=0", "trainer.overlap_update=true"]
    assert real_scale.extra_overrides(args, f"{name}@overlap") == both
    with pytest.raises(SystemExit):
        real_scale.parse_args(["--out", str(tmp_path), "--recipes", "no_such_recipe@x"])


def test_compile_auto_resolves_on_cuda_after_lora_and_refuses_what_it_cannot(tmp_path, tiny_dir, monkeypatch):
    """Where the policy runs on CUDA, ``auto`` compiles it once, with its LoRA adapters already in
    (the families inherit `LTXPolicy.compile`); FSDP, or a policy without a regional compile, leave
    ``auto`` eager and make ``true`` a one-line error. (The CUDA device is pretended: the CPU build
    of inductor is not what this checks.)"""
    from policies import LTX2Policy, NextClipPolicy
    from policies.nsp import NSPPolicy

    for family in (LTX2Policy, NSPPolicy, NextClipPolicy):  # no family falls back to nn.Module.compile
        assert issubclass(family, LTXPolicy) and family.compile is not torch.nn.Module.compile
    trainer = _trainer(tiny_dir, _args(tmp_path, use_lora=True, lora_rank=4))
    assert trainer.compiled is False
    calls = []
    monkeypatch.setattr(GRPOTrainer, "_on_cuda", property(lambda self: True))
    monkeypatch.setattr(LTXPolicy, "compile", lambda self: calls.append(self.has_lora))
    trainer.args.compile = "auto"
    assert trainer._compile() is True and calls == [True]
    trainer.args.fsdp = True
    assert trainer._compile() is False and len(calls) == 1
    trainer.args.compile = True
    with pytest.raises(InputError, match="trainer.compile true: fsdp / context_parallel") as err:
        trainer._compile()
    assert "\n" not in str(err.value)
    trainer.args.fsdp = False
    monkeypatch.setattr(LTXPolicy, "compile", torch.nn.Module.compile)  # a policy without its own
    with pytest.raises(InputError, match="has no regional compile"):
        trainer._compile()
