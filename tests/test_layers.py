"""The house's layering (pyproject.toml, [tool.importlinter]): no import cycles between a package's modules, every layer
imports only the layers below it, and the ground floor (mmtune.engine) imports no other part of mmtune — checked by
import-linter on the tree as it is, and shown to fail on a copy with a cycle or an upward import put back."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")

pytestmark = pytest.mark.skipif(not LINT.exists(), reason="import-linter is not installed (pip install -e '.[dev]')")


def _lint(tree: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT), "--no-cache"], cwd=tree, env={"PYTHONPATH": str(tree / "src"), "PATH": ""},
                          capture_output=True, text=True, timeout=300)


def test_the_layers_hold():
    result = _lint(ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "3 kept, 0 broken" in result.stdout


@pytest.mark.parametrize("file, line, broken", [
    ("data/record.py", "import mmtune.train", "No import cycles between the modules of a package BROKEN"),
    ("methods/base.py", "from mmtune.step import Step", "Layers import only downwards BROKEN"),
    ("engine.py", "from mmtune.config import RunConfig", "mmtune.engine) imports only torch, Accelerate and DeepSpeed BROKEN"),
])
def test_a_cycle_or_an_upward_import_put_back_breaks_a_contract(tmp_path, file, line, broken):
    shutil.copytree(ROOT / "src" / "mmtune", tmp_path / "src" / "mmtune",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    with (tmp_path / "src" / "mmtune" / file).open("a") as handle:
        handle.write(f"\n{line}  # noqa\n")
    result = _lint(tmp_path)
    assert result.returncode != 0 and broken in result.stdout, result.stdout[-3000:]


def test_no_function_is_longer_than_a_screen():
    """Issue 39: a reader finds each step of the algorithm in a function that fits on a screen (≤ 80 lines)."""
    import ast

    long = [f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for path in sorted((ROOT / "src" / "mmtune").rglob("*.py"))
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80]
    assert not long, long
