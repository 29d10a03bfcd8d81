"""Atomic, resumable training checkpoints.

A checkpoint is a directory ``OUTPUT_DIR/checkpoint-XXXXXXXX`` (the zero-padded iteration or
optimizer step) holding:

==========================  ===========================================================  ========
``model.safetensors``       trainable weights (LoRA adapters or the full model)           rank 0
``ema.safetensors``         EMA of the trainable weights (when EMA is on)                 rank 0
``sampler.safetensors``     DiffusionNFT's soft-updated sampling weights (``nft``)        rank 0
``optimizer.pt``            optimizer ``state_dict()``                                    rank 0
``scheduler.pt``            LR-scheduler ``state_dict()``                                 rank 0
``rng_state_rank{r}.pt``    python ``random``, numpy, torch CPU / CUDA and named           every rank
                            ``torch.Generator`` states of rank r
``meta.json``               step, world size, data position, free-form trainer state      rank 0
==========================  ===========================================================  ========

Everything is written into ``checkpoint-XXXXXXXX.tmp-<random>`` and fsynced; ``meta.json`` is
written last and the directory is then renamed (``os.replace``) to its final name, so a directory
called ``checkpoint-XXXXXXXX`` is complete whatever moment the job was killed at. `.pt` files are
read with ``torch.load(weights_only=True)``: nothing but tensors and plain containers is ever
unpickled. Several ranks must share ``output_dir`` on one filesystem; with FSDP pass full (gathered)
state dicts to rank 0.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import secrets
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from policies.errors import InputError
from policies.files import check_safetensors

FORMAT_VERSION = 1
META_FILE = "meta.json"
MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
SAMPLER_FILE = "sampler.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
# what a training run resumes from (`grpo.training_state.TrainingState.resume` reads them all)
RESUME_FILES = (MODEL_FILE, OPTIMIZER_FILE, SCHEDULER_FILE)
RESUME_TRAINER_STATE = ("step", "optimizer_steps")
_META_KEYS = ("step", "world_size", "data_state", "trainer_state")
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
# how long ranks > 0 wait for rank 0's staging directory to show up (shared filesystems lag)
_STAGING_TIMEOUT_S = 60.0


def checkpoint_name(step: int) -> str:
    """Directory name of the checkpoint of ``step``: ``checkpoint-00000042``."""
    return f"checkpoint-{step:08d}"


def rng_file(rank: int) -> str:
    """Name of the file holding the RNG states of ``rank``."""
    return f"rng_state_rank{rank}.pt"


@dataclass
class Checkpoint:
    """What `load_checkpoint` read back; hand each part to the object it came from."""

    path: Path
    step: int
    world_size: int
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any] | None = None
    scheduler_state: dict[str, Any] | None = None
    ema_state: dict[str, torch.Tensor] | None = None
    sampler_state: dict[str, torch.Tensor] | None = None
    data_state: dict[str, Any] | None = None
    trainer_state: dict[str, Any] = field(default_factory=dict)


# --- RNG -------------------------------------------------------------------------------------------


def capture_rng_state(generators: Mapping[str, torch.Generator] | None = None) -> dict[str, Any]:
    """This process's RNG states, as tensors and plain containers only (loadable with weights_only)."""
    numpy_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "bit_generator": numpy_state["bit_generator"],
            "key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
            "pos": int(numpy_state["state"]["pos"]),
            "has_gauss": int(numpy_state["has_gauss"]),
            "gauss": float(numpy_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
        "generators": {name: gen.get_state() for name, gen in (generators or {}).items()},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(
    state: Mapping[str, Any], generators: Mapping[str, torch.Generator] | None = None
) -> None:
    """Put back what `capture_rng_state` returned: the next draws equal those of the uninterrupted run."""
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    numpy_state = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": numpy_state["bit_generator"],
            "state": {"key": numpy_state["key"].numpy().astype(np.uint32), "pos": numpy_state["pos"]},
            "has_gauss": numpy_state["has_gauss"],
            "gauss": numpy_state["gauss"],
        }
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        if not torch.cuda.is_available():
            raise InputError(
                "checkpoint holds CUDA RNG states but CUDA is not available; resume on a GPU machine"
            )
        torch.cuda.set_rng_state_all(state["cuda"])
    for name, generator in (generators or {}).items():
        if name not in state["generators"]:
            saved = ", ".join(state["generators"]) or "none"
            raise InputError(f"checkpoint has no state for generator {name!r} (saved: {saved})")
        generator.set_state(state["generators"][name])


# --- file helpers ----------------------------------------------------------------------------------


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _torch_save(obj: Any, path: Path) -> None:
    with path.open("wb") as handle:
        torch.save(obj, handle)
        handle.flush()
        os.fsync(handle.fileno())


def _save_tensors(tensors: Mapping[str, torch.Tensor], path: Path) -> None:
    save_file({name: t.detach().cpu().contiguous() for name, t in tensors.items()}, str(path))
    _fsync_path(path)


def _write_json(obj: Any, path: Path) -> None:
    with path.open("w", encoding="utf-8") as handle:
        json.dump(obj, handle, indent=2)
        handle.flush()
        os.fsync(handle.fileno())


def _step_of(path: Path) -> int | None:
    match = _CHECKPOINT_RE.match(path.name)
    return int(match.group(1)) if match else None


def is_complete(path: str | os.PathLike[str]) -> bool:
    """True for a final-named checkpoint directory whose ``meta.json`` and every listed file exist."""
    path = Path(path)
    if _step_of(path) is None or not path.is_dir():
        return False
    try:
        meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    return all((path / name).is_file() for name in meta.get("files", []))


# --- saving ----------------------------------------------------------------------------------------


def save_checkpoint(
    output_dir: str | os.PathLike[str],
    step: int,
    *,
    model_state: Mapping[str, torch.Tensor],
    optimizer_state: Mapping[str, Any] | None = None,
    scheduler_state: Mapping[str, Any] | None = None,
    ema_state: Mapping[str, torch.Tensor] | None = None,
    sampler_state: Mapping[str, torch.Tensor] | None = None,
    data_state: Mapping[str, Any] | None = None,
    trainer_state: Mapping[str, Any] | None = None,
    generators: Mapping[str, torch.Generator] | None = None,
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] | None = None,
    save_total_limit: int | None = None,
) -> Path:
    """Write the checkpoint of ``step`` atomically and return its final path. Call it on every rank.

    Rank 0 writes the shared parts (``model_state`` ... ``trainer_state``; other ranks may pass
    empty ones), every rank its RNG states (the global generators plus the named ``generators``).
    Protocol: rank 0 removes staging directories left by killed saves and writes into a fresh one
    -> ``barrier()`` -> every rank writes its RNG file -> ``barrier()`` -> rank 0 writes ``meta.json``,
    renames the directory and prunes to the newest ``save_total_limit`` complete checkpoints (never
    the one just written) -> ``barrier()``. RNG states are captured on entry, before any other work.
    ``data_state`` and ``trainer_state`` must be JSON-serialisable. If a rank fails mid-way the others
    wait in ``barrier()`` until the collective times out; the previous checkpoint stays the latest.
    """
    if world_size > 1 and barrier is None:
        raise ValueError(
            "save_checkpoint: world_size > 1 needs a barrier() callable (e.g. accelerator.wait_for_everyone)"
        )
    rng_state = capture_rng_state(generators)
    sync = barrier or (lambda: None)
    output_dir = Path(output_dir)
    final = output_dir / checkpoint_name(step)
    staging_glob = f"{checkpoint_name(step)}.tmp-*"
    if rank == 0:
        meta = {
            "format_version": FORMAT_VERSION,
            "step": step,
            "world_size": world_size,
            "time": time.time(),
            "data_state": dict(data_state) if data_state is not None else None,
            "trainer_state": dict(trainer_state or {}),
        }
        json.dumps(meta)  # fail before writing anything if a state is not JSON-serialisable
        output_dir.mkdir(parents=True, exist_ok=True)
        for pattern in ("checkpoint-*.tmp-*", "checkpoint-*.old-*"):  # left by saves that were killed
            for stale in output_dir.glob(pattern):
                shutil.rmtree(stale, ignore_errors=True)
        staging = output_dir / f"{checkpoint_name(step)}.tmp-{secrets.token_hex(4)}"
        staging.mkdir()
        files = [MODEL_FILE]
        _save_tensors(model_state, staging / MODEL_FILE)
        if ema_state is not None:
            _save_tensors(ema_state, staging / EMA_FILE)
            files.append(EMA_FILE)
        if sampler_state is not None:
            _save_tensors(sampler_state, staging / SAMPLER_FILE)
            files.append(SAMPLER_FILE)
        if optimizer_state is not None:
            _torch_save(dict(optimizer_state), staging / OPTIMIZER_FILE)
            files.append(OPTIMIZER_FILE)
        if scheduler_state is not None:
            _torch_save(dict(scheduler_state), staging / SCHEDULER_FILE)
            files.append(SCHEDULER_FILE)
    sync()
    if rank != 0:
        staging = _find_staging(output_dir, staging_glob)
    _torch_save(rng_state, staging / rng_file(rank))
    sync()
    if rank == 0:
        meta["files"] = files + [rng_file(r) for r in range(world_size)]
        missing = [name for name in meta["files"] if not (staging / name).is_file()]
        if missing:
            raise RuntimeError(f"checkpoint {staging}: missing {missing} after every rank wrote its part")
        _write_json(meta, staging / META_FILE)
        _fsync_path(staging)
        replaced = None
        if final.exists():  # re-saving a step (resumed from an older checkpoint): set the old one aside
            replaced = output_dir / f"{final.name}.old-{secrets.token_hex(4)}"
            os.replace(final, replaced)
        os.replace(staging, final)
        _fsync_path(output_dir)
        if replaced is not None:
            shutil.rmtree(replaced)
        if save_total_limit is not None:
            prune_checkpoints(output_dir, save_total_limit, protect=final)
    sync()
    return final


def _find_staging(output_dir: Path, pattern: str) -> Path:
    deadline = time.monotonic() + _STAGING_TIMEOUT_S
    while True:
        found = list(output_dir.glob(pattern))
        if len(found) == 1:
            return found[0]
        if len(found) > 1 or time.monotonic() > deadline:
            raise RuntimeError(
                f"expected one staging directory {output_dir / pattern} from rank 0, found {len(found)}; "
                "do all ranks see output_dir on one shared filesystem?"
            )
        time.sleep(0.1)


def complete_checkpoints(output_dir: str | os.PathLike[str]) -> list[Path]:
    """Complete checkpoint directories in ``output_dir``, oldest step first (staging dirs ignored)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [path for path in output_dir.iterdir() if is_complete(path)]
    return sorted(found, key=_step_of)


def latest_checkpoint(output_dir: str | os.PathLike[str]) -> Path | None:
    """The complete checkpoint with the highest step in ``output_dir``, or None."""
    found = complete_checkpoints(output_dir)
    return found[-1] if found else None


def prune_checkpoints(
    output_dir: str | os.PathLike[str], keep: int, protect: Path | None = None
) -> list[Path]:
    """Delete the oldest complete checkpoints so that ``keep`` remain; return what was deleted.

    ``protect`` (the checkpoint just written) is never deleted and counts towards ``keep``;
    staging, incomplete and foreign directories are never touched.
    """
    if keep < 1:
        raise ValueError(f"prune_checkpoints: keep must be >= 1, got {keep}")
    found = complete_checkpoints(output_dir)
    excess = len(found) - keep
    protected = protect.resolve() if protect is not None else None
    doomed = [path for path in found if path.resolve() != protected][: max(0, excess)]
    for path in doomed:
        shutil.rmtree(path)
    return doomed


# --- loading ---------------------------------------------------------------------------------------


def resolve_resume(resume_from_checkpoint: str | None, output_dir: str | os.PathLike[str]) -> Path | None:
    """The checkpoint to resume from: None -> None (fresh start); ``"auto"`` -> the latest complete
    checkpoint in ``output_dir`` (None when there is none yet); a path -> that checkpoint, which must
    be complete."""
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "auto":
        return latest_checkpoint(output_dir)
    path = Path(resume_from_checkpoint)
    if not is_complete(path):
        latest = latest_checkpoint(path.parent) if path.parent.is_dir() else None
        hint = (
            f"; latest complete one there: {latest}"
            if latest
            else "; use 'auto' or a checkpoint-XXXXXXXX directory"
        )
        raise InputError(f"resume_from_checkpoint: {path} is not a complete checkpoint{hint}")
    return path


def check_checkpoint(
    path: str | os.PathLike[str], files: tuple[str, ...] = (), trainer_state: tuple[str, ...] = ()
) -> dict[str, Any]:
    """Read and return a complete checkpoint's ``meta.json``, or raise a one-line `InputError`: wrong
    format, missing keys, any of ``files`` or ``trainer_state`` entries absent, or a truncated / corrupt
    safetensors file (only headers are read: cheap, so it runs before any model work)."""
    path = Path(path)
    if not is_complete(path):
        raise InputError(f"{path} is not a complete checkpoint (no {META_FILE}, or files missing)")
    meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        version = meta.get("format_version") if isinstance(meta, dict) else None
        raise InputError(f"{path}: checkpoint format {version} is not {FORMAT_VERSION}")
    missing = [key for key in _META_KEYS if key not in meta]
    missing += [name for name in files if not (path / name).is_file()]
    state = meta.get("trainer_state")
    missing += [
        f"trainer_state.{key}" for key in trainer_state if not isinstance(state, dict) or key not in state
    ]
    if missing:
        raise InputError(
            f"{path} lacks {', '.join(missing)}: it was not written by a training run's save; "
            "resume from another checkpoint or start afresh (resume_from_checkpoint=null)"
        )
    for name in (MODEL_FILE, EMA_FILE):
        if (path / name).is_file():
            check_safetensors(path / name)
    return meta


def check_resume(resume_from_checkpoint: str | None, output_dir: str | os.PathLike[str]) -> Path | None:
    """`resolve_resume`, then `check_checkpoint` with everything a training run resumes from."""
    path = resolve_resume(resume_from_checkpoint, output_dir)
    if path is not None:
        check_checkpoint(path, RESUME_FILES, RESUME_TRAINER_STATE)
    return path


def _torch_load(file: Path, map_location: str | torch.device) -> Any:
    """``torch.load(weights_only=True)``; a truncated or corrupt file, or one holding anything but tensors
    and plain containers (refused, never unpickled), is a one-line `InputError` naming the file."""
    try:
        return torch.load(file, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as err:
        reason = (str(err).strip() or type(err).__name__).splitlines()[0][:200]
        raise InputError(
            f"{file} is truncated, corrupt or holds more than tensors ({reason}): "
            "resume from another checkpoint"
        ) from None


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    rank: int = 0,
    restore_rng: bool = True,
    generators: Mapping[str, torch.Generator] | None = None,
    map_location: str | torch.device = "cpu",
) -> Checkpoint:
    """Read a complete checkpoint; with ``restore_rng`` also restore this rank's RNG states (global
    generators and the named ``generators``) so that training continues with the same draws."""
    path = Path(path)
    meta = check_checkpoint(path)
    if restore_rng:
        if not (path / rng_file(rank)).is_file():
            raise InputError(
                f"{path} was written by {meta['world_size']} ranks and has no RNG state for rank {rank}; "
                f"resume with {meta['world_size']} processes, or pass restore_rng=False"
            )
        restore_rng_state(_torch_load(path / rng_file(rank), "cpu"), generators)

    def optional_tensors(name: str) -> dict[str, torch.Tensor] | None:
        return load_file(str(path / name), device=str(map_location)) if (path / name).is_file() else None

    def optional_state(name: str) -> dict[str, Any] | None:
        if not (path / name).is_file():
            return None
        return _torch_load(path / name, map_location)

    return Checkpoint(
        path=path,
        step=meta["step"],
        world_size=meta["world_size"],
        model_state=load_file(str(path / MODEL_FILE), device=str(map_location)),
        optimizer_state=optional_state(OPTIMIZER_FILE),
        scheduler_state=optional_state(SCHEDULER_FILE),
        ema_state=optional_tensors(EMA_FILE),
        sampler_state=optional_tensors(SAMPLER_FILE),
        data_state=meta["data_state"],
        trainer_state=meta["trainer_state"],
    )
