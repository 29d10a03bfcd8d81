"""NSP on an LTX-2 generator (picked by the checkpoint): recomputed log-probs equal the rollout's for
both modalities, the ODE rollout is diffusers' LTX2Pipeline / LTX2ImageToVideoPipeline fed the
connector's embeddings, one VLM forward per context per iteration, SFT through the frozen VLM, both
connector kinds save / load bitwise and resume, and one-line errors for bad directories and chats
too long for the VLM."""

import contextlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from test_bad_inputs import fails_in_one_line, write_recipe
from test_ltx2_policy import GUIDANCE, _pipeline_latents

import rewards
from grpo.config import FlowMatchingConfig, GRPOConfig
from grpo.data import ToyWorld, ToyWorldConfig
from grpo.sft import FlowMatchingTrainer
from grpo.train import ToyWorldDataSpec, build_datasets
from grpo.trainer import GRPOTrainer
from policies.errors import InputError
from policies.ltx2 import LTX2Policy, LTX2SamplingConfig
from policies.nsp import NSPConfig, NSPLTX2Policy, NSPPolicy, PaperConnector, check_nsp_dir
from policies.tiny_nsp import TinyNSPSpec, build_tiny_nsp

GEOMETRY = dict(num_frames=9, height=32, width=32, frame_rate=25.0)
NO_GUIDANCE = dict(guidance_scale=1.0, stg_scale=0.0, modality_scale=1.0, guidance_rescale=0.0)
NO_AUDIO_GUIDANCE = dict(
    audio_guidance_scale=1.0, audio_stg_scale=0.0, audio_modality_scale=1.0, audio_guidance_rescale=0.0
)


@rewards.register("test_nsp_ltx2_redness")
def redness(videos, prompts, contexts, **metadata):
    return [float((v[..., 0] - 0.5 * (v[..., 1] + v[..., 2])).mean()) for v in videos]


@pytest.fixture(scope="module")
def nsp_dir(tmp_path_factory):
    """A tiny NSP directory on LTX-2, its transformer with perturbed attention (STG; no extra weights)."""
    path = build_tiny_nsp(tmp_path_factory.mktemp("nsp_ltx2"), TinyNSPSpec(generator="ltx2"))
    file = path / "ltx" / "transformer" / "config.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), "perturbed_attn": True}))
    return path


@pytest.fixture(scope="module")
def paper_dir(tmp_path_factory):
    spec = TinyNSPSpec(generator="ltx2", nsp=NSPConfig(num_queries=256, connector="paper"))
    return build_tiny_nsp(tmp_path_factory.mktemp("paper_nsp_ltx2"), spec)


@pytest.fixture(scope="module")
def policy(nsp_dir):
    return NSPPolicy.from_pretrained(nsp_dir)


@pytest.fixture(scope="module")
def ltx23_dir(tmp_path_factory, nsp_dir):
    """The tiny NSP directory with an LTX-2.3-layout transformer: no caption projections of its own, so
    it takes the video and audio text streams at their cross-attention widths (here 32 and 16)."""
    from diffusers import LTX2VideoTransformer3DModel

    path = Path(shutil.copytree(nsp_dir, tmp_path_factory.mktemp("nsp_ltx23") / "nsp"))
    config = LTX2VideoTransformer3DModel.load_config(path / "ltx" / "transformer")
    torch.manual_seed(3)
    transformer = LTX2VideoTransformer3DModel.from_config({**config, "use_prompt_embeddings": False})
    transformer.save_pretrained(path / "ltx" / "transformer")
    (path / "nsp_trainable.safetensors").unlink()  # the connector's widths change: drawn anew
    return path


@pytest.fixture(scope="module")
def policy23(ltx23_dir):
    torch.manual_seed(4)
    return NSPPolicy.from_pretrained(ltx23_dir)


@pytest.fixture(scope="module")
def rows():
    """Toy-world contexts, quantised to 8 bits so the last frame is exactly an image a pipeline takes."""
    world = ToyWorld(ToyWorldConfig(next_overlap=1), split="train", num_samples=2)
    return [
        {
            "context": torch.as_tensor(s["context"]).mul(255).round().div(255),
            "instruction": s["instruction"],
            "fps": s["fps"],
        }
        for s in world
    ]


@contextlib.contextmanager
def _continuity(policy, continuity: bool):
    before, policy.config.continuity = policy.config.continuity, continuity
    try:
        yield
    finally:
        policy.config.continuity = before


def _cpu(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to("cpu", copy=True)


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: _cpu(v) for k, v in module.state_dict().items()}


def test_the_checkpoint_picks_the_generator(tmp_path, policy, nsp_dir):
    assert type(policy) is NSPLTX2Policy and isinstance(policy, (NSPPolicy, LTX2Policy))
    caption = policy.transformer.config.caption_channels
    assert policy.connector.proj[-1].out_features == caption
    # the family switch is the directory's alone: the same VLM, queries config and an LTX-Video generator
    ltx_dir = build_tiny_nsp(tmp_path / "ltx")
    assert type(NSPPolicy.from_pretrained(ltx_dir)) is NSPPolicy
    shutil.copytree(ltx_dir, tmp_path / "switched")
    shutil.rmtree(tmp_path / "switched" / "ltx")
    shutil.copytree(nsp_dir / "ltx", tmp_path / "switched" / "ltx")
    (tmp_path / "switched" / "nsp_trainable.safetensors").unlink()  # widths of the other generator
    switched = NSPPolicy.from_pretrained(tmp_path / "switched")
    assert type(switched) is NSPLTX2Policy and switched.connector.proj[-1].out_features == caption
    with pytest.raises(InputError, match="load it with NSPPolicy.from_pretrained"):
        NSPLTX2Policy.from_pretrained(ltx_dir)


@pytest.mark.parametrize("modalities", ["video", "audio_video"])
@pytest.mark.parametrize("guided", [False, True], ids=["no-guidance", "cfg-stg-modality-rescale"])
@pytest.mark.parametrize("layout", ["ltx2.0", "ltx2.3"])
def test_recomputed_log_prob_equals_rollout(request, rows, modalities, guided, layout):
    policy = request.getfixturevalue("policy" if layout == "ltx2.0" else "policy23")
    with torch.no_grad():
        cond = policy.prepare_condition(rows)
    assert "image_latents" in cond  # continuity: the last context frame, clean
    sampling = LTX2SamplingConfig(
        **GEOMETRY,
        num_inference_steps=4,
        kind="sde",
        noise_level=0.7,
        modalities=modalities,
        **(GUIDANCE if guided else {}),
    )
    rollout = policy.rollout(cond, num_generations=2, sampling=sampling, seeds=[1, 2, 3, 4])
    assert rollout.log_probs.shape == (4, 4)
    for j in range(rollout.latents.shape[1]):
        with torch.no_grad():
            out, parts = policy.log_prob_parts(rollout, j)
        assert (out.log_prob - rollout.log_probs[:, j]).abs().max().item() <= 1e-5
        for name in ("video", "audio"):
            assert (parts[name] - rollout.part_log_probs[name][:, j]).abs().max().item() <= 1e-5
    audio_scored = bool(rollout.part_log_probs["audio"].abs().sum() > 0)
    assert audio_scored == (modalities == "audio_video")
    # the next scene starts at the last context frame: clean, never moved, outside the log-prob
    first = rollout.latent_shape[1] * rollout.latent_shape[2] * policy.transformer.config.in_channels
    image = cond["image_latents"][rollout.condition_index].flatten(2).transpose(1, 2).flatten(1)
    assert torch.equal(rollout.final_latents[:, :first], image)
    assert not bool(rollout.generated_mask[:, :first].any())
    # the connector feeds both text streams; the connector trains through the recomputation
    out = policy.log_prob(rollout, 0)
    out.log_prob.sum().backward()
    grad, config = policy.connector.proj[-1].weight.grad, policy.transformer.config
    if layout == "ltx2.3":  # two output projections side by side: the video stream's, the audio's
        video = config.cross_attention_dim
        assert grad.shape[0] == video + config.audio_cross_attention_dim
        assert grad[:video].abs().sum() > 0 and grad[video:].abs().sum() > 0
    else:  # one output, fed to both streams
        assert grad.shape[0] == config.caption_channels and grad.abs().sum() > 0
    policy.zero_grad(set_to_none=True)


class _ConnectorOutput(torch.nn.Module):
    """Stands in for the pipeline's Gemma text connectors: the NSP connector applied to the 'prompt
    embeddings' it is given (VLM query states; zeros for the negative prompt), fed to both streams --
    the whole output to each (LTX-2.0), or its first ``video`` channels and the rest (LTX-2.3)."""

    def __init__(self, connector: torch.nn.Module, video: int | None = None) -> None:
        super().__init__()
        self.connector, self.video = connector, video

    @property
    def device(self) -> torch.device:  # what a pipeline asks of its components
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def forward(self, states, mask, padding_side="left"):
        embeds = self.connector(states)
        if self.video is None:
            return embeds, embeds, mask.to(torch.int64)
        return embeds[..., : self.video], embeds[..., self.video :], mask.to(torch.int64)


@pytest.mark.parametrize("continuity", [False, True], ids=["text-to-video", "image-to-video"])
@pytest.mark.parametrize("guided", [False, True], ids=["no-guidance", "cfg-stg-modality-rescale"])
@pytest.mark.parametrize("layout", ["ltx2.0", "ltx2.3"])
def test_ode_rollout_reproduces_diffusers_ltx2_pipelines(request, rows, continuity, guided, layout):
    """The NSP denoiser is LTX2Pipeline (continuity: LTX2ImageToVideoPipeline of the last context
    frame) whose text connectors are the NSP connector, fed the VLM query states (zero states for
    the negative prompt), with all of LTX-2's guidance on or off, on LTX-2.0's layout and LTX-2.3's."""
    nsp_dir = request.getfixturevalue("nsp_dir" if layout == "ltx2.0" else "ltx23_dir")
    policy = request.getfixturevalue("policy" if layout == "ltx2.0" else "policy23")
    from diffusers import LTX2ImageToVideoPipeline, LTX2Pipeline
    from PIL import Image

    pipeline_class = LTX2ImageToVideoPipeline if continuity else LTX2Pipeline
    pipe = pipeline_class.from_pretrained(nsp_dir / "ltx", text_encoder=None, tokenizer=None)
    pipe = pipe.to(policy.device)
    pipe.set_progress_bar_config(disable=True)
    config = policy.transformer.config
    video = None if config.use_prompt_embeddings else config.cross_attention_dim
    pipe.connectors = _ConnectorOutput(policy.connector, video)
    with _continuity(policy, continuity), torch.no_grad():
        cond = policy.prepare_condition(rows)
    assert ("image_latents" in cond) == continuity
    index, seeds = torch.arange(2).repeat_interleave(2), [11, 12, 13, 14]
    states = cond["vlm_states"][index.to(cond["vlm_states"].device)]
    mask = torch.ones(states.shape[:2], dtype=torch.int64, device=states.device)
    kwargs = dict(prompt_embeds=states, prompt_attention_mask=mask)
    if guided:
        kwargs.update(negative_prompt_embeds=torch.zeros_like(states), negative_prompt_attention_mask=mask)
        kwargs.update({k: v for k, v in GUIDANCE.items() if k != "stg_blocks"})
        kwargs.update(
            spatio_temporal_guidance_blocks=GUIDANCE["stg_blocks"],
            audio_stg_scale=GUIDANCE["stg_scale"],
            audio_modality_scale=GUIDANCE["modality_scale"],
        )
    else:
        kwargs.update(**NO_GUIDANCE, **NO_AUDIO_GUIDANCE)
    if continuity:
        frames = [(r["context"][-1] * 255).round().to(torch.uint8).numpy() for r in rows]
        kwargs.update(image=[Image.fromarray(frames[int(i)]) for i in index], image_crf=0)
    with torch.no_grad():
        expected = pipe(
            **kwargs,
            **GEOMETRY,
            num_inference_steps=4,
            generator=[torch.Generator(policy.device).manual_seed(s) for s in seeds],
            output_type="latent",
        )
    sampling = LTX2SamplingConfig(
        **GEOMETRY, num_inference_steps=4, kind="ode", **(GUIDANCE if guided else {})
    )
    rollout = policy.rollout(cond, num_generations=2, sampling=sampling, seeds=seeds)
    video, audio = _pipeline_latents(policy, rollout)
    assert video.shape == expected.frames.shape and audio.shape == expected.audio.shape
    assert (video - expected.frames).abs().max().item() <= 1e-4
    assert (audio - expected.audio).abs().max().item() <= 1e-4


@pytest.fixture(scope="module")
def data():
    """Toy-world rows with the context and the next scene's sound (audio_video SFT targets)."""
    return build_datasets(
        ToyWorldDataSpec(num_train=16, num_eval=4, next_overlap=1, context=True, audio=True)
    )


def test_grpo_iteration_runs_the_vlm_once_per_context(tmp_path, nsp_dir, data):
    policy = NSPPolicy.from_pretrained(nsp_dir)
    policy.sampling_overrides = {"modalities": "audio_video"}
    vlm, connector = _snapshot(policy.vlm), _snapshot(policy.connector)
    args = GRPOConfig(
        output_dir=str(tmp_path / "grpo"),
        num_generations=4,
        num_prompts_per_iteration=2,
        max_iterations=1,
        num_inference_steps=3,
        learning_rate=1e-2,
        beta=0.01,
        eval_every=0,
        save_steps=0,
        sample_every=0,
    )
    trainer = GRPOTrainer(policy, ["test_nsp_ltx2_redness"], args, data[0])
    before = policy.vlm_forwards
    trainer.train()
    assert policy.vlm_forwards - before == 2  # 2 contexts, 4 samples each, 3 recomputed steps each
    assert all(torch.equal(vlm[k], v) for k, v in _snapshot(policy.vlm).items())
    assert any(not torch.equal(connector[k], v) for k, v in _snapshot(policy.connector).items())


@pytest.mark.parametrize("directory", ["nsp_dir", "paper_dir"])
def test_sft_trains_queries_and_connector_through_the_frozen_vlm_and_resumes(
    tmp_path, request, directory, data
):
    """One SFT step moves the queries and every connector weight, not the VLM; the saved policy loads
    bitwise (either connector kind), and a run resumed from its step-1 checkpoint (started from other
    weights, so only the checkpoint can bring it back) ends where the uninterrupted two-step run ends."""
    path = request.getfixturevalue(directory)

    def sft(out, steps, resume=None):
        policy = NSPPolicy.from_pretrained(path)
        policy.sampling_overrides = {"modalities": "audio_video"}  # the audio stream is learned too
        if resume is not None:  # whatever it starts from, resuming restores the checkpoint's weights
            with torch.no_grad():
                policy.queries.add_(1.0)
                next(policy.connector.parameters()).add_(1.0)
        args = FlowMatchingConfig(
            output_dir=str(out),
            max_steps=steps,
            batch_size=2,
            learning_rate=1e-3,
            save_steps=1,
            resume_from_checkpoint=resume,
        )
        trainer = FlowMatchingTrainer(policy, args, data[0])
        trainer.train()
        return policy, trainer

    base = NSPPolicy.from_pretrained(path)
    policy, trainer = sft(tmp_path / "one", 1)
    assert all(torch.equal(v, _cpu(policy.vlm.state_dict()[k])) for k, v in _snapshot(base.vlm).items())
    vlm_params = {id(p) for p in policy.vlm.parameters()}
    assert not vlm_params & {id(p) for g in trainer.state.optimizer.param_groups for p in g["params"]}
    assert (_cpu(policy.queries) - _cpu(base.queries)).abs().max() > 0
    after = _snapshot(policy.connector)
    assert all(not torch.equal(v, after[k]) for k, v in _snapshot(base.connector).items())
    saved = NSPPolicy.from_pretrained(tmp_path / "one" / "final")
    assert type(saved) is NSPLTX2Policy
    assert isinstance(saved.connector, PaperConnector) == (directory == "paper_dir")
    trained, restored = policy.trained_state_dict(), saved.trained_state_dict()
    assert trained.keys() == restored.keys()
    assert all(torch.equal(_cpu(trained[k]), restored[k]) for k in trained)

    straight, _ = sft(tmp_path / "two", 2)
    checkpoint = sorted((tmp_path / "one").glob("checkpoint-*"))[-1]
    resumed, _ = sft(tmp_path / "resumed", 2, resume=str(checkpoint))
    a, b = straight.trained_state_dict(), resumed.trained_state_dict()
    # 1e-6, not bitwise: a GPU's backward may sum atomically in another order (grpo.seeding)
    assert max((_cpu(a[k]) - _cpu(b[k])).abs().max().item() for k in a) <= 1e-6


# ----------------------------------------------------------------------------------------- bad input
def test_a_generator_of_neither_family_is_one_line(tmp_path, nsp_dir):
    shutil.copytree(nsp_dir, tmp_path / "nsp")
    index = tmp_path / "nsp" / "ltx" / "model_index.json"
    index.write_text(json.dumps({**json.loads(index.read_text()), "_class_name": "WanPipeline"}))
    with pytest.raises(InputError) as err:
        check_nsp_dir(tmp_path / "nsp")
    message = str(err.value)
    assert "holds a 'WanPipeline' checkpoint" in message and "LTX2Pipeline" in message
    assert "LTXPipeline" in message and "\n" not in message
    with pytest.raises(InputError, match="'WanPipeline'"):
        NSPPolicy.from_pretrained(tmp_path / "nsp")


def test_queries_that_do_not_fit_the_vlm_context_are_one_line(tmp_path, paper_dir, rows):
    """256 queries: a VLM of 200 positions cannot hold them (refused before anything loads); one of 270
    holds the queries but not the chat before them (refused before any VLM forward, naming both)."""
    shutil.copytree(paper_dir, tmp_path / "nsp")
    config_file = tmp_path / "nsp" / "vlm" / "config.json"
    config = json.loads(config_file.read_text())

    def limit(positions: int) -> None:
        config["text_config"]["max_position_embeddings"] = positions
        config_file.write_text(json.dumps(config))

    limit(200)
    with pytest.raises(InputError, match="num_queries=256 does not fit the VLM's context of 200 positions"):
        check_nsp_dir(tmp_path / "nsp")
    limit(270)
    policy = NSPPolicy.from_pretrained(tmp_path / "nsp")
    needed = policy.vlm_tokenizer(policy._chat(rows[0], 0)[0], add_special_tokens=False).input_ids
    assert 270 < len(needed)
    with pytest.raises(InputError) as err:
        policy.prepare_condition(rows)
    message = str(err.value)
    prompt = len(needed) - 256
    assert f"needs {prompt} tokens" in message and f"+ 256 queries = {len(needed)} positions" in message
    assert f"use at most {270 - prompt} queries" in message and "\n" not in message
    assert policy.vlm_forwards == 0


def test_a_recipe_policy_section_builds_nsp_on_ltx2_with_its_sampling(tmp_path):
    from grpo.train import NSPPolicySpec, build_policy

    spec = NSPPolicySpec(tiny=True, tiny_generator="ltx2", sampling={"modalities": "video"})
    policy = build_policy(spec, tmp_path)
    assert type(policy) is NSPLTX2Policy and policy.ltx2_sampling(None).modalities == "video"
    with pytest.raises(InputError, match="set policy.tiny_generator: ltx2"):
        NSPPolicySpec(tiny=True, sampling={"modalities": "video"})
    with pytest.raises(InputError, match="policy.sampling: unknown key"):
        NSPPolicySpec(tiny=True, tiny_generator="ltx2", sampling={"modality": "video"})
    ltx_dir = build_tiny_nsp(tmp_path / "ltx")
    with pytest.raises(InputError, match="generates with LTX-Video.*remove policy.sampling"):
        NSPPolicySpec(path=str(ltx_dir), sampling={"modalities": "video"}).check_dir()


@pytest.mark.parametrize("damage", ["neither_family", "queries_too_many"])
def test_bad_nsp_ltx2_directories_fail_in_train_in_one_line(tmp_path, capsys, paper_dir, damage):
    """``nextscene train``: exit 2, one stderr line, nothing written, before any model loads."""
    nsp = Path(shutil.copytree(paper_dir, tmp_path / "nsp"))
    if damage == "neither_family":
        file = nsp / "ltx" / "model_index.json"
        file.write_text(json.dumps({**json.loads(file.read_text()), "_class_name": "WanPipeline"}))
        expected = "holds a 'WanPipeline' checkpoint"
    else:  # the paper's 256 queries, a VLM of 200 positions
        file = nsp / "vlm" / "config.json"
        config = json.loads(file.read_text())
        config["text_config"]["max_position_embeddings"] = 200
        file.write_text(json.dumps(config))
        expected = "num_queries=256 does not fit the VLM's context of 200 positions"
    recipe = write_recipe(tmp_path, {"type": "nsp", "path": str(nsp)})
    fails_in_one_line(capsys, tmp_path, ["train", str(recipe)], expected)


def test_tiny_nsp_on_ltx2_fits_its_audio_path(tmp_path):
    """``policy.tiny_audio_fit_steps`` reaches the tiny NSP builder: the audio VAE and vocoder under ltx/
    are trained (they differ from the random ones of the same seed), the video transformer is not."""
    from safetensors.torch import load_file

    from grpo.train import NSPPolicySpec

    random_dir = build_tiny_nsp(tmp_path / "random", TinyNSPSpec(generator="ltx2"))
    spec = NSPPolicySpec(tiny=True, tiny_generator="ltx2", tiny_audio_fit_steps=2)
    spec.build(tmp_path / "run", "cpu", torch.float32)
    fitted_dir = tmp_path / "run" / "base_tiny_nsp"
    assert json.loads((fitted_dir / "tiny_spec.json").read_text())["audio_fit_steps"] == 2

    def weights(root, part):
        return {
            k: v for f in sorted((root / "ltx" / part).glob("*.safetensors")) for k, v in load_file(f).items()
        }

    for part in ("audio_vae", "vocoder"):
        before, after = weights(random_dir, part), weights(fitted_dir, part)
        assert before.keys() == after.keys()
        assert any(not torch.equal(before[k], after[k]) for k in before), part
    before, after = weights(random_dir, "transformer"), weights(fitted_dir, "transformer")
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_tiny_nsp_audio_fit_needs_ltx2():
    from grpo.train import NSPPolicySpec

    with pytest.raises(InputError, match="tiny_generator: ltx2"):
        NSPPolicySpec(tiny=True, tiny_audio_fit_steps=2)
    with pytest.raises(InputError, match="generator 'ltx2'"):
        TinyNSPSpec(audio_fit_steps=2)
