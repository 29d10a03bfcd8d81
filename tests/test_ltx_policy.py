"""LTXPolicy's contract: recomputed log-probs equal the rollout's, the ODE path equals diffusers'
LTXPipeline, checkpoints round-trip, and bad input fails early with one line."""

import os

import pytest
import torch

from policies import LTXPolicy, Rollout, SamplingConfig
from policies.errors import InputError
from policies.tiny import build_tiny_ltx

FAST = dict(num_inference_steps=4, num_frames=9, height=32, width=32)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_ltx(tmp_path_factory.mktemp("tiny_ltx"))


@pytest.fixture(scope="module")
def policy(tiny_dir):
    return LTXPolicy.from_pretrained(tiny_dir)


def _condition(policy, prompts, cfg, i2v=False):
    cond = policy.encode_prompt(prompts, negative_prompt="" if cfg else None)
    if i2v:
        images = torch.rand(len(prompts), 32, 32, 3, generator=torch.Generator().manual_seed(5))
        cond["image_latents"] = policy.encode_image(images)
    return cond


def _assert_recompute_matches(policy, rollout):
    assert rollout.latents.shape[1] > 0
    for j in range(rollout.latents.shape[1]):
        with torch.no_grad():
            out = policy.log_prob(rollout, j)
        assert (out.log_prob - rollout.log_probs[:, j]).abs().max().item() <= 1e-5


@pytest.mark.parametrize(
    "prompts,generations,cfg,i2v",
    [
        (["a red ball"], 1, False, False),
        (["a red ball", "two blue squares"], 3, False, False),
        (["a red ball", "two blue squares"], 2, True, False),
        (["a red ball"], 1, True, True),
        (["a red ball", "a green ball"], 2, False, True),
    ],
    ids=["b1", "G3", "G2-cfg", "b1-cfg-i2v", "G2-i2v"],
)
def test_recomputed_log_prob_equals_rollout(policy, prompts, generations, cfg, i2v):
    cond = _condition(policy, prompts, cfg, i2v)
    sampling = SamplingConfig(**FAST, guidance_scale=3.0 if cfg else 1.0)
    rollout = policy.rollout(
        cond, num_generations=generations, sampling=sampling, seeds=list(range(len(prompts) * generations))
    )
    assert rollout.log_probs.shape == (len(prompts) * generations, 4)
    _assert_recompute_matches(policy, rollout)


@pytest.mark.parametrize("kind,noise", [("cps", 0.8), ("dance", 0.3)])
def test_recompute_for_every_kind(policy, kind, noise):
    cond = _condition(policy, ["a red ball"], cfg=False)
    rollout = policy.rollout(
        cond, num_generations=2, sampling=SamplingConfig(**FAST, kind=kind, noise_level=noise), seeds=[1, 2]
    )
    _assert_recompute_matches(policy, rollout)
    if kind == "cps":  # the step into sigma 0 is deterministic for cps and is not recorded
        assert rollout.step_indices.tolist() == [0, 1, 2]


def test_sde_window_records_only_window_steps(policy):
    cond = _condition(policy, ["a red ball"], cfg=False)
    rollout = policy.rollout(
        cond, num_generations=2, sampling=SamplingConfig(**FAST, sde_steps=[1, 2]), seeds=[0, 1]
    )
    assert rollout.step_indices.tolist() == [1, 2] and rollout.latents.shape[1] == 2
    _assert_recompute_matches(policy, rollout)


def test_i2v_keeps_first_latent_frame_clean(policy):
    cond = _condition(policy, ["a red ball"], cfg=False, i2v=True)
    rollout = policy.rollout(cond, num_generations=2, sampling=SamplingConfig(**FAST), seeds=[0, 1])
    first = ~rollout.generated_mask[0]
    assert first.sum().item() == 16  # one latent frame of 4 x 4 tokens
    image_tokens = cond["image_latents"][0].flatten(1).T  # [16, C]
    for b in range(2):
        assert torch.equal(rollout.final_latents[b, first], image_tokens)


def test_batch_rollout_equals_one_sample_at_a_time(policy):
    cond = _condition(policy, ["a red ball", "two blue squares"], cfg=True)
    sampling = SamplingConfig(**FAST, guidance_scale=2.5)
    batched = policy.rollout(cond, num_generations=2, sampling=sampling, seeds=[7, 8, 9, 10])
    for b, seed in enumerate([7, 8, 9, 10]):
        row = {k: v[b // 2 : b // 2 + 1] for k, v in cond.items()}
        single = policy.rollout(row, num_generations=1, sampling=sampling, seeds=[seed])
        torch.testing.assert_close(single.final_latents[0], batched.final_latents[b], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(single.log_probs[0], batched.log_probs[b], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_ode_rollout_reproduces_diffusers_ltx_pipeline(tiny_dir, policy, guidance):
    from diffusers import LTXPipeline

    pipe = LTXPipeline.from_pretrained(tiny_dir)
    pipe.set_progress_bar_config(disable=True)
    cond = _condition(policy, ["a red ball", "two blue squares"], cfg=guidance > 1)
    generations, seeds = 2, [11, 12, 13, 14]
    idx = torch.arange(2).repeat_interleave(generations)
    kwargs = dict(
        prompt_embeds=cond["prompt_embeds"][idx], prompt_attention_mask=cond["prompt_attention_mask"][idx]
    )
    if guidance > 1:
        kwargs.update(
            negative_prompt_embeds=cond["negative_prompt_embeds"][idx],
            negative_prompt_attention_mask=cond["negative_prompt_attention_mask"][idx],
        )
    steps = 6
    expected = pipe(
        **kwargs,
        num_frames=9,
        height=32,
        width=32,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=[torch.Generator().manual_seed(s) for s in seeds],
        output_type="latent",
    ).frames
    # noise_level 0 turns the SDE into the ODE
    sampling = SamplingConfig(
        num_frames=9,
        height=32,
        width=32,
        num_inference_steps=steps,
        guidance_scale=guidance,
        kind="sde",
        noise_level=0.0,
    )
    rollout = policy.rollout(cond, num_generations=generations, sampling=sampling, seeds=seeds)
    assert rollout.latents.shape[1] == 0 and rollout.kind == "ode"
    assert (rollout.final_latents - expected).abs().max().item() <= 1e-4

    frames = pipe(
        **kwargs,
        num_frames=9,
        height=32,
        width=32,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=[torch.Generator().manual_seed(s) for s in seeds],
        output_type="pt",
    ).frames
    videos = policy.decode(rollout.final_latents, rollout.latent_shape)
    assert (videos - frames.permute(0, 1, 3, 4, 2)).abs().max().item() <= 1e-4


def test_save_pretrained_round_trip(tmp_path, policy):
    policy.save_pretrained(tmp_path / "copy")
    loaded = LTXPolicy.from_pretrained(tmp_path / "copy")
    cond = _condition(policy, ["a red ball"], cfg=False)
    a = policy.rollout(cond, num_generations=2, sampling=SamplingConfig(**FAST), seeds=[3, 4])
    b = loaded.rollout(
        loaded.encode_prompt(["a red ball"]), num_generations=2, sampling=SamplingConfig(**FAST), seeds=[3, 4]
    )
    assert torch.equal(a.final_latents, b.final_latents) and torch.equal(a.log_probs, b.log_probs)


def test_lora_reference_and_round_trip(tmp_path, tiny_dir):
    policy = LTXPolicy.from_pretrained(tiny_dir)
    base = LTXPolicy.from_pretrained(tiny_dir)
    policy.add_lora(rank=4)
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():
        for name, param in policy.transformer.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5, generator=torch.Generator().manual_seed(0))
    cond = _condition(base, ["a red ball"], cfg=False)
    rollout = base.rollout(cond, num_generations=2, sampling=SamplingConfig(**FAST), seeds=[0, 1])
    with torch.no_grad():
        tuned = policy.log_prob(rollout, 0)
        with policy.reference():
            ref = policy.log_prob(rollout, 0)
    torch.testing.assert_close(ref.log_prob, rollout.log_probs[:, 0], rtol=0, atol=1e-5)
    assert (tuned.log_prob - rollout.log_probs[:, 0]).abs().max() > 1e-3  # the adapter does change the policy

    policy.save_pretrained(tmp_path / "lora")
    assert (tmp_path / "lora" / "transformer_lora").is_dir()
    reloaded = LTXPolicy.from_pretrained(tmp_path / "lora")
    with torch.no_grad():
        again = reloaded.log_prob(rollout, 0)
        with reloaded.reference():
            ref_again = reloaded.log_prob(rollout, 0)
    torch.testing.assert_close(again.log_prob, tuned.log_prob, rtol=0, atol=1e-6)
    torch.testing.assert_close(ref_again.log_prob, ref.log_prob, rtol=0, atol=1e-6)

    # a new LoRA run from that checkpoint: the loaded adapter is folded into the weights, so the new
    # (zero) adapter and its adapter-off reference both compute the loaded policy, and so does a save
    reloaded.add_lora(rank=2)
    assert {m.r["nextscene_lora"] for m in reloaded.transformer.modules() if hasattr(m, "lora_A")} == {2}
    reloaded.save_pretrained(tmp_path / "second")
    second = LTXPolicy.from_pretrained(tmp_path / "second")
    with torch.no_grad():
        for model in (reloaded, second):
            torch.testing.assert_close(model.log_prob(rollout, 0).log_prob, tuned.log_prob, rtol=0, atol=1e-5)
            with model.reference():
                torch.testing.assert_close(
                    model.log_prob(rollout, 0).log_prob, tuned.log_prob, rtol=0, atol=1e-5
                )


def _same_files(a, b):
    files = sorted(f.relative_to(a) for f in a.rglob("*") if f.is_file())
    return bool(files) and all(os.path.samefile(a / f, b / f) for f in files)


def test_saving_links_the_unchanged_components_and_writes_the_changed_ones(tmp_path, tiny_dir):
    """A frozen component (VAE, text encoder, the base under LoRA) is the loaded folder's own files,
    hard-linked; one changed since loading (in place, as an optimizer does) is written anew."""
    policy = LTXPolicy.from_pretrained(tiny_dir)
    policy.add_lora(rank=4)
    with torch.no_grad():
        next(p for n, p in policy.transformer.named_parameters() if "lora_B" in n).add_(0.5)
        policy.vae.decoder.conv_out.conv.bias.add_(0.25)
    policy.save_pretrained(tmp_path / "saved")
    for name in ("transformer", "text_encoder"):
        assert _same_files(tiny_dir / name, tmp_path / "saved" / name), name
    assert not _same_files(tiny_dir / "vae", tmp_path / "saved" / "vae")
    loaded = LTXPolicy.from_pretrained(tmp_path / "saved")
    for ours, theirs in ((policy.vae, loaded.vae), (policy.transformer, loaded.transformer)):
        mine, saved = ours.state_dict(), theirs.state_dict()
        assert mine.keys() == saved.keys() and all(torch.equal(mine[k], saved[k]) for k in mine)

    with torch.no_grad():  # the base changed under LoRA: saved over the linked folder, not into it
        next(p for n, p in policy.transformer.named_parameters() if "base_layer" in n).add_(0.5)
    policy.save_pretrained(tmp_path / "saved")
    for f in (tiny_dir / "transformer").iterdir():
        assert not os.path.samefile(f, tmp_path / "saved" / "transformer" / f.name), f.name

    full = LTXPolicy.from_pretrained(tiny_dir)  # full fine-tuning: the transformer is written
    with torch.no_grad():
        next(full.transformer.parameters()).add_(0.1)
    full.save_pretrained(tmp_path / "full")
    assert not _same_files(tiny_dir / "transformer", tmp_path / "full" / "transformer")
    assert _same_files(tiny_dir / "vae", tmp_path / "full" / "vae")
    assert torch.equal(
        next(full.transformer.parameters()),
        next(LTXPolicy.from_pretrained(tmp_path / "full").transformer.parameters()),
    )
    # saving a changed VAE over the linked one replaces the link: the loaded checkpoint stays as it was
    before = (tiny_dir / "vae" / "diffusion_pytorch_model.safetensors").read_bytes()
    with torch.no_grad():
        full.vae.decoder.conv_out.conv.bias.add_(1.0)
    full.save_pretrained(tmp_path / "full")
    assert (tiny_dir / "vae" / "diffusion_pytorch_model.safetensors").read_bytes() == before
    assert not _same_files(tiny_dir / "vae", tmp_path / "full" / "vae")


def test_full_finetune_reference_copy(policy):
    cond = _condition(policy, ["a red ball"], cfg=False)
    rollout = policy.rollout(cond, num_generations=1, sampling=SamplingConfig(**FAST), seeds=[0])
    with pytest.raises(InputError, match="no reference model"):
        with policy.reference():
            pass
    import copy

    tuned = copy.deepcopy(policy)
    tuned.keep_reference_copy()
    with torch.no_grad():
        tuned.transformer.proj_out.bias.add_(0.3)
        with tuned.reference():
            ref = tuned.log_prob(rollout, 1)
        moved = tuned.log_prob(rollout, 1)
    torch.testing.assert_close(ref.log_prob, rollout.log_probs[:, 1], rtol=0, atol=1e-5)
    assert (moved.log_prob - rollout.log_probs[:, 1]).abs().max() > 1e-3


def test_rollout_save_load_and_select(tmp_path, policy):
    cond = _condition(policy, ["a red ball", "a green ball"], cfg=True)
    rollout = policy.rollout(
        cond, num_generations=2, sampling=SamplingConfig(**FAST, guidance_scale=2.0), seeds=[0, 1, 2, 3]
    )
    rollout.save(tmp_path / "r")
    loaded = Rollout.load(tmp_path / "r")
    assert torch.equal(loaded.log_probs, rollout.log_probs) and loaded.latent_shape == rollout.latent_shape
    sub = loaded.select([3, 0])
    assert sub.num_samples == 2 and sub.condition_index.tolist() == [1, 0]
    _assert_recompute_matches(policy, sub)


@pytest.mark.parametrize(
    "sampling,match",
    [(dict(num_frames=10), "8k\\+1"), (dict(height=30), "multiple of 8"), (dict(width=36), "multiple of 8")],
)
def test_bad_geometry_fails_before_any_forward(policy, monkeypatch, sampling, match):
    calls = []
    monkeypatch.setattr(policy.transformer, "forward", lambda *a, **k: calls.append(1))
    cond = _condition(policy, ["a red ball"], cfg=False)
    with pytest.raises(InputError, match=match) as info:
        policy.rollout(cond, sampling=SamplingConfig(**{**FAST, **sampling}))
    assert calls == [] and "\n" not in str(info.value)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(kind="langevin"), "unknown SDE kind"),
        (dict(noise_level=5.0), "out of range"),
        (dict(noise_level=1.5, kind="cps"), "out of range"),
        (dict(sde_steps=[9]), "outside"),
        (dict(num_inference_steps=0), "num_inference_steps"),
    ],
)
def test_bad_sampling_config(kwargs, match):
    with pytest.raises(InputError, match=match):
        SamplingConfig(**kwargs)


@pytest.mark.parametrize("missing", ["transformer", "vae", "scheduler"])
def test_missing_subfolder_is_named(tmp_path, tiny_dir, missing):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir, broken)
    shutil.rmtree(broken / missing)
    with pytest.raises(InputError, match=f"no {missing}/ subfolder"):
        LTXPolicy.from_pretrained(broken)
    with pytest.raises(InputError, match="does not exist"):
        LTXPolicy.from_pretrained(tmp_path / "nowhere")


def test_bad_condition(policy):
    cond = _condition(policy, ["a red ball"], cfg=False)
    with pytest.raises(InputError, match="needs negative_prompt_embeds"):
        policy.rollout(cond, sampling=SamplingConfig(**FAST, guidance_scale=3.0))
    with pytest.raises(InputError, match=r"prompt_embeds must be \[P, L, 32\]"):
        policy.rollout({**cond, "prompt_embeds": torch.zeros(1, 4, 16)}, sampling=SamplingConfig(**FAST))
    with pytest.raises(InputError, match="seeds"):
        policy.rollout(cond, num_generations=2, sampling=SamplingConfig(**FAST), seeds=[1])


def test_per_sample_steps_equal_single_step_calls(policy):
    cond = _condition(policy, ["a red ball"], cfg=True)
    rollout = policy.rollout(
        cond, num_generations=3, sampling=SamplingConfig(**FAST, guidance_scale=2.0), seeds=[0, 1, 2]
    )
    steps = torch.tensor([2, 0, 3])
    with torch.no_grad():
        mixed = policy.log_prob(rollout, steps)
        for b, j in enumerate(steps.tolist()):
            single = policy.log_prob(rollout, j)
            torch.testing.assert_close(mixed.log_prob[b], single.log_prob[b], rtol=0, atol=1e-5)
    torch.testing.assert_close(mixed.log_prob, rollout.log_probs[torch.arange(3), steps], rtol=0, atol=1e-5)
    with pytest.raises(InputError, match="not a recorded stochastic step"):
        policy.log_prob(rollout, torch.tensor([0, 1, 4]))


def test_rollout_cat_keeps_conditioning_rows_apart(policy):
    sampling = SamplingConfig(**FAST)
    a = policy.rollout(
        _condition(policy, ["a red ball"], cfg=False), num_generations=2, sampling=sampling, seeds=[0, 1]
    )
    b = policy.rollout(
        _condition(policy, ["two blue squares"], cfg=False),
        num_generations=2,
        sampling=sampling,
        seeds=[2, 3],
    )
    both = Rollout.cat([a, b])
    assert both.num_samples == 4 and both.condition_index.tolist() == [0, 0, 1, 1]
    _assert_recompute_matches(policy, both)


def test_reference_forwards_bypass_the_training_wrapper(policy):
    """Under DDP the training forward goes through the wrapper (trained weights); the reference must not."""
    import copy

    class Spy(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.calls = inner, 0

        def forward(self, *args, **kwargs):
            self.calls += 1
            return self.inner(*args, **kwargs)

    tuned = copy.deepcopy(policy)
    tuned.keep_reference_copy()
    spy = Spy(tuned.transformer)
    tuned.wrap_transformer(spy)
    rollout = tuned.rollout(
        _condition(tuned, ["a red ball"], cfg=False), sampling=SamplingConfig(**FAST), seeds=[0]
    )
    spy.calls = 0
    with torch.no_grad():
        tuned.transformer.proj_out.bias.add_(0.3)
        moved = tuned.log_prob(rollout, 1)
        assert spy.calls == 1
        with tuned.reference():
            ref = tuned.log_prob(rollout, 1)
    assert spy.calls == 1 and not tuned._in_reference
    torch.testing.assert_close(ref.log_prob, rollout.log_probs[:, 1], rtol=0, atol=1e-5)
    assert (moved.log_prob - ref.log_prob).abs().max() > 1e-3


def test_rotary_tables_are_computed_once_per_geometry_and_change_no_bit(policy):
    """The cached rotary embedding (`CachedRope`) gives bitwise the rollout and the recomputed log-prob
    (with gradients) of diffusers' own, computing its tables once per geometry and for one sample."""
    from policies.ltx import CachedRope

    cached = policy.transformer.rope
    assert isinstance(cached, CachedRope)
    cond = _condition(policy, ["a red ball", "a green ball"], cfg=False, i2v=True)
    sampling = SamplingConfig(**FAST, sde_steps=[0, 1])

    def run() -> tuple[torch.Tensor, ...]:
        rollout = policy.rollout(cond, num_generations=2, sampling=sampling, seeds=[3, 4, 5, 6])
        rescored = policy.log_prob(rollout, torch.tensor([0, 1, 1, 0]))
        (grad,) = torch.autograd.grad(rescored.log_prob.sum(), policy.transformer.proj_out.weight)
        return rollout.final_latents, rollout.log_probs, rescored.log_prob.detach(), grad

    computed = []
    hook = cached.rope.register_forward_hook(lambda module, args, out: computed.append(args[0].shape[0]))
    try:
        cached._tables.clear()
        with_cache = run()
        assert computed == [1]  # 4 denoising steps and the recompute of the 4 samples: one sample's table
        policy.transformer.rope = cached.rope
        without = run()
    finally:
        hook.remove()
        policy.transformer.rope = cached
    for a, b in zip(with_cache, without, strict=True):
        assert torch.equal(a, b)
    assert computed == [1, 4, 4, 4, 4, 4]  # diffusers' own: every one of the 5 forwards computes them


def test_rotary_tables_of_one_sample_are_diffusers_tables_of_the_batch(policy):
    """Uncached (inference mode, as on a GPU): one sample's tables expanded to the batch, a view of
    batch stride 0 holding bitwise diffusers' tables of the whole batch; explicit coordinates pass."""
    cached = policy.transformer.rope
    hidden = torch.zeros(3, 2 * 2 * 2, 8)
    scale = (torch.tensor(0.04), 1.0, 1.0)
    with torch.inference_mode():
        tables = cached(hidden, 2, 2, 2, scale)
        expected = cached.rope(hidden, 2, 2, 2, scale)
    for table, reference in zip(tables, expected, strict=True):
        assert table.shape == reference.shape and table.stride(0) == 0
        assert torch.equal(table, reference)
    coords = torch.rand(3, 3, 8)
    for table, reference in zip(
        cached(hidden, video_coords=coords), cached.rope(hidden, video_coords=coords)
    ):
        assert torch.equal(table, reference)


def test_a_fully_valid_text_mask_is_dropped_on_cpu_and_changes_no_bit(policy, monkeypatch):
    """Text whose mask marks every token valid (NSP's connector output) reaches the transformer
    without a mask (the unmasked cross-attention kernel), with bitwise the rollout, the recomputed
    log-prob and its gradient of the masked forward; a padded prompt keeps its mask."""
    import policies.ltx as ltx

    width = policy.transformer.config.caption_channels
    embeds = torch.randn(2, 6, width, generator=torch.Generator().manual_seed(2))
    full = torch.ones(2, 6, dtype=torch.bool)
    cond = policy.prepare_condition(
        [{"prompt_embeds": e, "prompt_attention_mask": m} for e, m in zip(embeds, full, strict=True)]
    )
    sampling = SamplingConfig(**FAST, sde_steps=[0, 1])
    masks = []
    hook = policy.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: masks.append(kwargs["encoder_attention_mask"]), with_kwargs=True
    )

    def run() -> tuple[torch.Tensor, ...]:
        rollout = policy.rollout(cond, num_generations=2, sampling=sampling, seeds=[3, 4, 5, 6])
        rescored = policy.log_prob(rollout, torch.tensor([0, 1, 1, 0]))
        (grad,) = torch.autograd.grad(rescored.log_prob.sum(), policy.transformer.proj_out.weight)
        return rollout.final_latents, rollout.log_probs, rescored.log_prob.detach(), grad

    try:
        dropped = run()
        assert len(masks) == 5 and all(m is None for m in masks)  # 4 steps and the recompute
        masks.clear()
        monkeypatch.setattr(ltx, "_text_mask", lambda mask: mask)  # the masked forward
        masked = run()
        assert len(masks) == 5 and all(m is not None for m in masks)
        monkeypatch.undo()
        masks.clear()
        padded = _condition(policy, ["a red ball"], cfg=False)
        assert not padded["prompt_attention_mask"].all()
        policy.rollout(padded, sampling=SamplingConfig(**FAST), seeds=[0])
        assert len(masks) == 4 and all(m is not None for m in masks)
    finally:
        hook.remove()
    for a, b in zip(dropped, masked, strict=True):
        assert torch.equal(a, b)


def test_a_training_timestep_embedding_runs_once_per_distinct_value(policy):
    """Weights that train (full fine-tuning: nothing is cached): each forward embeds the distinct
    timesteps (two with a clean conditioning frame) and gathers them per token; the outputs and the
    weights' gradients equal the per-token embedding's (diffusers' own forward) within float rounding."""
    from policies.ltx import TimeEmbeddingCache

    embed = policy.transformer.time_embed
    timestep = torch.full((16, 1152), 712.5)  # the Quickstart update's tokens (32 x 576): threads split sums
    timestep[:, :128] = 0.0  # the clean conditioning frame's tokens
    rows = []
    hook = embed.linear.register_forward_hook(lambda module, args, out: rows.append(args[0].shape[0]))
    trains = [w.requires_grad for w in embed.parameters()]
    embed.requires_grad_(True)
    try:
        outputs = {}
        for name, forward in (
            ("distinct", embed.forward),
            ("per token", super(TimeEmbeddingCache, embed).forward),
        ):
            rows.clear()
            out = forward(timestep.flatten(), None, 16, torch.float32)
            grads = torch.autograd.grad(sum(o.square().sum() for o in out), list(embed.parameters()))
            outputs[name] = (rows[:], out, grads)
        for _ in range(10):  # the same gradient, bitwise, every time (a run must reproduce itself)
            again = torch.autograd.grad(
                sum(o.square().sum() for o in embed(timestep.flatten(), None, 16, torch.float32)),
                list(embed.parameters()),
            )
            assert all(torch.equal(a, b) for a, b in zip(again, outputs["distinct"][2], strict=True))
    finally:
        hook.remove()
        for weight, was in zip(embed.parameters(), trains, strict=True):
            weight.requires_grad_(was)
    (rows_d, out_d, grads_d), (rows_t, out_t, grads_t) = outputs["distinct"], outputs["per token"]
    assert rows_d == [2] and rows_t == [18432]
    for a, b in zip(out_d, out_t, strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    for a, b in zip(grads_d, grads_t, strict=True):  # sums of 18,432 terms in another order
        assert (a - b).norm() <= 1e-3 * b.norm()


def test_timestep_embeddings_are_reused_for_equal_timesteps_and_change_no_bit(policy):
    """`TimeEmbeddingCache`: the per-token timestep embedding (image-to-video: every token has its own
    timestep) runs once per distinct timestep tensor; rollout, recomputed log-prob and gradient are
    bitwise those of the uncached embedding; new weights, or weights that train, are computed afresh."""
    from policies.ltx import TimeEmbeddingCache

    embed = policy.transformer.time_embed
    assert isinstance(embed, TimeEmbeddingCache)
    uncached_class = type(embed).__mro__[2]  # the diffusers class under the cache
    cond = _condition(policy, ["a red ball", "a green ball"], cfg=False, i2v=True)
    sampling = SamplingConfig(**FAST, sde_steps=[0, 1])

    def run() -> tuple[torch.Tensor, ...]:
        first = policy.rollout(cond, num_generations=2, sampling=sampling, seeds=[3, 4, 5, 6])
        again = policy.rollout(cond, num_generations=2, sampling=sampling, seeds=[7, 8, 9, 10])
        rescored = policy.log_prob(first, torch.tensor([0, 1, 1, 0]))
        (grad,) = torch.autograd.grad(rescored.log_prob.sum(), policy.transformer.proj_out.weight)
        return first.final_latents, again.log_probs, rescored.log_prob.detach(), grad

    computed = []
    hook = embed.linear.register_forward_hook(lambda module, args, out: computed.append(args[0].shape[0]))
    cached_class = type(embed)
    trains = [w.requires_grad for w in embed.parameters()]
    embed.requires_grad_(False)  # frozen, as under LoRA
    try:
        embed.__dict__.pop("_cached_timesteps", None)
        with_cache = run()
        assert len(computed) == 5  # the first rollout's 4 steps and the recompute's per-sample steps
        embed.__class__ = uncached_class
        computed.clear()
        without = run()
        assert len(computed) == 9  # every forward: 4 + 4 steps and the recompute
        embed.__class__ = cached_class
        computed.clear()
        with torch.no_grad():
            embed.linear.weight.mul_(1.0)  # the same values, but written: computed afresh
        policy.rollout(cond, num_generations=2, sampling=sampling, seeds=[3, 4, 5, 6])
        assert len(computed) == 4
        computed.clear()
        embed.linear.weight.requires_grad_(True)  # full fine-tuning trains the embedding
        out = policy.log_prob(policy.rollout(cond, sampling=sampling, seeds=[1, 2]), 0)
        (grad,) = torch.autograd.grad(out.log_prob.sum(), embed.linear.weight)
        assert len(computed) == 4 + 1 and grad.abs().sum() > 0  # a new batch size; the recompute's
        computed.clear()
        with torch.no_grad():  # trainable weights are never cached (FSDP2 re-gathers them unversioned)
            policy.rollout(cond, sampling=sampling, seeds=[1, 2])
        assert len(computed) == 4
    finally:
        hook.remove()
        for weight, was in zip(embed.parameters(), trains, strict=True):
            weight.requires_grad_(was)
        embed.__class__ = cached_class
    for a, b in zip(with_cache, without, strict=True):
        assert torch.equal(a, b)
