"""The real-scale rehearsal (benchmarks/real_scale.py) in its --tiny mode, so the script cannot rot."""

import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import real_scale  # noqa: E402
from grpo.recipe import load_recipe  # noqa: E402


@pytest.mark.parametrize("name", sorted(real_scale.JOBS))
def test_every_recipe_takes_the_rehearsals_overrides(tmp_path, name):
    """Each shipped real recipe with the rehearsal's paths, step count, judge and tiny sizes is a valid
    recipe (schema, reward names) -- checked without running it."""
    raw = real_scale.yaml.safe_load((real_scale.RECIPES_DIR / f"{name}.yaml").read_text())
    paths = {k: tmp_path / k for k in ("policy", "run", "manifest", "eval_manifest", "vlm", "reward_model")}
    overrides = real_scale.recipe_overrides(name, raw, paths, tiny=True, device="cpu")
    recipe = load_recipe(real_scale.RECIPES_DIR / f"{name}.yaml", overrides)
    assert recipe.policy["path"] == str(paths["policy"]) and recipe.args.output_dir == str(paths["run"])
    steps = recipe.args.max_iterations if raw["stage"] == "grpo" else recipe.args.max_steps
    assert steps == real_scale.STEPS[raw["stage"]]
    names = [r.name for r in recipe.rewards]
    assert real_scale.JUDGE_REWARD not in names  # the vLLM judge is replaced by the in-process one
    base = load_recipe(real_scale.RECIPES_DIR / f"{name}.yaml")
    changed = {k.split(".", 1)[1] for k in real_scale.TINY_OVERRIDES[name] if k.startswith("trainer.")}
    for key in set(raw["trainer"]) - changed - {"max_steps", "max_iterations"}:  # nothing else changes
        assert getattr(recipe.args, key) == getattr(base.args, key), key


def test_disk_written_counts_each_file_once_and_not_links_from_outside(tmp_path):
    outside = tmp_path / "checkpoint" / "weights.bin"
    outside.parent.mkdir()
    outside.write_bytes(b"x" * 1000)
    run = tmp_path / "run"
    (run / "a").mkdir(parents=True)
    (run / "a" / "new.bin").write_bytes(b"y" * 300)
    os.link(run / "a" / "new.bin", run / "twice.bin")  # two links inside: counted once
    os.link(outside, run / "a" / "linked.bin")  # a link of a file outside: not new bytes
    assert real_scale.tree_bytes(run) == 1300
    assert real_scale.tree_bytes(run, only_new=True) == 300


def test_tiny_rehearsal_runs_a_recipe_and_reports_a_failing_one(tmp_path):
    """The whole pipeline on CPU: tiny checkpoints in their layouts, synthetic MP4 manifests,
    ``nextscene train`` in a subprocess. A recipe that fails (a bad override: refused before anything
    is written) is reported with its one-line error and does not stop the next; the NSP GRPO recipe
    on LTX-2 (judge in-process, best-of-N) runs and its saved policy links what it did not train."""
    out = tmp_path / "out"
    code = real_scale.main(
        [
            "--tiny",
            "--keep",
            "--out",
            str(out),
            "--json",
            str(tmp_path / "r.json"),
            "--recipes",
            "nsp_qwen25vl7b_ltx2b_grpo,nsp_qwen25vl7b_ltx2_grpo",
            "--set",
            "nsp_qwen25vl7b_ltx2b_grpo:trainer.lerning_rate=1",
        ]
    )
    assert code == 1  # one recipe failed
    report = json.loads((tmp_path / "r.json").read_text())
    assert report == json.loads((out / "real_scale.json").read_text())
    failed, ran = report["results"]
    assert not failed["ok"] and "lerning_rate" in failed["error"] and "\n" not in failed["error"]
    assert "override trainer.lerning_rate=1" in failed["reductions"] and failed["command"] == []
    assert not (out / "runs" / "nsp_qwen25vl7b_ltx2b_grpo").exists()
    assert ran["ok"], ran["error"]
    iterations = ran["metrics"]["iterations"]
    assert len(iterations) == real_scale.STEPS["grpo"]
    for it in iterations:
        assert it["rollout_s"] > 0 and it["decode_reward_s"] > 0 and it["update_s"] > 0
    final = out / "runs" / "nsp_qwen25vl7b_ltx2_grpo" / "final"
    config = json.loads((final / "nsp_config.json").read_text())
    assert Path(config["vlm"]) == out / "work" / "checkpoints" / "vlm"  # referred to, not copied
    assert not (final / "vlm").exists()
    # the LoRA base, VAEs and connectors are the checkpoint's own files: the saved policy's new bytes
    # are the adapter, the NSP weights and configs
    assert 0 < ran["final_bytes"] < real_scale.tree_bytes(final) / 2
    base = out / "work" / "checkpoints" / "ltx2" / "transformer" / "diffusion_pytorch_model.safetensors"
    assert os.path.samefile(base, final / "ltx" / "transformer" / "diffusion_pytorch_model.safetensors")
    table = real_scale.format_table([real_scale.Result(**r) for r in report["results"]])
    assert "failed: " in table and "| nsp_qwen25vl7b_ltx2_grpo | ok |" in table


def test_a_checkpoint_that_does_not_fit_the_disk_is_refused_before_writing(tmp_path, monkeypatch):
    import collections

    import torch

    store = real_scale.Checkpoints(tmp_path, tiny=True, gemma_layers=48, reward_model_layers=28)
    module = torch.nn.Linear(100, 100)  # 40 400 bytes of float32 weights
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(real_scale.shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 40_000, 40_000))
    with pytest.raises(RuntimeError, match="needs ~0.0 GB but 0.0 GB are free.*--gemma-layers"):
        store._check_fits("the test model", module)
    monkeypatch.setattr(real_scale.shutil, "disk_usage", lambda path: usage(10**6, 0, 40_400))
    store._check_fits("the test model", module)


def test_relative_out_and_work_become_absolute(tmp_path, monkeypatch):
    """An NSP directory written here names its VLM by path, resolved from that directory: a relative
    ``--out`` (``runs/x``) once made every NSP recipe fail with "VLM directory .../runs/x/... has no
    config.json"."""
    monkeypatch.chdir(tmp_path)
    args = real_scale.parse_args(["--out", "runs/rs", "--recipes", "nsp_qwen25vl7b_ltx2b_grpo"])
    assert args.out == tmp_path / "runs" / "rs" and args.work == tmp_path / "runs" / "rs" / "work"
    args = real_scale.parse_args(["--out", "o", "--work", "w", "--recipes", "nsp_qwen25vl7b_ltx2b_grpo"])
    assert args.work == tmp_path / "w"
