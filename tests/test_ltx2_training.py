"""LTX-2 training paths: the supervised flow-matching loss on the joint audio-video state (against
the transformer called directly), the waveform -> mel -> audio VAE encode path (against
`LTX2Pipeline`'s own packing and normalisation, and in shape against its decode path), and the
generated sound handed to rewards in GRPO."""

from __future__ import annotations

import math

import pytest
import torch

from grpo.train import ToyWorldDataSpec, build_datasets
from policies.errors import InputError
from policies.ltx2 import Geometry, LTX2Policy, log_mel_spectrogram, slaney_mel_filterbank
from policies.tiny_ltx2 import TinyLTX2Spec, build_tiny_ltx2

FPS = 8.0  # the toy world's frame rate (ToyWorldDataSpec's default)


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    path = build_tiny_ltx2(tmp_path_factory.mktemp("ltx2train") / "ckpt", TinyLTX2Spec.toy_world(), seed=1)
    return LTX2Policy.from_pretrained(path)


@pytest.fixture(scope="module")
def rows():
    """Two toy-world rows with sound: prompt, next-scene video [9, 32, 32, 3], its waveform, world."""
    train, _ = build_datasets(ToyWorldDataSpec(audio=True, num_train=2, num_eval=1))
    return [train[0], train[1]]


def _direct_loss(policy, condition, target, audio_target, sigmas, noise, audio_noise, modalities, i2v):
    """The loss computed independently: diffusers' transformer called directly on the noised states,
    mean squared error of its velocities against ``noise - target`` over the generated elements."""
    video_text, audio_text, mask = policy.connectors(
        condition["prompt_embeds"], condition["prompt_attention_mask"], padding_side="left"
    )
    s = sigmas[:, None, None]
    video = (1 - s) * target + s * noise
    audio = (1 - s) * audio_target + s * audio_noise
    t = sigmas * 1000
    first = 8 * 8  # one latent frame of the toy layout (8x8 latents per 32x32 frame)
    video_t = t
    if i2v:
        video[:, :first] = target[:, :first]
        video_t = t[:, None].expand(-1, target.shape[1]).clone()
        video_t[:, :first] = 0
    video_v, audio_v = policy.transformer(
        hidden_states=video,
        audio_hidden_states=audio,
        encoder_hidden_states=video_text,
        audio_encoder_hidden_states=audio_text,
        timestep=video_t,
        audio_timestep=t,
        sigma=t,
        encoder_attention_mask=mask,
        audio_encoder_attention_mask=mask,
        num_frames=9,
        height=8,
        width=8,
        fps=FPS,
        audio_num_frames=audio.shape[1],
        use_cross_timestep=True,
        return_dict=False,
    )
    video_err = (video_v - (noise - target)) ** 2
    if i2v:
        video_err = video_err[:, first:]
    parts = [video_err.flatten(1)]
    if modalities == "audio_video":
        parts.append(((audio_v - (audio_noise - audio_target)) ** 2).flatten(1))
    return torch.cat(parts, dim=1).mean(dim=1)


@pytest.mark.parametrize(
    "modalities,i2v,silent",
    [
        ("audio_video", False, False),
        ("video", False, False),
        ("audio_video", True, False),
        ("video", True, True),
    ],
)
def test_flow_matching_loss_is_the_transformers_velocity_error(policy, rows, modalities, i2v, silent):
    """``silent``: rows without sound (video only): the audio stream is the all-zero latent."""
    from diffusers import LTX2Pipeline

    policy.sampling_overrides = {"modalities": modalities}
    if silent:
        rows = [{k: v for k, v in r.items() if k not in ("audio", "sample_rate")} for r in rows]
    try:
        condition = policy.prepare_condition(rows)
        videos = torch.stack([torch.as_tensor(r["video"]) for r in rows])
        if i2v:
            condition["image_latents"] = policy.encode_image(videos[:, 0])
        target = policy.encode_video(videos)
        latent_shape = policy.latent_shape(9, 32, 32)
        # the targets as LTX2Pipeline normalises and packs given latents
        pixels = videos.permute(0, 4, 1, 2, 3) * 2 - 1
        expected = LTX2Pipeline._pack_latents(
            LTX2Pipeline._normalize_latents(
                policy.vae.encode(pixels).latent_dist.mode(),
                policy.vae.latents_mean,
                policy.vae.latents_std,
                policy.vae.config.scaling_factor,
            ),
            1,
            1,
        )
        torch.testing.assert_close(target, expected)
        g = torch.Generator().manual_seed(0)
        sigmas = torch.tensor([0.3, 0.8])
        noise = torch.randn(target.shape, generator=g)
        if silent:
            audio_target = audio_noise = torch.zeros(2, policy._audio_frames(9, FPS), 32)
            extra = {}
        else:
            audio_target = condition["audio_latents"]
            audio_noise = torch.randn(audio_target.shape, generator=g)
            extra = {"audio_noise": audio_noise}
        loss = policy.flow_matching_loss(
            condition, target, sigmas, noise, latent_shape, frame_rate=FPS, **extra
        )
        with torch.no_grad():
            direct = _direct_loss(
                policy, condition, target, audio_target, sigmas, noise, audio_noise, modalities, i2v
            )
    finally:
        policy.sampling_overrides = {}
    assert loss.shape == (2,)
    torch.testing.assert_close(loss.detach(), direct, rtol=1e-5, atol=1e-6)


def test_audio_target_is_the_pipelines_packed_normalised_encoding(policy, rows):
    from diffusers import LTX2Pipeline

    wave = torch.as_tensor(rows[0]["audio"])
    latents = policy.encode_audio([wave], rows[0]["sample_rate"])
    config = policy.audio_vae.config
    mel = log_mel_spectrogram(wave[None].expand(-1, 2, -1), 16000, config.mel_bins, config.mel_hop_length)
    assert mel.shape == (1, 2, wave.shape[-1] // 160 + 1, 64)  # [B, C, frames, mel bins], hop 160
    raw = policy.audio_vae.encode(mel).latent_dist.mode()
    expected = LTX2Pipeline._normalize_audio_latents(
        LTX2Pipeline._pack_audio_latents(raw), policy.audio_vae.latents_mean, policy.audio_vae.latents_std
    )
    frames = policy._audio_frames(9, FPS)  # what a 9-frame rollout at the toy fps generates
    assert latents.shape == (1, frames, policy.transformer.config.audio_in_channels)
    torch.testing.assert_close(latents, expected[:, :frames])


def test_toy_waveform_round_trips_to_a_vocoder_waveform_of_its_length(policy, rows):
    """waveform -> mel -> audio VAE encode, then LTX2Pipeline's decode path (denormalise, unpack, audio
    VAE decode, vocoder): the spectrogram comes back in the encoder's layout and the waveform lasts
    as long as the input (to within one latent frame), at the vocoder's rate."""
    wave = torch.as_tensor(rows[0]["audio"])
    seconds = wave.shape[-1] / rows[0]["sample_rate"]
    audio = policy.encode_audio([wave], rows[0]["sample_rate"])
    latent_shape = policy.latent_shape(9, 32, 32)
    video = torch.zeros(1, math.prod(latent_shape), policy.transformer.config.in_channels)
    state = Geometry.join(video, audio)
    rollout = type("R", (), {})()  # rollout_audio reads final_latents, latent_shape and extras
    rollout.final_latents, rollout.latent_shape = state, latent_shape
    rollout.extras = {"modalities": "audio_video"}
    waveforms, rate = policy.rollout_audio(rollout)
    assert rate == policy.vocoder.config.output_sampling_rate == 24000
    mel_frames = 4 * audio.shape[1] - 3  # the causal audio VAE's 4x upsampling
    assert waveforms.shape == (1, 2, mel_frames * 240)  # 100 mel frames/s -> 24 kHz
    assert abs(waveforms.shape[-1] / rate - seconds) <= 4 * 160 / 16000  # one latent frame: 40 ms
    rollout.extras = {"modalities": "video"}
    assert policy.rollout_audio(rollout) is None


def test_slaney_mel_filterbank_closed_form():
    """Filter centres on the Slaney scale (3 f / 200 below 1 kHz, 15 + 27 ln(f / 1 kHz) / ln 6.4
    above), unit area, and a pure tone lights the filter centred nearest its pitch."""
    banks = slaney_mel_filterbank(513, 16000, 64)
    top = 15 + 27 * math.log(8000 / 1000) / math.log(6.4)
    mels = torch.linspace(0, top, 66, dtype=torch.float64)[1:-1]
    centres = torch.where(mels < 15, mels * 200 / 3, 1000 * torch.exp((mels - 15) * math.log(6.4) / 27))
    freqs = torch.linspace(0, 8000, 513, dtype=torch.float64)
    peaks = freqs[banks.argmax(dim=0)]
    assert torch.all((peaks - centres).abs() <= 8000 / 512)  # within one FFT bin
    area = banks.double().sum(dim=0) * (8000 / 512)
    torch.testing.assert_close(area[20:], torch.ones(44, dtype=torch.float64), rtol=0.03, atol=0)
    for pitch in (440.0, 1000.0, 3000.0):
        t = torch.arange(16000) / 16000
        tone = torch.sin(2 * math.pi * pitch * t)[None, None]
        mel = log_mel_spectrogram(tone, 16000, 64, 160)
        assert int(mel[0, 0].mean(0).argmax()) == int((centres - pitch).abs().argmin())


def test_audio_video_training_needs_the_rows_sound(policy, rows):
    silent = [{k: v for k, v in r.items() if k not in ("audio", "sample_rate")} for r in rows]
    condition = policy.prepare_condition(silent)
    target = policy.encode_video(torch.stack([torch.as_tensor(r["video"]) for r in rows]))
    shape = policy.latent_shape(9, 32, 32)
    sigmas, noise = torch.full((2,), 0.5), torch.zeros_like(target)
    with pytest.raises(InputError, match="audio: true"):
        policy.flow_matching_loss(condition, target, sigmas, noise, shape, frame_rate=FPS)
    # the clip's sound at another frame rate does not fit the video's duration
    condition = policy.prepare_condition(rows)
    audio_noise = torch.zeros_like(condition["audio_latents"])
    with pytest.raises(InputError, match="frame_rate"):
        policy.flow_matching_loss(
            condition, target, sigmas, noise, shape, frame_rate=25.0, audio_noise=audio_noise
        )
    with pytest.raises(InputError, match="Hz"):
        policy.encode_audio([torch.as_tensor(rows[0]["audio"])], 22050)


def test_rewards_get_the_generated_sound_not_the_rows(policy, rows):
    from grpo.trainer import reward_metadata
    from policies.ltx import SamplingConfig

    sampling = SamplingConfig(num_frames=9, height=32, width=32, num_inference_steps=2, frame_rate=FPS)
    condition = policy.prepare_condition(rows[:1])
    policy.sampling_overrides = {"modalities": "audio_video"}
    try:
        rollout = policy.rollout(condition, num_generations=2, sampling=sampling, seeds=[3, 4])
    finally:
        policy.sampling_overrides = {}
    metadata = reward_metadata(policy, rollout, rows[0])
    generated = policy.decode_audio(rollout.final_latents, rollout.latent_shape)
    assert len(metadata["audio"]) == 2 and metadata["sample_rate"] == [24000, 24000]
    for got, want in zip(metadata["audio"], generated, strict=True):
        torch.testing.assert_close(got, want.cpu())
    assert metadata["world"] == [rows[0]["world"]] * 2
    # a rollout without scored sound: the row's own (target) waveform never reaches the rewards
    rollout.extras["modalities"] = "video"
    assert not {"audio", "sample_rate", "prompt"} & set(reward_metadata(policy, rollout, rows[0]))


def test_grpo_on_the_toy_world_scores_the_generated_sound(tmp_path):
    """Two GRPO iterations of toy_ltx2_grpo.yaml (shrunk, on a fresh tiny toy-layout LTX-2): the audio
    reward scores every rollout and every held-out generation from the vocoder's waveform."""
    import json
    from pathlib import Path

    from grpo.recipe import load_recipe
    from grpo.train import run

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "toy_ltx2_grpo.yaml"
    overrides = [
        f"output_dir={tmp_path / 'run'}",
        "policy.path=null",
        "policy.tiny=true",
        "policy.tiny_vae_fit_steps=2",
        "data.num_train=4",
        "data.num_eval=1",
        "trainer.max_iterations=2",
        "trainer.num_generations=2",
        "trainer.num_prompts_per_iteration=1",
        "trainer.num_inference_steps=3",
        "trainer.sde_window_size=2",
        "trainer.eval_every=2",
        "trainer.save_steps=0",
        "trainer.save_eval_videos=0",
    ]
    run(load_recipe(recipe, overrides))
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [m for m in logged if "reward/toyworld_audio/mean" in m]
    assert len(train) == 2
    assert all(math.isfinite(m["reward/toyworld_audio/mean"]) for m in train)
    assert all(m["reward/toyworld_audio/num_unscored"] == 0 for m in train)
    held_out = [m for m in logged if "eval/toyworld_audio/mean" in m]
    assert held_out and math.isfinite(held_out[-1]["eval/toyworld_audio/mean"])


def test_toy_world_first_frame_is_the_seen_frame_and_conditions_image_to_video(policy):
    """data.first_frame: each row's 'image' is the next scene's first frame, which (next_overlap 1) is
    the context's last one; the policy takes it as image-to-video conditioning. Without an overlap the
    frame was never seen: a one-line error."""
    from grpo.data import ToyWorld, ToyWorldConfig

    train, _ = build_datasets(ToyWorldDataSpec(next_overlap=1, first_frame=True, num_train=2, num_eval=1))
    world = ToyWorld(ToyWorldConfig(next_overlap=1), split="train", num_samples=2)
    for i in range(2):
        assert torch.equal(torch.as_tensor(train[i]["image"]), world[i]["context"][-1])
        assert torch.equal(torch.as_tensor(train[i]["image"]), torch.as_tensor(train[i]["video"])[0])
    condition = policy.prepare_condition([train[0], train[1]])
    assert condition["image_latents"].shape[0] == 2
    plain, _ = build_datasets(ToyWorldDataSpec(next_overlap=1, num_train=1, num_eval=1))
    assert "image" not in plain[0]
    with pytest.raises(InputError, match="next_overlap >= 1"):
        ToyWorldDataSpec(first_frame=True)
