"""The import rules of docs/architecture.md hold: `lint-imports` checks the contracts in pyproject.toml."""

from __future__ import annotations

import pkgutil
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import iot2ml

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"


def lint_imports(*args: str) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).with_name("lint-imports")
    command = str(exe) if exe.exists() else shutil.which("lint-imports")
    assert command, "lint-imports is missing: pip install -e '.[test]'"
    return subprocess.run([command, "--no-cache", "--no-logo", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_imports_keep_the_layers():
    run = lint_imports()
    assert run.returncode == 0, f"an import breaks the layers of docs/architecture.md:\n{run.stdout}{run.stderr}"
    assert "0 broken" in run.stdout


def test_imports_inside_functions_count(tmp_path):
    """The workbench imports the lake inside a method: without its listed edge the contract breaks."""
    text = PYPROJECT.read_text()
    edge = '  "iot2ml.ml.workbench -> iot2ml.lake",\n'
    assert edge in text
    config = tmp_path / "pyproject.toml"
    config.write_text(text.replace(edge, ""))
    run = lint_imports("--contract", "services", str(config))
    assert run.returncode == 1 and "iot2ml.ml.workbench -> iot2ml.lake" in run.stdout, run.stdout + run.stderr


def test_every_top_level_module_has_a_place_in_the_contracts():
    contracts = tomllib.loads(PYPROJECT.read_text())["tool"]["importlinter"]["contracts"]
    placed = {m for c in contracts for key in ("source_modules", "forbidden_modules", "modules")
              for m in c.get(key, [])}
    modules = {f"iot2ml.{m.name}" for m in pkgutil.iter_modules(iot2ml.__path__)}
    assert modules - placed == set(), "name the new module in pyproject's [tool.importlinter] contracts"
