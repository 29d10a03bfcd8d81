"""The training engine's loop and its seeded row sampler, on a one-layer model (no diffusion model):
the schedule of evaluations, logs and checkpoints, resume, halting, and the row order."""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest
import torch

from grpo.config import TrainerConfig
from grpo.engine import Engine, RowSampler, Stage, make_accelerator
from grpo.reward_modeling import _Trainable
from grpo.tracking import read_metrics
from grpo.training_state import TrainingState
from policies.seeding import derived_seed


class Halted(Exception):
    pass


class LinearStage(Stage):
    """Regresses y = 2x with one linear layer; records what the engine asks of it."""

    def __init__(self, args: TrainerConfig, total: int, halt_at: int | None = None) -> None:
        self.accelerator = make_accelerator()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.model = torch.nn.Linear(1, 1)
        self.state = TrainingState(_Trainable(self.model), args, self.accelerator, total)
        self.calls: list[tuple[str, int]] = []
        self.halt_at = halt_at
        self.step = -1
        self.engine = Engine(
            self,
            self.state,
            total=total,
            evaluates=True,
            final_eval=True,
            progress_keys=("loss",),
            callbacks=[],
        )

    def train_step(self, step: int, started: float) -> dict:
        self.calls.append(("step", step))
        self.step = step
        x = torch.tensor([[float(step % 3 + 1)]], device=self.accelerator.device)  # CUDA on a GPU
        loss = ((self.state.wrapped(x) - 2 * x) ** 2).mean()
        self.accelerator.backward(loss)
        return {"loss": loss.item(), "grad_norm": self.engine.optimizer_step()}

    def eval_metrics(self, step: int) -> dict:
        self.calls.append(("eval", step))
        return {"eval/weight": float(self.model.weight.detach())}

    def checkpoint_state(self, step: int) -> dict:
        return {"seen": step}

    def should_halt(self) -> bool:
        return self.step == self.halt_at

    def halt_error(self, saved: Path) -> Exception:
        return Halted(f"halted, saved {saved.name}")

    def finish(self) -> None:
        self.calls.append(("finish", self.step))


def _args(tmp_path: Path, **changes) -> TrainerConfig:
    values = dict(output_dir=str(tmp_path / "run"), learning_rate=0.05, eval_every=2, save_steps=3)
    values.update(changes)
    return TrainerConfig(**values)


def test_the_loop_evaluates_logs_saves_and_finishes_on_schedule(tmp_path, monkeypatch):
    saved_final = []
    monkeypatch.setattr(TrainingState, "save_final", lambda self: saved_final.append(True))
    stage = LinearStage(_args(tmp_path, logging_steps=2), total=5)
    history = stage.engine.run()
    evals = [("eval", 0), ("eval", 2), ("eval", 4), ("eval", 5)]  # every 2 steps, before the step; final
    assert [c for c in stage.calls if c[0] == "eval"] == evals
    assert stage.calls[-1] == ("finish", 4) and saved_final == [True]
    assert len(history) == 6 and history[0].keys() == {"eval/weight", "loss", "grad_norm"}
    # logged every 2 steps and at the last, then the final evaluation at step `total`
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [0, 2, 4, 5]
    ckpts = sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*"))
    assert ckpts == ["checkpoint-00000003"] and stage.state.optimizer_steps == 5
    meta = json.loads((tmp_path / "run" / ckpts[0] / "meta.json").read_text())
    assert meta["trainer_state"]["seen"] == 3 and meta["step"] == 3


def test_resume_continues_with_the_uninterrupted_weights(tmp_path, monkeypatch):
    monkeypatch.setattr(TrainingState, "save_final", lambda self: None)
    whole = LinearStage(_args(tmp_path / "a"), total=6)
    whole.engine.run()
    first = LinearStage(_args(tmp_path / "b", save_steps=3), total=3)
    first.engine.run()
    resumed = LinearStage(_args(tmp_path / "b", resume_from_checkpoint="auto"), total=6)
    resumed.engine.run()
    assert [c for c in resumed.calls if c[0] == "step"] == [("step", 3), ("step", 4), ("step", 5)]
    assert torch.equal(resumed.model.weight, whole.model.weight)
    assert torch.equal(resumed.model.bias, whole.model.bias)


def test_a_halting_stage_checkpoints_then_raises_its_error(tmp_path, monkeypatch):
    monkeypatch.setattr(TrainingState, "save_final", lambda self: pytest.fail("no final after a halt"))
    stage = LinearStage(_args(tmp_path, save_steps=0), total=5, halt_at=1)
    with pytest.raises(Halted, match="saved checkpoint-00000002"):
        stage.engine.run()
    assert [c for c in stage.calls if c[0] == "step"] == [("step", 0), ("step", 1)]


def test_callbacks_see_each_optimizer_step_and_iteration(tmp_path, monkeypatch):
    monkeypatch.setattr(TrainingState, "save_final", lambda self: None)
    stage = LinearStage(_args(tmp_path, eval_every=0, save_steps=0), total=3)
    seen = []
    stage.engine.callbacks.append(
        types.SimpleNamespace(
            on_optimizer_step=lambda trainer, step: seen.append(("opt", step, trainer is stage)),
            on_iteration_end=lambda trainer, step, metrics: seen.append(("end", step, "loss" in metrics)),
        )
    )
    stage.engine.run()
    assert seen == [("opt", 1, True), ("end", 0, True), ("opt", 2, True), ("end", 1, True)] + [
        ("opt", 3, True),
        ("end", 2, True),
    ]


def test_the_row_sampler_reads_each_row_once_per_epoch_in_a_seeded_order():
    sampler = RowSampler(7, seed=3)
    stream = sampler.indices(0, 21)
    epochs = [stream[i : i + 7] for i in range(0, 21, 7)]
    assert all(sorted(e) == list(range(7)) for e in epochs) and len({tuple(e) for e in epochs}) == 3
    assert sampler.indices(5, 9) == stream[5:14]  # any slot range: resuming reads the same rows
    assert RowSampler(7, seed=3).indices(0, 21) == stream and RowSampler(7, seed=4).indices(0, 21) != stream
    # epoch e is torch.randperm under derived_seed(seed, e) (the order GRPO and flow matching always had)
    perm = torch.randperm(7, generator=torch.Generator().manual_seed(derived_seed(3, 1))).tolist()
    assert epochs[1] == perm


def test_ranks_and_micro_batches_read_disjoint_slots():
    sampler = RowSampler(1000, seed=0)
    ranks = [types.SimpleNamespace(num_processes=2, process_index=r) for r in range(2)]
    slots = [
        sampler.micro_batch(step, micro, accumulation=2, size=3, accelerator=rank)
        for step in range(2)
        for micro in range(2)
        for rank in ranks
    ]
    flat = [row for batch in slots for row in batch]
    assert flat == sampler.indices(0, 2 * 2 * 2 * 3)  # consecutive slots, no row read twice
