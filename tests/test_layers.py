"""The packages' layers: policies < rewards < grpo, no import cycles inside a package (`lint-imports`
with the contracts in pyproject.toml), and no function-level imports that hide a cycle.

``python tests/test_layers.py`` lists the library's function-level imports of project modules.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("policies", "rewards", "grpo")


def function_level_imports(package: str) -> list[str]:
    """``path:line: module`` of every import of a project module inside a function of ``package``."""
    found = set()
    for path in sorted((ROOT / package).rglob("*.py")):
        for function in ast.walk(ast.parse(path.read_text())):
            if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for node in ast.walk(function):
                if isinstance(node, ast.ImportFrom):
                    modules = ["." * node.level + (node.module or "")]
                elif isinstance(node, ast.Import):
                    modules = [alias.name for alias in node.names]
                else:
                    continue
                for module in modules:
                    if module.startswith(".") or module.split(".")[0] in PACKAGES:
                        found.add((str(path.relative_to(ROOT)), node.lineno, module))
    return [f"{file}:{line}: {module}" for file, line, module in sorted(found)]


def test_lint_imports_keeps_the_layer_and_no_cycle_contracts():
    command = Path(sys.executable).with_name("lint-imports")
    assert command.is_file(), "lint-imports is missing: pip install -e '.[dev]' (import-linter)"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [str(command), "--no-cache"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 2 kept, 0 broken." in result.stdout, result.stdout


def test_project_modules_are_imported_at_module_level_but_to_keep_torch_out_of_the_toyworld_command():
    """Function-level project imports hid imports of upper layers and cycles; the one left keeps
    ``nextscene toyworld`` (`grpo.data.toyworld_cli`) free of torch (tests/test_nsp_dataset.py)."""
    found = [line for package in PACKAGES for line in function_level_imports(package)]
    assert [f"{line.split(':')[0]}: {line.split(': ')[1]}" for line in found] == [
        "grpo/data/toyworld_cli.py: grpo.data.toyworld"
    ], found


def test_moved_helpers_keep_their_old_import_paths():
    import grpo.data.toyworld
    import grpo.data.video
    import grpo.seeding
    import grpo.trainer
    import policies.seeding
    import policies.toy_geometry
    import policies.video_io
    from grpo import evaluation

    assert grpo.data.toyworld.disc_coverage is policies.toy_geometry.disc_coverage
    assert grpo.data.video.read_video is policies.video_io.read_video
    assert grpo.seeding.derived_seed is policies.seeding.derived_seed
    assert grpo.trainer.reward_metadata is evaluation.reward_metadata


if __name__ == "__main__":
    lines = [line for package in PACKAGES for line in function_level_imports(package)]
    print("\n".join(lines + [f"{len(lines)} function-level imports of project modules"]))
