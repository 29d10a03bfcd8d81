"""Next-clip on LTX-2 (`NextClipLTX2Policy`): the same exactness tests as on LTX-Video 0.9, run on a
tiny LTX-2 of the same latent geometry (9-frame clips of 2 x 4 x 4 tokens of 8 channels at 32 px),
plus what is LTX-2's own: the checkpoint picks the class, the RoPE coordinates are LTX-2's, the
clip-causal processor is the stock one without a plan, the audio stream cannot reach the video, and
what is not available (audio_video, STG, LTX-2.3's prompt modulation) is refused.

The imported tests run here against this module's ``tiny_dir`` / ``policy`` fixtures (the LTX-2
checkpoint); their helpers and sizes are the LTX-Video module's, which this geometry matches.
"""

import json

import pytest
import torch
from test_nextclip_grpo import (  # noqa: F401  (collected here, on the LTX-2 checkpoint)
    _trainer,
    test_a_reward_on_clip_2_only_moves_clip_2_steps,
    test_clip_scores_must_cover_every_generated_clip,
    test_nft_trains_each_clip_by_its_own_advantage,
    test_whole_video_rewards_give_every_clip_the_video_advantage,
)
from test_nextclip_policy import (  # noqa: F401  (collected here, on the LTX-2 checkpoint)
    TOKENS,
    _condition,
    _count,
    _fast,
    test_attention_backends_cannot_replace_the_clip_causal_attention,
    test_bad_input_fails_before_any_forward,
    test_batch_rollout_equals_one_sample_at_a_time,
    test_branched_rollout_shares_the_trunks_history_and_recomputes_exactly,
    test_clip_causal_mask_in_the_transformer,
    test_clip_frames_must_fit_the_vae,
    test_decode_turns_each_clip_into_its_frames,
    test_gradient_checkpointing_keeps_the_mask,
    test_history_noise_is_reproducible_and_cached,
    test_log_prob_gradients_reach_the_history_keys,
    test_lora_reference_and_rollout_record_round_trip,
    test_nft_velocity_gives_every_clip_its_own_history_in_one_forward,
    test_per_sample_steps_across_clips_equal_single_step_calls,
    test_recompute_for_every_kind,
    test_recomputed_log_prob_equals_rollout_for_every_clip_and_step,
    test_save_pretrained_round_trip_keeps_the_clip_config,
    test_sde_window_records_only_window_steps_of_each_clip,
    test_teacher_forcing_equals_one_forward_per_clip,
    test_teacher_forcing_is_reproducible_from_the_trainers_draws,
)

from policies import NextClipPolicy
from policies.errors import InputError
from policies.ltx2 import LTX2SamplingConfig
from policies.nextclip import NextClipConfig, NextClipLTX2Policy
from policies.nextclip_tiny import build_tiny_nextclip
from policies.tiny_ltx2 import TinyLTX2Spec

# 8x spatial (2-pixel patches, two spatiotemporal stages) and 8x temporal, 8 latent channels: the
# latent geometry of the LTX-Video tiny checkpoint the imported tests were written for (a layout whose
# tiny decoder mirrors its encoder)
SPEC = TinyLTX2Spec(
    latent_channels=8,
    vae_channels=(8, 8, 8),
    vae_downsample=("temporal", "spatiotemporal", "spatiotemporal"),
    vae_patch_size=2,
)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_nextclip(tmp_path_factory.mktemp("tiny_nextclip_ltx2"), SPEC, generator="ltx2")


@pytest.fixture(scope="module")
def policy(tiny_dir):
    return NextClipPolicy.from_pretrained(tiny_dir)


def test_the_checkpoint_picks_the_ltx2_class(tiny_dir, policy, tmp_path):
    assert type(policy) is NextClipLTX2Policy
    assert type(policy.transformer).__name__ == "LTX2VideoTransformer3DModel"
    assert json.loads((tiny_dir / "model_index.json").read_text())["_class_name"] == "LTX2Pipeline"
    policy.save_pretrained(tmp_path / "copy")
    assert json.loads((tmp_path / "copy" / "model_index.json").read_text())["_class_name"] == "LTX2Pipeline"
    assert type(NextClipPolicy.from_pretrained(tmp_path / "copy")) is NextClipLTX2Policy


@pytest.mark.parametrize("first,clips", [(0, 1), (2, 3)])
def test_positions_are_ltx2_video_coords(policy, first, clips):
    """A clip sequence's coordinates are those LTX-2 gives one video of the same pixel frames."""
    config = policy.clip_config
    rope = policy.transformer.rope
    frames = policy.latent_clip_frames
    ours = policy.positions(first, clips, (4, 4))
    assert ours.shape == (3, clips * TOKENS, 2)
    for c in range(clips):  # clip k: LTX-2's coords of a single clip, shifted by k * clip_frames
        ref = rope.prepare_video_coords(1, frames, 4, 4, ours.device, fps=config.rope_frame_rate)[0]
        ref[0] += (first + c) * config.clip_frames / config.rope_frame_rate
        torch.testing.assert_close(ours[:, c * TOKENS : (c + 1) * TOKENS], ref, rtol=0, atol=1e-6)


def transformer_inputs(model, **extra) -> dict:
    """Random keyword inputs of one forward of a tiny `LTX2VideoTransformer3DModel` (2 samples,
    2 x 4 x 4 video tokens, 3 audio tokens, 5 text tokens), plus ``extra``."""
    g = torch.Generator().manual_seed(0)
    width = model.config.caption_channels
    return dict(
        hidden_states=torch.randn(2, 32, model.config.in_channels, generator=g),
        audio_hidden_states=torch.randn(2, 3, model.config.audio_in_channels, generator=g),
        encoder_hidden_states=torch.randn(2, 5, width, generator=g),
        audio_encoder_hidden_states=torch.randn(2, 5, width, generator=g),
        timestep=torch.tensor([300.0, 700.0]),
        sigma=torch.tensor([300.0, 700.0]),
        encoder_attention_mask=torch.ones(2, 5),
        audio_encoder_attention_mask=torch.ones(2, 5),
        num_frames=2,
        height=4,
        width=4,
        audio_num_frames=3,
        use_cross_timestep=True,
        return_dict=False,
        **extra,
    )


def test_without_a_plan_the_transformer_is_stock_ltx2(tiny_dir, policy):
    from diffusers import LTX2VideoTransformer3DModel

    stock = LTX2VideoTransformer3DModel.from_pretrained(tiny_dir / "transformer")
    kwargs = transformer_inputs(stock)
    with torch.no_grad():
        for ours, theirs in zip(policy.transformer(**kwargs), stock(**kwargs), strict=True):
            torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_video_velocity_ignores_the_audio_stream(policy):
    """Every next-clip forward has the cross-modal attentions off: the audio stream's content cannot
    reach the video velocity (else a whole-video audio track would leak later clips)."""
    tokens = torch.randn(1, 2 * TOKENS, 8, generator=torch.Generator().manual_seed(0))
    timestep = torch.full((1, 2 * TOKENS), 500.0)
    coords = policy.positions(0, 2, (4, 4))
    text = policy.text_inputs(policy.prepare_condition([{}]), torch.arange(1), 1.0)
    with torch.no_grad():
        base = policy._denoise(policy.transformer, tokens, timestep, coords[None], text)
        loud = {**text, "audio": text["audio"] + 5.0}
        assert torch.equal(policy._denoise(policy.transformer, tokens, timestep, coords[None], loud), base)
        # the stock call with the cross-modal attentions on does hear the audio text stream
        kwargs = dict(
            hidden_states=tokens,
            audio_hidden_states=torch.zeros(1, 1, policy.transformer.config.audio_in_channels),
            encoder_hidden_states=text["video"],
            encoder_attention_mask=text["mask"],
            audio_encoder_attention_mask=text["mask"],
            timestep=timestep,
            audio_timestep=torch.zeros(1),
            sigma=torch.zeros(1),
            video_coords=coords[None],
            audio_num_frames=1,
            use_cross_timestep=True,
            return_dict=False,
        )
        quiet = policy.transformer(audio_encoder_hidden_states=text["audio"], **kwargs)[0]
        heard = policy.transformer(audio_encoder_hidden_states=loud["audio"], **kwargs)[0]
        assert (quiet - heard).abs().max() > 1e-6


def test_cached_rollout_equals_uncached_and_is_cheaper(policy):
    """Cached == no-cache rollout (latents of every step, log-probs), and the cache carries only the
    new clip's tokens through the transformer. The max latents difference is printed (README)."""
    cond = _condition(policy, rows=2)
    sampling = _fast(4)  # 1 context clip + 4 generated clips
    seeds = [0, 1, 2, 3]
    cached, n_c, tok_c, flops_c = _count(
        policy, lambda: policy.rollout(cond, num_generations=2, sampling=sampling, seeds=seeds)
    )
    plain, n_u, tok_u, flops_u = _count(
        policy,
        lambda: policy.rollout(cond, num_generations=2, sampling=sampling, seeds=seeds, use_cache=False),
    )
    diff = (cached.latents - plain.latents).abs().max().item()
    final = (cached.final_latents - plain.final_latents).abs().max().item()
    print(
        f"next-clip LTX-2: max |latents cached - no cache| = {diff:.3g} (final {final:.3g}); "
        f"FLOPs cached / no cache = {flops_c / flops_u:.3f}"
    )
    assert diff <= 1e-5 and final <= 1e-5
    assert (cached.log_probs - plain.log_probs).abs().max() <= 1e-5
    # cached: 4 clips x 3 steps of 32 tokens + prefill (context) + 3 extensions
    assert (n_c, tok_c) == (4 * 3 + 1 + 3, (4 * 3 + 1 + 3) * TOKENS)
    # uncached: every step carries the whole history: clip k (k = 1..4) is (k + 1) x 32 tokens
    assert (n_u, tok_u) == (12, sum(3 * (k + 1) * TOKENS for k in range(1, 5)))
    # (at this toy size LTX-2's per-forward costs, the audio stream and the text cross-attention,
    # keep the FLOP ratio near 0.56, where LTX-Video's is below 0.5)
    assert flops_c < 0.7 * flops_u
    # the clips are not trivially equal: each clip's latents differ from the others'
    first, second = cached.final_latents[:, :TOKENS], cached.final_latents[:, TOKENS : 2 * TOKENS]
    assert (first - second).abs().max() > 1e-2


def test_what_next_clip_on_ltx2_does_not_do_is_refused(policy, monkeypatch):
    calls = []
    monkeypatch.setattr(policy.transformer, "forward", lambda *a, **k: calls.append(1))
    cond = _condition(policy)
    audio = LTX2SamplingConfig(num_frames=18, height=32, width=32, num_inference_steps=3)
    with pytest.raises(NotImplementedError, match="video stream only"):
        policy.rollout(cond, sampling=audio)
    stg = LTX2SamplingConfig(
        num_frames=18,
        height=32,
        width=32,
        num_inference_steps=3,
        modalities="video",
        stg_scale=1.0,
        stg_blocks=[0],
    )
    with pytest.raises(InputError, match="without guidance"):
        policy.rollout(cond, sampling=stg)
    policy.sampling_overrides = {"modalities": "audio_video"}
    try:
        with pytest.raises(NotImplementedError, match="video stream only"):
            policy.rollout(cond, sampling=_fast(2))
    finally:
        policy.sampling_overrides = {}
    assert calls == []


def test_a_video_modality_sampling_config_is_accepted(policy):
    video = LTX2SamplingConfig(num_frames=18, height=32, width=32, num_inference_steps=3, modalities="video")
    a = policy.rollout(_condition(policy), sampling=video, seeds=[5])
    b = policy.rollout(_condition(policy), sampling=_fast(2), seeds=[5])
    assert torch.equal(a.final_latents, b.final_latents) and a.extras["modalities"] == "video"
    assert policy.rollout_audio(a) is None  # no sound to score


def test_ltx2_3_prompt_modulation_is_refused(tiny_dir):
    from diffusers import LTX2VideoTransformer3DModel

    transformer = LTX2VideoTransformer3DModel.from_pretrained(tiny_dir / "transformer")
    transformer.prompt_modulation = True
    transformer.register_to_config(use_prompt_adaln_single=True)
    base = NextClipPolicy.from_pretrained(tiny_dir)
    with pytest.raises(NotImplementedError, match="LTX-2.3"):
        NextClipLTX2Policy(
            transformer, base.vae, base.scheduler, base.connectors, config=NextClipConfig(clip_frames=9)
        )


def test_grpo_trainer_takes_the_ltx2_policy(tiny_dir, tmp_path):
    trainer = _trainer(tiny_dir, tmp_path, "test_clip2_redness")
    assert type(trainer.policy) is NextClipLTX2Policy


def test_a_recipe_picks_next_clip_on_ltx2_from_the_directory_or_tiny_generator(tiny_dir, tmp_path):
    import shutil

    from grpo.train import NextClipPolicySpec, build_policy

    spec = NextClipPolicySpec(path=str(tiny_dir))
    spec.check_dir()  # an LTX-2 directory is a valid next-clip checkpoint
    assert type(build_policy(spec, tmp_path)) is NextClipLTX2Policy
    tiny = build_policy(NextClipPolicySpec(tiny=True, tiny_generator="ltx2"), tmp_path)
    assert type(tiny) is NextClipLTX2Policy
    assert tiny.latent_shape(27, 32, 32) == (27, 8, 8)  # TinyLTX2Spec.toy_world: 4x4 patches, 1x in time
    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir, broken)
    shutil.rmtree(broken / "connectors")
    with pytest.raises(InputError, match="no connectors/ subfolder") as info:
        NextClipPolicySpec(path=str(broken)).check_dir()
    assert "\n" not in str(info.value)
