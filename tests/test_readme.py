"""The README and CONTRIBUTING as tests: what they show runs, what they name exists, what they measure
has a source.

* Every ```python block runs as written in a fresh interpreter, with only the substitutions the README
  itself announces (`SUBSTITUTIONS`: a tiny checkpoint for ``/ckpt/LTX-Video``, the machine's device,
  small sizes for the real-scale ones, one training iteration).
* Files named in the docs (recipes, benchmarks, checkpoints, CI scripts) exist; every shipped recipe
  and every data kind and stage is listed; ``nextscene`` options the docs use exist.
* Every table or paragraph of results carries ``<!-- source: FILE ... -->`` and its decimal numbers are
  found in that file (a result JSON that a script writes, or a shipped ``provenance.json``).
* The documented way to regenerate a shipped checkpoint keeps its ``provenance.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = {name: (ROOT / name).read_text() for name in ("README.md", "CONTRIBUTING.md")}
README = DOCS["README.md"]

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# what the README's examples say at real scale -> what the test runs (the README announces each one)
SUBSTITUTIONS = {
    "/ckpt/LTX-Video": "{tiny_ltx}",
    "/ckpt/LTX-2": "{tiny_ltx2}",
    'device="cuda"': f'device="{DEVICE}"',
    "num_frames=121, height=512, width=768": "num_frames=9, height=64, width=64",
    "max_iterations=100": "max_iterations=1",
}


FENCE = re.compile(r"^ *```(\w*)\n(.*?)^ *```", re.M | re.S)


def _blocks(text: str, language: str) -> list[tuple[str, str]]:
    """(nearest heading above, dedented body) of every fenced block of ``language``."""
    found, heading = [], "top"
    for match in re.finditer(rf"^(#+ [^\n]*)$|{FENCE.pattern}", text, re.M | re.S):
        if match.group(1):
            heading = match.group(1).lstrip("# ").strip()
        elif match.group(2) == language:
            found.append((heading, textwrap.dedent(match.group(3))))
    return found


PYTHON_EXAMPLES = [
    (f"{name}:{heading}", body) for name, text in DOCS.items() for heading, body in _blocks(text, "python")
]


def test_the_readme_announces_every_substitution():
    """An entry of the table that the README does not use, or does not announce, would be a silent edit."""
    for real in SUBSTITUTIONS:
        assert any(real in body for _, body in PYTHON_EXAMPLES), f"no README example uses {real!r}"
    said = README[: README.index("```python")]  # the announcement comes before the first example
    phrases = ["`/ckpt/LTX-Video`", "`/ckpt/LTX-2`", '`"cuda"`', "121 frames at 512x768"]
    phrases.append("`max_iterations=100`")
    for phrase in phrases:
        assert phrase in said, f"the README does not announce the substitution of {phrase}"


@pytest.fixture(scope="module")
def tiny_ltx(tmp_path_factory) -> Path:
    from policies.tiny import build_tiny_ltx

    return build_tiny_ltx(tmp_path_factory.mktemp("ckpt") / "tiny_ltx")


@pytest.fixture(scope="module")
def tiny_ltx2(tmp_path_factory) -> Path:
    from policies.tiny_ltx2 import build_tiny_ltx2

    return build_tiny_ltx2(tmp_path_factory.mktemp("ckpt") / "tiny_ltx2", seed=0)


@pytest.mark.parametrize("name,body", PYTHON_EXAMPLES, ids=[name for name, _ in PYTHON_EXAMPLES])
def test_python_example_runs_as_written(name, body, tiny_ltx, tiny_ltx2, tmp_path):
    for real, small in SUBSTITUTIONS.items():
        body = body.replace(real, small.format(tiny_ltx=tiny_ltx, tiny_ltx2=tiny_ltx2))
    (tmp_path / "checkpoints").symlink_to(
        ROOT / "checkpoints"
    )  # the shipped tiny policies, as from the repo root
    script = tmp_path / "example.py"
    script.write_text(body)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    result = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, f"{name} failed:\n{result.stderr[-3000:]}"


# ------------------------------------------------------------------------------ names that must exist


def _code_spans(text: str) -> list[str]:
    """Fenced blocks (any language) and inline code spans."""
    fenced = [body for _, body in FENCE.findall(text)]
    rest = FENCE.sub("", text)
    return fenced + re.findall(r"`([^`\n]+(?:\n[^`\n]+)?)`", rest)


def _expand(path: str) -> list[str]:
    """Shell brace expansion of one ``{a,b}`` group: ``x_{a,b}.yaml`` -> ``x_a.yaml``, ``x_b.yaml``."""
    match = re.search(r"\{([^{}]*)\}", path)
    if not match:
        return [path]
    return [path[: match.start()] + part + path[match.end() :] for part in match.group(1).split(",")]


PLACEHOLDERS = {"recipes/my_recipe.yaml", "benchmarks/results/X.json"}  # the docs' stand-ins


def test_files_named_in_the_docs_exist():
    missing = []
    for name, text in DOCS.items():
        for path in re.findall(
            r"(?<![\w/])((?:recipes|benchmarks|checkpoints|tests|\.ci)/[\w./{},-]*\w/?)", text
        ):
            for one in _expand(path):
                if one not in PLACEHOLDERS and not (ROOT / one).exists():
                    missing.append(f"{name}: {one}")
    assert not missing, missing


def test_recipe_names_in_the_docs_exist():
    """Bare recipe names (`toy_nsp_sft.yaml`) are files of recipes/ too."""
    recipes = {p.name for p in (ROOT / "recipes").rglob("*.yaml")}
    named = {
        one
        for text in DOCS.values()
        for span in re.findall(r"`([\w{},]+\.yaml)`", text)
        for one in _expand(span)
    }
    assert named - {"resolved_recipe.yaml"} <= recipes, sorted(named - recipes)


def test_every_shipped_recipe_is_listed_in_the_readme():
    table = {m for m in re.findall(r"^\| `([\w]+\.yaml)` \|", README, re.M)}
    assert table == {p.name for p in (ROOT / "recipes").glob("*.yaml")}


def test_every_data_kind_and_stage_is_documented():
    from grpo.cli import main
    from grpo.recipe import STAGES, TRAINER_CONFIGS

    for kind in {kind for stage in STAGES.values() for kind in stage.data}:
        assert f"`{kind}`" in README, f"data kind {kind!r} is not in the README"
    stages = " | ".join(TRAINER_CONFIGS)
    assert f"stage: grpo                  # {stages}" in README
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        main(["train", "--help"])
    assert all(stage in out.getvalue() for stage in TRAINER_CONFIGS), out.getvalue()


def _nextscene_commands(text: str) -> list[list[str]]:
    """Each ``nextscene ...`` command line of the docs' code, as argv (without ``nextscene``)."""
    commands = []
    for span in _code_spans(text):
        for line in re.split(r"&&|;|\n", span.replace("\\\n", " ")):
            line = line.split("#")[0].strip()
            if line.startswith("nextscene "):
                commands.append(shlex.split(line)[1:])
    return commands


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(actions[0].choices) if actions else {}


def test_nextscene_options_in_the_docs_exist():
    from grpo.cli import build_parser

    commands = [c for text in DOCS.values() for c in _nextscene_commands(text)]
    assert len(commands) >= 10  # the extraction finds the docs' commands
    unknown = []
    for argv in commands:
        parser, words = build_parser(), list(argv)
        while words and words[0] in _subcommands(parser):
            parser = _subcommands(parser)[words.pop(0)]
        assert parser.prog != "nextscene", f"unknown sub-command in: nextscene {' '.join(argv)}"
        options = {s for a in parser._actions for s in a.option_strings}
        for word in words:
            option = word.strip("[]").split("=")[0]
            if option.startswith("--") and option not in options:
                unknown.append(f"{parser.prog}: {option}")
    assert not unknown, unknown


def test_nsp_options_example_is_a_valid_policy_section():
    """The README's `policy.overrides` example validates, and its options are NSPConfig fields."""
    from grpo.recipe import from_dict
    from grpo.train import NSPPolicySpec
    from policies.nsp import NSPConfig

    (body,) = [b for _, b in _blocks(README, "yaml") if "overrides:" in b]
    spec = from_dict(NSPPolicySpec, yaml.safe_load(body)["policy"], where="policy")
    assert spec.overrides and NSPConfig(**spec.overrides).vision_input == "images"


# ------------------------------------------------------------------------------ numbers and sources

# tables of parameters, not of results (their header rows)
PARAMETER_TABLES = {"| kind | what | noise_level |", "| column | required | meaning |"}
SOURCE = re.compile(r"<!-- source: (.*?) -->")
# '3.1x', '7.0 %', '1.2e-7' count; 'Qwen2.5', '0.42.1' do not
DECIMAL = re.compile(r"(?<![\w.])(\d+\.\d+(?:e-?\d+)?)(?!\d|\.\d)")


def _sourced_blocks(text: str) -> list[tuple[list[str], str]]:
    """(source files, text) for every marker: the table below it, or the rest of its paragraph / bullet."""
    blocks, lines = [], text.splitlines()
    for i, line in enumerate(lines):
        if not (match := SOURCE.search(line)):
            continue
        files = match.group(1).split()
        after = line[match.end() :]
        rest = lines[i + 1 :]
        # a table right below (indented when it is inside a bullet)
        if not after.strip() and rest and rest[0].lstrip().startswith("|"):
            block = [s.lstrip() for s in itertools.takewhile(lambda s: s.lstrip().startswith("|"), rest)]
        else:
            end = (j for j, s in enumerate(rest) if not s.strip() or re.match(r"\s*(\* |\||```)", s))
            block = [after, *rest[: next(end, len(rest))]]
        blocks.append((files, "\n".join(block)))
    return blocks


def _numbers(value) -> list[float]:
    """Every number in a JSON value, including the decimals written inside its strings."""
    if isinstance(value, bool):
        return []
    if isinstance(value, int | float):
        return [float(value)]
    if isinstance(value, str):
        return [float(x) for x in DECIMAL.findall(value)]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list):
        return [x for v in value for x in _numbers(v)]
    return []


def _found(shown: str, numbers: list[float]) -> bool:
    """``shown`` (as printed, e.g. '0.245' or '7.0') is some number of the file rounded to its
    decimals, as it is, as a percentage, or as seconds shown in minutes."""
    mantissa, _, exponent = shown.partition("e")
    decimals = len(mantissa.split(".")[1])
    target = float(shown)
    if exponent:  # as many significant digits as shown
        return any(f"{abs(x):.{decimals}e}" == f"{target:.{decimals}e}" for x in numbers)
    return any(
        abs(abs(round(scale * x, decimals)) - target) < 1e-9
        for x in numbers
        for scale in (1.0, 100.0, 1 / 60)
    )


def _cell(row: list[str], col: int) -> float:
    value = float(DECIMAL.search(row[col]).group(1))
    return -value if row[col].startswith("-") else value


def _without_derived(block: str) -> str:
    """A table's derived columns are checked against the columns they come from and removed (the other
    numbers must be in the source file): 'gain' = the two columns to its left, after - before;
    'scaling' = 'samples/s per GPU' over that of the 1-GPU row of the same mode (its first word)."""
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in block.splitlines()]
    if not block.startswith("|"):
        return block
    header, body = rows[0], rows[2:]
    if "gain" in header:
        col = header.index("gain")
        for row in body:
            assert abs(_cell(row, col - 1) - _cell(row, col - 2) - _cell(row, col)) <= 0.0015, row
            row[col] = ""
    if "scaling" in header:
        col, rate, gpus = header.index("scaling"), header.index("samples/s per GPU"), header.index("GPUs")
        single = {row[0].split()[0]: _cell(row, rate) for row in body if row[gpus] == "1"}
        for row in body:
            assert abs(_cell(row, rate) / single[row[0].split()[0]] - _cell(row, col)) <= 0.01, row
            row[col] = ""
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def test_readme_numbers_have_a_source():
    blocks = _sourced_blocks(README)
    assert len(blocks) >= 8
    for files, block in blocks:
        numbers = []
        for name in files:
            path = ROOT / name
            assert path.is_file() and path.suffix == ".json", f"source {name} is not a JSON file of the repo"
            numbers += _numbers(json.loads(path.read_text()))
        missing = [n for n in DECIMAL.findall(_without_derived(block)) if not _found(n, numbers)]
        assert not missing, f"{missing} are not in {files}:\n{block}"

    # every table of results carries a source marker
    lines = README.splitlines()
    for i, line in enumerate(lines):
        starts_table = line.startswith("|") and not lines[i - 1].startswith("|")
        if starts_table and line.strip() not in PARAMETER_TABLES:
            table = "\n".join(itertools.takewhile(lambda s: s.startswith("|"), lines[i:]))
            if DECIMAL.search(table):
                assert SOURCE.search(lines[i - 1]), f"table without <!-- source: ... -->:\n{table}"


def test_the_source_check_catches_a_number_not_in_the_file():
    files, block = _sourced_blocks(README)[0]
    numbers = [x for name in files for x in _numbers(json.loads((ROOT / name).read_text()))]
    shown = DECIMAL.findall(block)
    assert shown and all(_found(n, numbers) for n in shown)
    assert not _found("0.123456", numbers)


# ------------------------------------------------------------------------------ shipped checkpoints


def _regeneration_commands() -> list[str]:
    readme = [b for _, b in _blocks(README, "bash") if "cp -r runs/" in b]
    shipped = [json.loads(p.read_text())["command"] for p in (ROOT / "checkpoints").glob("*/provenance.json")]
    return [b.replace("\\\n", " ") for b in readme] + shipped


def test_each_shipped_checkpoint_has_a_regeneration_command_in_the_readme():
    commands = _regeneration_commands()
    assert len(commands) == 2 * len(list((ROOT / "checkpoints").glob("*/provenance.json")))


@pytest.mark.parametrize("command", _regeneration_commands())
def test_regeneration_command_keeps_provenance(command, tmp_path):
    """Run the documented command with a stand-in `nextscene train` (writes runs/<recipe>/final): the new
    checkpoint replaces the old weights and keeps provenance.json."""
    (bin_dir := tmp_path / "bin").mkdir()
    fake = bin_dir / "nextscene"
    fake.write_text(
        '#!/bin/sh\nset -e\nname=$(basename "$2" .yaml)\nmkdir -p runs/$name/final\n'
        "echo new > runs/$name/final/new.safetensors\n"
    )
    fake.chmod(0o755)
    target = re.search(r"rm -rf (checkpoints/\w+)", command).group(1)
    provenance = (ROOT / target / "provenance.json").read_text()
    (tmp_path / target).mkdir(parents=True)
    (tmp_path / target / "provenance.json").write_text(provenance)
    (tmp_path / target / "old.safetensors").write_text("old")
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run(["bash", "-euo", "pipefail", "-c", command], cwd=tmp_path, env=env, check=True, timeout=60)
    assert sorted(p.name for p in (tmp_path / target).iterdir()) == ["new.safetensors", "provenance.json"]
    assert (tmp_path / target / "provenance.json").read_text() == provenance
