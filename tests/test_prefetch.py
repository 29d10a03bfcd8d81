"""``trainer.prefetch_iterations``: the rows of the next iterations load in a background thread while
one iteration trains. The trainer reads exactly the rows the synchronous loop reads (toy world, an MP4
manifest with an undecodable row, another rank's slice), a run ends bitwise as without it, also when
resumed and with ``overlap_update``; a background decoding error stops the run at the iteration that
needs the row with the synchronous error; no thread outlives a run that ends, fails or is preempted."""

from __future__ import annotations

import json
import signal
import threading
import warnings

import pytest
import torch
from test_nsp_dataset import _truncated_mp4
from test_overlap import _args as overlap_args

from grpo.config import ConfigError, GRPOConfig
from grpo.data.nsp_dataset import load_manifest
from grpo.data.toyworld import ToyWorld, export_toyworld
from grpo.engine import RowSampler
from grpo.prefetch import RowPrefetcher
from grpo.train import ManifestDataSpec, ToyWorldDataSpec
from grpo.trainer import GRPOTrainer
from policies import LTXPolicy
from policies.errors import InputError
from policies.tiny import build_tiny_ltx

NUM_ROWS = 4
BROKEN = 3  # the manifest row whose next video fails only when decoded


def redness(videos, prompts, contexts, **metadata):
    return [float((v[..., 0] - 0.5 * (v[..., 1] + v[..., 2])).mean()) for v in videos]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_ltx(tmp_path_factory.mktemp("tiny_ltx"))


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    """A 4-row MP4 manifest of the toy world whose row BROKEN has a truncated next video (good header)."""
    out = tmp_path_factory.mktemp("data")
    path = export_toyworld(ToyWorld(split="train", num_samples=NUM_ROWS), out, progress=False)
    rows, _ = load_manifest(path)
    _truncated_mp4(out / "videos" / "broken.mp4")
    rows[BROKEN]["next_video"] = "videos/broken.mp4"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _manifest_rows(manifest, on_error: str = "skip"):
    return ManifestDataSpec(path=str(manifest), fps=8, on_error=on_error).build()[0]


def _args(out, **changes) -> GRPOConfig:
    """The overlap tests' tiny GRPO settings, two contexts an iteration (rows to prefetch)."""
    return overlap_args(out, **{"num_prompts_per_iteration": 2, "num_inference_steps": 2, **changes})


def _trainer(tiny_dir, args, rows, **kwargs) -> GRPOTrainer:
    return GRPOTrainer(LTXPolicy.from_pretrained(tiny_dir), [redness], args, rows, **kwargs)


def _weights(trainer: GRPOTrainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in trainer.policy.transformer.named_parameters()}


def _same(a, b) -> bool:
    """Rows (lists of dicts) equal: tensors bitwise, everything else by value."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("row-prefetch")]


def _broken_iteration(num_prompts: int, seed: int = 5) -> int:
    """The first iteration whose rows include the broken manifest row."""
    sampler = RowSampler(NUM_ROWS, seed)
    return next(t for t in range(NUM_ROWS) if BROKEN in sampler.indices(t * num_prompts, num_prompts))


@pytest.mark.parametrize("data", ["toyworld", "manifest"])
def test_prefetched_rows_are_the_synchronous_rows(tmp_path, tiny_dir, manifest, data):
    """Iterations 0..5 (past an epoch, so every row is read twice) of rank 0 and of rank 1 of 2: the
    prefetched rows equal a second trainer's synchronous ones, they were loaded in the background
    thread, and the manifest's undecodable row is replaced and counted as without prefetch."""

    def rows():
        if data == "manifest":
            return _manifest_rows(manifest)
        return ToyWorldDataSpec(num_train=NUM_ROWS, num_eval=1, prompt="next_caption").build()[0]

    for rank in (0, 1):
        trainers = [_trainer(tiny_dir, _args(tmp_path / f"{rank}{k}"), rows()) for k in range(2)]
        for trainer in trainers:  # rank 1 of 2: one prompt of the two per iteration
            trainer.rank, trainer.world_size, trainer.local_prompts = rank, 2, 1
        synchronous, prefetching = trainers
        loaded_by = {}

        def load(iteration, trainer=prefetching, loaded_by=loaded_by):
            loaded_by[iteration] = threading.current_thread().name
            return trainer._load_rows(iteration)

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the skipped row's warning
            expected = [synchronous._rows_for(t) for t in range(6)]
            with RowPrefetcher(load, 2, 6) as prefetching._prefetcher:
                got = [prefetching._rows_for(t) for t in range(6)]
        assert _same(got, expected) and len(got[0]) == 1
        assert all(loaded_by[t].startswith("row-prefetch") for t in range(6))
        if data == "manifest":
            counts = [t.train_dataset.source.num_decode_skips for t in trainers]
            assert counts[0] == counts[1] == (1 if BROKEN in synchronous.train_dataset.failed else 0)
    assert not _prefetch_threads()


@pytest.mark.parametrize("overlap", [False, True])
def test_a_run_with_prefetch_is_bitwise_the_run_without(tmp_path, tiny_dir, manifest, overlap):
    """On the manifest with an undecodable row (skipped): same weights, rewards and skip count with
    prefetch_iterations 0 and 2, with and without overlap_update; no thread is left afterwards."""
    runs = {}
    for ahead in (0, 2):
        args = _args(
            tmp_path / str(ahead), max_iterations=4, prefetch_iterations=ahead, overlap_update=overlap
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = _trainer(tiny_dir, args, _manifest_rows(manifest))
            history = trainer.train()
        runs[ahead] = trainer, [m["reward/mean"] for m in history]
        assert not _prefetch_threads()
        assert all(m["time/rows_wait_s"] >= 0 for m in history)  # the wait for this iteration's rows
    (off, off_rewards), (on, on_rewards) = runs[0], runs[2]
    a, b = _weights(off), _weights(on)
    assert all(torch.equal(a[n], b[n]) for n in a) and on_rewards == off_rewards
    assert BROKEN in on.train_dataset.failed  # the broken row was read (and replaced) in these runs
    assert on.train_dataset.source.num_decode_skips == off.train_dataset.source.num_decode_skips == 1


class _Killed(Exception):
    pass


def test_a_resumed_prefetching_run_is_bitwise_the_uninterrupted_one(tmp_path, tiny_dir, manifest):
    """A run killed (an error in a callback) after checkpoint-2 while rows were loading ahead leaves no
    thread; resumed from the checkpoint it ends with the uninterrupted run's weights and rewards."""
    changes = dict(max_iterations=4, save_steps=2, prefetch_iterations=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        straight = _trainer(tiny_dir, _args(tmp_path / "run", **changes), _manifest_rows(manifest))
        history = straight.train()

        class KillAt:
            def on_iteration_end(self, trainer, step, metrics):
                if step == 2:
                    raise _Killed

        out = tmp_path / "killed"
        with pytest.raises(_Killed):
            _trainer(tiny_dir, _args(out, **changes), _manifest_rows(manifest), callbacks=[KillAt()]).train()
        assert not _prefetch_threads()
        resumed = _trainer(
            tiny_dir, _args(out, **changes, resume_from_checkpoint="auto"), _manifest_rows(manifest)
        )
        rest = resumed.train()
    a, b = _weights(straight), _weights(resumed)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert [m["reward/mean"] for m in rest] == [m["reward/mean"] for m in history[2:]]


def test_a_background_decode_error_stops_the_run_where_the_row_is_needed(tmp_path, tiny_dir, manifest):
    """With on_error raise the broken row's error, raised while prefetching, surfaces at the first
    iteration that reads the row -- after the same iterations, with the same one line, as without
    prefetch -- and the prefetch thread is gone."""
    prompts = 1
    broken_at = _broken_iteration(prompts)
    outcomes = []
    for ahead in (0, 3):
        done = []

        class Record:
            def on_iteration_end(self, trainer, step, metrics, done=done):
                done.append(step)

        args = _args(
            tmp_path / str(ahead),
            num_prompts_per_iteration=prompts,
            max_iterations=NUM_ROWS,
            prefetch_iterations=ahead,
        )
        trainer = _trainer(tiny_dir, args, _manifest_rows(manifest, on_error="raise"), callbacks=[Record()])
        with pytest.raises(InputError) as err:
            trainer.train()
        outcomes.append((done, str(err.value)))
        assert not _prefetch_threads()
    assert outcomes[0] == outcomes[1]
    done, message = outcomes[1]
    assert done == list(range(broken_at)) and "\n" not in message
    assert f"row {BROKEN}: next_video" in message and broken_at > 0


def test_preemption_stops_the_prefetcher_and_bad_settings_fail(tmp_path, tiny_dir, manifest):
    """SIGTERM after iteration 0 (rows of 1 and 2 queued): train() returns and no thread is left;
    a negative prefetch_iterations is a one-line config error."""

    class Preempt:
        def on_iteration_end(self, trainer, step, metrics):
            if step == 0:
                signal.raise_signal(signal.SIGTERM)

    args = _args(tmp_path / "run", max_iterations=4, prefetch_iterations=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        history = _trainer(tiny_dir, args, _manifest_rows(manifest), callbacks=[Preempt()]).train()
    assert len(history) == 1 and not _prefetch_threads()
    with pytest.raises(ConfigError, match="prefetch_iterations: must be >= 0") as err:
        _args(tmp_path, prefetch_iterations=-1)
    assert "\n" not in str(err.value)


def test_the_prefetcher_serves_any_order_and_loads_nothing_past_the_end():
    """A caller that jumps (back or ahead) still gets each iteration's own rows; no iteration at or
    past ``end`` is loaded; ``ahead`` 0 loads in the caller's thread."""
    calls = []

    def load(iteration):
        calls.append((iteration, threading.current_thread().name))
        return [{"iteration": iteration}]

    with RowPrefetcher(load, 2, 5) as prefetcher:
        assert [prefetcher.get(t)[0]["iteration"] for t in (0, 1, 4, 2, 3)] == [0, 1, 4, 2, 3]
    assert max(t for t, _ in calls) == 4 and not _prefetch_threads()
    calls.clear()
    with RowPrefetcher(load, 0, 5) as prefetcher:
        assert prefetcher.get(3) == [{"iteration": 3}]
    assert calls == [(3, threading.current_thread().name)]
