"""Training the causal-consistency judge (recipe stage ``judge_sft``) with TRL's `SFTTrainer`.

Each training example is one conversation: the user turn is exactly the request the judge sends
when it scores (`rewards.judge.prompts.build_requests`: the same system prompt, question, frame
sampling and layout, encoded by the in-process judge's own `rewards.judge.local.encode_request`),
and the assistant turn is the verdict ("yes" / "no") as the checkpoint's chat template renders it.
The loss covers the verdict's first token only. Scoring reads that token after the very same
prompt tokens, so training and scoring cannot drift apart.

TRL's vision collator (`DataCollatorForVisionLanguageModeling`) needs a transformers
``ProcessorMixin`` and builds the vision inputs itself; the judge's frames go through
`policies.qwen_vl_inputs` instead (the layout the vLLM server and the in-process judge see), so
`JudgeCollator` builds the batches and `SFTTrainer` runs the loop (optimizer, schedule, logging).

The result, ``output_dir/final``, is a checkpoint directory (safetensors weights, tokenizer with its
chat template, pre-processing config) for ``causal_consistency_local`` (`InProcessJudge`) or a vLLM
server. Nothing here imports torch at import time (recipes validate in milliseconds).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from grpo.config import TrainerConfig, _require
from grpo.data import ToyWorld, ToyWorldConfig
from grpo.data.judge_data import (
    FAILURES,
    VERIFIABLE_YES,
    read_verdict_manifest,
    synthetic_verdicts,
    toyworld_verdicts,
    verdict_dataset,
    verdicts_from_scores,
)
from grpo.reward_modeling import ToyCandidatesSpec, ToyPreferencesSpec, policy_samples
from grpo.schema import from_dict, from_nested_dict, save_resolved
from grpo.tracking import MetricsLogger
from policies.errors import InputError
from policies.files import check_model_weights
from policies.tiny_qwen_vl import TinyQwenVLSpec, build_tiny_qwen_vl
from rewards.judge.config import JudgeConfig
from rewards.judge.local import InProcessJudge, encode_request
from rewards.judge.prompts import build_requests, shown_frames
from rewards.preferences import PERTURBATIONS, perturb
from rewards.reward_model import spearman
from rewards.verifiable import ToyWorldVerifiableReward

VL_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")
AIM_ROWS = 64  # training rows whose mean answer state `aim_verdict_rows` aims the verdict rows at
AIM_LOGIT = 10.0  # the verdicts' logit there: far above the other tokens' (a few units at most)
# JudgeConfig fields that shape what the judge is shown and answers; the rest are network settings
PROMPT_FIELDS = (
    "mode", "num_frames", "context_frames", "frame_stride", "image_format", "system_prompt", "template",
    "aspects", "choices",
)  # fmt: skip


@dataclass
class JudgeSFTConfig(TrainerConfig):
    """Judge fine-tuning (TRL's `SFTConfig` names). Only the final judge is saved (``save_steps: 0``)."""

    max_steps: int = field(default=200, metadata={"help": "Optimizer steps to run."})
    per_device_train_batch_size: int = field(
        default=8, metadata={"help": "Conversations per device per micro-batch."}
    )
    save_steps: int = field(default=0, metadata={"help": "Must be 0: only the final judge is saved."})
    dataloader_num_workers: int = field(
        default=0,
        metadata={
            "help": "Processes building the batches (each row's request encoded as the judge sends it, "
            "then Qwen-VL inputs: a few ms a row on CPU, which a GPU step outruns); 0: the training one."
        },
    )

    pair_loss_weight: float = field(
        default=0.0,
        metadata={
            "help": "weight of a Bradley-Terry term between the verdict logits (log P(yes) - log P(no)) of "
            "a yes row and a no row of one context (toy: true vs perturbed; policy samples of one context), "
            "batched side by side; what a tiny judge learns from where the verdict loss alone leaves it at "
            "ln 2 (0: off; batch size must be even)"
        },
    )

    cross_pair_margin: float = field(
        default=0.0,
        metadata={
            "help": "also pair scored rows (policy samples, synthetic failures) of any two contexts whose "
            "verifiable scores differ by more than this, the better first, in the pair term (0: off)"
        },
    )
    cross_pair_share: float = field(
        default=0.5,
        metadata={"help": "share of each epoch's pairs that cross_pair_margin draws across contexts"},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(self.pair_loss_weight >= 0, "pair_loss_weight", f"must be >= 0, got {self.pair_loss_weight}")
        _require(
            self.cross_pair_margin == 0 or self.pair_loss_weight > 0,
            "cross_pair_margin",
            "pairs only count in the pair term; set trainer.pair_loss_weight > 0 or cross_pair_margin: 0",
        )
        _require(
            self.cross_pair_margin >= 0, "cross_pair_margin", f"must be >= 0, got {self.cross_pair_margin}"
        )
        _require(
            0 < self.cross_pair_share < 1,
            "cross_pair_share",
            f"must be in (0, 1), got {self.cross_pair_share}",
        )
        _require(
            self.pair_loss_weight == 0 or self.per_device_train_batch_size % 2 == 0,
            "per_device_train_batch_size",
            f"must be even with pair_loss_weight > 0 (pairs share a batch), got "
            f"{self.per_device_train_batch_size}",
        )
        _require(
            self.dataloader_num_workers >= 0,
            "dataloader_num_workers",
            f"must be >= 0, got {self.dataloader_num_workers}",
        )
        _require(self.max_steps >= 1, "max_steps", f"must be >= 1, got {self.max_steps}")
        _require(
            self.per_device_train_batch_size >= 1,
            "per_device_train_batch_size",
            f"must be >= 1, got {self.per_device_train_batch_size}",
        )
        unsupported = {
            "use_lora": (self.use_lora, "the judge is fully fine-tuned; LoRA is not supported yet"),
            "fsdp": (self.fsdp, "judge training uses DDP; FSDP is not supported yet"),
            "ema_decay": (self.ema_decay > 0, "no EMA in judge training; set 0"),
            "eval_every": (self.eval_every > 0, "the held-out split is scored before and after; set 0"),
            "save_steps": (self.save_steps > 0, "only the final judge is saved; set 0"),
            "resume_from_checkpoint": (
                self.resume_from_checkpoint is not None,
                "judge runs are short and not resumable yet; set null",
            ),
        }
        for name, (bad, problem) in unsupported.items():
            _require(not bad, name, problem)


# ------------------------------------------------------------------------------------------- recipe specs


@dataclass
class JudgeModelSpec:
    """``policy: {type: qwen_vl_judge, ...}``: the Qwen-VL judge to fine-tune and what it is asked."""

    type: Literal["qwen_vl_judge"] = field(default="qwen_vl_judge", metadata={"help": "model kind"})
    path: str | None = field(default=None, metadata={"help": "Qwen2-VL / Qwen2.5-VL checkpoint directory"})
    tiny: bool = field(default=False, metadata={"help": "a random tiny Qwen2.5-VL judge (tests, toy world)"})
    tiny_spec: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "sizes of the tiny judge (policies.tiny_qwen_vl.TinyQwenVLSpec fields)"},
    )
    torch_dtype: Literal["float32", "bfloat16"] = field(default="float32", metadata={"help": "weights dtype"})
    judge: dict[str, Any] = field(
        default_factory=dict,
        metadata={
            "help": "what the judge is shown, as the reward's kwargs: mode (images | video | clip), "
            "num_frames, context_frames, frame_stride, image_format, system_prompt, template, aspects, "
            "choices"
        },
    )
    aim_verdict: bool = field(
        default=False,
        metadata={
            "help": "before training, point the output rows of both verdicts' first tokens at the mean "
            "answer state (P(yes) = P(no) ~ 1/2 for every input), so that a random judge learns to judge "
            "rather than a prior first (`aim_verdict_rows`); for tiny judges"
        },
    )

    def __post_init__(self) -> None:
        # every size and prompt setting written out, so resolved_recipe.yaml pins the judge and its question
        if self.tiny:
            self.tiny_spec = asdict(from_nested_dict(TinyQwenVLSpec, self.tiny_spec, "policy.tiny_spec"))
        config = judge_config(self)
        self.judge = {
            name: list(value) if isinstance(value, tuple) else value
            for name, value in ((name, getattr(config, name)) for name in PROMPT_FIELDS)
        }

    def check(self, recipe: Any) -> None:
        """One source (a checkpoint or tiny) of a vision-language judge."""
        if (self.path is None) == (not self.tiny):
            raise InputError("policy: give exactly one of policy.path or policy.tiny: true")
        if self.tiny_spec and not self.tiny:
            raise InputError("policy.tiny_spec: sizes a tiny judge; set policy.tiny: true or drop it")
        if not self.tiny:
            check_vl_checkpoint(self.path)
        elif self.tiny_spec["architecture"] not in VL_MODEL_TYPES:
            raise InputError(f"policy.tiny_spec.architecture: judge_sft trains {' or '.join(VL_MODEL_TYPES)}")


@dataclass
class ToyVerdictsSpec(ToyCandidatesSpec):
    """``data: {type: toyworld_verdicts, ...}``: true toy-world continuations (yes), perturbed ones (no;
    with ``verify_perturbed`` both as the verifier says), with ``synthetic_failures`` damaged true ones
    and with ``policy`` that NSP policy's own samples, both yes when ``toyworld_verifiable`` >= 0.5."""

    type: Literal["toyworld_verdicts"] = field(default="toyworld_verdicts", metadata={"help": "data kind"})
    num_train: int = field(default=512, metadata={"help": "training samples (two rows each: yes and no)"})
    num_eval: int = field(default=64, metadata={"help": "held-out samples (validation split seeds)"})
    synthetic_failures: list[str] = field(
        default_factory=list,
        metadata={
            "help": f"per sample, its true future damaged by each ({', '.join(FAILURES)}; repeat: another "
            "strength), labelled by toyworld_verifiable >= 0.5"
        },
    )

    verify_perturbed: bool = field(
        default=False,
        metadata={
            "help": "label the true and perturbed continuations by toyworld_verifiable >= 0.5 too (a frozen "
            "or shuffled future of a still scene is right), not yes / no by construction"
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        unknown = sorted(set(self.synthetic_failures) - set(FAILURES))
        _require(not unknown, "synthetic_failures", f"choose from {', '.join(FAILURES)}, got {unknown}")

    def check(self, recipe: Any, model: JudgeModelSpec) -> None:
        """Nothing beyond its fields (``__post_init__``)."""


@dataclass
class VerdictManifestSpec:
    """``data: {type: verdict_manifest, ...}``: JSON Lines of ``{context, candidate, verdict}``."""

    type: Literal["verdict_manifest"] = field(default="verdict_manifest", metadata={"help": "data kind"})
    path: str = field(default="", metadata={"help": "training manifest (.jsonl; video paths relative to it)"})
    eval_path: str | None = field(default=None, metadata={"help": "held-out manifest (.jsonl)"})

    def check(self, recipe: Any, model: JudgeModelSpec) -> None:
        """The manifests exist."""
        for name in ("path", "eval_path"):
            value = getattr(self, name)
            if (name == "path" or value is not None) and not Path(value or "").is_file():
                raise InputError(
                    f"data.{name}: verdict manifest {value!r} does not exist; give a .jsonl file"
                )


def judge_config(spec: JudgeModelSpec) -> Any:
    """The `JudgeConfig` of the question the judge is trained (and later asked) with."""
    unknown = sorted(set(spec.judge) - set(PROMPT_FIELDS))
    if unknown:
        raise InputError(
            f"policy.judge: {unknown} do not change what the judge is shown; "
            f"give only {', '.join(PROMPT_FIELDS)}"
        )
    config = from_nested_dict(JudgeConfig, spec.judge, "policy.judge")
    if config.mode == "text":
        raise InputError("policy.judge.mode: judge_sft trains on frames; use 'images' or 'video'")
    return config


def check_vl_checkpoint(path: str) -> None:
    """A one-line error unless ``path`` is a Qwen2-VL / Qwen2.5-VL checkpoint with safetensors weights."""
    folder = Path(path)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise InputError(f"policy.path: {path!r} is not a model directory (no config.json)")
    try:
        model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
    except (json.JSONDecodeError, AttributeError):
        raise InputError(f"policy.path: {config_file} is not a JSON object; is this a checkpoint?") from None
    if model_type not in VL_MODEL_TYPES:
        raise InputError(
            f"policy.path: {path!r} is a {model_type!r} checkpoint, not a vision-language judge; "
            f"give a Qwen2-VL / Qwen2.5-VL one (model_type {' or '.join(VL_MODEL_TYPES)})"
        )
    check_model_weights(folder)


def build_rows(data: Any, choices: Sequence[str], seed: int = 0) -> tuple[Any, Any]:
    """Training and held-out verdict tables of a data spec (`grpo.data.judge_data`; no held-out
    manifest: None); ``seed`` (the recipe's) draws the strengths of ``data.synthetic_failures``."""
    if isinstance(data, VerdictManifestSpec):
        train = read_verdict_manifest(data.path, choices)
        return train, read_verdict_manifest(data.eval_path, choices) if data.eval_path else None
    config = data.toy_config()
    workers = min(data.num_workers, os.cpu_count() or 1)
    import datasets

    tables = []
    for split, n in (("train", data.num_train), ("validation", data.num_eval)):
        world = ToyWorld(config, split=split, num_samples=n)
        table = toyworld_verdicts(
            world, data.perturbations, choices=choices, num_workers=workers, verify=data.verify_perturbed
        )
        if data.synthetic_failures:
            synthetic = synthetic_verdicts(
                world, data.synthetic_failures, seed, choices=choices, num_workers=workers
            )
            table = datasets.concatenate_datasets([table, synthetic])
        tables.append(table)
    if data.policy is not None:
        for i, (split, n) in enumerate(
            (("train", data.policy_contexts), ("validation", data.policy_eval_contexts))
        ):
            samples, candidates, scores = policy_samples(data, config, split, n)
            rows = verdicts_from_scores(
                [s["context"] for s in samples],
                candidates,
                scores,
                VERIFIABLE_YES,
                choices=choices,
                prompts=[s["context_caption"] for s in samples],
            )
            tables[i] = datasets.concatenate_datasets([tables[i], verdict_dataset(rows)])
    return tables[0], tables[1]


def load_judge(spec: JudgeModelSpec, output_dir: Path) -> tuple[Any, Any, Any]:
    """Model, tokenizer and pre-processing config of the judge to train (a tiny one is written to
    ``output_dir/base`` first, so it loads through exactly the code a real checkpoint takes)."""
    path = spec.path
    if spec.tiny:
        tiny = from_dict(TinyQwenVLSpec, spec.tiny_spec, where="policy.tiny_spec")
        path = build_tiny_qwen_vl(output_dir / "base", tiny)
    return InProcessJudge.load_checkpoint(Path(path), "cpu", spec.torch_dtype, None)


def run_recipe(recipe: Any, spec: JudgeModelSpec, data: Any) -> list[dict[str, Any]]:
    """Fine-tune the judge a recipe describes (its validated model and data specs); returns the
    logged metrics."""
    config = judge_config(spec)
    train, held_out = build_rows(data, config.choices, recipe.args.seed)
    output_dir = Path(recipe.args.output_dir)
    save_resolved(recipe, output_dir)
    model, tokenizer, inputs_config = load_judge(spec, output_dir)
    if spec.aim_verdict:
        collator = JudgeCollator(tokenizer, inputs_config, config, model.config)
        aim_verdict_rows(model, collator, [train[i] for i in range(min(AIM_ROWS, len(train)))])
    return train_judge(model, tokenizer, inputs_config, config, recipe.args, train, held_out)


# ------------------------------------------------------------------------------------------- training


def frames(video: Any) -> Any:
    """A video cell of a verdict table as a uint8 tensor (datasets hands Array4D back as int64)."""
    import torch

    return torch.as_tensor(video).to(torch.uint8)


class JudgeCollator:
    """Verdict rows -> one padded Qwen-VL batch whose only label is the verdict's first token.

    The prompt is `encode_request` of the judge's own request for the row (what the judge sends
    when scoring); the completion is what the chat template appends for an assistant turn holding
    the verdict (e.g. ``yes<|im_end|>\\n``), tokenized on its own, since scoring reads the token
    that follows the prompt tokens. Only that first token is a label: it is the whole decision
    (P(yes)/(P(yes)+P(no)) is read from it; the choice constraint completes the word), so the loss
    is the verdict's cross-entropy -- ln 2 when the judge cannot tell on balanced labels -- rather
    than that diluted by end-of-turn tokens any model learns in a few steps. With ``pair_margin``
    (`JudgeSFTConfig.cross_pair_margin`) the batch also holds ``pair_mask``: which row pairs the pair
    term counts (`pair_mask`).
    """

    def __init__(
        self,
        tokenizer: Any,
        inputs_config: Any,
        config: Any,
        model_config: Any,
        pair_margin: float | None = None,
    ) -> None:
        self.pair_margin = pair_margin
        self.tokenizer = tokenizer
        self.inputs_config = inputs_config
        self.config = config
        self.model_config = model_config
        self._completions = {label: self._completion_ids(label) for label in config.choices}

    def _completion_ids(self, verdict: str) -> list[int]:
        turn = [{"role": "user", "content": "?"}]
        prompt = self.tokenizer.apply_chat_template(turn, tokenize=False, add_generation_prompt=True)
        full = self.tokenizer.apply_chat_template(
            [*turn, {"role": "assistant", "content": verdict}], tokenize=False
        )
        if not full.startswith(prompt):
            raise InputError(
                "the judge's chat template renders an assistant turn that does not extend its generation "
                "prompt; judge_sft needs a template like Qwen's"
            )
        return self.tokenizer(full[len(prompt) :], add_special_tokens=False)["input_ids"]

    def encode(self, row: dict[str, Any]) -> dict[str, Any]:
        """The prompt inputs (CPU) and labels of one row."""
        import torch

        prompts = None if row.get("prompt") is None else [row["prompt"]]
        request = build_requests(
            self.config, [frames(row["candidate"])], prompts, [frames(row["context"])], {}
        )[0]
        inputs = encode_request(request, self.tokenizer, self.inputs_config, self.model_config)
        completion = torch.tensor([self._completions[row["verdict"]]])
        prompt_ids = inputs.pop("input_ids")
        inputs["input_ids"] = torch.cat([prompt_ids, completion], dim=1)
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        labels = torch.full_like(inputs["input_ids"], -100)
        labels[0, prompt_ids.shape[1]] = completion[0, 0]  # the verdict's first token: what scoring reads
        inputs["labels"] = labels
        if "mm_token_type_ids" in inputs:
            inputs["mm_token_type_ids"] = torch.cat(
                [inputs["mm_token_type_ids"], torch.zeros_like(completion, dtype=torch.int32)], dim=1
            )
        return inputs

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
        import torch

        encoded = [self.encode(row) for row in rows]
        length = max(e["input_ids"].shape[1] for e in encoded)
        pads = {
            "input_ids": self.tokenizer.pad_token_id,
            "attention_mask": 0,
            "labels": -100,
            "mm_token_type_ids": 0,
        }
        batch: dict[str, Any] = {}
        for key, pad in pads.items():
            if key in encoded[0]:
                batch[key] = torch.cat(
                    [
                        torch.nn.functional.pad(e[key], (0, length - e[key].shape[1]), value=pad)
                        for e in encoded
                    ]
                )
        for key in encoded[0]:
            if key not in pads:  # pixels and grids of every frame, in row order
                batch[key] = torch.cat([e[key] for e in encoded])
        if self.pair_margin is not None:
            batch["pair_mask"] = self.pair_mask(rows)
        return batch

    def pair_mask(self, rows: Sequence[dict[str, Any]]) -> Any:
        """Which pairs of rows ``(0, 1), (2, 3), ...`` the pair term counts (`pair_order`'s units): a
        yes then a no, or two scored rows whose scores fall by more than ``pair_margin``."""
        import torch

        yes = self.config.choices[0]

        def counts(better: dict[str, Any], worse: dict[str, Any]) -> bool:
            if better["verdict"] == yes and worse["verdict"] != yes:
                return True
            a, b = better.get("score"), worse.get("score")
            return a is not None and b is not None and float(a) - float(b) > self.pair_margin

        return torch.tensor([counts(a, b) for a, b in zip(rows[0::2], rows[1::2])], dtype=torch.bool)


def aim_verdict_rows(model: Any, collator: JudgeCollator, rows: Sequence[dict[str, Any]]) -> None:
    """Point the output rows of the verdicts' first tokens at the mean answer state of ``rows``, both
    the same, so that each gets the logit `AIM_LOGIT` there: P(yes) = P(no) for every input and
    together they take nearly all the mass.

    Why: a random judge's verdict rows are random, so its answer first has to learn to be "yes" or
    "no" at all (the loss falls from ~6 to ln 2). That phase adds a large constant to the answer
    position's state and -- Adam moving every weight by about the learning rate, whatever its
    gradient -- wipes out the small part of it that depends on the frames: the attention path from
    the answer to the video dies and the judge ends as a constant, the answer prior (measured: a
    tiny judge could not memorise 8 verdicts). Started here, the loss starts at ln 2 and its only
    gradient is the verdict's, as a reward model's zero-initialised head gives it.
    """
    import torch

    output = model.get_output_embeddings()
    if output.weight is model.get_input_embeddings().weight:
        raise InputError(
            "policy.aim_verdict: this judge ties its output layer to its input embeddings, so aiming "
            "the verdict rows would change its prompt too; set aim_verdict: false"
        )
    batch = collator(rows)
    labels = batch.pop("labels")
    device = output.weight.device
    was_training = model.training
    model.eval()
    with torch.no_grad():
        hidden = model.model(**{k: v.to(device) for k, v in batch.items()}).last_hidden_state
        at = (labels != -100).nonzero()
        mean = hidden[at[:, 0], at[:, 1] - 1].float().mean(0)
        first = [collator._completions[label][0] for label in collator.config.choices]
        output.weight[first] = (mean * AIM_LOGIT / mean.norm() ** 2).to(output.weight.dtype)
    model.train(was_training)


def pair_order(
    groups: Sequence[Any],
    positive: Sequence[bool],
    generator: Any,
    scores: Sequence[float | None] | None = None,
    margin: float = 0.0,
    share: float = 0.5,
) -> list[int]:
    """One epoch's row order for `pair_loss_weight`: shuffled units of two rows. A unit is a yes row
    then a no row of one group (one context) as long as a group has both; the rest go in twos ordered
    so that a no never follows a yes within a unit (a lone last row is paired with itself), so
    `verdict_loss` finds the pairs at even positions of every even-sized batch.

    With ``margin`` > 0, cross-context units join them, ``share`` of all units: a random scored row
    (``scores[i]`` not None) then a random one whose score is lower by more than ``margin``, whatever
    their groups -- where passing depends on the scene (the toy policy's samples), pairs of one
    context carry little of the signal (`JudgeCollator` marks them for the pair term)."""
    import torch

    by_group: dict[Any, tuple[list[int], list[int]]] = {}
    for i, (group, yes) in enumerate(zip(groups, positive, strict=True)):
        by_group.setdefault(("row", i) if group is None else group, ([], []))[0 if yes else 1].append(i)
    units, rest = [], []
    for yes_rows, no_rows in by_group.values():
        units += [[y, n] for y, n in zip(yes_rows, no_rows)]
        rest += yes_rows[len(no_rows) :] + no_rows[len(yes_rows) :]
    rest = [rest[i] for i in torch.randperm(len(rest), generator=generator).tolist()]
    rest += rest[-1:] * (len(rest) % 2)
    for a, b in zip(rest[0::2], rest[1::2]):
        units.append([b, a] if positive[a] and not positive[b] else [a, b])
    if margin > 0 and scores is not None:
        units += cross_pairs(scores, margin, round(len(units) * share / (1 - share)), generator)
    return [i for u in torch.randperm(len(units), generator=generator).tolist() for i in units[u]]


def cross_pairs(scores: Sequence[float | None], margin: float, count: int, generator: Any) -> list[list[int]]:
    """``count`` pairs ``[better, worse]`` of scored rows (None: unscored, never drawn), the better
    drawn uniformly from those with some row lower by more than ``margin``, the worse uniformly from
    those rows; none when no two scores are that far apart."""
    import torch

    scored = [(s, i) for i, s in enumerate(scores) if s is not None and not math.isnan(s)]
    if not scored or count <= 0:
        return []
    ordered = torch.tensor(sorted(scored), dtype=torch.float64)
    values, rows = ordered[:, 0].contiguous(), ordered[:, 1].long()
    below = torch.searchsorted(values, values - margin)  # rows [0, below[k]) score < values[k] - margin
    better = (below > 0).nonzero().flatten()
    if not len(better):
        return []
    k = better[torch.randint(len(better), (count,), generator=generator)]
    worse = (torch.rand(count, generator=generator) * below[k]).long()
    return [[int(rows[a]), int(rows[b])] for a, b in zip(k.tolist(), worse.tolist())]


class PairSampler:
    """Row indices of a verdict table in `pair_order`, a fresh shuffle each epoch from ``seed``."""

    def __init__(self, groups: Sequence[Any], positive: Sequence[bool], seed: int, **cross: Any) -> None:
        import torch

        self.groups, self.positive, self.cross = list(groups), list(positive), cross
        self.generator = torch.Generator().manual_seed(seed)
        self.length = len(self._order(torch.Generator().manual_seed(seed)))

    def _order(self, generator: Any) -> list[int]:
        return pair_order(self.groups, self.positive, generator, **self.cross)

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Any:
        return iter(self._order(self.generator))


def verdict_loss(
    outputs: Any,
    labels: Any,
    verdict_ids: Sequence[int],
    pair_weight: float,
    num_items_in_batch: Any = None,
    pair_mask: Any = None,
) -> Any:
    """The verdict's cross-entropy (as `SFTTrainer` computes it: summed over label tokens, divided by
    ``num_items_in_batch``) plus ``pair_weight`` x the Bradley-Terry loss
    ``softplus(-(d_yes - d_no))`` of each pair at even positions of the batch (`pair_order`), where
    ``d = log P(yes) - log P(no)`` is the row's verdict logit. Why: a pair of one context differs only
    in what the judge must learn, so its gradient carries the signal without the scene-to-scene noise
    a single row's has; the verdict loss alone let a random tiny judge forget its inputs. The pairs
    counted are those of ``pair_mask`` (one bool per pair; `JudgeCollator` with ``pair_margin``),
    else those whose rows are a yes then a no."""
    import torch

    at = (labels != -100).nonzero()
    log_p = outputs.logits[at[:, 0], at[:, 1] - 1].float().log_softmax(-1)
    target = labels[at[:, 0], at[:, 1]]
    count = len(target) if num_items_in_batch is None else num_items_in_batch
    loss = -log_p.gather(1, target[:, None]).sum() / torch.as_tensor(count, device=log_p.device).clamp(min=1)
    if pair_weight > 0:
        if len(target) != len(labels):
            raise InputError("pair_loss_weight needs exactly one verdict label per row")
        d = log_p[:, verdict_ids[0]] - log_p[:, verdict_ids[1]]
        even, odd = slice(0, len(d) - len(d) % 2, 2), slice(1, len(d), 2)
        paired = (target[even] == verdict_ids[0]) & (target[odd] == verdict_ids[1])
        if pair_mask is not None:
            paired = pair_mask.to(paired.device)
        bt = torch.nn.functional.softplus(d[odd] - d[even])
        loss = loss + pair_weight * (bt * paired).sum() / paired.sum().clamp(min=1)
    return loss


def evaluate_judge(judge: Any, dataset: Any, prefix: str = "eval") -> dict[str, float]:
    """Mean P(positive) of the positive and negative rows of a verdict table, their gap
    (``separation``) and the verdict accuracy at 0.5, as the judge scores them (`InProcessJudge`);
    no table: no metrics."""
    if dataset is None:
        return {}
    rows = [dataset[i] for i in range(len(dataset))]
    positive = judge.config.choices[0]
    prompts = [row.get("prompt") or "" for row in rows]
    scores = judge(
        [frames(r["candidate"]) for r in rows], prompts, [frames(r["context"]) for r in rows]
    ).metadata[judge.config.label_column]
    yes = [s for s, r in zip(scores, rows) if r["verdict"] == positive and s is not None]
    no = [s for s, r in zip(scores, rows) if r["verdict"] != positive and s is not None]
    mean = lambda values: sum(values) / len(values) if values else math.nan  # noqa: E731
    right = [(s >= 0.5) == (r["verdict"] == positive) for s, r in zip(scores, rows) if s is not None]
    return {
        f"{prefix}/p_{positive}_true": mean(yes),
        f"{prefix}/p_{positive}_false": mean(no),
        f"{prefix}/separation": mean(yes) - mean(no),
        f"{prefix}/accuracy": mean([float(x) for x in right]),
    }


def sft_config(args: JudgeSFTConfig) -> Any:
    """TRL's `SFTConfig` of a `JudgeSFTConfig` (same names; batches come from `JudgeCollator`)."""
    import torch
    from trl import SFTConfig

    shared = {f.name for f in fields(SFTConfig)}
    ours = {k: v for k, v in asdict(args).items() if k in shared and k not in ("report_to", "save_steps")}
    if "activation_checkpointing" in shared:  # newer transformers' name; older releases know only the old one
        ours["activation_checkpointing"] = ours.pop("gradient_checkpointing")
    return SFTConfig(
        **ours,
        save_strategy="no",
        report_to="none",  # metrics.jsonl / TensorBoard / W&B go through grpo.tracking, as in every stage
        logging_strategy="steps",
        remove_unused_columns=False,
        dataset_kwargs={"skip_prepare_dataset": True},
        max_length=None,
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True,  # grpo.tracking draws the bar
        data_seed=args.seed,
    )


def train_judge(
    model: Any,
    tokenizer: Any,
    inputs_config: Any,
    config: Any,
    args: JudgeSFTConfig,
    train_rows: Any,
    eval_rows: Any = None,
) -> list[dict[str, Any]]:
    """Fine-tune ``model`` on a verdict table (`grpo.data.judge_data`) with `SFTTrainer`, score the
    held-out table before and after (``base/*``, ``eval/*``) and save the judge to
    ``args.output_dir/final``; returns the log."""
    from transformers import PrinterCallback, TrainerCallback
    from trl import SFTTrainer

    def scored(prefix: str) -> dict[str, float]:
        return evaluate_judge(InProcessJudge(model, tokenizer, config, inputs_config), eval_rows, prefix)

    history: list[dict[str, Any]] = []
    logger = MetricsLogger(
        args.output_dir,
        report_to=args.report_to,
        total=args.max_steps,
        run_name=args.run_name,
        progress_keys=("loss",),
    )

    class Log(TrainerCallback):
        def on_log(self, _args: Any, state: Any, _control: Any, logs: Any = None, **kwargs: Any) -> None:
            metrics = {k: v for k, v in (logs or {}).items() if isinstance(v, int | float)}
            if "loss" in metrics:
                logger.log(metrics, step=state.global_step)
                history.append(metrics)

    margin = args.cross_pair_margin or None
    collator = JudgeCollator(tokenizer, inputs_config, config, model.config, margin)
    paired = args.pair_loss_weight > 0

    class JudgeTrainer(SFTTrainer):
        def _get_train_sampler(self, train_dataset: Any = None) -> Any:
            if not paired:
                return super()._get_train_sampler(train_dataset)
            rows = train_dataset if train_dataset is not None else self.train_dataset
            positive = [v == config.choices[0] for v in rows["verdict"]]
            if not args.cross_pair_margin:
                return PairSampler(rows["group"], positive, args.seed)
            cross = {
                "scores": rows["score"],
                "margin": args.cross_pair_margin,
                "share": args.cross_pair_share,
            }
            return PairSampler(rows["group"], positive, args.seed, **cross)

        def compute_loss(
            self, model: Any, inputs: Any, return_outputs: bool = False, num_items_in_batch: Any = None
        ) -> Any:
            if not paired:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            labels, mask = inputs["labels"], inputs.get("pair_mask")
            outputs = model(
                **{k: v for k, v in inputs.items() if k not in ("labels", "pair_mask")}, use_cache=False
            )
            loss = verdict_loss(outputs, labels, verdict_ids, args.pair_loss_weight, num_items_in_batch, mask)
            return (loss, outputs) if return_outputs else loss

    verdict_ids = [collator._completions[label][0] for label in config.choices]

    with logger:
        base = scored("base")
        if base:
            logger.log(base, step=0)
            history.append(base)
        trainer = JudgeTrainer(
            model=model,
            args=sft_config(args),
            train_dataset=train_rows,
            processing_class=tokenizer,
            data_collator=collator,
            callbacks=[Log()],
        )
        trainer.remove_callback(PrinterCallback)  # the log goes to metrics.jsonl and the bar
        trainer.train()
        final = scored("eval")
        if final:
            logger.log(final, step=args.max_steps)
            history.append(final)
    save_judge(model, tokenizer, inputs_config, Path(args.output_dir) / "final")
    return history


def save_judge(model: Any, tokenizer: Any, inputs_config: Any, path: Path) -> Path:
    """A judge checkpoint directory: safetensors weights, tokenizer (with the chat template) and the
    pre-processing config -- what `InProcessJudge` and a vLLM server load."""
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    inputs_config.save_pretrained(path)
    return path


# ------------------------------------------------------------------------------------------- evaluation


def auroc(scores: Sequence[float], labels: Sequence[bool]) -> float:
    """Area under the ROC curve of ``scores`` for the binary ``labels``: the chance that a random
    positive scores above a random negative (ties count one half); NaN without both classes."""
    import numpy as np

    s, y = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=bool)
    if s.shape != y.shape or s.ndim != 1:
        raise InputError(f"auroc needs equally long score and label lists, got {s.shape} and {y.shape}")
    if y.all() or not y.any():
        return math.nan
    gap = s[y][:, None] - s[~y][None, :]
    return float((gap > 0).mean() + 0.5 * (gap == 0).mean())


@dataclass
class HeldOutCandidates:
    """Candidate next scenes of held-out toy contexts, each with its toy world and verifiable reward."""

    contexts: list[Any]
    candidates: list[Any]
    worlds: list[Any]  # each candidate's toy-world metadata (the truth it is scored against)
    verifiable: list[float]
    kinds: list[str]


def held_out_candidates(
    num_contexts: int,
    *,
    policy: str | None = "checkpoints/toy_nsp",
    generations: int = 4,
    split: str = "test",
    seed: int = 2,
    perturbations: Sequence[str] | None = None,
) -> HeldOutCandidates:
    """The judge's evaluation set: for each of the first ``num_contexts`` toy contexts of ``split``
    (fresh seeds: judge_sft trains on ``train`` and scores ``validation``), its true continuation,
    one of each perturbation and ``generations`` samples of the NSP ``policy`` (drawn as its GRPO
    rollouts are, seeds from ``seed``; None: none), all scored by ``toyworld_verifiable``."""

    config = ToyWorldConfig(size=32, next_overlap=1)  # the shipped NSP policy's data
    world = ToyWorld(config, split=split, num_samples=max(num_contexts, 2))
    samples = [world[i] for i in range(num_contexts)]
    out = HeldOutCandidates([], [], [], [], [])
    for i, sample in enumerate(samples):
        other = world[(i + 1) % len(world)]
        videos = [("true", sample["next"])]
        videos += [(k, perturb(world, i, sample, k, other)) for k in perturbations or PERTURBATIONS]
        for kind, video in videos:
            out.contexts.append(sample["context"])
            out.candidates.append(video)
            out.kinds.append(kind)
            out.worlds.append(sample["world"])
    out.verifiable = list(ToyWorldVerifiableReward()(out.candidates, world=out.worlds).scores)
    if policy is not None and generations > 0:
        spec = ToyPreferencesSpec(policy=policy, policy_generations=max(generations, 2))
        _, candidates, scores = policy_samples(spec, config, split, num_contexts, seed=seed)
        for sample, group, values in zip(samples, candidates, scores):
            for video, value in list(zip(group, values))[:generations]:
                if value is not None:
                    out.contexts.append(sample["context"])
                    out.candidates.append(video)
                    out.worlds.append(sample["world"])
                    out.kinds.append("policy")
                    out.verifiable.append(float(value))
    return out


def verifier_ceiling(
    held_out: HeldOutCandidates, frames: Sequence[int], threshold: float = VERIFIABLE_YES
) -> dict[str, float]:
    """What the candidates' ``frames`` alone tell: the AUROC of the verifier's own score over just
    those frames (`ToyWorldVerifiableReward.score_frames`) against "verifiable reward >=
    ``threshold``" -- ``ceiling/auroc``, and ``ceiling/policy/auroc`` over the policy's samples (at
    least two). A candidate that goes wrong only between the shown frames looks right there, so a
    judge shown those frames is read against this, not against 1 (a reference, not a bound: a judge
    also sees the context and may guess what happens between the frames)."""
    import numpy as np

    verifier = ToyWorldVerifiableReward()
    scores = np.asarray(
        [
            verifier.score_frames(video, world, frames, index=i)
            for i, (video, world) in enumerate(zip(held_out.candidates, held_out.worlds, strict=True))
        ]
    )
    passing = np.asarray(held_out.verifiable, dtype=np.float64) >= threshold
    out = {"ceiling/auroc": auroc(scores, passing)}
    policy = np.asarray(held_out.kinds) == "policy"
    if policy.sum() >= 2:
        out["ceiling/policy/auroc"] = auroc(scores[policy], passing[policy])
    return out


def judge_auroc(
    judge: Any, held_out: HeldOutCandidates, threshold: float = VERIFIABLE_YES
) -> dict[str, float]:
    """How well a judge's P(positive) tells good continuations from bad on `held_out_candidates`:
    ``auroc`` against "verifiable reward >= ``threshold``", ``spearman`` with the verifiable reward,
    the same two over the policy's samples only (``policy/*``), per candidate kind the mean P, how
    many the verifier passes (``positives/<kind>``) and the mean P of those and of the rest
    (``p_<yes>_pass/<kind>``, ``p_<yes>_fail/<kind>``), and where the AUROC is lost:
    ``misranked/<kind a>/<kind b>``, the share of all (passing, failing) pairs that pair a passing
    candidate of kind a with a failing one of kind b and rank the failing one higher (ties: one
    half); these shares add up to 1 - ``auroc``. ``ceiling/auroc`` (and ``ceiling/policy/auroc``) is
    the verifier's own AUROC over just the frames this judge is shown, the reference its AUROC is read
    against (`verifier_ceiling`, frames from `rewards.judge.prompts.shown_frames`); mode ``text``
    shows no frames and reports no ceiling."""
    import numpy as np

    cfg = judge.config
    lengths = sorted({len(c) for c in held_out.candidates})
    if cfg.mode != "text" and len(lengths) > 1:
        raise InputError(
            f"judge_auroc: the candidates have {lengths} frames; the frames a judge is shown (and its "
            "ceiling) need one length, give all candidates as many frames"
        )
    frames = shown_frames(lengths[0], cfg.mode, cfg.num_frames, cfg.frame_stride) if lengths else []
    p = judge(held_out.candidates, None, held_out.contexts).metadata[judge.config.label_column]
    p = np.asarray([math.nan if v is None else v for v in p], dtype=np.float64)
    verifiable = np.asarray(held_out.verifiable, dtype=np.float64)
    kinds = np.asarray(held_out.kinds)
    passing = verifiable >= threshold
    out = {
        "auroc": auroc(p, passing),
        "spearman": spearman(p, verifiable),
        "candidates": float(len(p)),
        "positives": float(passing.sum()),
    }
    policy = kinds == "policy"
    if policy.sum() >= 2:
        out["policy/auroc"] = auroc(p[policy], passing[policy])
        out["policy/spearman"] = spearman(p[policy], verifiable[policy])
    yes = judge.config.choices[0]
    for kind in dict.fromkeys(held_out.kinds):
        of_kind = kinds == kind
        out[f"p_{yes}/{kind}"] = float(p[of_kind].mean())
        out[f"positives/{kind}"] = float(passing[of_kind].sum())
        for label, rows in (("pass", of_kind & passing), ("fail", of_kind & ~passing)):
            if rows.any():  # where the judge disagrees with the verifier, by kind
                out[f"p_{yes}_{label}/{kind}"] = float(p[rows].mean())
    pairs = passing.sum() * (~passing).sum()
    for good in dict.fromkeys(kinds[passing]):
        for bad in dict.fromkeys(kinds[~passing]):
            gap = p[passing & (kinds == good)][:, None] - p[~passing & (kinds == bad)][None, :]
            out[f"misranked/{good}/{bad}"] = float(((gap < 0).sum() + 0.5 * (gap == 0).sum()) / pairs)
    if frames:
        out.update(verifier_ceiling(held_out, frames, threshold))
    return out
