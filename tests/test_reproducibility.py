"""Same recipe + same seed -> bitwise the same run (CPU), and SIGKILL + resume -> the uninterrupted run.

Every run is a `nextscene train` in a process of its own (tests/scripts/nextscene_process.py), whose
global generators are seeded differently on purpose: what a run draws must come from the recipe's
seed alone.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from grpo.checkpoint import checkpoint_name, is_complete
from policies.seeding import seed_process, seeded

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "scripts" / "nextscene_process.py"

# the Quickstart recipe (NSP, LoRA + EMA, SDE window), shortened: 4 iterations of 2 contexts x 4
# samples, checkpoints at 2 and 4, held-out evaluation of one context at 0 and at the end
GRPO = [
    "recipes/toy_nsp_grpo.yaml",
    "trainer.max_iterations=4",
    "trainer.num_generations=4",
    "trainer.num_prompts_per_iteration=2",
    "trainer.eval_every=4",
    "trainer.save_steps=2",
    "trainer.save_eval_videos=1",
    "data.num_eval=1",
    "trainer.resume_from_checkpoint=auto",
]
# the NFT Quickstart as shipped (full fine-tuning: the timestep embedding trains), shortened: 2 iterations,
# no held-out evaluation (the second iteration's loss already depends on every bit of the first update)
QUICKSTART = [
    "recipes/toy_nsp_nft.yaml",
    "trainer.max_iterations=2",
    "trainer.eval_every=0",
    "trainer.save_steps=0",
]
# the NSP SFT stage with LoRA + EMA on the shipped base: 4 steps of 2 rows, checkpoint at 2
SFT = [
    "recipes/toy_nsp_sft.yaml",
    "policy.path=checkpoints/toy_nsp",
    "trainer.max_steps=4",
    "trainer.batch_size=2",
    "trainer.warmup_steps=1",
    "trainer.eval_every=2",
    "trainer.save_steps=2",
    "trainer.use_lora=true",
    "trainer.lora_rank=4",
    "trainer.ema_decay=0.9",
    "data.num_train=16",
    "data.num_eval=1",
]
TIMING_KEYS = ("time", "samples_per_s", "memory/peak_gb")


def nextscene(out: Path, recipe: list[str], global_seed: int, kill_after_step: int = -1, threads: int = 1):
    """Run `nextscene train RECIPE output_dir=OUT` in a fresh process (CPU, ``threads`` threads)."""
    pythonpath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {
        **os.environ,
        "PYTHONPATH": pythonpath,
        "OMP_NUM_THREADS": str(threads),
        "CUDA_VISIBLE_DEVICES": "",
    }
    command = [sys.executable, str(SCRIPT), str(global_seed), str(kill_after_step), "--", "train"]
    return subprocess.run(
        [*command, *recipe, f"output_dir={out}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def finished(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stderr[-3000:]


def metrics_lines(run: Path) -> list[dict]:
    """Every line of metrics.jsonl as written (not deduplicated), timing fields left out."""
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if not k.startswith(TIMING_KEYS)} for line in lines]


def weights(run: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Every safetensors file under ``final/`` and the checkpoints, by relative path."""
    files = [f for f in sorted(run.rglob("*.safetensors")) if "checkpoint-" in str(f) or "final" in f.parts]
    return {str(f.relative_to(run)): load_file(str(f)) for f in files}


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert sorted(a[name]) == sorted(b[name]), name
        for key in a[name]:
            assert torch.equal(a[name][key], b[name][key]), f"{name}: {key} differs"


def test_seeded_draws_come_from_the_seed_and_leave_the_global_generator_alone():
    torch.manual_seed(5)
    next_global = torch.rand(3)
    torch.manual_seed(5)
    with seeded(11):
        inside = torch.rand(3)
    assert torch.equal(torch.rand(3), next_global)  # the global stream continues as if nothing ran
    assert torch.equal(inside, torch.rand(3, generator=torch.Generator().manual_seed(11)))


def test_each_rank_gets_its_own_global_seed_from_the_recipe_seed():
    draws = {}
    for seed, rank in ((0, 0), (0, 1), (1, 0), (0, 0)):
        seed_process(seed, rank)
        draws.setdefault((seed, rank), []).append(torch.rand(4))
    assert torch.equal(*draws[(0, 0)])
    assert not torch.equal(draws[(0, 0)][0], draws[(0, 1)][0])
    assert not torch.equal(draws[(0, 0)][0], draws[(1, 0)][0])


@pytest.mark.parametrize("stage", ["grpo", "sft"])
def test_lora_adapters_start_from_the_recipe_seed_whatever_the_global_generator(tmp_path, stage):
    from grpo.config import FlowMatchingConfig, GRPOConfig
    from grpo.sft import FlowMatchingTrainer
    from grpo.trainer import GRPOTrainer
    from policies import LTXPolicy
    from policies.tiny import build_tiny_ltx

    tiny = build_tiny_ltx(tmp_path / "tiny")
    row = {"prompt": "a ball", "video": torch.zeros(9, 32, 32, 3)}

    def adapters(global_seed: int, seed: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(global_seed)
        common = dict(output_dir=str(tmp_path / "run"), use_lora=True, lora_rank=4, seed=seed)
        if stage == "grpo":
            trainer = GRPOTrainer(LTXPolicy.from_pretrained(tiny), [lambda v, *a, **k: [0.0] * len(v)],
                                  GRPOConfig(**common), [row])  # fmt: skip
        else:
            trainer = FlowMatchingTrainer(
                LTXPolicy.from_pretrained(tiny), FlowMatchingConfig(**common), [row]
            )
        return {k: v.detach().cpu().clone() for k, v in trainer.state.trainable.items()}

    first, again, other_seed = adapters(1, seed=0), adapters(2, seed=0), adapters(1, seed=1)
    assert any("lora_A" in k for k in first)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other_seed[k]) for k in first if "lora_A" in k)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("grpo") / "uninterrupted"
    finished(nextscene(run, GRPO, global_seed=1))
    return run


@pytest.mark.slow
def test_two_grpo_runs_of_one_recipe_are_bitwise_identical(uninterrupted, tmp_path):
    again = tmp_path / "again"
    finished(nextscene(again, GRPO, global_seed=2))
    first, second = weights(uninterrupted), weights(again)
    assert any("transformer_lora" in name for name in first) and any("ema" in name for name in first)
    assert_bitwise_equal(first, second)
    assert metrics_lines(uninterrupted) == metrics_lines(again)
    assert [r["step"] for r in metrics_lines(again)] == [0, 1, 2, 3, 4]


@pytest.mark.slow
def test_sigkill_between_checkpoints_then_resume_gives_the_uninterrupted_run(uninterrupted, tmp_path):
    run = tmp_path / "killed"
    killed = nextscene(run, GRPO, global_seed=3, kill_after_step=2)
    assert killed.returncode == -signal.SIGKILL
    # killed between checkpoints: checkpoint 2 is complete, step 2 is already logged, 4 never came
    assert is_complete(run / checkpoint_name(2)) and not (run / checkpoint_name(4)).exists()
    assert [r["step"] for r in metrics_lines(run)] == [0, 1, 2]
    assert not (run / "final").exists()

    finished(nextscene(run, GRPO, global_seed=4))  # resume_from_checkpoint=auto -> checkpoint 2
    assert_bitwise_equal(weights(run), weights(uninterrupted))
    resumed = metrics_lines(run)
    assert [r["step"] for r in resumed] == [0, 1, 2, 3, 4]  # step 2 ran twice, logged once
    assert resumed == metrics_lines(uninterrupted)


@pytest.mark.slow
def test_two_sft_runs_of_one_recipe_are_bitwise_identical(tmp_path):
    runs = [tmp_path / "a", tmp_path / "b"]
    for seed, run in enumerate(runs):
        finished(nextscene(run, SFT, global_seed=seed))
    first, second = weights(runs[0]), weights(runs[1])
    assert any("transformer_lora" in name for name in first) and any("ema" in name for name in first)
    assert_bitwise_equal(first, second)
    assert metrics_lines(runs[0]) == metrics_lines(runs[1])


@pytest.mark.slow
def test_two_quickstart_runs_on_two_threads_are_bitwise_identical(tmp_path):
    """The Quickstart's own setting, torch's two threads on two cores: reductions split across threads
    must still add in a fixed order (plain tensor indexing's backward did not: its runs drifted by
    ~1e-7 within a few iterations)."""
    runs = [tmp_path / "a", tmp_path / "b"]
    for seed, run in enumerate(runs):
        finished(nextscene(run, QUICKSTART, global_seed=seed, threads=2))
    assert_bitwise_equal(weights(runs[0]), weights(runs[1]))
    assert metrics_lines(runs[0]) == metrics_lines(runs[1])
