"""NextClipPolicy: the clip-causal mask, the history cache, the log-prob contract for (clip, step)
pairs, teacher forcing against per-clip forwards, checkpoints, and early one-line errors."""

import copy
from dataclasses import replace

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from policies import NextClipPolicy, Rollout, SamplingConfig
from policies.clip_attention import AttentionPlan, clip_causal_mask
from policies.errors import InputError
from policies.nextclip import NextClipConfig
from policies.nextclip_tiny import build_tiny_nextclip
from policies.tiny import TinyLTXSpec

CLIP = 9  # pixel frames per clip; 2 latent frames of 4 x 4 tokens at 32 px
TOKENS = 32


def _fast(clips: int, **kwargs) -> SamplingConfig:
    return SamplingConfig(num_frames=clips * CLIP, height=32, width=32, num_inference_steps=3, **kwargs)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_nextclip(tmp_path_factory.mktemp("tiny_nextclip"))


@pytest.fixture(scope="module")
def policy(tiny_dir):
    return NextClipPolicy.from_pretrained(tiny_dir)


def _contexts(rows: int, clips: int = 1, seed: int = 0) -> list[dict]:
    videos = torch.rand(rows, clips * CLIP, 32, 32, 3, generator=torch.Generator().manual_seed(seed))
    return [{"context": v} for v in videos]


def _condition(policy, rows=1, clips=1, seed=0):
    return policy.prepare_condition(_contexts(rows, clips, seed))


# ----------------------------------------------------------------------------------------- the mask


def test_mask_rule_against_an_enumeration():
    clip = torch.tensor([0, 0, 1, 1, 2, 0, 0, 1, 1, 2, 2])
    clean = torch.tensor([True] * 5 + [False] * 6)
    mask = clip_causal_mask(clip, clean)[0, 0]
    for q in range(len(clip)):
        for k in range(len(clip)):
            if clean[q]:
                expected = bool(clean[k]) and clip[k] <= clip[q]
            else:
                expected = (bool(clean[k]) and clip[k] < clip[q]) or (not clean[k] and clip[k] == clip[q])
            assert bool(mask[q, k]) == expected, (q, k)


def _teacher_forcing_forward(policy, tokens, num_clips=3):
    """Outputs of the teacher-forcing layout [clean 0..N-2 ; noisy 0..N-1] under the clip-causal mask."""
    ids = torch.cat([torch.arange(num_clips - 1), torch.arange(num_clips)]).repeat_interleave(TOKENS)
    clean = torch.arange(len(ids)) < (num_clips - 1) * TOKENS
    timestep = torch.where(clean, 0.0, 600.0)[None]
    coords = torch.cat(
        [policy.positions(0, num_clips - 1, (4, 4)), policy.positions(0, num_clips, (4, 4))], 1
    )
    text = policy.text_inputs(policy.prepare_condition([{}]), torch.arange(1), 1.0)  # the empty text
    with torch.no_grad():
        return policy._forward(
            tokens, timestep, coords, text, AttentionPlan(mask=clip_causal_mask(ids, clean))
        )


def test_clip_causal_mask_in_the_transformer(policy):
    # layout: clean clips 0, 1 = tokens [0, 64); noisy clips 0, 1, 2 = tokens [64, 160)
    clean_clip = {c: slice(c * TOKENS, (c + 1) * TOKENS) for c in range(2)}
    noisy_clip = {c: slice(64 + c * TOKENS, 64 + (c + 1) * TOKENS) for c in range(3)}
    tokens = torch.randn(1, 160, 8, generator=torch.Generator().manual_seed(0))
    base = _teacher_forcing_forward(policy, tokens)

    def changed(where):
        edited = tokens.clone()
        edited[:, where] += torch.randn(edited[:, where].shape, generator=torch.Generator().manual_seed(1))
        return (_teacher_forcing_forward(policy, edited) - base).abs().amax(dim=(0, 2))  # per token

    # a later noisy clip changes nothing before it, and no clean (history) output at all
    diff = changed(noisy_clip[2])
    assert diff[:64].max() == 0 and diff[noisy_clip[0]].max() == 0 and diff[noisy_clip[1]].max() == 0
    assert diff[noisy_clip[2]].min() > 1e-4
    # noisy clip 1 leaves every clean output and the other noisy clips unchanged
    diff = changed(noisy_clip[1])
    assert diff[:64].max() == 0 and diff[noisy_clip[0]].max() == 0 and diff[noisy_clip[2]].max() == 0
    # a later clean clip changes nothing of earlier clips (clean or noisy) nor its own noisy copy
    diff = changed(clean_clip[1])
    assert (
        diff[clean_clip[0]].max() == 0 and diff[noisy_clip[0]].max() == 0 and diff[noisy_clip[1]].max() == 0
    )
    assert diff[noisy_clip[2]].min() > 1e-4 and diff[clean_clip[1]].min() > 1e-4  # it is history for clip 2
    # clean clip 0 is history of every later clip
    diff = changed(clean_clip[0])
    assert (
        diff[noisy_clip[0]].max() == 0
        and diff[noisy_clip[1]].min() > 1e-4
        and diff[clean_clip[1]].min() > 1e-4
    )
    # within a clip attention is bidirectional: the last token moves the first one
    for where in (noisy_clip[1], clean_clip[1]):
        last = where.stop - 1
        diff = changed(slice(last, last + 1))
        assert diff[where.start] > 1e-5


def test_without_a_plan_the_transformer_is_stock_ltx(tiny_dir, policy):
    from diffusers import LTXVideoTransformer3DModel

    stock = LTXVideoTransformer3DModel.from_pretrained(tiny_dir / "transformer")
    kwargs = dict(
        hidden_states=torch.randn(2, 64, 8, generator=torch.Generator().manual_seed(0)),
        encoder_hidden_states=torch.randn(2, 3, 32, generator=torch.Generator().manual_seed(1)),
        timestep=torch.tensor([300.0, 700.0]),
        encoder_attention_mask=torch.ones(2, 3, dtype=torch.bool),
        num_frames=4,
        height=4,
        width=4,
        rope_interpolation_scale=(8 / 25.0, 8, 8),
        return_dict=False,
    )
    with torch.no_grad():
        torch.testing.assert_close(policy.transformer(**kwargs)[0], stock(**kwargs)[0], rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------- the cache


def _count(policy, fn):
    """(transformer forwards, tokens through the transformer, FLOPs) of ``fn()``."""
    calls = []
    handle = policy.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(kwargs["hidden_states"].shape[1]), with_kwargs=True
    )
    try:
        with FlopCounterMode(display=False) as counter:
            result = fn()
    finally:
        handle.remove()
    return result, len(calls), sum(calls), counter.get_total_flops()


def test_cached_rollout_equals_uncached_and_is_cheaper(policy):
    cond = _condition(policy, rows=1)
    sampling = _fast(4)  # 1 context clip + 4 generated clips
    cached, n_c, tok_c, flops_c = _count(
        policy, lambda: policy.rollout(cond, num_generations=2, sampling=sampling, seeds=[3, 4])
    )
    plain, n_u, tok_u, flops_u = _count(
        policy,
        lambda: policy.rollout(cond, num_generations=2, sampling=sampling, seeds=[3, 4], use_cache=False),
    )
    assert (cached.final_latents - plain.final_latents).abs().max() <= 1e-5
    assert (cached.log_probs - plain.log_probs).abs().max() <= 1e-5
    # cached: 4 clips x 3 steps of 32 tokens + prefill (context) + 3 extensions
    assert (n_c, tok_c) == (4 * 3 + 1 + 3, (4 * 3 + 1 + 3) * TOKENS)
    # uncached: every step carries the whole history: clip k (k = 1..4) is (k + 1) x 32 tokens
    assert (n_u, tok_u) == (12, sum(3 * (k + 1) * TOKENS for k in range(1, 5)))
    assert flops_c < 0.5 * flops_u


def test_history_noise_is_reproducible_and_cached(tiny_dir):
    noisy = NextClipPolicy.from_pretrained(tiny_dir, config=NextClipConfig(history_sigma=0.1))
    cond = _condition(noisy, rows=1)
    a = noisy.rollout(cond, num_generations=2, sampling=_fast(2), seeds=[0, 1])
    b = noisy.rollout(cond, num_generations=2, sampling=_fast(2), seeds=[0, 1], use_cache=False)
    assert (a.final_latents - b.final_latents).abs().max() <= 1e-5
    _assert_recompute_matches(noisy, a)
    clean = NextClipPolicy.from_pretrained(tiny_dir).rollout(
        cond, num_generations=2, sampling=_fast(2), seeds=[0, 1]
    )
    assert (clean.final_latents[:, TOKENS:] - a.final_latents[:, TOKENS:]).abs().max() > 1e-4


# ----------------------------------------------------------------------------------------- log-probs


def _assert_recompute_matches(policy, rollout):
    assert rollout.latents.shape[1] > 0
    for j in range(rollout.latents.shape[1]):
        with torch.no_grad():
            out = policy.log_prob(rollout, j)
        assert (out.log_prob - rollout.log_probs[:, j]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("rows,generations,context", [(1, 1, 1), (2, 3, 1), (1, 2, 2), (2, 2, 0)])
def test_recomputed_log_prob_equals_rollout_for_every_clip_and_step(policy, rows, generations, context):
    cond = _condition(policy, rows=rows, clips=max(context, 1))
    if context == 0:
        cond.pop("context_latents")
    rollout = policy.rollout(
        cond, num_generations=generations, sampling=_fast(2), seeds=list(range(rows * generations))
    )
    assert rollout.log_probs.shape == (rows * generations, 2 * 3)
    assert rollout.step_clips == [0, 0, 0, 1, 1, 1]
    assert rollout.extras["num_context_clips"] == context
    _assert_recompute_matches(policy, rollout)


@pytest.mark.parametrize("kind,noise", [("cps", 0.8), ("dance", 0.3)])
def test_recompute_for_every_kind(policy, kind, noise):
    rollout = policy.rollout(
        _condition(policy), num_generations=2, sampling=_fast(2, kind=kind, noise_level=noise), seeds=[1, 2]
    )
    _assert_recompute_matches(policy, rollout)


def test_sde_window_records_only_window_steps_of_each_clip(policy):
    rollout = policy.rollout(
        _condition(policy), num_generations=2, sampling=_fast(3, sde_steps=[1]), seeds=[0, 1]
    )
    assert rollout.step_indices.tolist() == [1, 1, 1] and rollout.step_clips == [0, 1, 2]
    _assert_recompute_matches(policy, rollout)


def test_per_sample_steps_across_clips_equal_single_step_calls(policy):
    rollout = policy.rollout(_condition(policy), num_generations=3, sampling=_fast(3), seeds=[0, 1, 2])
    steps = torch.tensor([8, 0, 4])  # clips 2, 0, 1
    with torch.no_grad():
        mixed = policy.log_prob(rollout, steps)
        for b, j in enumerate(steps.tolist()):
            single = policy.log_prob(rollout, j)
            torch.testing.assert_close(mixed.log_prob[b], single.log_prob[b], rtol=0, atol=1e-6)
            torch.testing.assert_close(mixed.mean[b], single.mean[b], rtol=0, atol=1e-6)
    torch.testing.assert_close(mixed.log_prob, rollout.log_probs[torch.arange(3), steps], rtol=0, atol=1e-5)
    with pytest.raises(InputError, match="not a recorded stochastic step"):
        policy.log_prob(rollout, torch.tensor([0, 1, 9]))


def test_branched_rollout_shares_the_trunks_history_and_recomputes_exactly(policy):
    """A tree rollout: for every clip the G samples of a row continue the row's first sample's clips.
    The trunk is the whole-video rollout's own sample, clip 0 is every sample's (context only), later
    clips are not; every recorded (clip, step) recomputes to 1e-5 under the shared history, cached ==
    no cache, and a sub-rollout without its trunk keeps that history."""
    cond = _condition(policy, rows=2)
    seeds = [5, 6, 7, 8, 9, 10]
    whole = policy.rollout(cond, num_generations=3, sampling=_fast(3), seeds=seeds)
    tree = policy.rollout(cond, num_generations=3, sampling=_fast(3), seeds=seeds, branch=True)
    plain = policy.rollout(
        cond, num_generations=3, sampling=_fast(3), seeds=seeds, branch=True, use_cache=False
    )
    assert (tree.final_latents - plain.final_latents).abs().max() <= 1e-5
    assert (tree.log_probs - plain.log_probs).abs().max() <= 1e-5
    trunks = [0, 3]
    torch.testing.assert_close(tree.final_latents[trunks], whole.final_latents[trunks], rtol=0, atol=1e-5)
    torch.testing.assert_close(tree.condition["branch_history_latents"], whole.final_latents[trunks])
    clip0 = slice(0, TOKENS)
    torch.testing.assert_close(tree.final_latents[:, clip0], whole.final_latents[:, clip0], rtol=0, atol=1e-5)
    branches = [1, 2, 4, 5]
    assert (tree.final_latents[branches, TOKENS:] - whole.final_latents[branches, TOKENS:]).abs().min() > 0
    _assert_recompute_matches(policy, tree)
    _assert_recompute_matches(policy, tree.select([5, 1]))
    # the sample's own earlier clips are not its history: recomputing under them misses the record
    own = replace(tree, condition={k: v for k, v in tree.condition.items() if k != "branch_history_latents"})
    with torch.no_grad():
        mismatch = (policy.log_prob(own, 4).log_prob - tree.log_probs[:, 4]).abs()  # clip 1, step 1
    assert mismatch[trunks].max() <= 1e-5 and mismatch[branches].min() > 1e-4
    # a branched rollout's condition given back as an input is not taken for a shared history
    again = policy.rollout(tree.condition, num_generations=3, sampling=_fast(3), seeds=seeds)
    torch.testing.assert_close(again.final_latents, whole.final_latents, rtol=0, atol=1e-5)


def test_batch_rollout_equals_one_sample_at_a_time(policy):
    cond = _condition(policy, rows=2)
    batched = policy.rollout(cond, num_generations=2, sampling=_fast(2), seeds=[7, 8, 9, 10])
    for b, seed in enumerate([7, 8, 9, 10]):
        row = {k: v[b // 2 : b // 2 + 1] for k, v in cond.items()}
        single = policy.rollout(row, num_generations=1, sampling=_fast(2), seeds=[seed])
        torch.testing.assert_close(single.final_latents[0], batched.final_latents[b], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(single.log_probs[0], batched.log_probs[b], rtol=1e-5, atol=1e-5)


def test_log_prob_gradients_reach_the_history_keys(policy):
    rollout = policy.rollout(_condition(policy), num_generations=2, sampling=_fast(2), seeds=[0, 1])
    tuned = copy.deepcopy(policy)
    out = tuned.log_prob(rollout, 4)  # clip 1, whose history is the context and clip 0
    out.log_prob.sum().backward()
    grads = [b.attn1.to_k.weight.grad for b in tuned.transformer.transformer_blocks]
    assert all(g is not None and g.abs().max() > 0 for g in grads)


def test_gradient_checkpointing_keeps_the_mask(policy):
    videos = torch.rand(2, 3 * CLIP, 32, 32, 3, generator=torch.Generator().manual_seed(0))
    target = policy.encode_video(videos)
    cond = policy.prepare_condition([{}, {}])
    noise = torch.randn(target.shape, generator=torch.Generator().manual_seed(1))
    grads = []
    for checkpointing in (False, True):
        model = copy.deepcopy(policy)
        if checkpointing:
            model.transformer.enable_gradient_checkpointing()
        model.flow_matching_loss(cond, target, torch.tensor([0.2, 0.9]), noise, (6, 4, 4)).sum().backward()
        grads.append(
            torch.cat([p.grad.flatten() for p in model.transformer.parameters() if p.grad is not None])
        )
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------- teacher forcing


def test_teacher_forcing_equals_one_forward_per_clip(policy):
    videos = torch.rand(2, 3 * CLIP, 32, 32, 3, generator=torch.Generator().manual_seed(0))
    target = policy.encode_video(videos)
    assert target.shape == (2, 3 * TOKENS, 8)
    cond = policy.prepare_condition([{}, {}])
    noise = torch.randn(target.shape, generator=torch.Generator().manual_seed(1))
    text = policy.text_inputs(cond, torch.arange(2), 1.0)
    firsts = set()
    for sigmas in (torch.tensor([0.3, 0.8]), torch.tensor([0.1, 0.2]), torch.tensor([0.5, 0.6])):
        first, levels, _ = policy.teacher_forcing_draws(sigmas, 3)
        firsts.add(first)
        with torch.no_grad():
            loss = policy.flow_matching_loss(cond, target, sigmas, noise, (6, 4, 4))
            # every noisy clip alone, after its clean history (clips first .. c-1), as a rollout sees it
            errors = []
            for k, c in enumerate(range(first, 3)):
                level = levels[:, k]
                clip = slice(c * TOKENS, (c + 1) * TOKENS)
                x0, eps = target[:, clip], noise[:, clip]
                noisy = (1 - level[:, None, None]) * x0 + level[:, None, None] * eps
                history = target[:, first * TOKENS : c * TOKENS]
                tokens = torch.cat([history, noisy], 1)
                ids = torch.arange(first, c + 1).repeat_interleave(TOKENS)
                clean = ids < c
                timestep = torch.cat(
                    [torch.zeros(2, history.shape[1]), (level * 1000)[:, None].expand(2, TOKENS)], 1
                )
                coords = policy.positions(first, c + 1 - first, (4, 4))
                plan = AttentionPlan(mask=clip_causal_mask(ids, clean))
                v = policy._forward(tokens, timestep, coords, text, plan)[:, -TOKENS:]
                errors.append(((v - (eps - x0)) ** 2).mean(dim=(1, 2)))
        torch.testing.assert_close(loss, torch.stack(errors).mean(0), rtol=1e-5, atol=1e-6)
    assert firsts == {0, 1}  # random clip boundaries: the history sometimes starts later


def test_teacher_forcing_draws_are_independent_uniform_levels():
    draws = [NextClipPolicy.teacher_forcing_draws(torch.rand(8), 4) for _ in range(300)]
    levels = torch.cat([d[1][:, -3:] for d in draws if d[1].shape[1] >= 3])  # the last 3 clips
    assert levels.min() >= 0 and levels.max() < 1 and abs(levels.mean().item() - 0.5) < 0.03
    correlation = torch.corrcoef(levels.T)
    assert (correlation - torch.eye(3)).abs().max() < 0.1
    assert {d[0] for d in draws} == {0, 1, 2}
    same = [NextClipPolicy.teacher_forcing_draws(torch.tensor([0.25, 0.5]), 4) for _ in range(2)]
    assert same[0][0] == same[1][0] and torch.equal(same[0][1], same[1][1])


def clip_by_clip_velocity(
    policy: NextClipPolicy, rollout: Rollout, sigmas: torch.Tensor, noise: torch.Tensor
) -> torch.Tensor:
    """What DiffusionNFT's `nft_velocity` must equal, by the rollout's own path: every generated clip
    noised at its level (``sigmas [b, K]``) and denoised alone by `clip_velocity` after the history it
    was sampled after (context + own earlier clips, or the branched trunk's), history noise included."""
    tokens, num_context = rollout.extras["clip_tokens"], rollout.extras["num_context_clips"]
    idx = rollout.condition_index
    shown = rollout.condition.get("branch_history_latents")
    shown = rollout.final_latents if shown is None else shown[idx]
    history = torch.cat([rollout.condition["context_latents"][idx], shown], dim=1)
    history_noise = policy._history_noise(rollout.seeds.tolist(), history.shape[1])
    seen = policy._history_input(history, history_noise)
    text = policy.text_inputs(rollout.condition, idx, 1.0)
    velocities = []
    for k in range(rollout.num_clips):
        clip = slice(k * tokens, (k + 1) * tokens)
        level = sigmas[:, k, None, None]
        noisy = (1 - level) * rollout.final_latents[:, clip] + level * noise[:, clip]
        velocities.append(
            policy.clip_velocity(noisy, sigmas[:, k] * 1000, num_context + k, seen, text, (4, 4))
        )
    return torch.cat(velocities, dim=1)


@pytest.mark.parametrize("branch", [False, True])
def test_nft_velocity_gives_every_clip_its_own_history_in_one_forward(tiny_dir, branch):
    policy = NextClipPolicy.from_pretrained(tiny_dir, config=NextClipConfig(history_sigma=0.05))
    rollout = policy.rollout(
        _condition(policy, rows=2), num_generations=2, sampling=_fast(3), seeds=[4, 5, 6, 7], branch=branch
    )
    assert ("branch_history_latents" in rollout.condition) == branch
    generator = torch.Generator().manual_seed(0)
    sigmas = torch.rand(4, 3, generator=generator)
    noise = torch.randn(rollout.final_latents.shape, generator=generator)
    with torch.no_grad():
        got, forwards, _, _ = _count(policy, lambda: policy.nft_velocity(rollout, sigmas, noise))
        want = clip_by_clip_velocity(policy, rollout, sigmas, noise)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert forwards == 1
        # one level per sample ([b]) noises all its clips at that level
        same = policy.nft_velocity(rollout, sigmas[:, 0], noise)
        torch.testing.assert_close(same, policy.nft_velocity(rollout, sigmas[:, :1].expand(-1, 3), noise))


def test_teacher_forcing_is_reproducible_from_the_trainers_draws(policy):
    target = policy.encode_video(
        torch.rand(1, 4 * CLIP, 32, 32, 3, generator=torch.Generator().manual_seed(0))
    )
    cond = policy.prepare_condition([{}])
    noise = torch.randn(target.shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        losses = [
            policy.flow_matching_loss(cond, target, torch.tensor([s]), noise, (8, 4, 4))
            for s in (0.3, 0.3, 0.6)
        ]
    assert torch.equal(losses[0], losses[1]) and not torch.equal(losses[0], losses[2])


# ----------------------------------------------------------------------------------------- checkpoints


def test_save_pretrained_round_trip_keeps_the_clip_config(tmp_path, tiny_dir):
    policy = NextClipPolicy.from_pretrained(tiny_dir, config=NextClipConfig(history_sigma=0.05))
    policy.save_pretrained(tmp_path / "copy")
    loaded = NextClipPolicy.from_pretrained(tmp_path / "copy")
    assert loaded.clip_config == policy.clip_config
    cond = _condition(policy)
    a = policy.rollout(cond, num_generations=2, sampling=_fast(2), seeds=[3, 4])
    b = loaded.rollout(cond, num_generations=2, sampling=_fast(2), seeds=[3, 4])
    assert torch.equal(a.final_latents, b.final_latents) and torch.equal(a.log_probs, b.log_probs)


def test_lora_reference_and_rollout_record_round_trip(tmp_path, tiny_dir):
    base = NextClipPolicy.from_pretrained(tiny_dir)
    rollout = base.rollout(_condition(base, rows=2), num_generations=2, sampling=_fast(2), seeds=[0, 1, 2, 3])
    rollout.save(tmp_path / "r")
    loaded = Rollout.load(tmp_path / "r")
    assert loaded.extras == rollout.extras
    sub = loaded.select([3, 0])
    _assert_recompute_matches(base, sub)

    policy = NextClipPolicy.from_pretrained(tiny_dir)
    policy.add_lora(rank=4)
    with torch.no_grad():
        for name, param in policy.transformer.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5, generator=torch.Generator().manual_seed(0))
        tuned = policy.log_prob(loaded, 4)
        with policy.reference():
            ref = policy.log_prob(loaded, 4)
    torch.testing.assert_close(ref.log_prob, rollout.log_probs[:, 4], rtol=0, atol=1e-5)
    assert (tuned.log_prob - rollout.log_probs[:, 4]).abs().max() > 1e-3


def test_decode_turns_each_clip_into_its_frames(policy):
    videos = torch.rand(2, 2 * CLIP, 32, 32, 3, generator=torch.Generator().manual_seed(0))
    latents = policy.encode_video(videos)
    decoded = policy.decode(latents, (4, 4, 4))
    assert decoded.shape == (2, 18, 32, 32, 3)
    # clip by clip: the second clip decodes the same alone as within the video (up to float32
    # rounding: a batch of 1 and of 2 may take different conv kernels, 1.4e-5 seen on LTX-2's VAE;
    # a clip decoded with its neighbour's frames would differ far more)
    alone = policy.decode(policy.encode_video(videos[:1, CLIP:]), (2, 4, 4))
    torch.testing.assert_close(alone[0], decoded[0, CLIP:], rtol=0, atol=5e-5)
    # in VAE calls of 3 clips (the 4 clips split 3 + 1): the same videos, in order
    chunked = policy.decode(latents, (4, 4, 4), batch_size=3)
    torch.testing.assert_close(chunked, decoded, rtol=0, atol=5e-5)


# ----------------------------------------------------------------------------------------- bad input


def test_bad_input_fails_before_any_forward(policy, monkeypatch):
    calls = []
    monkeypatch.setattr(policy.transformer, "forward", lambda *a, **k: calls.append(1))
    cond = _condition(policy)
    cases = [
        (dict(sampling=SamplingConfig(num_frames=10)), "multiple of clip_frames=9"),
        (dict(sampling=_fast(2, guidance_scale=3.0)), "without CFG"),
        (dict(sampling=_fast(2), seeds=[1, 2, 3]), "seeds"),
    ]
    for kwargs, match in cases:
        with pytest.raises(InputError, match=match) as info:
            policy.rollout(cond, **kwargs)
        assert "\n" not in str(info.value)
    bad = {**cond, "context_latents": cond["context_latents"][:, :20]}
    with pytest.raises(InputError, match="not whole clips of 32"):
        policy.rollout(bad, sampling=_fast(2))
    assert calls == []


def test_clip_frames_must_fit_the_vae(tiny_dir):
    with pytest.raises(InputError, match="is not 8k\\+1"):
        NextClipPolicy.from_pretrained(tiny_dir, config=NextClipConfig(clip_frames=8))
    with pytest.raises(InputError, match="history_sigma"):
        NextClipConfig(history_sigma=0.9)


def test_tiny_builder_can_fit_its_vae_to_the_toy_world(tmp_path):
    from grpo.toy_checkpoints import build_fitted_tiny_nextclip

    path = build_fitted_tiny_nextclip(tmp_path / "fitted", vae_fit_steps=2)
    fitted = NextClipPolicy.from_pretrained(path)
    assert not torch.equal(fitted.vae.latents_std, torch.ones_like(fitted.vae.latents_std))
    latents = fitted.encode_video(torch.rand(1, CLIP, 32, 32, 3, generator=torch.Generator().manual_seed(0)))
    assert latents.shape == (1, TOKENS, 8)


def test_attention_backends_cannot_replace_the_clip_causal_attention(policy):
    with pytest.raises(NotImplementedError, match="clip-causal self-attention"):
        policy.compile(attention_backend="_native_cudnn")


def test_compiled_blocks_share_their_graphs_whatever_the_depth(tmp_path):
    """Regional compilation of a next-clip model deeper than dynamo's recompile limit (8): the
    history cache is looked up outside the compiled graph, so the blocks do not each compile a
    graph of their own (which past the limit left the rest eager); the rollout is the eager one."""
    deep = NextClipPolicy.from_pretrained(
        build_tiny_nextclip(tmp_path / "deep", TinyLTXSpec(text_layers=0, num_layers=10))
    )
    cond, sampling = _condition(deep), _fast(3)
    with torch.no_grad():
        eager = deep.rollout(cond, num_generations=2, sampling=sampling, seeds=[3, 4])
        deep.compile(backend="eager")  # dynamo's graphs and guards, without inductor's code generation
        # dynamo's default limit (policies.fp8 raises it for its graphs), fewer than the blocks
        with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True, recompile_limit=8):
            compiled = deep.rollout(cond, num_generations=2, sampling=sampling, seeds=[3, 4])
    assert torch.equal(compiled.final_latents, eager.final_latents)


def test_a_recipe_builds_a_tiny_nextclip_in_another_toy_layout(tmp_path):
    """``policy.tiny_ltx`` reaches the tiny next-clip builder as it reaches the NSP one: 8x8-pixel VAE
    patches (a quarter of the tokens) and a deeper, wider transformer; an LTX-2 generator is refused."""
    from grpo.train import NextClipPolicySpec

    sizes = {"vae_patch_size": 8, "vae_channels": [64], "num_layers": 3, "attention_head_dim": 32}
    spec = NextClipPolicySpec(tiny=True, tiny_ltx=sizes)
    assert spec.tiny_ltx["vae_channels"] == (64,) and spec.tiny_ltx["num_attention_heads"] == 4  # filled in
    policy = spec.build(tmp_path, "cpu", torch.float32)
    assert policy.vae.config.patch_size == 8 and len(policy.transformer.transformer_blocks) == 3
    assert policy.transformer.config.attention_head_dim == 32
    assert policy.latent_shape(27, 32, 32) == (27, 4, 4)
    with pytest.raises(InputError, match="tiny_generator is 'ltx2': remove it"):
        NextClipPolicySpec(tiny=True, tiny_generator="ltx2", tiny_ltx={"num_layers": 3})
