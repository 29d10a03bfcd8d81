"""The NSP unified policy: Qwen-VL reads the context, learnable queries carry it to the video generator.

Next Scene Prediction (arXiv 2512.13015) couples understanding and generation: a vision-language
model (Qwen2.5-VL by default; Qwen2-VL and Qwen3-VL by config) receives a chat -- the context video
and an instruction ("What happens next?") -- followed by N learnable query embeddings. The VLM's
hidden states at the query positions (from a chosen layer) go through a connector and take the
place of the T5 text embeddings in LTX-Video, which generates the next scene. Two connectors:
``transformer`` (the default: transformer encoder layers at VLM width + an MLP to LTX's caption
width) and ``paper`` (the NSP paper's: Linear - SiLU - Linear - RMSNorm with a learnable output
scale initialised at 0.01, as Qwen-VL's hidden states have a far larger variance than the T5
embeddings LTX was trained on). Optionally the last context frame is a
clean LTX conditioning frame (per-token timestep 0, excluded from log-probs) for visual continuity;
the next scene then starts at that frame, as image-to-video generation does.

The VLM is frozen. Its query states are computed once per context and reused for the whole group
of G samples, every denoising step, and the log-prob recomputation of the GRPO update, which
therefore trains the connector and LTX but not the queries (their gradient would need a VLM
backward per update). The supervised stages backpropagate through the frozen VLM into the queries
(``train_queries``), as MetaQuery does.

Rollout, log-prob recomputation, reference model, LoRA and decoding are the generator policy's own:
only the conditioning differs (`prepare_condition`, `text_inputs`).

**Generators.** The checkpoint picks the generator, by the ``_class_name`` of its generator
directory's ``model_index.json`` (as ``nextscene rollout`` does): LTX-Video 0.9 (``LTXPipeline``:
`NSPPolicy`, on `LTXPolicy`) or LTX-2 (``LTX2Pipeline``: `NSPLTX2Policy`, on `LTX2Policy`, audio +
video). `NSPPolicy.from_pretrained` returns the one the directory holds. The NSP part (VLM, queries,
connector, their saving and loading, the chat, continuity) is `NSPPolicy`'s, and `NSPLTX2Policy`
inherits it with LTX-2's sampler behind it (``NSPLTX2Policy(NSPPolicy, LTX2Policy)``: NSP methods
first, then LTX-2's, then LTX-Video's). On LTX-2 the connector's output is the text conditioning of
*both* streams, video and audio: LTX-2.0's transformer projects each stream with its own learned
caption projection (``caption_projection``, ``audio_caption_projection``, both from
``caption_channels``), as LTX-2's Gemma connectors also start from one shared projection of the
text states, so one connector (one set of trained weights, one 7B-width encoder rather than two)
gives the scene to both. LTX-2.3 has no caption projections of its own and takes the streams at
their cross-attention widths: there the connector's last layer is the two streams' output
projections side by side (width video + audio), split per stream. Continuity is LTX-2's
image-to-video path (the first latent frame clean at timestep 0, out of the log-prob). The Gemma
text connectors of the LTX-2 directory are loaded and saved with it (the saved generator stays a
complete LTX-2 checkpoint) but are not used.
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from policies.errors import InputError
from policies.files import check_model_weights, check_safetensors, fresh_dir, link_tree
from policies.ltx import LTXPolicy, check_ltx_dir
from policies.ltx2 import LTX2_PIPELINES, LTX2Policy, check_ltx2_dir, read_model_index
from policies.qwen_vl_inputs import (
    QwenVLInputsConfig,
    expand_vision_placeholders,
    image_inputs,
    video_inputs,
)

CONFIG_FILE = "nsp_config.json"
TRAINED_FILE = "nsp_trainable.safetensors"
VLM_ARCHITECTURES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
DEFAULT_INSTRUCTION = "What happens next? Continue the scene."
CONNECTORS = ("transformer", "paper")
LTX_PIPELINES = ("LTXPipeline", "LTXImageToVideoPipeline", "LTXConditionPipeline")  # LTX-Video 0.9
PAPER_OUTPUT_SCALE = 0.01  # the NSP paper's initial output scale of its connector


@dataclass
class NSPConfig:
    """How the NSP policy is put together; stored as ``nsp_config.json`` in its directory."""

    vlm: str = field(
        default="vlm", metadata={"help": "Qwen-VL directory (relative to the NSP directory or absolute)."}
    )
    ltx: str = field(
        default="ltx",
        metadata={
            "help": "Generator directory, relative or absolute: LTX-Video 0.9 or LTX-2 (its "
            "model_index.json _class_name picks the family)."
        },
    )
    num_queries: int = field(
        default=64, metadata={"help": "Learnable query embeddings appended to the chat."}
    )
    vlm_layer: int = field(
        default=-1, metadata={"help": "Hidden-state layer read at the query positions (-1: last)."}
    )
    connector: Literal["transformer", "paper"] = field(
        default="transformer",
        metadata={
            "help": "'transformer' (encoder layers + MLP) or 'paper' (Linear-SiLU-Linear-RMSNorm x 0.01)."
        },
    )
    connector_layers: int = field(
        default=2, metadata={"help": "Transformer-encoder layers of the 'transformer' connector."}
    )
    connector_heads: int = field(
        default=8, metadata={"help": "Attention heads of the 'transformer' connector's layers."}
    )
    connector_mlp_ratio: float = field(
        default=4.0, metadata={"help": "'transformer' connector: feed-forward width / VLM width."}
    )
    continuity: bool = field(
        default=True, metadata={"help": "Condition LTX on the last context frame as a clean first frame."}
    )
    context_frames: int = field(
        default=8, metadata={"help": "Context frames shown to the VLM (evenly sampled)."}
    )
    min_context_frames: int = field(default=2, metadata={"help": "Shortest context video accepted."})
    context_fps: float = field(
        default=8.0, metadata={"help": "Frame rate of contexts without an 'fps' column."}
    )
    vision_input: Literal["video", "images"] = field(
        default="video", metadata={"help": "Context as one Qwen-VL video, or as a sequence of images."}
    )
    instruction: str = field(
        default=DEFAULT_INSTRUCTION, metadata={"help": "Instruction for rows without an 'instruction'."}
    )
    train_queries: bool = field(
        default=True, metadata={"help": "Backpropagate through the frozen VLM into the queries (SFT)."}
    )

    def __post_init__(self) -> None:
        if self.num_queries < 1:
            raise InputError(f"nsp num_queries={self.num_queries} must be >= 1")
        if self.connector not in CONNECTORS:
            raise InputError(
                f"nsp connector must be one of {', '.join(map(repr, CONNECTORS))}, got {self.connector!r}"
            )
        if self.connector_layers < 0:
            raise InputError(f"nsp connector_layers={self.connector_layers} must be >= 0")
        if self.min_context_frames < 1 or self.context_frames < self.min_context_frames:
            raise InputError(
                f"nsp context_frames={self.context_frames} must be >= min_context_frames="
                f"{self.min_context_frames} >= 1"
            )
        if self.vision_input not in ("video", "images"):
            raise InputError(f"nsp vision_input must be 'video' or 'images', got {self.vision_input!r}")

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str) -> NSPConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise InputError(f"{where}: unknown NSP config keys {unknown}; known: {', '.join(sorted(known))}")
        for f in fields(cls):  # every field has a plain default: its type is the field's type
            if f.name not in values:
                continue
            value, default = values[f.name], f.default
            expected = (int, float) if isinstance(default, float) else type(default)
            if isinstance(value, bool) != isinstance(default, bool) or not isinstance(value, expected):
                raise InputError(f"{where}: {f.name}={value!r} must be of type {type(default).__name__}")
        return cls(**values)


class Connector(nn.Module):
    """VLM query states ``[B, N, D_vlm]`` -> LTX caption embeddings ``[B, N, D_caption]``."""

    def __init__(self, width: int, out_width: int, layers: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        if width % heads:
            raise InputError(
                f"connector_heads={heads} does not divide the VLM width {width}: pick a divisor of {width}"
            )
        layer = nn.TransformerEncoderLayer(
            width,
            heads,
            int(width * mlp_ratio),
            dropout=0.0,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False) if layers else None
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Sequential(
            nn.Linear(width, out_width), nn.GELU(approximate="tanh"), nn.Linear(out_width, out_width)
        )

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        if self.encoder is not None:
            states = self.encoder(states)
        return self.proj(self.norm(states))


class PaperConnector(nn.Module):
    """The NSP paper's connector: ``Linear - SiLU - Linear - RMSNorm``, times a learnable per-channel
    output scale initialised at 0.01.

    The RMSNorm (no affine weight of its own) removes the scale of the VLM's hidden states, whose
    variance is far larger than that of the T5 embeddings LTX-Video was trained on; the small scale
    then starts LTX near an unconditional prompt instead of far outside its training range.
    """

    def __init__(self, width: int, out_width: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(width, out_width), nn.SiLU(), nn.Linear(out_width, out_width))
        self.norm = nn.RMSNorm(out_width, eps=1e-6, elementwise_affine=False)
        self.scale = nn.Parameter(torch.full((out_width,), PAPER_OUTPUT_SCALE))

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        return self.norm(self.mlp(states)) * self.scale


def build_connector(config: NSPConfig, width: int, out_width: int) -> nn.Module:
    """The connector ``config.connector`` names, from VLM width ``width`` to LTX caption width."""
    if config.connector == "paper":
        return PaperConnector(width, out_width)
    return Connector(
        width, out_width, config.connector_layers, config.connector_heads, config.connector_mlp_ratio
    )


def connector_kind(keys: Iterable[str]) -> str | None:
    """Which connector a trained-weights file holds (``connector.*`` keys), or None if neither."""
    keys = set(keys)
    if "connector.scale" in keys:
        return "paper"
    if "connector.norm.weight" in keys:
        return "transformer"
    return None


def check_connector_kind(file: Path, keys: Iterable[str], config: NSPConfig) -> None:
    """A one-line `InputError` when the trained weights ``keys`` of ``file`` are another connector
    than ``config.connector``."""
    stored = connector_kind(keys)
    if stored is not None and stored != config.connector:
        raise InputError(
            f"{file}: holds a {stored!r} connector but the NSP config says connector: "
            f"{config.connector!r}; set connector: {stored!r} ({CONFIG_FILE} or overrides)"
        )


def _vlm_type(path: Path) -> str:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise InputError(f"VLM directory {str(path)!r} has no config.json: give a Qwen-VL checkpoint folder")
    model_type = json.loads(config_file.read_text()).get("model_type")
    if model_type not in VLM_ARCHITECTURES:
        raise InputError(
            f"VLM directory {str(path)!r} holds a {model_type!r} model; the NSP policy needs one of "
            f"{', '.join(VLM_ARCHITECTURES)} (Qwen2-VL / Qwen2.5-VL / Qwen3-VL)"
        )
    return model_type


def generator_family(path: Path) -> str:
    """``ltx`` (LTX-Video 0.9) or ``ltx2`` (LTX-2): the family an NSP generator directory's
    ``model_index.json`` ``_class_name`` names, or a one-line `InputError` for anything else."""
    if not (path / "model_index.json").is_file():
        raise InputError(
            f"NSP generator directory {str(path)!r} is not a diffusers LTX-Video or LTX-2 checkpoint "
            "(no model_index.json)"
        )
    name = read_model_index(path).get("_class_name")
    if name in LTX2_PIPELINES:
        return "ltx2"
    if name in LTX_PIPELINES:
        return "ltx"
    raise InputError(
        f"NSP generator directory {str(path)!r} holds a {name!r} checkpoint (model_index.json _class_name); "
        f"the NSP policy generates with LTX-Video 0.9 ({', '.join(LTX_PIPELINES)}) or LTX-2 "
        f"({', '.join(LTX2_PIPELINES)}): point the NSP config's ltx entry at one"
    )


def ltx2_text_widths(transformer_config: Mapping[str, Any]) -> tuple[int, int]:
    """Widths of the (video, audio) text conditioning an LTX-2 transformer attends to, from its config.

    LTX-2.0 (``use_prompt_embeddings``) projects both streams from ``caption_channels`` itself; LTX-2.3
    takes them already at its text cross-attention widths (``cross_attention_dim``,
    ``audio_cross_attention_dim``)."""
    config = transformer_config
    if config.get("use_prompt_embeddings", True):
        return config["caption_channels"], config["caption_channels"]
    return config["cross_attention_dim"], config["audio_cross_attention_dim"]


def _vlm_positions(vlm_path: Path) -> int | None:
    """The VLM language model's ``max_position_embeddings`` (its longest input), from config.json."""
    config = json.loads((vlm_path / "config.json").read_text())
    value = config.get("text_config", {}).get(
        "max_position_embeddings", config.get("max_position_embeddings")
    )
    return int(value) if value is not None else None


def check_nsp_dir(path: Path, **overrides: Any) -> NSPConfig:
    """The `NSPConfig` of an NSP directory after checking its layout and weight files (safetensors only,
    headers readable) without loading anything; ``overrides`` as in `NSPPolicy.from_pretrained`."""
    config_file = path / CONFIG_FILE
    if not config_file.is_file():
        raise InputError(
            f"{str(path)!r} is not an NSP policy directory (no {CONFIG_FILE}); build one with "
            "policies.tiny_nsp.build_tiny_nsp or write the config naming your VLM and LTX directories"
        )
    try:
        stored = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise InputError(f"{config_file} is not valid JSON ({err}): re-download or regenerate it") from None
    if not isinstance(stored, dict):
        raise InputError(f"{config_file} must hold a JSON object of NSP config keys")
    config = NSPConfig.from_dict({**stored, **overrides}, str(config_file))
    vlm_path, ltx_path = path / config.vlm, path / config.ltx
    _vlm_type(vlm_path)
    check_model_weights(vlm_path)
    positions = _vlm_positions(vlm_path)
    if positions is not None and config.num_queries >= positions:
        raise InputError(
            f"num_queries={config.num_queries} does not fit the VLM's context of {positions} positions "
            f"(max_position_embeddings of {str(vlm_path)!r}) with any chat before them: use fewer queries "
            "or a VLM with a longer context"
        )
    if generator_family(ltx_path) == "ltx2":
        check_ltx2_dir(ltx_path)
    else:
        check_ltx_dir(ltx_path)
    if (path / TRAINED_FILE).exists():
        from safetensors import safe_open

        check_safetensors(path / TRAINED_FILE)
        with safe_open(str(path / TRAINED_FILE), "pt") as trained:  # the header only: nothing loads
            check_connector_kind(path / TRAINED_FILE, trained.keys(), config)
    return config


def _vlm_width(vlm: nn.Module) -> int:
    config = vlm.config
    return int(getattr(config, "text_config", config).hidden_size)


class NSPPolicy(LTXPolicy):
    """Qwen-VL + learnable queries + connector + LTX-Video, with `LTXPolicy`'s rollout / log-prob contract;
    the NSP part of every generator family (`NSPLTX2Policy` for LTX-2).

    Rows for `prepare_condition`: ``context`` ``[F, H, W, 3]`` in [0, 1] with an optional
    ``instruction`` (next-scene prediction), or only a ``prompt`` (stage-1 text-to-video: a
    text-only chat).
    """

    generator_class: type[LTXPolicy] = LTXPolicy  # the generator policy this class conditions

    def __init__(
        self,
        transformer: nn.Module,
        vae: nn.Module,
        scheduler: Any,
        vlm: nn.Module,
        vlm_tokenizer: Any,
        inputs_config: QwenVLInputsConfig,
        config: NSPConfig,
        **generator_parts: Any,
    ) -> None:
        """``generator_parts``: the generator policy's components beyond the transformer, VAE and
        scheduler (LTX-2: ``connectors``, ``audio_vae``, ``vocoder``)."""
        super().__init__(transformer, vae, scheduler, **generator_parts)
        self.config = config
        self.vlm = vlm.requires_grad_(False).eval()
        self.vlm_tokenizer = vlm_tokenizer
        self.inputs_config = inputs_config
        self.vlm_path: Path | None = None  # where the VLM was loaded from (saving refers to or copies it)
        self.vlm_forwards = 0  # VLM forward passes so far (one per context)
        width = _vlm_width(vlm)
        embed = vlm.get_input_embeddings().weight
        self.queries = nn.Parameter(torch.randn(config.num_queries, width) * float(embed.float().std()))
        self.connector = build_connector(config, width, self.connector_width())
        self._reference_connector: nn.Module | None = None
        self._query_token = vlm_tokenizer.pad_token or "<|endoftext|>"
        self._query_token_id = vlm_tokenizer.convert_tokens_to_ids(self._query_token)

    def connector_width(self) -> int:
        """Width of the connector's output: the caption width the generator's transformer attends to."""
        return self.transformer.config.caption_channels

    @staticmethod
    def generator_parts(generator: LTXPolicy) -> dict[str, Any]:
        """The loaded generator's components this class takes beyond transformer, VAE and scheduler."""
        return {}

    # ------------------------------------------------------------------ loading and saving
    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        torch_dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        **overrides: Any,
    ) -> NSPPolicy:
        """Load an NSP directory: ``nsp_config.json`` naming (or holding) the VLM and generator
        checkpoints, plus the trained queries and connector in ``nsp_trainable.safetensors``.

        The generator directory's family picks the class returned: `NSPPolicy` on LTX-Video 0.9,
        `NSPLTX2Policy` on LTX-2. ``overrides`` replace fields of the stored `NSPConfig` (e.g.
        ``num_queries`` for a new model).
        """
        from transformers import AutoModelForImageTextToText, AutoTokenizer

        path = Path(path)
        config = check_nsp_dir(path, **overrides)
        vlm_path, ltx_path = path / config.vlm, path / config.ltx
        policy_class = NSPLTX2Policy if generator_family(ltx_path) == "ltx2" else NSPPolicy
        if not issubclass(policy_class, cls):
            raise InputError(
                f"{str(path)!r} holds an NSP policy on {policy_class.generator_class.__name__}'s family, "
                f"not {cls.__name__}'s: load it with NSPPolicy.from_pretrained"
            )
        ltx = policy_class.generator_class.from_pretrained(
            ltx_path, torch_dtype=torch_dtype, load_text_encoder=False
        )
        vlm = AutoModelForImageTextToText.from_pretrained(vlm_path, dtype=torch_dtype, use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(vlm_path)
        if getattr(tokenizer, "chat_template", None) is None:
            raise InputError(f"the VLM tokenizer in {str(vlm_path)!r} has no chat template")
        policy = policy_class(
            ltx.transformer,
            ltx.vae,
            ltx.scheduler,
            vlm,
            tokenizer,
            QwenVLInputsConfig.from_pretrained(vlm_path),
            config,
            **policy_class.generator_parts(ltx),
        )
        policy.vlm_path = vlm_path.resolve()
        policy.remember_source(ltx_path, source=ltx)  # saving links the generator's unchanged parts
        if (path / TRAINED_FILE).is_file():
            policy.load_trained(path / TRAINED_FILE)
        return policy.to(device)

    def trained_state_dict(self) -> dict[str, torch.Tensor]:
        """The NSP-specific trained weights: ``queries`` and ``connector.*``."""
        state = {"queries": self.queries.detach()}
        state.update({f"connector.{k}": v.detach() for k, v in self.connector.state_dict().items()})
        return state

    def load_trained(self, file: str | Path) -> None:
        """Load queries and connector from a safetensors file, checking every width first."""
        from safetensors.torch import load_file

        check_safetensors(file)
        state = load_file(str(file))
        expected = {k: tuple(v.shape) for k, v in self.trained_state_dict().items()}
        found = {k: tuple(v.shape) for k, v in state.items()}
        check_connector_kind(Path(file), found, self.config)
        if set(found) != set(expected):
            missing, extra = sorted(set(expected) - set(found))[:3], sorted(set(found) - set(expected))[:3]
            raise InputError(
                f"{file}: connector layout does not match this NSP config (missing {missing}, unexpected "
                f"{extra}): use the connector_layers the weights were trained with"
            )
        for key, shape in expected.items():
            if found[key] != shape:
                raise InputError(
                    f"{file}: {key} has shape {found[key]} but this VLM/LTX pair needs {shape} (VLM width "
                    f"{_vlm_width(self.vlm)}, LTX caption width {self.connector_width()}, "
                    f"{self.config.num_queries} queries): pair the weights with the models they were "
                    "trained on"
                )
        with torch.no_grad():
            self.queries.copy_(state["queries"])
        self.connector.load_state_dict(
            {k[len("connector.") :]: v for k, v in state.items() if k != "queries"}
        )

    def save_pretrained(
        self, path: str | Path, transformer_state_dict: dict[str, torch.Tensor] | None = None
    ) -> None:
        """Write an NSP directory: ``ltx/`` (the trained LTX, full or base + LoRA), the trained queries
        and connector, ``nsp_config.json``, and the frozen VLM, never copied when avoidable: referred to
        by absolute path when it came from its own checkpoint directory, hard-linked file by file into
        ``vlm/`` when it came from inside an NSP directory (which a later save may delete: checkpoint
        rotation), copied only where links cannot be made (another filesystem), and written from
        memory when it was never loaded from disk.
        """
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        super().save_pretrained(path / "ltx", transformer_state_dict)
        vlm_entry = "vlm"
        if self.vlm_path is None:
            self.vlm.save_pretrained(fresh_dir(path / "vlm"))
            self.vlm_tokenizer.save_pretrained(path / "vlm")
            self.inputs_config.save_pretrained(path / "vlm")
        elif self.vlm_path.parent.joinpath(CONFIG_FILE).is_file() and self.vlm_path.name == "vlm":
            if self.vlm_path != (path / "vlm").resolve():
                link_tree(self.vlm_path, path / "vlm")
        else:
            vlm_entry = str(self.vlm_path)
        save_file(
            {k: v.float().cpu().contiguous() for k, v in self.trained_state_dict().items()},
            str(path / TRAINED_FILE),
        )
        config = {**asdict(self.config), "vlm": vlm_entry, "ltx": "ltx"}
        (path / CONFIG_FILE).write_text(json.dumps(config, indent=2))

    # ------------------------------------------------------------------ what trains
    def extra_trainable_parameters(self) -> dict[str, nn.Parameter]:
        """Trainable weights outside the LTX transformer (the trainers optimise these too)."""
        params = {"nsp.queries": self.queries} if self.queries.requires_grad else {}
        params.update(
            {f"nsp.connector.{n}": p for n, p in self.connector.named_parameters() if p.requires_grad}
        )
        return params

    def keep_reference_copy(self) -> None:
        """Freeze copies of the transformer and the connector as the KL reference."""
        super().keep_reference_copy()
        self._reference_connector = copy.deepcopy(self.connector).requires_grad_(False).eval()

    def add_lora(
        self, rank: int = 16, alpha: float | None = None, target_modules: list[str] | None = None
    ) -> None:
        """LoRA on LTX; the connector trains fully, so a frozen copy of it joins the reference."""
        super().add_lora(rank, alpha, target_modules)
        self._reference_connector = copy.deepcopy(self.connector).requires_grad_(False).eval()

    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        """The reference policy: LTX's reference (LoRA off or frozen copy) and the frozen connector."""
        with super().reference():
            trained, self.connector = self.connector, self._reference_connector or self.connector
            try:
                yield
            finally:
                self.connector = trained

    # ------------------------------------------------------------------ conditioning
    def _context_frames(self, context: Any, index: int) -> torch.Tensor:
        frames = torch.as_tensor(context)
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise InputError(
                f"row {index}: context must be a video [F, H, W, 3], got shape {tuple(frames.shape)}"
            )
        if frames.shape[0] < self.config.min_context_frames:
            raise InputError(
                f"row {index}: the context video has {frames.shape[0]} frame(s); the NSP policy needs "
                f"at least {self.config.min_context_frames} (min_context_frames)"
            )
        count = min(self.config.context_frames, frames.shape[0])
        picks = torch.linspace(0, frames.shape[0] - 1, count).round().long()
        return frames[picks].float()

    def _chat(self, row: dict[str, Any], index: int) -> tuple[str, dict[str, torch.Tensor]]:
        """The templated chat text (vision placeholders expanded, queries appended) and its vision inputs."""
        content: list[dict[str, Any]] = []
        vision: dict[str, torch.Tensor] = {}
        context = row.get("context")
        if context is not None:
            frames = self._context_frames(context, index)
            if self.config.vision_input == "video":
                source_fps = float(row.get("fps") or self.config.context_fps)
                stride = (len(torch.as_tensor(context)) - 1) / max(len(frames) - 1, 1)
                vision = video_inputs([frames], self.inputs_config, fps=source_fps / max(stride, 1e-6))
                content.append({"type": "video"})
            else:
                vision = image_inputs(frames, self.inputs_config)
                content.extend({"type": "image"} for _ in range(len(frames)))
            text = row.get("instruction") or self.config.instruction
        else:
            text = row.get("prompt")
            if not isinstance(text, str):
                raise InputError(f"row {index} has neither a 'context' video nor a 'prompt' text for the VLM")
        content.append({"type": "text", "text": text})
        chat = self.vlm_tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
        chat = expand_vision_placeholders(
            chat,
            image_grid_thw=vision.get("image_grid_thw"),
            video_grid_thw=vision.get("video_grid_thw"),
            merge_size=self.inputs_config.merge_size,
        )
        return chat + self._query_token * self.config.num_queries, vision

    def query_states(self, rows: list[dict[str, Any]]) -> torch.Tensor:
        """VLM hidden states at the query positions ``[P, N, D_vlm]`` (fp32), one VLM forward per row.

        Runs with gradients to the queries when grad mode is on and ``train_queries`` is set (the
        supervised stages); the VLM's own weights are frozen either way.
        """
        chats = [self._chat(row, i) for i, row in enumerate(rows)]
        track = torch.is_grad_enabled() and self.config.train_queries and self.queries.requires_grad
        device = self.queries.device
        dtype = next(self.vlm.parameters()).dtype
        n = self.config.num_queries
        tokens = [
            self.vlm_tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
            for text, _ in chats
        ]
        self._check_chat_lengths(tokens)  # every row, before the first VLM forward
        states = []
        for ids, (_, vision) in zip(tokens, chats, strict=True):
            ids = ids.to(device)
            if not bool((ids[0, -n:] == self._query_token_id).all()):
                raise InputError(
                    f"the VLM tokenizer does not keep {self._query_token!r} as one token; give it a pad token"
                )
            inputs = {
                k: v.to(device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in vision.items()
            }
            config = self.vlm.config
            types = (ids == config.image_token_id).int() + 2 * (ids == config.video_token_id).int()
            with torch.set_grad_enabled(track), self._queries_in_embeddings(n):
                out = self.vlm.model(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    mm_token_type_ids=types,  # text 0, image 1, video 2: what M-RoPE positions need
                    output_hidden_states=True,
                    **inputs,
                )
            self.vlm_forwards += 1
            states.append(out.hidden_states[self.config.vlm_layer][:, -n:].float())
        return torch.cat(states)

    def _check_chat_lengths(self, tokens: list[torch.Tensor]) -> None:
        """A one-line `InputError` when a row's chat (context vision tokens, instruction and template)
        plus the queries is longer than the VLM's ``max_position_embeddings``."""
        config = self.vlm.config
        limit = getattr(getattr(config, "text_config", config), "max_position_embeddings", None)
        longest = max(int(ids.shape[1]) for ids in tokens)
        n = self.config.num_queries
        if limit is not None and longest > limit:
            raise InputError(
                f"the VLM chat needs {longest - n} tokens (vision, instruction, template) + {n} queries = "
                f"{longest} positions, but the VLM holds {limit} (max_position_embeddings): use at most "
                f"{limit - (longest - n)} queries, or fewer / smaller context frames (context_frames, "
                "the video pixel budget)"
            )

    @contextlib.contextmanager
    def _queries_in_embeddings(self, n: int) -> Iterator[None]:
        """While active, the VLM's token embeddings of the last ``n`` positions are the learnable queries."""

        def swap(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            queries = self.queries.to(output.dtype).expand(output.shape[0], -1, -1)
            return torch.cat([output[:, :-n], queries], dim=1)

        handle = self.vlm.get_input_embeddings().register_forward_hook(swap)
        try:
            yield
        finally:
            handle.remove()

    def prepare_condition(
        self, rows: list[dict], *, guidance_scale: float = 1.0, max_sequence_length: int = 128
    ) -> dict[str, torch.Tensor]:
        """Conditioning rows for `rollout`: the VLM query states of each row (one VLM forward per row)
        and, with ``continuity`` and a context, the last context frame's latents as the clean first
        frame. With CFG the unconditional branch is the connector applied to zero query states."""
        has_context = ["context" in r and r["context"] is not None for r in rows]
        if any(has_context) and not all(has_context):
            raise InputError(
                "mix of rows with and without a 'context' video; give all rows a context or none"
            )
        condition = {"vlm_states": self.query_states(rows)}
        if self.config.continuity and all(has_context):
            last = torch.stack([torch.as_tensor(r["context"])[-1] for r in rows]).float()
            condition["image_latents"] = self.encode_image(last)
        return condition

    def _check_condition(self, condition: dict[str, torch.Tensor], guidance_scale: float) -> int:
        states = condition.get("vlm_states")
        width = _vlm_width(self.vlm)
        if states is None or states.ndim != 3 or states.shape[1:] != (self.config.num_queries, width):
            shape = None if states is None else tuple(states.shape)
            raise InputError(
                f"NSP condition needs 'vlm_states' [P, {self.config.num_queries}, {width}] from "
                f"prepare_condition, got {shape}"
            )
        return states.shape[0]

    def connector_embeddings(
        self, condition: dict[str, torch.Tensor], condition_index: torch.Tensor, guidance_scale: float
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Connector output per sample ``[b, N, D]`` and, with CFG, the unconditional embeddings (the
        connector applied to zero query states) at the same shape, else None; in the transformer's dtype.

        The connector runs once per conditioning row, with gradients when training.
        """
        states = condition["vlm_states"]
        dtype = self.transformer.dtype
        embeds = self.connector(states.to(self.queries.dtype))[condition_index].to(dtype)
        if guidance_scale <= 1.0:
            return embeds, None
        null = self.connector(torch.zeros_like(states[:1]).to(self.queries.dtype)).to(dtype)
        return embeds, null.expand_as(embeds)

    def text_inputs(
        self, condition: dict[str, torch.Tensor], condition_index: torch.Tensor, guidance_scale: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Connector output per sample as LTX's caption embeddings (``[null; cond]`` stacked for CFG)."""
        embeds, null = self.connector_embeddings(condition, condition_index, guidance_scale)
        if null is not None:
            embeds = torch.cat([null, embeds])
        mask = torch.ones(embeds.shape[:2], dtype=torch.bool, device=embeds.device)
        return embeds, mask


class NSPLTX2Policy(NSPPolicy, LTX2Policy):
    """The NSP policy on an LTX-2 generator: `NSPPolicy`'s VLM, queries, connector and continuity,
    `LTX2Policy`'s sampler (audio + video state, guidance, ``modalities``), decoding and saving.

    The connector's output is both text streams LTX-2's transformer attends to (see the module
    docstring); with CFG the unconditional branch of both is the connector applied to zero states.
    """

    generator_class = LTX2Policy

    def connector_width(self) -> int:
        """LTX-2.0: the one width of both text streams (``caption_channels``); LTX-2.3: the video and
        the audio width side by side (the connector's last layer is then the two streams' output
        projections), from the transformer's config."""
        video, audio = ltx2_text_widths(self.transformer.config)
        return video if video == audio else video + audio

    def _streams(self, embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The (video, audio) text streams of connector output ``embeds``: the same tensor for
        LTX-2.0, whose transformer projects each stream itself; split by width for LTX-2.3."""
        video, audio = ltx2_text_widths(self.transformer.config)
        if video == audio:
            return embeds, embeds
        return tuple(embeds.split([video, audio], dim=-1))

    @staticmethod
    def generator_parts(generator: LTXPolicy) -> dict[str, Any]:
        return {
            "connectors": generator.connectors,
            "audio_vae": generator.audio_vae,
            "vocoder": generator.vocoder,
        }

    def prepare_condition(
        self, rows: list[dict], *, guidance_scale: float = 1.0, max_sequence_length: int = 128
    ) -> dict[str, torch.Tensor]:
        """`NSPPolicy.prepare_condition`, plus ``audio_latents`` for rows carrying a target waveform
        (``audio`` and ``sample_rate``: the audio half of a supervised target, as for `LTX2Policy`)."""
        condition = super().prepare_condition(
            rows, guidance_scale=guidance_scale, max_sequence_length=max_sequence_length
        )
        condition.update(self.audio_condition(rows))
        return condition

    def text_inputs(
        self, condition: dict[str, torch.Tensor], condition_index: torch.Tensor, guidance_scale: float
    ) -> dict[str, torch.Tensor]:
        """The connector output as LTX-2's video and audio text streams (``video``, ``audio``, ``mask``
        and, with CFG, their ``negative_`` twins), as `LTX2Policy.text_inputs` gives them."""
        embeds, null = self.connector_embeddings(condition, condition_index, guidance_scale)
        mask = torch.ones(embeds.shape[:2], dtype=torch.int64, device=embeds.device)
        text = dict(zip(("video", "audio"), self._streams(embeds), strict=True), mask=mask)
        if null is not None:
            negative = self._streams(null)
            text.update(negative_video=negative[0], negative_audio=negative[1], negative_mask=mask)
        return text
