"""The supervised flow-matching stage: its loss against diffusers' noising, and learning on the toy world."""

from pathlib import Path

import pytest
import torch

from grpo.config import FlowMatchingConfig
from grpo.recipe import load_recipe
from grpo.sft import FlowMatchingTrainer
from grpo.train import build_datasets, validate
from policies import LTXPolicy
from policies.tiny import build_tiny_ltx

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_ltx(tmp_path_factory.mktemp("tiny_ltx"))


def test_flow_matching_loss_matches_diffusers_noising_and_a_direct_forward(tiny_dir):
    from diffusers import FlowMatchEulerDiscreteScheduler

    policy = LTXPolicy.from_pretrained(tiny_dir)
    videos = torch.rand(2, 9, 32, 32, 3, generator=torch.Generator().manual_seed(0))
    target = policy.encode_video(videos)
    condition = policy.encode_prompt(["a red ball", "a blue ball"])
    sigmas = torch.tensor([0.3, 0.8])
    noise = torch.randn(target.shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        loss = policy.flow_matching_loss(condition, target, sigmas, noise, (2, 4, 4))

        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(tiny_dir / "scheduler")
        expected = []
        for b in range(2):
            noisy = scheduler.scale_noise(
                target[b : b + 1], torch.tensor([sigmas[b] * 1000]), noise[b : b + 1]
            )
            velocity = policy.transformer(
                hidden_states=noisy,
                encoder_hidden_states=condition["prompt_embeds"][b : b + 1],
                timestep=torch.tensor([sigmas[b] * 1000]),
                encoder_attention_mask=condition["prompt_attention_mask"][b : b + 1],
                num_frames=2,
                height=4,
                width=4,
                rope_interpolation_scale=(8 / 25.0, 8, 8),
                return_dict=False,
            )[0]
            expected.append(((velocity - (noise[b : b + 1] - target[b : b + 1])) ** 2).mean())
    torch.testing.assert_close(loss, torch.stack(expected), rtol=1e-5, atol=1e-6)


def test_sft_lowers_held_out_loss_on_the_toy_world(tmp_path, tiny_dir):
    recipe = load_recipe(
        RECIPES[0].parent / "toy_ltx_sft.yaml",
        [
            "data.num_train=128",
            "data.num_eval=16",
            f"policy.path={tiny_dir}",
            "policy.tiny=false",
            f"output_dir={tmp_path / 'run'}",
        ],
    )
    _, data_spec = validate(recipe)
    train, held_out = build_datasets(data_spec)
    args = FlowMatchingConfig(
        output_dir=str(tmp_path / "run"),
        max_steps=60,
        batch_size=8,
        learning_rate=1e-3,
        eval_every=60,
        save_steps=0,
        logging_steps=10,
    )
    history = FlowMatchingTrainer(LTXPolicy.from_pretrained(tiny_dir), args, train, held_out).train()
    evals = [m["eval/loss"] for m in history if "eval/loss" in m]
    print(f"held-out flow-matching loss {evals[0]:.4f} -> {evals[-1]:.4f}")
    assert len(evals) == 2 and evals[-1] < 0.6 * evals[0]
    assert (tmp_path / "run" / "final" / "transformer").is_dir()


def test_sft_trains_at_the_recipes_frame_rate(tmp_path, tiny_dir):
    """The supervised loss uses the recipe's frame rate (data.fps), not LTX's 25 fps default: the
    logged loss of step 0 is the loss at data.fps computed here from the same draws, and the 25 fps
    loss differs. The trained policy records the rate."""
    from grpo.config import trained_frame_rate
    from grpo.trainer import derived_seed

    recipe = load_recipe(
        RECIPES[0].parent / "toy_ltx_sft.yaml",
        [
            "data.num_train=8",
            "data.fps=2",
            f"policy.path={tiny_dir}",
            "policy.tiny=false",
            f"output_dir={tmp_path / 'run'}",
            "trainer.max_steps=1",
            "trainer.batch_size=2",
            "trainer.timestep_sampling=uniform",
            "trainer.eval_every=0",
            "trainer.save_steps=0",
            "trainer.lr_scheduler_type=constant",
            "trainer.warmup_steps=0",
        ],
    )
    assert recipe.args.frame_rate == 2.0
    _, data_spec = validate(recipe)
    train, _ = build_datasets(data_spec)
    history = FlowMatchingTrainer(LTXPolicy.from_pretrained(tiny_dir), recipe.args, train).train()

    # the weights of step 0, before the update, on the trainer's device (a GPU's kernels round differently)
    policy = LTXPolicy.from_pretrained(tiny_dir).to("cuda" if torch.cuda.is_available() else "cpu")
    seed = recipe.args.seed
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(derived_seed(seed, 0)))
    rows = [train[int(i)] for i in order[:2]]
    generator = torch.Generator().manual_seed(derived_seed(seed, 0, 0))
    with torch.no_grad():
        condition = policy.prepare_condition(rows)
        target = policy.encode_video(torch.stack([torch.as_tensor(r["video"]) for r in rows]))
        sigmas = torch.rand(2, generator=generator)
        noise = torch.randn(target.shape, generator=generator).to(target.device)
        at = {
            fps: float(policy.flow_matching_loss(condition, target, sigmas, noise, (2, 4, 4), fps).mean())
            for fps in (2.0, 25.0)
        }
    assert history[0]["loss"] == pytest.approx(at[2.0], rel=1e-5)
    assert abs(at[2.0] - at[25.0]) > 1e-3 * at[2.0], at  # 100x the tolerance above
    assert trained_frame_rate(tmp_path / "run" / "final") == 2.0


def test_dataloader_workers_read_the_same_rows_and_resume_the_same(tmp_path, tiny_dir):
    """``dataloader_num_workers``: the rows are loaded in worker processes, and the run (every step's
    loss, bitwise) is the one that loads them in the training process, also when resumed mid-run."""
    import os

    recipe = load_recipe(
        RECIPES[0].parent / "toy_ltx_sft.yaml",
        ["data.num_train=16", f"policy.path={tiny_dir}", "policy.tiny=false", f"output_dir={tmp_path}"],
    )
    _, data_spec = validate(recipe)
    rows, _ = build_datasets(data_spec)

    class Traced(torch.utils.data.Dataset):  # each row says which process loaded it
        def __len__(self):
            return len(rows)

        def __getitem__(self, index):
            return {**rows[index], "loaded_by": os.getpid()}

    def run(out: str, workers: int, resume: str | None = None) -> tuple[list[float], set[int]]:
        args = FlowMatchingConfig(
            output_dir=str(tmp_path / out),
            max_steps=4,
            batch_size=2,
            gradient_accumulation_steps=2,
            eval_every=0,
            save_steps=2,
            dataloader_num_workers=workers,
            resume_from_checkpoint=resume,
        )
        trainer = FlowMatchingTrainer(LTXPolicy.from_pretrained(tiny_dir), args, Traced())
        loaders, batch = set(), trainer._batch

        def traced(step: int, micro: int) -> list:
            loaded = batch(step, micro)
            loaders.update(row["loaded_by"] for row in loaded)
            return loaded

        trainer._batch = traced
        return [m["loss"] for m in trainer.train()], loaders

    plain, loaded_here = run("plain", 0)
    workers, loaded_there = run("workers", 2)
    assert loaded_here == {os.getpid()} and len(loaded_there) == 2 and os.getpid() not in loaded_there
    assert workers == plain and len(plain) == 4
    resumed, _ = run("workers", 2, resume=str(tmp_path / "workers" / "checkpoint-00000002"))
    assert resumed == plain[2:]


@pytest.fixture(scope="module")
def toy_manifest(tmp_path_factory):
    from grpo.data import ToyWorld, ToyWorldConfig
    from grpo.data.toyworld import export_toyworld

    world = ToyWorld(ToyWorldConfig(), split="train", num_samples=2)
    return export_toyworld(world, tmp_path_factory.mktemp("manifest"), video_format="npz", progress=False)


def _standalone(recipe: Path, overrides: list[str], manifest: Path | None = None):
    """The recipe with a tiny random policy where its checkpoint comes from an earlier stage or is a
    cluster path, and a small toy-world manifest in place of a cluster dataset."""
    loaded = load_recipe(recipe, overrides)
    extra = []
    path = loaded.policy.get("path")
    if path is not None and not Path(path).is_dir():
        extra += ["policy.path=null", "policy.tiny=true"]
        if loaded.policy["type"] == "ltx2" and loaded.data["type"] == "toyworld":
            extra.append("policy.tiny_vae_fit_steps=2")  # the toy-world layout its pretrain stage builds
        if loaded.policy["type"] == "nsp" and loaded.policy.get("sampling"):
            extra.append("policy.tiny_generator=ltx2")  # LTX-2 sampling settings: an NSP on LTX-2
    if loaded.data["type"] == "nsp_manifest" and not Path(loaded.data["path"]).exists():
        extra += [f"data.path={manifest}", f"data.eval_path={manifest}"]
    return load_recipe(recipe, [*overrides, *extra]) if extra else loaded


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.name for r in RECIPES])
def test_every_shipped_recipe_validates(recipe, toy_manifest):
    validate(_standalone(recipe, [], toy_manifest))


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.name for r in RECIPES])
def test_every_shipped_recipe_resolves_to_a_file_that_loads_back_the_same(tmp_path, recipe, toy_manifest):
    from grpo.recipe import RESOLVED_RECIPE_FILE, recipe_to_dict, save_resolved

    loaded = _standalone(recipe, [], toy_manifest)
    again = load_recipe(save_resolved(loaded, tmp_path))
    assert recipe_to_dict(again) == recipe_to_dict(loaded) and again.args == loaded.args
    assert (tmp_path / RESOLVED_RECIPE_FILE).is_file()


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.name for r in RECIPES])
def test_every_shipped_recipe_resolves_every_default_and_validates_back_to_the_same_specs(
    tmp_path, recipe, toy_manifest
):
    """resolved_recipe.yaml holds every field of every section's spec, and of the settings nested in
    them (tiny backbone sizes, the judge's question, LTX-2 sampling), so a later change of a default
    cannot change what it reproduces; loading it validates to equal specs and trainer config."""
    import dataclasses

    import yaml

    from grpo.judge_training import PROMPT_FIELDS
    from grpo.recipe import save_resolved
    from policies.ltx2 import LTX2_ONLY_FIELDS
    from policies.tiny_qwen_vl import TinyQwenVLSpec
    from rewards.reward_model import TinyRewardModelSpec

    loaded = _standalone(recipe, [], toy_manifest)
    policy, data = validate(loaded)
    path = save_resolved(loaded, tmp_path)
    written = yaml.safe_load(path.read_text())
    for section, spec in (("policy", policy), ("data", data), ("trainer", loaded.args)):
        assert set(written[section]) == {f.name for f in dataclasses.fields(spec) if f.init}, section
    assert all(set(reward) == {"name", "weight", "kwargs"} for reward in written["rewards"])
    nested = {"sampling": set(LTX2_ONLY_FIELDS), "judge": set(PROMPT_FIELDS)}
    tiny = {"video_reward_model": TinyRewardModelSpec, "qwen_vl_judge": TinyQwenVLSpec}.get(policy.type)
    if tiny is not None and policy.tiny:
        nested["tiny_spec"] = {f.name for f in dataclasses.fields(tiny)}
    for name, expected in nested.items():
        if written["policy"].get(name):  # (an NSP on LTX-Video has no LTX-2 sampling settings)
            assert set(written["policy"][name]) == expected, name
    assert policy.type != "ltx2" or written["policy"]["sampling"]  # LTX-2 always has them
    again = load_recipe(path)
    assert validate(again) == (policy, data) and again.args == loaded.args


@pytest.mark.slow
@pytest.mark.parametrize(
    "recipe",
    # toy_nsp_grpo_judge.yaml (with the shipped checkpoints/toy_judge): tests/test_judge_grpo.py runs
    # one iteration of it per scoring
    [r for r in RECIPES if r.name.startswith(("toy_", "tiny_")) and r.name != "toy_nsp_grpo_judge.yaml"],
    ids=lambda r: r.name,
)
def test_toy_recipes_run_a_few_steps(tmp_path, recipe):
    from grpo.train import run

    loaded = load_recipe(recipe, [f"output_dir={tmp_path / 'run'}"])
    short = ["trainer.max_steps=3"] if loaded.stage != "grpo" else ["trainer.max_iterations=1"]
    if loaded.stage in ("pretrain", "sft"):  # a few rows a step (the deep next-clip recipe draws 32)
        short += ["trainer.batch_size=2", "trainer.eval_batch_size=2"]
    if loaded.policy.get("tiny_vae_fit_steps"):
        short.append("policy.tiny_vae_fit_steps=2")
    if loaded.policy.get("tiny_audio_fit_steps"):
        short.append("policy.tiny_audio_fit_steps=2")
    if loaded.stage == "grpo" and loaded.policy["type"] == "nextclip":  # 3 clips x 6 steps per sample
        short += ["trainer.num_prompts_per_iteration=1", "trainer.num_generations=2"]
    if loaded.stage == "reward_model":  # the recipe simulates 16k preference pairs first
        short += ["data.num_train=32", "data.num_eval=16", "trainer.per_device_train_batch_size=8"]
        if loaded.data.get("policy"):  # and samples 512 contexts x 8 of a policy
            short += ["data.policy_contexts=1", "data.policy_eval_contexts=1", "data.policy_generations=4"]
            short += ["data.policy_margin=0"]  # 6 pairs of one context: keep every pair that is not a tie
    if loaded.stage == "judge_sft":  # the recipes simulate thousands of scenes (and policy samples) first
        short += ["data.num_train=4", "data.num_eval=2", "trainer.per_device_train_batch_size=4"]
        short += ["data.num_workers=0", "trainer.dataloader_num_workers=0"]
        if loaded.data.get("policy"):
            short += ["data.policy_contexts=1", "data.policy_eval_contexts=1", "data.policy_generations=2"]
    for i, reward in enumerate(loaded.rewards):  # a learned reward the recipe expects trained first
        model = (reward.kwargs or {}).get("model")
        if reward.name == "reward_model" and not Path(str(model)).is_dir():
            from rewards.reward_model import build_tiny_reward_model

            build_tiny_reward_model().save_pretrained(tmp_path / "reward_model")
            short += [
                f"rewards.{i}.kwargs.model={tmp_path / 'reward_model'}",
                f"rewards.{i}.kwargs.normalize=false",
            ]
    run(_standalone(recipe, [f"output_dir={tmp_path / 'run'}", *short, "trainer.eval_every=0"]))
    assert (tmp_path / "run" / "final").is_dir() and (tmp_path / "run" / "metrics.jsonl").is_file()
