"""MetricsLogger (JSONL, trackers, progress bar) and PreemptionHandler (with real signals)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import types

import numpy as np
import pytest
import torch

from grpo import tracking
from grpo.checkpoint import is_complete, latest_checkpoint, load_checkpoint
from grpo.preemption import PreemptionHandler
from grpo.tracking import METRICS_FILE, MetricsLogger, read_metrics
from policies.errors import InputError

# --- JSONL -----------------------------------------------------------------------------------------


def test_one_flushed_json_line_per_log(tmp_path):
    logger = MetricsLogger(tmp_path, progress_bar=False)
    logger.log(
        {"reward/mean": torch.tensor(0.5), "loss": np.float32(0.25), "n": 3, "phase": "rollout"}, step=1
    )
    lines = (tmp_path / METRICS_FILE).read_text().splitlines()  # readable before close: flushed
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record["step"] == 1 and isinstance(record["time"], float)
    assert record["reward/mean"] == 0.5 and record["loss"] == 0.25 and record["n"] == 3
    assert record["phase"] == "rollout"
    logger.log({"loss": math.nan, "kl": math.inf, "x": -math.inf}, step=2)
    logger.close()
    last = json.loads((tmp_path / METRICS_FILE).read_text().splitlines()[-1])
    assert (last["loss"], last["kl"], last["x"]) == ("nan", "inf", "-inf")  # valid JSON
    read = read_metrics(tmp_path)
    assert math.isnan(read[1]["loss"]) and read[1]["kl"] == math.inf and read[1]["x"] == -math.inf


def test_resume_drops_the_steps_it_runs_again_so_each_step_is_logged_once(tmp_path):
    with MetricsLogger(tmp_path, progress_bar=False) as first:
        for step in (1, 2, 3):
            first.log({"reward/mean": step / 10}, step=step)
    # the run was killed after logging step 3 but its last checkpoint is step 3 (iterations 0..2
    # done): the resumed run redoes step 3
    with MetricsLogger(tmp_path, progress_bar=False, initial=3, resume_step=3) as resumed:
        assert len((tmp_path / METRICS_FILE).read_text().splitlines()) == 2  # rewritten before any log
        for step in (3, 4):
            resumed.log({"reward/mean": step}, step=step)
    lines = [json.loads(line) for line in (tmp_path / METRICS_FILE).read_text().splitlines()]
    assert [(r["step"], r["reward/mean"]) for r in lines] == [(1, 0.1), (2, 0.2), (3, 3), (4, 4)]
    assert not list(tmp_path.glob("*.tmp-*"))
    # without resume_step nothing is dropped (appending logger)
    with MetricsLogger(tmp_path, progress_bar=False) as appending:
        appending.log({"reward/mean": 5}, step=4)
    assert len((tmp_path / METRICS_FILE).read_text().splitlines()) == 5
    assert read_metrics(tmp_path)[-1]["reward/mean"] == 5  # the last record of a step wins


def test_truncation_drops_a_torn_line_and_a_fresh_start_drops_everything(tmp_path):
    torn = '{"step": 0, "loss": 1.0}\n{"step": 1, "loss": 2.0}\n{"step": 2, "lo'
    (tmp_path / METRICS_FILE).write_text(torn)
    assert tracking.truncate_metrics(tmp_path / METRICS_FILE, 2) == 1
    assert read_metrics(tmp_path) == [{"step": 0, "loss": 1.0}, {"step": 1, "loss": 2.0}]
    assert tracking.truncate_metrics(tmp_path / METRICS_FILE, 2) == 0
    with MetricsLogger(tmp_path, progress_bar=False, resume_step=0):
        pass
    assert (tmp_path / METRICS_FILE).read_text() == ""


def test_a_torn_last_line_is_ended_and_skipped(tmp_path):
    (tmp_path / METRICS_FILE).write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lo')
    with MetricsLogger(tmp_path, progress_bar=False) as logger:
        logger.log({"loss": 3.0}, step=3)
    with pytest.warns(UserWarning, match="torn metrics line"):
        records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 3]


def test_other_ranks_write_nothing(tmp_path):
    logger = MetricsLogger(tmp_path / "run", is_main_process=False, report_to=["tensorboard"])
    logger.log({"loss": 1.0}, step=1)
    logger.close()
    assert not (tmp_path / "run").exists()


def test_reserved_and_unloggable_values(tmp_path):
    with MetricsLogger(tmp_path, progress_bar=False) as logger:
        with pytest.raises(ValueError, match="reserved"):
            logger.log({"step": 1}, step=1)
        with pytest.raises(TypeError, match="metric 'video' is a list"):
            logger.log({"video": [1, 2]}, step=1)


def test_progress_bar_shows_position_and_latest_reward(tmp_path, capsys):
    with MetricsLogger(tmp_path, total=10, initial=2, desc="grpo") as logger:
        logger.log({"reward/mean": 0.123456, "loss": 2.0}, step=3)
        logger.log({"reward/mean": 0.75}, step=4)
    err = capsys.readouterr().err
    assert "grpo" in err and "4/10" in err and "reward/mean=0.75" in err and "loss=2" in err


# --- trackers --------------------------------------------------------------------------------------


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed")
def test_missing_tracker_is_a_one_line_error(tmp_path):
    with pytest.raises(
        InputError, match="report_to: 'wandb' is asked for but not installed; `pip install wandb`"
    ):
        MetricsLogger(tmp_path, report_to=["wandb"])


def test_unknown_tracker(tmp_path):
    with pytest.raises(InputError, match="unknown tracker 'mlflow'"):
        MetricsLogger(tmp_path, report_to=["mlflow"])


@pytest.fixture
def fake_trackers(monkeypatch):
    """Stand-ins for tensorboard's SummaryWriter and wandb that record what they are given."""
    calls: dict[str, list] = {"scalar": [], "wandb_init": [], "wandb_log": [], "closed": []}

    class SummaryWriter:
        def __init__(self, log_dir, purge_step=None):
            calls["tb_dir"] = log_dir
            calls["tb_purge_step"] = purge_step

        def add_scalar(self, key, value, global_step):
            calls["scalar"].append((key, value, global_step))

        def flush(self):
            pass

        def close(self):
            calls["closed"].append("tensorboard")

    class Run:
        def log(self, data, step):
            calls["wandb_log"].append((data, step))

        def finish(self):
            calls["closed"].append("wandb")

    def init(**kwargs):
        calls["wandb_init"].append(kwargs)
        return Run()

    wandb = types.ModuleType("wandb")
    wandb.init = init
    wandb.util = types.SimpleNamespace(generate_id=lambda: "run123")
    tensorboard = types.ModuleType("torch.utils.tensorboard")
    tensorboard.SummaryWriter = SummaryWriter
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", tensorboard)
    monkeypatch.setattr(tracking, "tracker_problem", lambda name: None)
    return calls


def test_tensorboard_and_wandb_get_the_numbers(tmp_path, fake_trackers):
    with MetricsLogger(
        tmp_path,
        report_to=["tensorboard", "wandb"],
        progress_bar=False,
        config={"beta": 0.1},
        run_name="r1",
        resume_step=5,
    ) as logger:
        logger.log({"loss": torch.tensor(1.5), "kl": math.nan, "phase": "x", "ok": True}, step=7)
    assert fake_trackers["tb_dir"] == str(tmp_path / "tensorboard")
    assert fake_trackers["tb_purge_step"] == 5  # TensorBoard drops the resumed-over events from step 5
    assert fake_trackers["scalar"][0] == ("loss", 1.5, 7)
    assert math.isnan(fake_trackers["scalar"][1][1]) and len(fake_trackers["scalar"]) == 2  # no str, no bool
    data, step = fake_trackers["wandb_log"][0]
    assert step == 7 and set(data) == {"loss", "kl"}
    init = fake_trackers["wandb_init"][0]
    assert init["id"] == "run123" and init["resume"] == "allow" and init["name"] == "r1"
    assert init["config"] == {"beta": 0.1}
    assert sorted(fake_trackers["closed"]) == ["tensorboard", "wandb"]
    # a resumed run continues the same W&B run even if a new id would be generated
    sys.modules["wandb"].util.generate_id = lambda: "other"
    MetricsLogger(tmp_path, report_to=["wandb"], progress_bar=False).close()
    MetricsLogger(tmp_path, report_to=["wandb"], progress_bar=False, resume_step=3).close()
    assert [init["id"] for init in fake_trackers["wandb_init"][1:]] == ["run123", "run123"]
    # a run starting again from step 0 is a new W&B run (W&B would ignore its steps below the old run's)
    MetricsLogger(tmp_path, report_to=["wandb"], progress_bar=False, resume_step=0).close()
    assert fake_trackers["wandb_init"][3]["id"] == "other"


# --- preemption ------------------------------------------------------------------------------------


def test_first_signal_sets_the_flag_and_handlers_are_restored(capsys):
    before_term, before_int = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with PreemptionHandler() as preemption:
        assert not preemption.requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert preemption.requested and preemption.received is signal.SIGTERM
    assert "received SIGTERM" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) == before_term and signal.getsignal(signal.SIGINT) == before_int


def test_second_sigint_raises_keyboard_interrupt():
    # from Python's default Ctrl-C handler, whatever an earlier test in this process left installed
    outer = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            with PreemptionHandler() as preemption:
                # raise_signal runs the handler in this (the main) thread at once; os.kill may land
                # on another thread and reach the handler only after the block
                signal.raise_signal(signal.SIGINT)
                assert preemption.requested
                signal.raise_signal(signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, outer)


TRAIN_SCRIPT = textwrap.dedent(
    """
    import sys, time, torch
    from grpo.checkpoint import save_checkpoint
    from grpo.preemption import PreemptionHandler

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with PreemptionHandler() as preemption:
        for iteration in range(1, 10_000):
            loss = model(torch.randn(8, 4)).pow(2).mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            time.sleep(0.02)
            print(f"iteration {iteration}", flush=True)
            if preemption.requested:
                save_checkpoint(sys.argv[1], iteration, model_state=model.state_dict(),
                                optimizer_state=optimizer.state_dict(), trainer_state={"preempted": True})
                print(f"saved {iteration} {model.weight.sum().item():.10f}", flush=True)
                sys.exit(0)
    """
)


def test_sigterm_during_training_leaves_a_complete_checkpoint(tmp_path):
    process = subprocess.Popen(
        [sys.executable, "-c", TRAIN_SCRIPT, str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout.readline().startswith("iteration 1")  # the loop is running
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 0, err
    assert "received SIGTERM" in err
    saved = [line for line in out.splitlines() if line.startswith("saved")]
    assert len(saved) == 1
    _, step, weight_sum = saved[0].split()
    path = latest_checkpoint(tmp_path)
    assert path is not None and is_complete(path) and path.name == f"checkpoint-{int(step):08d}"
    loaded = load_checkpoint(path, restore_rng=False)
    assert loaded.trainer_state == {"preempted": True} and loaded.optimizer_state is not None
    assert loaded.model_state["weight"].sum().item() == pytest.approx(float(weight_sum), abs=1e-9)


def test_a_second_sigterm_stops_at_once(tmp_path):
    script = textwrap.dedent(
        """
        import time
        from grpo.preemption import PreemptionHandler
        with PreemptionHandler():
            print("ready", flush=True)
            while True:
                time.sleep(0.01)  # a stuck iteration that never checks the flag
        """
    )
    process = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout.readline().strip() == "ready"
        process.send_signal(signal.SIGTERM)
        assert "received SIGTERM" in process.stderr.readline()
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
    finally:
        process.kill()
    assert process.returncode == -signal.SIGTERM
