"""Cheap checks of the files a user names, made before any model work.

Weights are loaded from safetensors only (never unpickled): a model folder with only pickle weights
(``*.bin``, ``*.pt``, ...) is refused with a command that converts it, and every safetensors file's
header is read first (``safe_open`` parses the header and checks that the data covers the file, without
reading the tensors), so a truncated or corrupt download is named before anything is loaded or written.
An output folder that cannot be one (a file stands there or above it) is refused the same way.
Frozen model folders are hard-linked into saved policies (`link_tree`) rather than copied.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from policies.errors import InputError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def check_safetensors(file: str | Path) -> None:
    """Raise `InputError` unless ``file`` is a complete, readable safetensors file."""
    from safetensors import SafetensorError, safe_open

    file = Path(file)
    if not file.is_file():
        raise InputError(f"{file} not found: re-download or regenerate the checkpoint")
    try:
        with safe_open(str(file), framework="pt"):
            pass
    except (SafetensorError, OSError) as err:
        reason = " ".join(str(err).split())
        raise InputError(f"{file} is truncated or corrupt ({reason}): re-download or regenerate it") from None


def conversion_command(folder: Path) -> str:
    """A shell command rewriting the pickle weights of a diffusers / transformers folder as safetensors."""
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    where = repr(str(folder))
    if config.get("_class_name"):  # diffusers
        library, cls, save = "diffusers", config["_class_name"], ", safe_serialization=True"
    elif config.get("architectures"):  # transformers (saves safetensors only)
        library, cls, save = "transformers", config["architectures"][0], ""
    else:  # a bare state dict
        pickles = sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        source, target = repr(str(pickles[0])), repr(str(pickles[0].with_suffix(".safetensors")))
        return (
            'python -c "import torch; from safetensors.torch import save_file; '
            f'save_file(torch.load({source}, weights_only=True), {target})"'
        )
    return (
        f'python -c "from {library} import {cls} as M; '
        f'M.from_pretrained({where}, use_safetensors=False).save_pretrained({where}{save})"'
    )


def check_model_weights(folder: str | Path, others: tuple[str, ...] = ()) -> None:
    """Raise `InputError` unless a diffusers / transformers model folder holds readable safetensors weights.

    A folder with only pickle weights is refused with `conversion_command`; a sharded checkpoint's index
    must name shards that exist; every ``*.safetensors`` header is read (milliseconds, even for GBs).
    ``others`` names safetensors files in the folder that are not the model's weights (left out here).
    """
    folder = Path(folder)
    weights = sorted(p for p in folder.glob("*.safetensors") if p.name not in others)
    if not weights:
        pickles = sorted(p.name for p in folder.glob("*") if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise InputError(
                f"{folder} has only pickle weights ({', '.join(pickles[:3])}); nextscene loads safetensors "
                f"only: convert with `{conversion_command(folder)}`"
            )
        raise InputError(f"{folder} has no weights (*.safetensors): re-download or regenerate the checkpoint")
    for index in folder.glob("*.safetensors.index.json"):
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (json.JSONDecodeError, KeyError, AttributeError, TypeError) as err:
            raise InputError(
                f"{index} is not a valid shard index ({err!r}): re-download or regenerate it"
            ) from None
        missing = sorted(name for name in shards if not (folder / name).is_file())
        if missing:
            raise InputError(f"{index} names missing shards {missing[:3]}: re-download the checkpoint")
    for file in weights:
        check_safetensors(file)


def check_output_dir(path: str | Path, what: str) -> None:
    """Raise `InputError` if ``path`` (the ``what`` option) cannot be a folder: it, or a parent, is a file."""
    path = Path(path)
    for candidate in (path, *path.parents):
        if candidate.exists():
            if not candidate.is_dir():
                where = "is a file" if candidate == path else f"is inside {candidate}, which is a file"
                raise InputError(f"{what}: {path} {where}; choose another folder or move the file away")
            return


def link_tree(source: str | Path, target: str | Path) -> int:
    """Mirror the folder ``source`` at ``target`` with a hard link per file, so a frozen model saved
    again (a 7B VLM in every saved policy) costs no disk: the bytes are stored once and stay valid
    when either folder is deleted. A file that cannot be linked (``target`` on another filesystem, or
    one without hard links) is copied instead. Returns the bytes copied (0 when all were linked).
    """
    source, target = Path(source), Path(target)
    copied = 0
    for folder, _, names in os.walk(source):
        into = target / Path(folder).relative_to(source)
        into.mkdir(parents=True, exist_ok=True)
        for name in names:
            src, dst = Path(folder) / name, into / name
            if dst.exists() and os.path.samefile(src, dst):
                continue
            dst.unlink(missing_ok=True)
            try:
                os.link(src, dst)
            except OSError:  # another filesystem, or links unsupported: the one case that copies
                shutil.copy2(src, dst)
                copied += dst.stat().st_size
    return copied


def fresh_dir(path: str | Path) -> Path:
    """An empty folder at ``path``, removing what was there first: a file there may be a hard link
    (`link_tree`) whose bytes another checkpoint shares, and writing over it in place would change
    that checkpoint too."""
    path = Path(path)
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path
