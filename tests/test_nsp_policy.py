"""NSPPolicy (Qwen-VL + learnable queries + connector + LTX-Video): LTXPolicy's contract, one VLM
forward per context, a frozen VLM, checkpoints, and one-line errors for bad input."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from grpo.data import ToyWorld, ToyWorldConfig
from policies import SamplingConfig
from policies.errors import InputError
from policies.files import link_tree
from policies.nsp import NSPConfig, NSPPolicy
from policies.qwen_vl_inputs import num_vision_tokens, video_inputs
from policies.tiny_nsp import TinyNSPSpec, build_tiny_nsp
from policies.tiny_qwen_vl import TinyQwenVLSpec

FAST = dict(num_inference_steps=4, num_frames=9, height=32, width=32)


@pytest.fixture(scope="module")
def nsp_dir(tmp_path_factory):
    return build_tiny_nsp(tmp_path_factory.mktemp("tiny_nsp"))


@pytest.fixture(scope="module")
def policy(nsp_dir):
    return NSPPolicy.from_pretrained(nsp_dir)


@pytest.fixture(scope="module")
def samples():
    world = ToyWorld(ToyWorldConfig(next_overlap=1), split="train", num_samples=3)
    return [world[i] for i in range(3)]


def _rows(samples, n):
    return [{"context": s["context"], "instruction": s["instruction"], "fps": s["fps"]} for s in samples[:n]]


def _assert_recompute_matches(policy, rollout):
    assert rollout.latents.shape[1] > 0
    for j in range(rollout.latents.shape[1]):
        with torch.no_grad():
            out = policy.log_prob(rollout, j)
        assert (out.log_prob - rollout.log_probs[:, j]).abs().max().item() <= 1e-5


@pytest.mark.parametrize(
    "rows,generations,cfg,continuity",
    [(1, 1, False, True), (2, 3, False, True), (2, 2, True, True), (2, 2, False, False)],
    ids=["b1", "G3", "G2-cfg", "G2-no-continuity"],
)
def test_recomputed_log_prob_equals_rollout(policy, samples, rows, generations, cfg, continuity):
    policy.config.continuity = continuity
    try:
        with torch.no_grad():
            cond = policy.prepare_condition(_rows(samples, rows))
    finally:
        policy.config.continuity = True
    assert ("image_latents" in cond) == continuity
    sampling = SamplingConfig(**FAST, guidance_scale=3.0 if cfg else 1.0)
    rollout = policy.rollout(
        cond, num_generations=generations, sampling=sampling, seeds=list(range(rows * generations))
    )
    _assert_recompute_matches(policy, rollout)
    if continuity:  # the next scene starts at the last context frame, kept clean
        first = rollout.latent_shape[1] * rollout.latent_shape[2]
        expected = cond["image_latents"][rollout.condition_index].flatten(2).transpose(1, 2)
        assert torch.equal(rollout.final_latents[:, :first], expected)


def test_batch_rollout_equals_one_sample_at_a_time(policy, samples):
    with torch.no_grad():
        cond = policy.prepare_condition(_rows(samples, 2))
    sampling = SamplingConfig(**FAST)
    together = policy.rollout(cond, num_generations=2, sampling=sampling, seeds=[5, 6, 7, 8])
    for b, seed in enumerate([5, 6, 7, 8]):
        row = {k: v[b // 2 : b // 2 + 1] for k, v in cond.items()}
        alone = policy.rollout(row, num_generations=1, sampling=sampling, seeds=[seed])
        assert (alone.final_latents[0] - together.final_latents[b]).abs().max().item() <= 1e-5
        assert (alone.log_probs[0] - together.log_probs[b]).abs().max().item() <= 1e-5


def test_ode_rollout_reproduces_diffusers_ltx_pipeline(nsp_dir, policy, samples):
    """Without continuity the NSP denoiser is LTXPipeline fed the connector's embeddings."""
    from diffusers import LTXPipeline

    pipe = LTXPipeline.from_pretrained(nsp_dir / "ltx", text_encoder=None, tokenizer=None)
    pipe.set_progress_bar_config(disable=True)
    policy.config.continuity = False
    try:
        with torch.no_grad():
            cond = policy.prepare_condition(_rows(samples, 2))
            embeds, mask = policy.text_inputs(cond, torch.arange(2).repeat_interleave(2), 1.0)
    finally:
        policy.config.continuity = True
    seeds = [11, 12, 13, 14]
    expected = pipe(
        prompt_embeds=embeds,
        prompt_attention_mask=mask,
        num_frames=9,
        height=32,
        width=32,
        num_inference_steps=6,
        guidance_scale=1.0,
        generator=[torch.Generator().manual_seed(s) for s in seeds],
        output_type="latent",
    ).frames
    sampling = SamplingConfig(num_frames=9, height=32, width=32, num_inference_steps=6, kind="ode")
    rollout = policy.rollout(cond, num_generations=2, sampling=sampling, seeds=seeds)
    assert (rollout.final_latents - expected).abs().max().item() <= 1e-4


def test_one_vlm_forward_per_context_whatever_the_group_size(policy, samples):
    for generations in (1, 6):
        before = policy.vlm_forwards
        with torch.no_grad():
            cond = policy.prepare_condition(_rows(samples, 2))
            rollout = policy.rollout(cond, num_generations=generations, sampling=SamplingConfig(**FAST))
        out = policy.log_prob(rollout, torch.arange(rollout.num_samples) % 4)
        out.log_prob.sum().backward()
        assert policy.vlm_forwards - before == 2
    policy.zero_grad(set_to_none=True)


def test_chat_puts_video_tokens_then_instruction_then_queries(policy, samples):
    text, vision = policy._chat(_rows(samples, 1)[0], 0)
    frames = policy._context_frames(samples[0]["context"], 0)
    reference = video_inputs([frames], policy.inputs_config)
    assert torch.equal(vision["pixel_values_videos"], reference["pixel_values_videos"])
    tokens = num_vision_tokens(vision["video_grid_thw"], policy.inputs_config.merge_size)[0]
    assert text.count("<|video_pad|>") == tokens > 0
    assert samples[0]["instruction"] in text
    assert text.endswith(policy._query_token * policy.config.num_queries)
    assert text.index("<|video_pad|>") < text.index(samples[0]["instruction"])


def test_query_states_depend_on_the_context(policy, samples):
    with torch.no_grad():
        states = policy.query_states(_rows(samples, 2))
        again = policy.query_states(_rows(samples, 1))
        text_only = policy.query_states([{"prompt": samples[0]["next_caption"]}])
    assert states.shape == (2, policy.config.num_queries, 64)
    assert torch.allclose(states[:1], again, atol=1e-6)
    assert (states[0] - states[1]).abs().max() > 1e-3
    assert (text_only[0] - states[0]).abs().max() > 1e-3


@pytest.mark.parametrize("architecture,vision", [("qwen2_vl", "video"), ("qwen3_vl", "images")])
def test_other_qwen_vl_generations_by_config(tmp_path, samples, architecture, vision):
    spec = TinyNSPSpec(vlm=TinyQwenVLSpec(architecture=architecture))
    spec.nsp.vision_input = vision
    policy = NSPPolicy.from_pretrained(build_tiny_nsp(tmp_path / architecture, spec))
    assert type(policy.vlm).__name__.lower().startswith(architecture.replace("_", ""))
    with torch.no_grad():
        cond = policy.prepare_condition(_rows(samples, 2))
    rollout = policy.rollout(cond, num_generations=2, sampling=SamplingConfig(**FAST), seeds=[0, 1, 2, 3])
    _assert_recompute_matches(policy, rollout)


def test_save_load_round_trip_keeps_the_vlm_inside(tmp_path, policy, samples):
    with torch.no_grad():
        policy.connector.proj[0].bias.add_(0.1)
        policy.queries.add_(0.05)
    try:
        policy.save_pretrained(tmp_path / "copy")
        loaded = NSPPolicy.from_pretrained(tmp_path / "copy")
        config = json.loads((tmp_path / "copy" / "nsp_config.json").read_text())
        assert config["vlm"] == "vlm" and (tmp_path / "copy" / "vlm" / "config.json").is_file()
        # the frozen VLM is hard-linked, not copied: every file is the source's own bytes
        source_files = sorted(f for f in policy.vlm_path.rglob("*") if f.is_file())
        assert source_files and any(f.suffix == ".safetensors" for f in source_files)
        for f in source_files:
            assert os.path.samefile(f, tmp_path / "copy" / "vlm" / f.relative_to(policy.vlm_path))
        with torch.no_grad():
            a = policy.text_inputs(policy.prepare_condition(_rows(samples, 1)), torch.tensor([0]), 1.0)[0]
            b = loaded.text_inputs(loaded.prepare_condition(_rows(samples, 1)), torch.tensor([0]), 1.0)[0]
        assert torch.equal(a, b)
    finally:
        with torch.no_grad():
            policy.connector.proj[0].bias.sub_(0.1)
            policy.queries.sub_(0.05)


def test_saving_again_after_the_source_is_deleted_keeps_a_loadable_vlm(tmp_path, nsp_dir):
    """Checkpoint rotation deletes the directory a policy was loaded from: the linked VLM survives it."""
    source = Path(shutil.copytree(nsp_dir, tmp_path / "first"))
    policy = NSPPolicy.from_pretrained(source)
    policy.save_pretrained(tmp_path / "second")
    shutil.rmtree(source)
    reloaded = NSPPolicy.from_pretrained(tmp_path / "second")
    reloaded.save_pretrained(tmp_path / "third")
    for a, b in zip(policy.vlm.parameters(), NSPPolicy.from_pretrained(tmp_path / "third").vlm.parameters()):
        assert torch.equal(a, b)


def test_link_tree_copies_only_what_cannot_be_linked(tmp_path, nsp_dir, monkeypatch):
    vlm = nsp_dir / "vlm"
    total = sum(f.stat().st_size for f in vlm.rglob("*") if f.is_file())
    assert link_tree(vlm, tmp_path / "linked") == 0
    assert link_tree(vlm, tmp_path / "linked") == 0  # again over itself: nothing to do

    def cross_device(src, dst):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", cross_device)
    assert link_tree(vlm, tmp_path / "copied") == total
    for f in (f for f in vlm.rglob("*") if f.is_file()):
        copy = tmp_path / "copied" / f.relative_to(vlm)
        assert copy.read_bytes() == f.read_bytes() and not os.path.samefile(f, copy)


def test_a_vlm_outside_the_directory_is_referred_to(tmp_path, nsp_dir):
    shutil.copytree(nsp_dir / "vlm", tmp_path / "qwen")
    shutil.copytree(nsp_dir / "ltx", tmp_path / "nsp" / "ltx")
    config = json.loads((nsp_dir / "nsp_config.json").read_text())
    config["vlm"] = str(tmp_path / "qwen")
    (tmp_path / "nsp" / "nsp_config.json").write_text(json.dumps(config))
    policy = NSPPolicy.from_pretrained(tmp_path / "nsp")
    policy.save_pretrained(tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "nsp_config.json").read_text())
    assert saved["vlm"] == str((tmp_path / "qwen").resolve()) and not (tmp_path / "out" / "vlm").exists()
    NSPPolicy.from_pretrained(tmp_path / "out")


def test_lora_reference_uses_the_frozen_connector(tmp_path, nsp_dir, samples):
    policy = NSPPolicy.from_pretrained(nsp_dir)
    policy.add_lora(rank=4)
    with torch.no_grad():
        cond = policy.prepare_condition(_rows(samples, 1))
        policy.connector.proj[2].bias.add_(0.5)
        trained = policy.text_inputs(cond, torch.tensor([0]), 1.0)[0]
        with policy.reference():
            reference = policy.text_inputs(cond, torch.tensor([0]), 1.0)[0]
        assert (trained - reference).abs().max() > 0.4
    assert set(policy.extra_trainable_parameters()) >= {"nsp.queries", "nsp.connector.proj.0.weight"}
    policy.save_pretrained(tmp_path / "lora")
    assert (tmp_path / "lora" / "ltx" / "transformer_lora").is_dir()
    loaded = NSPPolicy.from_pretrained(tmp_path / "lora")
    assert loaded.has_lora


# ----------------------------------------------------------------------------------------- bad input
def test_too_short_context_is_one_line(policy, samples):
    with pytest.raises(InputError, match="context video has 1 frame.*at least 2"):
        policy.prepare_condition([{"context": samples[0]["context"][:1]}])


def test_vlm_of_the_wrong_architecture(tmp_path, nsp_dir):
    shutil.copytree(nsp_dir, tmp_path / "nsp")
    config = json.loads((tmp_path / "nsp" / "vlm" / "config.json").read_text())
    config["model_type"] = "llama"
    (tmp_path / "nsp" / "vlm" / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match="holds a 'llama' model.*qwen2_5_vl"):
        NSPPolicy.from_pretrained(tmp_path / "nsp")
    with pytest.raises(InputError, match="not an NSP policy directory"):
        NSPPolicy.from_pretrained(nsp_dir / "ltx")


def test_mismatched_widths_are_named(tmp_path, nsp_dir):
    """Connector weights trained for a VLM of another width do not load silently."""
    other = build_tiny_nsp(tmp_path / "wide", TinyNSPSpec(vlm=TinyQwenVLSpec(hidden_size=96)))
    shutil.copytree(nsp_dir, tmp_path / "nsp")
    shutil.copy(other / "nsp_trainable.safetensors", tmp_path / "nsp" / "nsp_trainable.safetensors")
    with pytest.raises(InputError, match=r"queries has shape \(8, 96\).*VLM width 64"):
        NSPPolicy.from_pretrained(tmp_path / "nsp")
    with pytest.raises(InputError, match="connector_heads=5 does not divide the VLM width 64"):
        NSPPolicy.from_pretrained(nsp_dir, connector_heads=5)
    with pytest.raises(InputError, match="unknown NSP config keys"):
        NSPPolicy.from_pretrained(nsp_dir, num_querys=4)


def test_condition_of_the_wrong_shape(policy):
    with pytest.raises(InputError, match="vlm_states"):
        policy.rollout({"vlm_states": torch.zeros(1, 3, 64)}, sampling=SamplingConfig(**FAST))


def test_config_rejects_impossible_values():
    with pytest.raises(InputError, match="num_queries"):
        NSPConfig(num_queries=0)
    with pytest.raises(InputError, match="context_frames"):
        NSPConfig(context_frames=1, min_context_frames=2)


def test_a_recipe_builds_a_tiny_nsp_in_another_toy_layout(tmp_path):
    """``policy.tiny_ltx`` reaches the tiny builder (8x8-pixel VAE patches, the layout of
    ``checkpoints/toy_nsp_quick``: a quarter of the tokens); unknown sizes, or LTX-Video sizes for an
    LTX-2 generator, are one-line errors before any model is built."""
    from grpo.train import NSPPolicySpec

    spec = NSPPolicySpec(tiny=True, tiny_ltx={"vae_patch_size": 8, "vae_channels": [64]})
    policy = spec.build(tmp_path, "cpu", torch.float32)
    assert policy.vae.config.patch_size == 8 and list(policy.vae.config.block_out_channels) == [64]
    with torch.no_grad():
        latents = policy.vae.encode(torch.rand(1, 3, 9, 32, 32) * 2 - 1).latent_dist.mode()
    assert latents.shape == (1, 16, 9, 4, 4)
    with pytest.raises(InputError, match=r"policy.tiny_ltx: unknown size\(s\) \['patch'\]"):
        NSPPolicySpec(tiny=True, tiny_ltx={"patch": 8})
    with pytest.raises(InputError, match=r"policy.tiny_ltx.vae_patch_size: expected int, got '8'"):
        NSPPolicySpec(tiny=True, tiny_ltx={"vae_patch_size": "8"})
    with pytest.raises(InputError, match="policy.tiny_ltx.vae_channels: expected a list of ints"):
        NSPPolicySpec(tiny=True, tiny_ltx={"vae_channels": 64})
    with pytest.raises(InputError, match="tiny_generator is 'ltx2': remove it"):
        NSPPolicySpec(tiny=True, tiny_generator="ltx2", tiny_ltx={"vae_patch_size": 8})
