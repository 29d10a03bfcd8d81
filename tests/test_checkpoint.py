"""Atomic checkpoints: contents round-trip, RNG restore, completeness, pruning, several ranks."""

from __future__ import annotations

import json
import os
import random
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from grpo import checkpoint as ckpt
from grpo.checkpoint import (
    checkpoint_name,
    complete_checkpoints,
    is_complete,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    resolve_resume,
    save_checkpoint,
)
from policies.errors import InputError


def tiny_training_state(steps: int = 2):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    for _ in range(steps):
        model(torch.randn(4, 3)).pow(2).mean().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    return model, optimizer, scheduler


def save(output_dir: Path, step: int, **kwargs) -> Path:
    return save_checkpoint(output_dir, step, model_state={"w": torch.full((2,), float(step))}, **kwargs)


def test_everything_round_trips(tmp_path):
    model, optimizer, scheduler = tiny_training_state()
    ema = {name: p.detach().clone() * 0.5 for name, p in model.named_parameters()}
    path = save_checkpoint(
        tmp_path,
        7,
        model_state=model.state_dict(),
        optimizer_state=optimizer.state_dict(),
        scheduler_state=scheduler.state_dict(),
        ema_state=ema,
        data_state={"epoch": 1, "index": 17},
        trainer_state={"best_reward": 0.25, "window": [2, 3]},
    )
    assert path == tmp_path / "checkpoint-00000007" and is_complete(path)
    assert sorted(p.name for p in path.iterdir()) == [
        "ema.safetensors",
        "meta.json",
        "model.safetensors",
        "optimizer.pt",
        "rng_state_rank0.pt",
        "scheduler.pt",
    ]
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no staging directory left behind

    loaded = load_checkpoint(path)
    assert loaded.step == 7 and loaded.world_size == 1
    assert loaded.data_state == {"epoch": 1, "index": 17}
    assert loaded.trainer_state == {"best_reward": 0.25, "window": [2, 3]}
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.model_state[name], tensor)
        assert torch.equal(loaded.ema_state[name], ema[name])

    fresh_model, fresh_optimizer, fresh_scheduler = tiny_training_state(steps=0)
    fresh_model.load_state_dict(loaded.model_state)
    fresh_optimizer.load_state_dict(loaded.optimizer_state)
    fresh_scheduler.load_state_dict(loaded.scheduler_state)
    assert fresh_scheduler.last_epoch == scheduler.last_epoch == 2
    assert fresh_scheduler.get_last_lr() == scheduler.get_last_lr()
    for p, q in zip(optimizer.state.values(), fresh_optimizer.state.values()):
        assert torch.equal(p["exp_avg"], q["exp_avg"]) and torch.equal(p["exp_avg_sq"], q["exp_avg_sq"])
    # one more identical step from both gives identical weights
    batch = torch.randn(4, 3)
    for m, o in ((model, optimizer), (fresh_model, fresh_optimizer)):
        m(batch).pow(2).mean().backward()
        o.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh_model.parameters()))


def test_optional_parts_may_be_left_out(tmp_path):
    loaded = load_checkpoint(save(tmp_path, 1))
    assert loaded.optimizer_state is None and loaded.scheduler_state is None and loaded.ema_state is None
    assert loaded.data_state is None and loaded.trainer_state == {}


def draws(generator: torch.Generator) -> list[float]:
    return [
        *torch.randn(3).tolist(),
        random.random(),
        random.gauss(0, 1),
        *np.random.rand(2).tolist(),
        float(np.random.normal()),
        *torch.rand(2, generator=generator).tolist(),
    ]


def test_restoring_rng_repeats_the_uninterrupted_draws(tmp_path):
    torch.manual_seed(1)
    random.seed(1)
    np.random.seed(1)
    generator = torch.Generator().manual_seed(5)
    draws(generator)  # advance every stream, leave a cached gaussian in numpy and python
    path = save(tmp_path, 3, generators={"noise": generator})
    uninterrupted = draws(generator)

    torch.manual_seed(99)
    random.seed(99)
    np.random.seed(99)
    other = torch.Generator().manual_seed(99)
    assert draws(other) != uninterrupted
    load_checkpoint(path, generators={"noise": other})
    assert draws(other) == uninterrupted


def test_restore_rng_false_leaves_the_generators_alone(tmp_path):
    path = save(tmp_path, 1)
    torch.manual_seed(4)
    expected = torch.randn(2)
    torch.manual_seed(4)
    load_checkpoint(path, restore_rng=False)
    assert torch.equal(torch.randn(2), expected)


def test_unknown_generator_is_reported(tmp_path):
    path = save(tmp_path, 1, generators={"noise": torch.Generator()})
    with pytest.raises(InputError, match="no state for generator 'data' \\(saved: noise\\)"):
        load_checkpoint(path, generators={"data": torch.Generator()})


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_loading_never_unpickles_arbitrary_objects(tmp_path):
    path = save(tmp_path, 1, optimizer_state={"state": {}, "param_groups": []})
    marker = tmp_path / "pwned"
    torch.save({"state": _Exploit(marker)}, path / "optimizer.pt")  # unsafe to load with weights_only=False
    with pytest.raises(InputError, match="optimizer.pt is truncated, corrupt or holds more than tensors"):
        load_checkpoint(path)
    assert not marker.exists()


def test_latest_checkpoint_ignores_staging_and_incomplete_directories(tmp_path):
    assert latest_checkpoint(tmp_path / "missing") is None
    save(tmp_path, 9)
    save(tmp_path, 10)
    (tmp_path / "checkpoint-00000011.tmp-abcd").mkdir()  # a save killed mid-way
    (tmp_path / "checkpoint-00000012").mkdir()  # no meta.json
    listed = tmp_path / "checkpoint-00000013"
    listed.mkdir()  # meta.json naming a file that is not there
    (listed / "meta.json").write_text(json.dumps({"files": ["model.safetensors"]}))
    (tmp_path / "checkpoint-latest").mkdir()
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-00000010"  # 10 > 9 numerically
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["checkpoint-00000009", "checkpoint-00000010"]
    save(tmp_path, 123456789)
    assert latest_checkpoint(tmp_path).name == "checkpoint-123456789"


def test_a_save_that_dies_midway_leaves_the_previous_checkpoint_latest(tmp_path, monkeypatch):
    save(tmp_path, 1)

    def die(obj, path):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "_torch_save", die)
    with pytest.raises(OSError, match="disk full"):
        save(tmp_path, 2, optimizer_state={"state": {}})
    monkeypatch.undo()
    assert not (tmp_path / checkpoint_name(2)).exists()
    assert len(list(tmp_path.glob("checkpoint-00000002.tmp-*"))) == 1
    assert latest_checkpoint(tmp_path) == tmp_path / checkpoint_name(1)
    save(tmp_path, 2)  # the next save clears what the dead one left
    assert sorted(p.name for p in tmp_path.iterdir()) == [checkpoint_name(1), checkpoint_name(2)]


def test_resaving_a_step_replaces_it(tmp_path):
    save(tmp_path, 4)
    save_checkpoint(tmp_path, 4, model_state={"w": torch.zeros(2)})
    assert torch.equal(load_checkpoint(tmp_path / checkpoint_name(4)).model_state["w"], torch.zeros(2))
    assert [p.name for p in tmp_path.iterdir()] == [checkpoint_name(4)]


def test_keep_last_n_never_touches_anything_else(tmp_path):
    (tmp_path / "samples").mkdir()
    (tmp_path / "checkpoint-00000000").mkdir()  # incomplete: not ours to delete
    for step in range(1, 6):
        save(tmp_path, step, save_total_limit=2)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["checkpoint-00000000", "checkpoint-00000004", "checkpoint-00000005", "samples"]


def test_pruning_protects_the_checkpoint_just_written(tmp_path):
    for step in (5, 6):
        save(tmp_path, step)
    just_written = save(tmp_path, 3)  # resumed from an older checkpoint: the lowest step, yet newest
    staging = tmp_path / "checkpoint-00000007.tmp-live"
    staging.mkdir()
    deleted = prune_checkpoints(tmp_path, keep=2, protect=just_written)
    assert deleted == [tmp_path / checkpoint_name(5)]
    assert [p.name for p in complete_checkpoints(tmp_path)] == [checkpoint_name(3), checkpoint_name(6)]
    assert staging.exists()


def test_resolve_resume(tmp_path):
    assert resolve_resume(None, tmp_path) is None
    assert resolve_resume("auto", tmp_path) is None  # nothing yet: a fresh start
    first = save(tmp_path, 1)
    second = save(tmp_path, 2)
    assert resolve_resume("auto", tmp_path) == second
    assert resolve_resume(str(first), tmp_path) == first
    (tmp_path / "checkpoint-00000003").mkdir()
    with pytest.raises(
        InputError, match="is not a complete checkpoint; latest complete one there: .*00000002"
    ):
        resolve_resume(str(tmp_path / "checkpoint-00000003"), tmp_path)
    with pytest.raises(InputError, match="is not a complete checkpoint"):
        load_checkpoint(tmp_path / "checkpoint-00000003")


def test_several_ranks_each_write_their_rng_state(tmp_path):
    barrier = threading.Barrier(2, timeout=30)
    generators = {rank: torch.Generator().manual_seed(100 + rank) for rank in range(2)}
    results: dict[int, Path] = {}
    errors: list[BaseException] = []

    def run(rank: int) -> None:
        try:
            results[rank] = save_checkpoint(
                tmp_path,
                5,
                model_state={"w": torch.ones(2)} if rank == 0 else {},
                generators={"noise": generators[rank]},
                rank=rank,
                world_size=2,
                barrier=barrier.wait,
            )
        except BaseException as err:  # re-raised in the main thread below
            errors.append(err)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    path = tmp_path / checkpoint_name(5)
    assert results == {0: path, 1: path} and is_complete(path)
    assert {"rng_state_rank0.pt", "rng_state_rank1.pt"} <= {p.name for p in path.iterdir()}
    assert json.loads((path / "meta.json").read_text())["world_size"] == 2

    expected = {rank: torch.rand(3, generator=generators[rank]) for rank in range(2)}
    for rank in range(2):
        generator = torch.Generator()
        load_checkpoint(path, rank=rank, generators={"noise": generator})
        assert torch.equal(torch.rand(3, generator=generator), expected[rank])
    with pytest.raises(InputError, match="written by 2 ranks and has no RNG state for rank 2"):
        load_checkpoint(path, rank=2)


def test_several_ranks_need_a_barrier(tmp_path):
    with pytest.raises(ValueError, match="needs a barrier"):
        save(tmp_path, 1, world_size=2)
