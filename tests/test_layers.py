"""The package's layers (pyproject.toml's import-linter contracts, docs/architecture.md) hold, and an import
that crosses one is caught."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(project: Path) -> subprocess.CompletedProcess:
    """lint-imports on the package in ``project`` (found first on PYTHONPATH), with its pyproject.toml."""
    return subprocess.run([str(LINT_IMPORTS), "--no-cache", "--no-logo", "--config", str(project / "pyproject.toml")],
                          cwd=project, env={**os.environ, "PYTHONPATH": str(project)}, capture_output=True,
                          text=True, timeout=300)


def broken(stdout: str) -> list[str]:
    """The names of the contracts lint-imports reports broken (a name may wrap over lines before BROKEN)."""
    summary = stdout.split("Contracts: ")[0]
    return [" ".join(block.split()) for block in summary.split("BROKEN")[:-1]]


def test_the_package_keeps_its_layers():
    proc = lint_imports(ROOT)
    assert proc.returncode == 0, proc.stdout
    assert "3 kept, 0 broken" in proc.stdout


@pytest.mark.parametrize("module, line, contract", [
    ("data/folds.py", "import mlflow", "Below tracking, nothing knows MLflow"),
    ("data/audio.py", "from rfcx_mlops.infer import detect", "Layers:"),
    ("learn/metrics.py", "import argparse", "Below tracking, nothing knows MLflow"),
    ("track/runs.py", "from rfcx_mlops.jobs import fit", "Layers:"),
    ("train.py", "import keras", "Command lines import no TensorFlow"),
])
def test_an_import_that_crosses_a_layer_fails_the_check(tmp_path, module, line, contract):
    shutil.copytree(ROOT / "rfcx_mlops", tmp_path / "rfcx_mlops", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    path = tmp_path / "rfcx_mlops" / module
    path.write_text(path.read_text() + f"\n{line}\n")
    proc = lint_imports(tmp_path)
    assert proc.returncode == 1, proc.stdout
    names = broken(proc.stdout)
    assert len(names) == 1 and contract in names[0], proc.stdout
    assert f"rfcx_mlops.{module[:-3].replace('/', '.')} ->" in proc.stdout
