"""A judge server killed mid-run (SIGKILL): its samples are unscored (None), the log counts them, the run
goes on and scores again once the server is back; an outage longer than the trainer's patience saves a
checkpoint and stops with a one-line error, and the run resumes from it. Nothing crashes, nothing is lost."""

import json
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from grpo.cli import _one_line
from grpo.config import GRPOConfig
from grpo.trainer import GRPOTrainer
from policies import LTXPolicy
from policies.tiny import build_tiny_ltx
from rewards import CausalConsistencyJudge, CompositeReward, JudgeUnavailableError, RewardUnavailableError

pytestmark = pytest.mark.timeout(300)

SERVER = Path(__file__).parent / "scripts" / "fake_judge_server.py"
G = 2


class JudgeProcess:
    """The stand-in judge server as a process on a fixed port, so it can be killed and started again."""

    def __init__(self) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(SERVER), str(self.port)], stdout=subprocess.PIPE, text=True
        )
        assert self.process.stdout.readline().strip() == "ready"

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        assert self.process.wait(timeout=30) == -signal.SIGKILL


@pytest.fixture
def server():
    process = JudgeProcess()
    process.start()
    yield process
    if process.process.poll() is None:
        process.kill()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_ltx(tmp_path_factory.mktemp("tiny_ltx"))


class Outage:
    """Kills the server after iteration ``down`` and starts it again after iteration ``up`` (if given)."""

    def __init__(self, server: JudgeProcess, down: int, up: int | None = None) -> None:
        self.server, self.down, self.up = server, down, up

    def on_iteration_end(self, trainer, iteration, metrics) -> None:
        if iteration == self.down:
            self.server.kill()
        if iteration == self.up:
            self.server.start()


def _trainer(tmp_path, tiny_dir, server, callback, **overrides):
    judge = CausalConsistencyJudge(
        urls=[server.url], mode="images", num_frames=2, max_retries=1, backoff_s=0.01, timeout_s=5.0,
        url_cooldown_s=0.1, health_timeout_s=10.0, cache_size=0,
    )  # fmt: skip
    args = GRPOConfig(
        output_dir=str(tmp_path / "run"),
        num_generations=G,
        num_prompts_per_iteration=1,
        num_inference_steps=2,
        save_steps=1,
        sample_every=0,
        seed=0,
        **overrides,
    )
    row = {
        "prompt": "a ball",
        "context": torch.rand(9, 32, 32, 3, generator=torch.Generator().manual_seed(0)),
    }
    reward = CompositeReward([judge], names=["judge"])
    return GRPOTrainer(LTXPolicy.from_pretrained(tiny_dir), reward, args, [row], callbacks=[callback])


def _logged(run: Path, key: str) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [row[key] for row in rows if key in row]


def test_a_judge_killed_mid_run_leaves_its_samples_unscored_and_the_run_goes_on(tmp_path, tiny_dir, server):
    trainer = _trainer(tmp_path, tiny_dir, server, Outage(server, down=0, up=2), max_iterations=5)
    trainer.train()
    run = tmp_path / "run"
    assert _logged(run, "reward/judge/num_unscored") == [0.0, G, G, 0.0, 0.0]  # down for iterations 1-2
    assert _logged(run, "reward/unavailable") == [0.0, 1.0, 1.0, 0.0, 0.0]
    assert all(0 < x < 1 for x in _logged(run, "reward/judge/mean")[3:])  # scoring resumed
    assert (run / "checkpoint-00000005").is_dir()  # every save_steps checkpoint written (older pruned)
    assert (run / "final").is_dir()


def test_an_outage_past_the_patience_saves_stops_in_one_line_and_resumes(tmp_path, tiny_dir, server):
    trainer = _trainer(
        tmp_path, tiny_dir, server, Outage(server, down=0), max_iterations=5, max_reward_outage_iterations=2
    )
    with pytest.raises(RewardUnavailableError, match="could not score for 2 iterations in a row") as info:
        trainer.train()
    message = str(info.value)
    assert (
        "\n" not in message and "checkpoint-00000003" in message and "resume_from_checkpoint=auto" in message
    )
    assert _one_line(info.value)  # the CLI prints it as one line, no traceback
    run = tmp_path / "run"
    assert _logged(run, "reward/judge/num_unscored") == [0.0, G, G]
    assert (run / "checkpoint-00000003").is_dir()

    server.start()  # back: resume where it stopped and finish
    resumed = _trainer(
        tmp_path, tiny_dir, server, Outage(server, down=-1), max_iterations=5, resume_from_checkpoint="auto"
    )
    resumed.train()
    assert _logged(run, "reward/judge/num_unscored") == [0.0, G, G, 0.0, 0.0]  # each step once
    assert (run / "final").is_dir()


def test_a_judge_alone_still_raises_when_its_server_is_down(server):
    judge = CausalConsistencyJudge(
        urls=[server.url], mode="text", max_retries=0, backoff_s=0.01, timeout_s=2.0
    )
    judge.check_health()
    server.kill()
    captions = {"context_caption": ["a ball rolls"], "prediction_caption": ["it stops"]}
    with pytest.raises(JudgeUnavailableError):
        judge(None, ["a ball"], None, **captions)
    out = CompositeReward([judge], names=["judge"])(None, ["a ball"], None, **captions)
    assert out.columns["judge"] == [None] and "judge failed on 1 of 1 samples" in out.unavailable["judge"]
