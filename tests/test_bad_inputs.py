"""Bad inputs end in one line on stderr and exit code 2, before any model work, writing nothing.

Failure classes: a checkpoint whose weight files are truncated or corrupt, or that has only pickle
weights (refused with a conversion command that works); an output folder that is a file; a malformed
or empty prompts file; a resume checkpoint that is corrupt or not a training run's; ``nextscene judge
score`` with no judge server. Each goes through the real ``nextscene`` entry point and, for the
checkpoints, through the Python loaders too.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from grpo.checkpoint import load_checkpoint, save_checkpoint
from grpo.cli import main
from policies import LTXPolicy
from policies.errors import InputError
from policies.nextclip import NextClipPolicy
from policies.nsp import NSPPolicy
from policies.tiny import build_tiny_ltx

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def tiny_ltx(tmp_path_factory) -> Path:
    return build_tiny_ltx(tmp_path_factory.mktemp("tiny_ltx") / "ltx")


# ------------------------------------------------------------------------------------------ helpers
def truncate(file: Path) -> None:
    """Cut a file in half, as an interrupted download leaves it."""
    os.truncate(file, file.stat().st_size // 2)


def corrupt_header(file: Path) -> None:
    """Overwrite the header length of a safetensors file with garbage."""
    data = bytearray(file.read_bytes())
    data[:8] = b"\xff" * 8
    file.write_bytes(bytes(data))


def pickle_only(weights: Path, name: str) -> None:
    """Replace a safetensors file by the same tensors saved with pickle (``torch.save``) as ``name``."""
    torch.save(load_file(str(weights)), weights.parent / name)
    weights.unlink()


BREAK = {"truncated": truncate, "corrupt_header": corrupt_header}


def tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under ``root`` with its size and modification time."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def fails_in_one_line(capsys, root: Path, argv: list[str], *messages: str) -> str:
    """Run ``nextscene ARGV``: exit code 2, one stderr line holding ``messages``, nothing under ``root``
    written or changed."""
    before = tree(root)
    capsys.readouterr()  # drop what the setup printed
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for message in messages:
        assert message in err, err
    assert tree(root) == before
    return err


def write_recipe(tmp_path: Path, policy: dict, **changes) -> Path:
    recipe = {
        "name": "bad-inputs",
        "stage": "grpo",
        "policy": policy,
        "data": {"type": "prompts", "prompts": ["a ball", "two balls"], "eval_prompts": ["a cube"]},
        "rewards": [{"name": "redness", "weight": 1.0}],
        "trainer": {
            "output_dir": str(tmp_path / "run"),
            "num_generations": 2,
            "num_prompts_per_iteration": 2,
            "num_inference_steps": 2,
            "max_iterations": 1,
        },
    }
    for key, value in changes.items():
        recipe[key] = {**recipe[key], **value} if isinstance(value, dict) else value
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def copy(source: Path, target: Path) -> Path:
    return Path(shutil.copytree(source, target))


# ------------------------------------------------------------------------------------------ weights
@pytest.mark.parametrize("command", ["train", "eval", "rollout"])
@pytest.mark.parametrize("damage", ["truncated", "corrupt_header", "pickle_only"])
def test_broken_ltx_weights_are_one_line_before_model_work(tmp_path, tiny_ltx, capsys, command, damage):
    ckpt = copy(tiny_ltx, tmp_path / "ckpt")
    if damage == "pickle_only":
        pickle_only(ckpt / "transformer" / WEIGHTS, "diffusion_pytorch_model.bin")
        expected = [
            f"{ckpt / 'transformer'} has only pickle weights (diffusion_pytorch_model.bin)",
            "convert",
        ]
    else:
        BREAK[damage](ckpt / "vae" / WEIGHTS)
        expected = [f"{ckpt / 'vae' / WEIGHTS} is truncated or corrupt", "re-download or regenerate"]
    recipe = write_recipe(tmp_path, {"type": "ltx", "path": str(ckpt)})
    argv = {
        "train": ["train", str(recipe)],
        "eval": ["eval", str(recipe)],
        "rollout": ["rollout", "--checkpoint", str(ckpt), "--out", str(tmp_path / "run")],
    }[command]
    fails_in_one_line(capsys, tmp_path, argv, *expected)


@pytest.mark.parametrize("damage", ["truncated", "corrupt_header"])
def test_broken_nsp_and_nextclip_checkpoints_fail_in_train_before_writing(tmp_path, capsys, damage):
    nsp = copy(REPO / "checkpoints" / "toy_nsp", tmp_path / "nsp")
    BREAK[damage](nsp / "nsp_trainable.safetensors")
    recipe = write_recipe(tmp_path, {"type": "nsp", "path": str(nsp)})
    fails_in_one_line(
        capsys, tmp_path, ["train", str(recipe)], f"{nsp / 'nsp_trainable.safetensors'} is truncated"
    )

    nextclip = copy(REPO / "checkpoints" / "toy_nextclip", tmp_path / "nextclip")
    BREAK[damage](nextclip / "transformer" / WEIGHTS)
    recipe = write_recipe(tmp_path, {"type": "nextclip", "path": str(nextclip)})
    fails_in_one_line(
        capsys,
        tmp_path,
        ["train", str(recipe)],
        f"{nextclip / 'transformer' / WEIGHTS} is truncated or corrupt",
    )


@pytest.mark.parametrize("damage", ["config_json", "no_tokenizer", "nsp_config_type"])
def test_broken_checkpoint_layout_is_one_line_before_model_work(tmp_path, tiny_ltx, capsys, damage):
    if damage == "nsp_config_type":
        ckpt = copy(REPO / "checkpoints" / "toy_nsp", tmp_path / "ckpt")
        config = ckpt / "nsp_config.json"
        config.write_text(config.read_text().replace('"num_queries": 8', '"num_queries": "8"'))
        policy, expected = "nsp", f"{config}: num_queries='8' must be of type int"
    else:
        ckpt = copy(tiny_ltx, tmp_path / "ckpt")
        policy = "ltx"
        if damage == "config_json":
            (ckpt / "vae" / "config.json").write_text('{"in_channels": 3,')
            expected = f"{ckpt / 'vae' / 'config.json'} is not valid JSON"
        else:
            shutil.rmtree(ckpt / "tokenizer")
            expected = "has a text_encoder/ but no tokenizer/"
    recipe = write_recipe(tmp_path, {"type": policy, "path": str(ckpt)})
    fails_in_one_line(capsys, tmp_path, ["train", str(recipe)], expected)


def test_python_loaders_name_the_broken_file(tmp_path, tiny_ltx):
    ltx = copy(tiny_ltx, tmp_path / "ltx")
    truncate(ltx / "text_encoder" / "model.safetensors")
    with pytest.raises(
        InputError, match=re.escape(f"{ltx / 'text_encoder' / 'model.safetensors'} is truncated")
    ):
        LTXPolicy.from_pretrained(ltx)

    with_lora = LTXPolicy.from_pretrained(tiny_ltx)
    with_lora.add_lora(rank=2)
    with_lora.save_pretrained(tmp_path / "lora")
    adapter = tmp_path / "lora" / "transformer_lora" / "pytorch_lora_weights.safetensors"
    corrupt_header(adapter)
    with pytest.raises(InputError, match=re.escape(f"{adapter} is truncated or corrupt")):
        LTXPolicy.from_pretrained(tmp_path / "lora")

    nextclip = copy(REPO / "checkpoints" / "toy_nextclip", tmp_path / "nextclip")
    pickle_only(nextclip / "vae" / WEIGHTS, "diffusion_pytorch_model.bin")
    with pytest.raises(InputError, match=re.escape(f"{nextclip / 'vae'} has only pickle weights")):
        NextClipPolicy.from_pretrained(nextclip)

    nsp = copy(REPO / "checkpoints" / "toy_nsp", tmp_path / "nsp")
    corrupt_header(nsp / "vlm" / "model.safetensors")
    with pytest.raises(
        InputError, match=re.escape(f"{nsp / 'vlm' / 'model.safetensors'} is truncated or corrupt")
    ):
        NSPPolicy.from_pretrained(nsp)


def test_reward_model_loading_refuses_pickle_and_broken_heads(tmp_path, capsys):
    from rewards.reward_model import HEADS_FILE, VideoRewardModel, build_tiny_reward_model

    model = build_tiny_reward_model()
    pickled = model.save_pretrained(tmp_path / "pickled")
    pickle_only(pickled / "model.safetensors", "pytorch_model.bin")
    refusal = re.escape(f"{pickled} has only pickle weights (pytorch_model.bin)")
    with pytest.raises(InputError, match=refusal):
        VideoRewardModel.from_pretrained(pickled)
    truncated = model.save_pretrained(tmp_path / "truncated")
    truncate(truncated / HEADS_FILE)
    with pytest.raises(InputError, match=re.escape(f"{truncated / HEADS_FILE} is truncated or corrupt")):
        VideoRewardModel.from_pretrained(truncated)
    # a reward-model training run that starts from either is refused before anything is written
    for start, message in ((pickled, "has only pickle weights"), (truncated, "is truncated or corrupt")):
        recipe = tmp_path / "reward_model.yaml"
        recipe.write_text(
            yaml.safe_dump(
                {
                    "name": "bad-reward-model",
                    "stage": "reward_model",
                    "policy": {"type": "video_reward_model", "path": str(start)},
                    "data": {"type": "toyworld_preferences", "num_train": 4, "num_eval": 2},
                    "trainer": {"output_dir": str(tmp_path / "run"), "max_steps": 1},
                }
            )
        )
        fails_in_one_line(capsys, tmp_path, ["train", str(recipe)], f"{start}", message)


def test_broken_reward_model_in_a_grpo_recipe_fails_before_writing(tmp_path, tiny_ltx, capsys):
    from rewards.reward_model import HEADS_FILE, build_tiny_reward_model

    saved = build_tiny_reward_model().save_pretrained(tmp_path / "rm")
    truncate(saved / HEADS_FILE)
    recipe = write_recipe(
        tmp_path,
        {"type": "ltx", "path": str(tiny_ltx)},
        rewards=[
            {"name": "reward_model", "weight": 1.0, "kwargs": {"model": str(saved), "normalize": False}}
        ],
    )
    fails_in_one_line(
        capsys, tmp_path, ["train", str(recipe)], f"{saved / HEADS_FILE} is truncated or corrupt"
    )


@pytest.mark.parametrize("kind", ["ltx", "nsp"])
def test_the_conversion_command_in_the_message_works(tmp_path, tiny_ltx, kind):
    """The command a pickle-only refusal prints converts the folder (diffusers' LTX transformer, the
    transformers VLM); the policy then loads the weights of the original safetensors checkpoint."""
    source = tiny_ltx if kind == "ltx" else REPO / "checkpoints" / "toy_nsp"
    load = LTXPolicy.from_pretrained if kind == "ltx" else NSPPolicy.from_pretrained
    ckpt = copy(source, tmp_path / "ckpt")
    if kind == "ltx":
        pickle_only(ckpt / "transformer" / WEIGHTS, "diffusion_pytorch_model.bin")
    else:
        pickle_only(ckpt / "vlm" / "model.safetensors", "pytorch_model.bin")
    with pytest.raises(InputError, match="nextscene loads safetensors only: convert with") as refused:
        load(ckpt)
    command = re.search(r"`([^`]+)`", str(refused.value)).group(1)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run(command, shell=True, check=True, env=env, cwd=tmp_path, capture_output=True)
    converted, original = load(ckpt).state_dict(), load(source).state_dict()
    assert converted.keys() == original.keys()
    assert all(torch.equal(converted[k], original[k]) for k in original)


# ------------------------------------------------------------------------------------------ outputs
def test_output_dir_that_is_a_file_is_refused_before_model_work(tmp_path, tiny_ltx, capsys):
    taken = tmp_path / "taken"
    taken.write_text("keep me")
    recipe = write_recipe(
        tmp_path, {"type": "ltx", "path": str(tiny_ltx)}, trainer={"output_dir": str(taken)}
    )
    fails_in_one_line(capsys, tmp_path, ["train", str(recipe)], f"output_dir: {taken} is a file")
    recipe = write_recipe(tmp_path, {"type": "ltx", "path": str(tiny_ltx)})
    fails_in_one_line(
        capsys, tmp_path, ["eval", str(recipe), "--out", str(taken / "eval")], f"inside {taken}"
    )
    fails_in_one_line(capsys, tmp_path, ["rollout", "--out", str(taken)], f"--out: {taken} is a file")
    assert taken.read_text() == "keep me"


# ------------------------------------------------------------------------------------------ prompts
@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        (
            "prompts.jsonl",
            '{"prompt": "a ball"}\n{"prompt": "two balls"\n',
            "prompts.jsonl:2: not valid JSON",
        ),
        ("prompts.jsonl", "\n\n", "prompts.jsonl holds no prompts"),
        ("prompts.txt", "  \n", "prompts.txt holds no prompts"),
    ],
)
def test_bad_prompts_file_is_one_line_naming_the_line(tmp_path, tiny_ltx, capsys, name, text, message):
    prompts = tmp_path / name
    prompts.write_text(text)
    recipe = write_recipe(
        tmp_path, {"type": "ltx", "path": str(tiny_ltx)}, data={"prompts": None, "path": str(prompts)}
    )
    fails_in_one_line(capsys, tmp_path, ["train", str(recipe)], message)


# ------------------------------------------------------------------------------------------ resume
def _training_checkpoint(output_dir: Path, trainer_state: dict) -> Path:
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return save_checkpoint(
        output_dir,
        2,
        model_state=model.state_dict(),
        optimizer_state=optimizer.state_dict(),
        scheduler_state=scheduler.state_dict(),
        trainer_state=trainer_state,
    )


@pytest.mark.parametrize("damage", ["truncated_model", "no_training_state", "no_optimizer"])
def test_broken_resume_checkpoint_fails_before_model_work(tmp_path, tiny_ltx, capsys, damage):
    state = {} if damage == "no_training_state" else {"step": 2, "optimizer_steps": 2}
    ckpt = _training_checkpoint(tmp_path / "old_run", state)
    expected = {
        "truncated_model": f"{ckpt / 'model.safetensors'} is truncated or corrupt",
        "no_training_state": f"{ckpt} lacks trainer_state.step, trainer_state.optimizer_steps",
        "no_optimizer": f"{ckpt} lacks optimizer.pt",
    }[damage]
    if damage == "truncated_model":
        truncate(ckpt / "model.safetensors")
    elif damage == "no_optimizer":  # a checkpoint of weights only, listed as such in its meta.json
        meta = ckpt / "meta.json"
        meta.write_text(meta.read_text().replace('"optimizer.pt",', ""))
        (ckpt / "optimizer.pt").unlink()
    recipe = write_recipe(
        tmp_path, {"type": "ltx", "path": str(tiny_ltx)}, trainer={"resume_from_checkpoint": str(ckpt)}
    )
    fails_in_one_line(capsys, tmp_path, ["train", str(recipe)], expected)


def test_corrupt_optimizer_state_is_an_input_error(tmp_path):
    ckpt = _training_checkpoint(tmp_path, {"step": 2, "optimizer_steps": 2})
    truncate(ckpt / "optimizer.pt")
    with pytest.raises(InputError, match=re.escape(f"{ckpt / 'optimizer.pt'} is truncated, corrupt")):
        load_checkpoint(ckpt)


# ------------------------------------------------------------------------------------------ judge
def test_grpo_with_an_unreachable_judge_fails_before_writing(tmp_path, tiny_ltx, capsys):
    judge = {"urls": ["http://127.0.0.1:1"], "health_timeout_s": 1, "max_retries": 0}
    recipe = write_recipe(
        tmp_path,
        {"type": "ltx", "path": str(tiny_ltx)},
        rewards=[{"name": "causal_consistency", "weight": 1.0, "kwargs": judge}],
    )
    fails_in_one_line(
        capsys, tmp_path, ["train", str(recipe)], "no judge server answered", "nextscene judge serve"
    )


def test_judge_score_without_a_server_is_one_line_and_writes_nothing(tmp_path):
    """Through the real entry point (a subprocess): logging and all, stderr is the one error line."""
    manifest = tmp_path / "pairs.jsonl"
    manifest.write_text('{"context_caption": "a ball rolls", "next_caption": "it stops"}\n')
    argv = ["judge", "score", str(manifest), "--url", "http://127.0.0.1:1", "--mode", "text"]
    argv += ["--health-timeout-s", "1", "--max-retries", "0"]
    done = subprocess.run(
        [sys.executable, "-m", "grpo.cli", *argv], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    err = done.stderr.strip()
    assert done.returncode == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "no judge server answered" in err and "nextscene judge serve --model PATH" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pairs.jsonl"]


@pytest.mark.parametrize("damage", ["truncated", "pickle_only"])
def test_broken_ltx2_weights_are_one_line_before_model_work(tmp_path, capsys, damage):
    from policies.tiny_ltx2 import build_tiny_ltx2

    ckpt = build_tiny_ltx2(tmp_path / "ckpt", seed=0)
    if damage == "pickle_only":
        pickle_only(ckpt / "connectors" / WEIGHTS, "diffusion_pytorch_model.bin")
        expected = [f"{ckpt / 'connectors'} has only pickle weights (diffusion_pytorch_model.bin)", "convert"]
    else:
        truncate(ckpt / "transformer" / WEIGHTS)
        expected = [f"{ckpt / 'transformer' / WEIGHTS} is truncated or corrupt", "re-download or regenerate"]
    recipe = write_recipe(tmp_path, {"type": "ltx2", "path": str(ckpt)})
    fails_in_one_line(capsys, tmp_path, ["train", str(recipe)], *expected)
