"""LTX2Policy's contract: the ODE path equals diffusers' LTX2Pipeline / LTX2ImageToVideoPipeline (video
and audio, all guidance on), recomputed log-probs equal the rollout's, checkpoints (with LoRA)
round-trip bitwise, and bad input fails early with one line."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from policies.errors import InputError
from policies.ltx import LTXPolicy
from policies.ltx2 import LTX2Policy, LTX2SamplingConfig
from policies.tiny_ltx2 import build_tiny_ltx2

REPO = Path(__file__).resolve().parents[1]
GEOMETRY = dict(num_frames=9, height=64, width=64, frame_rate=25.0)
GUIDANCE = dict(
    guidance_scale=3.0,
    audio_guidance_scale=4.0,
    stg_scale=1.0,
    stg_blocks=[1],
    modality_scale=2.0,
    guidance_rescale=0.5,
    audio_guidance_rescale=0.3,
)
PROMPTS = ["a red ball", "two blue squares"]
TEXT = dict(max_sequence_length=16)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """The tiny LTX-2 checkpoint with perturbed attention on (LTX-2.3's STG layout: no extra weights)
    and non-trivial latent statistics, so that STG acts and (de)normalisation is checked."""
    path = build_tiny_ltx2(tmp_path_factory.mktemp("tiny_ltx2") / "ckpt", seed=1)
    config = json.loads((path / "transformer" / "config.json").read_text())
    (path / "transformer" / "config.json").write_text(json.dumps({**config, "perturbed_attn": True}))
    for seed, folder in enumerate(("vae", "audio_vae")):
        file = path / folder / "diffusion_pytorch_model.safetensors"
        state = load_file(file)
        g = torch.Generator().manual_seed(seed)
        state["latents_mean"] = 0.3 * torch.randn(state["latents_mean"].shape, generator=g)
        state["latents_std"] = 0.5 + torch.rand(state["latents_std"].shape, generator=g)
        save_file(state, file)
    return path


@pytest.fixture(scope="module")
def policy(tiny_dir):
    return LTX2Policy.from_pretrained(tiny_dir)


def _pipeline(cls, path):
    pipe = cls.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _condition(policy, rows: int, cfg: bool) -> dict[str, torch.Tensor]:
    return policy.encode_prompt(PROMPTS[:rows], negative_prompt="" if cfg else None, **TEXT)


def _pipeline_latents(policy, rollout):
    """The rollout's final video ``[B, C, F, h, w]`` and audio ``[B, C, L, M]`` latents, denormalised
    as the pipelines return them with ``output_type="latent"``."""
    final, channels = rollout.final_latents, policy.transformer.config.in_channels
    n_video = int(np.prod(rollout.latent_shape)) * channels
    video = final[:, :n_video].unflatten(1, (-1, channels)).transpose(1, 2).unflatten(2, rollout.latent_shape)
    vae = policy.vae
    video = video * vae.latents_std.view(1, -1, 1, 1, 1) / vae.config.scaling_factor + vae.latents_mean.view(
        1, -1, 1, 1, 1
    )
    audio = final[:, n_video:].unflatten(1, (-1, policy.transformer.config.audio_in_channels))
    audio = audio * policy.audio_vae.latents_std + policy.audio_vae.latents_mean
    return video, audio.unflatten(2, (policy.audio_vae.config.latent_channels, -1)).transpose(1, 2)


def _pipeline_kwargs(rows, guidance, generations=1):
    # each prompt repeated, not num_videos_per_prompt: diffusers 0.42.1 repeats the prompt embeddings
    # per prompt but their attention masks per batch, so the two disagree for G > 1 distinct prompts
    prompts = [p for p in PROMPTS[:rows] for _ in range(generations)]
    kwargs = dict(prompt=prompts, negative_prompt="", **TEXT)
    if guidance:
        kwargs.update(
            **{k: v for k, v in GUIDANCE.items() if k != "stg_blocks"},
            spatio_temporal_guidance_blocks=GUIDANCE["stg_blocks"],
            audio_stg_scale=GUIDANCE["stg_scale"],
            audio_modality_scale=GUIDANCE["modality_scale"],
        )
    else:
        kwargs.update(guidance_scale=1.0, stg_scale=0.0, modality_scale=1.0, guidance_rescale=0.0)
        kwargs.update(audio_guidance_scale=1.0, audio_stg_scale=0.0, audio_modality_scale=1.0)
        kwargs.update(audio_guidance_rescale=0.0)
    return kwargs


@pytest.mark.parametrize("guidance", [False, True], ids=["no-guidance", "cfg-stg-modality-rescale"])
def test_ode_rollout_reproduces_ltx2_pipeline(tiny_dir, policy, guidance):
    from diffusers import LTX2Pipeline

    pipe = _pipeline(LTX2Pipeline, tiny_dir)
    cond = _condition(policy, 2, cfg=guidance)
    seeds, steps = [11, 12, 13, 14], 4
    expected = pipe(
        **_pipeline_kwargs(2, guidance, generations=2),
        **GEOMETRY,
        num_inference_steps=steps,
        generator=[torch.Generator().manual_seed(s) for s in seeds],
        output_type="latent",
    )
    sampling = LTX2SamplingConfig(
        **GEOMETRY, num_inference_steps=steps, kind="ode", **(GUIDANCE if guidance else {})
    )
    rollout = policy.rollout(cond, num_generations=2, sampling=sampling, seeds=seeds)
    video, audio = _pipeline_latents(policy, rollout)
    assert video.shape == expected.frames.shape and audio.shape == expected.audio.shape
    assert (video - expected.frames).abs().max().item() <= 1e-4
    assert (audio - expected.audio).abs().max().item() <= 1e-4
    assert rollout.extras["guidance"]["stg"] == ([1.0, 1.0] if guidance else [0.0, 0.0])  # recorded


def test_decode_matches_ltx2_pipeline_output(tiny_dir, policy):
    from diffusers import LTX2Pipeline

    pipe = _pipeline(LTX2Pipeline, tiny_dir)
    cond = _condition(policy, 1, cfg=False)
    out = pipe(
        **_pipeline_kwargs(1, False),
        **GEOMETRY,
        num_inference_steps=3,
        generator=[torch.Generator().manual_seed(7)],
        output_type="pt",
    )
    rollout = policy.rollout(
        cond, sampling=LTX2SamplingConfig(**GEOMETRY, num_inference_steps=3, kind="ode"), seeds=[7]
    )
    videos = policy.decode(rollout.final_latents, rollout.latent_shape)
    assert (videos - out.frames.permute(0, 1, 3, 4, 2)).abs().max().item() <= 1e-4
    waveform = policy.decode_audio(rollout.final_latents, rollout.latent_shape)
    assert waveform.shape == out.audio.shape
    assert (waveform - out.audio).abs().max().item() <= 1e-4


@pytest.mark.parametrize("guidance", [False, True], ids=["no-guidance", "cfg-stg-modality-rescale"])
def test_i2v_ode_rollout_reproduces_ltx2_image_to_video_pipeline(tiny_dir, policy, guidance):
    from diffusers import LTX2ImageToVideoPipeline
    from PIL import Image

    pipe = _pipeline(LTX2ImageToVideoPipeline, tiny_dir)
    pixels = np.random.default_rng(3).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    cond = _condition(policy, 1, cfg=guidance)
    seeds = [21, 22]
    expected = pipe(
        image=[Image.fromarray(pixels)] * 2,
        image_crf=0,
        **_pipeline_kwargs(1, guidance, generations=2),
        **GEOMETRY,
        num_inference_steps=4,
        generator=[torch.Generator().manual_seed(s) for s in seeds],
        output_type="latent",
    )
    cond["image_latents"] = policy.encode_image(torch.from_numpy(pixels).float()[None] / 255)
    sampling = LTX2SamplingConfig(
        **GEOMETRY, num_inference_steps=4, kind="ode", **(GUIDANCE if guidance else {})
    )
    rollout = policy.rollout(cond, num_generations=2, sampling=sampling, seeds=seeds)
    video, audio = _pipeline_latents(policy, rollout)
    assert (video - expected.frames).abs().max().item() <= 1e-4
    assert (audio - expected.audio).abs().max().item() <= 1e-4


@pytest.mark.parametrize("modalities", ["video", "audio_video"])
@pytest.mark.parametrize("guidance", [False, True], ids=["no-guidance", "guidance"])
@pytest.mark.parametrize("i2v", [False, True], ids=["t2v", "i2v"])
def test_recomputed_log_prob_equals_rollout(policy, modalities, guidance, i2v):
    cond = _condition(policy, 2, cfg=guidance)
    if i2v:
        cond["image_latents"] = policy.encode_image(
            torch.rand(2, 64, 64, 3, generator=torch.Generator().manual_seed(4))
        )
    sampling = LTX2SamplingConfig(
        **GEOMETRY,
        num_inference_steps=4,
        kind="sde",
        noise_level=0.7,
        modalities=modalities,
        **(GUIDANCE if guidance else {}),
    )
    rollout = policy.rollout(cond, num_generations=2, sampling=sampling, seeds=[1, 2, 3, 4])
    assert rollout.log_probs.shape == (4, 4) and set(rollout.part_log_probs) == {"video", "audio"}
    for j in range(rollout.latents.shape[1]):
        with torch.no_grad():
            out, parts = policy.log_prob_parts(rollout, j)
        assert (out.log_prob - rollout.log_probs[:, j]).abs().max().item() <= 1e-5
        for name in ("video", "audio"):
            assert (parts[name] - rollout.part_log_probs[name][:, j]).abs().max().item() <= 1e-5
    # the joint reduction, computed independently: the Gaussian density of every stochastic element
    with torch.no_grad():
        out = policy.log_prob(rollout, 1)
    stochastic = out.std > 0
    n_video = int(np.prod(rollout.latent_shape)) * policy.transformer.config.in_channels
    assert bool(stochastic[:, n_video:].any()) == (modalities == "audio_video")
    std = torch.where(stochastic, out.std, torch.ones_like(out.std))
    density = (
        -0.5 * ((rollout.next_latents[:, 1] - out.mean) / std) ** 2 - std.log() - 0.5 * np.log(2 * np.pi)
    )
    expected = (density * stochastic).sum(1) / stochastic.sum(1)
    assert (expected - rollout.log_probs[:, 1]).abs().max().item() <= 1e-5
    if modalities == "video":
        assert torch.equal(rollout.part_log_probs["audio"], torch.zeros_like(rollout.log_probs))
        assert torch.equal(rollout.log_probs, rollout.part_log_probs["video"])
    if i2v:  # the clean first latent frame never moves and is out of the log-prob
        first = rollout.latent_shape[1] * rollout.latent_shape[2] * policy.transformer.config.in_channels
        assert torch.equal(rollout.final_latents[:, :first], rollout.latents[:, 0, :first])
        assert not bool(stochastic[:, :first].any())


@pytest.mark.parametrize("kind", ["cps", "dance"])
def test_sde_window_and_kinds(policy, kind):
    sampling = LTX2SamplingConfig(
        **GEOMETRY, num_inference_steps=5, kind=kind, noise_level=0.5, sde_steps=[1, 3]
    )
    rollout = policy.rollout(
        _condition(policy, 1, cfg=False), num_generations=2, sampling=sampling, seeds=[7, 8]
    )
    assert rollout.step_indices.tolist() == [1, 3] and rollout.log_probs.shape == (2, 2)
    for j in range(2):
        with torch.no_grad():
            assert (policy.log_prob(rollout, j).log_prob - rollout.log_probs[:, j]).abs().max().item() <= 1e-5


def test_sum_reduction_is_the_joint_likelihood(policy):
    sampling = LTX2SamplingConfig(**GEOMETRY, num_inference_steps=3, reduction="sum")
    rollout = policy.rollout(
        _condition(policy, 1, cfg=False), num_generations=2, sampling=sampling, seeds=[5, 6]
    )
    parts = rollout.part_log_probs
    torch.testing.assert_close(rollout.log_probs, parts["video"] + parts["audio"], rtol=1e-6, atol=1e-3)
    with torch.no_grad():
        out = policy.log_prob(rollout, 2)
    assert (out.log_prob - rollout.log_probs[:, 2]).abs().max().item() <= 1e-5 * rollout.log_probs.abs().max()


def test_saved_rollout_recomputes_and_per_sample_steps_match(tmp_path, policy):
    from policies import Rollout

    cond = _condition(policy, 2, cfg=True)
    sampling = LTX2SamplingConfig(**GEOMETRY, num_inference_steps=3, **GUIDANCE)
    rollout = policy.rollout(cond, num_generations=2, sampling=sampling, seeds=[1, 2, 3, 4])
    rollout.save(tmp_path / "r")
    loaded = Rollout.load(tmp_path / "r")
    assert torch.equal(loaded.part_log_probs["audio"], rollout.part_log_probs["audio"])
    steps = torch.tensor([2, 0, 1, 2])  # each sample its own recorded step (Flow-GRPO's random subset)
    with torch.no_grad():
        mixed = policy.log_prob(loaded, steps)
        singles = [policy.log_prob(loaded, int(j)).log_prob[b] for b, j in enumerate(steps)]
    torch.testing.assert_close(mixed.log_prob, torch.stack(singles), rtol=0, atol=1e-6)
    expected = rollout.log_probs[torch.arange(4), steps]
    assert (mixed.log_prob - expected).abs().max().item() <= 1e-5
    part = loaded.select([2, 3])  # a micro-batch keeps its own rows, masks and per-part log-probs
    with torch.no_grad():
        assert (policy.log_prob(part, 1).log_prob - rollout.log_probs[2:, 1]).abs().max().item() <= 1e-5


def test_train_without_guidance_and_bad_override(policy):
    cond = _condition(policy, 1, cfg=True)
    sampling = LTX2SamplingConfig(**GEOMETRY, num_inference_steps=3, **GUIDANCE)
    rollout = policy.rollout(cond, num_generations=2, sampling=sampling, seeds=[5, 6])
    plain = policy.rollout(
        cond, num_generations=2, sampling=LTX2SamplingConfig(**GEOMETRY, num_inference_steps=3), seeds=[5, 6]
    )
    with torch.no_grad():
        free = policy.log_prob(rollout, 0, guidance_scale=1.0)
        again = policy.log_prob(plain, 0)
    assert torch.equal(
        rollout.latents[:, 0], plain.latents[:, 0]
    )  # the first step's input is the seed's noise
    # without guidance the recompute is the unguided policy's log-prob of the guided sample
    assert (free.mean - again.mean).abs().max().item() <= 1e-5
    with pytest.raises(InputError, match="guidance_scale"):
        policy.log_prob(rollout, 0, guidance_scale=3.0)


def test_save_load_lora_round_trip_is_bitwise(tmp_path, tiny_dir):
    from diffusers import LTX2Pipeline

    sampling = LTX2SamplingConfig(**GEOMETRY, num_inference_steps=3, **GUIDANCE)
    policy = LTX2Policy.from_pretrained(tiny_dir)
    cond = _condition(policy, 1, cfg=True)
    policy.save_pretrained(tmp_path / "base")
    loaded = LTX2Policy.from_pretrained(tmp_path / "base")
    first = policy.rollout(cond, num_generations=2, sampling=sampling, seeds=[8, 9])
    assert torch.equal(
        first.final_latents,
        loaded.rollout(cond, num_generations=2, sampling=sampling, seeds=[8, 9]).final_latents,
    )

    loaded.add_lora(rank=4)
    optimizer = torch.optim.SGD([p for p in loaded.parameters() if p.requires_grad], lr=0.5)
    for step in range(2):
        loss = -loaded.log_prob(first, step).log_prob.mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    tuned = loaded.rollout(cond, num_generations=2, sampling=sampling, seeds=[8, 9])
    assert (tuned.final_latents - first.final_latents).abs().max() > 1e-4  # LoRA training changed the policy
    with loaded.reference(), torch.no_grad():  # adapters off: the base model again
        reference = loaded.rollout(cond, num_generations=2, sampling=sampling, seeds=[8, 9])
    torch.testing.assert_close(reference.final_latents, first.final_latents, rtol=0, atol=1e-5)

    loaded.save_pretrained(tmp_path / "lora")
    assert (tmp_path / "lora" / "transformer_lora").is_dir()
    for name in ("transformer", "vae", "connectors", "audio_vae", "vocoder", "text_encoder"):
        files = [f.relative_to(tmp_path / "base" / name) for f in (tmp_path / "base" / name).rglob("*.*")]
        assert files and all(  # frozen parts (the base under LoRA too) are the loaded files, hard-linked
            os.path.samefile(tmp_path / "base" / name / f, tmp_path / "lora" / name / f) for f in files
        ), name
    again = LTX2Policy.from_pretrained(tmp_path / "lora")
    second = again.rollout(cond, num_generations=2, sampling=sampling, seeds=[8, 9])
    for name in ("final_latents", "latents", "next_latents", "log_probs"):
        assert torch.equal(getattr(second, name), getattr(tuned, name)), name
    _pipeline(LTX2Pipeline, tmp_path / "base")  # what we save is a diffusers LTX-2 directory


def _no_forward(monkeypatch, policy):
    calls = []
    monkeypatch.setattr(policy.transformer, "forward", lambda *a, **k: calls.append(1))
    return calls


def test_ltx_video_and_ltx2_directories_are_not_mixed_up(tmp_path, tiny_dir):
    from policies.tiny import build_tiny_ltx

    ltx_dir = build_tiny_ltx(tmp_path / "ltx")
    with pytest.raises(InputError, match="LTXPolicy") as info:
        LTX2Policy.from_pretrained(ltx_dir)
    assert "\n" not in str(info.value)
    with pytest.raises(InputError, match="LTX2Policy") as info:
        LTXPolicy.from_pretrained(tiny_dir)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(num_frames=10), "8k\\+1"),
        (dict(height=48), "multiple of 32"),
        (dict(modalities="audio"), "modalities"),
        (dict(stg_scale=1.0, stg_blocks=[]), "stg_blocks"),
        (dict(stg_scale=1.0, stg_blocks=[2]), "stg_blocks"),
        (dict(guidance_scale=3.0), "negative_prompt_embeds"),
    ],
)
def test_bad_input_fails_before_any_forward(monkeypatch, policy, change, match):
    calls = _no_forward(monkeypatch, policy)
    with pytest.raises(InputError, match=match) as info:
        policy.rollout(
            _condition(policy, 1, cfg=False), sampling=LTX2SamplingConfig(**{**GEOMETRY, **change})
        )
    assert calls == [] and "\n" not in str(info.value)


def test_checkpoint_limits_fail_before_any_forward(monkeypatch, tiny_dir):
    policy = LTX2Policy.from_pretrained(tiny_dir)
    calls = _no_forward(monkeypatch, policy)
    policy.transformer.register_to_config(perturbed_attn=False)
    with pytest.raises(InputError, match="perturbed attention") as info:
        policy.rollout(
            _condition(policy, 1, cfg=False),
            sampling=LTX2SamplingConfig(**GEOMETRY, stg_scale=1.0, stg_blocks=[1]),
        )
    assert "\n" not in str(info.value)
    with pytest.raises(InputError, match="height=32 is 1 latent cell") as info:  # the VAE could not decode it
        policy.rollout(
            _condition(policy, 1, cfg=False), sampling=LTX2SamplingConfig(**{**GEOMETRY, "height": 32})
        )
    assert "\n" not in str(info.value)
    policy.audio_vae = None
    with pytest.raises(InputError, match="modalities='video'") as info:
        policy.rollout(_condition(policy, 1, cfg=False), sampling=LTX2SamplingConfig(**GEOMETRY))
    assert calls == [] and "\n" not in str(info.value)
    with pytest.raises(InputError, match="prompt_embeds must be"):
        policy.rollout({"prompt_embeds": torch.zeros(1, 3, 5), "prompt_attention_mask": torch.ones(1, 3)})


def _grpo_recipe(tmp_path, tiny_dir, *overrides):
    import yaml

    from grpo.recipe import load_recipe

    recipe = yaml.safe_load((REPO / "recipes" / "tiny_ltx2_grpo_redness.yaml").read_text())
    recipe["policy"] = {"type": "ltx2", "path": str(tiny_dir), "sampling": {"modalities": "audio_video"}}
    recipe["trainer"].update(
        output_dir=str(tmp_path / "run"), max_iterations=2, eval_every=2, save_steps=2, num_inference_steps=3
    )
    recipe["data"]["eval_prompts"] = recipe["data"]["eval_prompts"][:2]
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return load_recipe(path, list(overrides))


def test_grpo_runs_on_ltx2_with_exact_on_policy_ratios(tmp_path, tiny_dir):
    from grpo.tracking import read_metrics
    from grpo.train import run

    run(_grpo_recipe(tmp_path, tiny_dir, "trainer.guidance_scale=2.0", "trainer.cfg_in_training=true"))
    metrics = read_metrics(tmp_path / "run" / "metrics.jsonl")
    steps = [m for m in metrics if "train/ratio_first_step" in m]
    assert len(steps) == 2 and all(m["train/ratio_first_step"] == pytest.approx(1.0, abs=1e-5) for m in steps)
    assert all(m["train/logprob_drift"] < 1e-5 for m in steps)  # the recompute reproduces the rollout
    assert steps[-1]["train/kl"] > 0  # the policy moved
    final = LTX2Policy.from_pretrained(tmp_path / "run" / "final").transformer.state_dict()
    start = LTX2Policy.from_pretrained(tiny_dir).transformer.state_dict()
    assert max((final[k] - start[k]).abs().max().item() for k in start) > 1e-4  # trained and saved


@pytest.mark.parametrize(
    "override,message",
    [
        ("policy.sampling.modalities=audio", "modalities must be one of"),
        ("policy.sampling.num_frames=9", "unknown key(s) ['num_frames']"),
        # what the checkpoint's configs refuse: caught at recipe time, not after the first rollout
        (
            "trainer.height=32",
            "height=32 is 1 latent cell; the LTX-2 VAE decoder (reflect padding) needs >= 2",
        ),
        ("trainer.num_frames=12", "num_frames=12 is not 8k+1"),
        ("policy.sampling.stg_scale=1.0", "stg_blocks [] must be a non-empty list of blocks"),
    ],
)
def test_bad_ltx2_recipe_fails_fast_with_one_line(tmp_path, tiny_dir, override, message):
    from grpo.train import validate

    with pytest.raises(InputError) as info:
        validate(_grpo_recipe(tmp_path, tiny_dir, override))
    assert message in str(info.value) and "\n" not in str(info.value)
