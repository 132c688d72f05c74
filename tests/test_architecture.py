"""The architecture, enforced: the import-linter contracts of pyproject.toml (layers tools > analysis,
robustness > pretrain, finetune, detection > core; no cycles between siblings) hold for the code.

The repository's folders map onto ``rcmae.*`` (pyproject's ``package-dir``), which import-linter cannot
follow: the check runs on a copy of the sources laid out as the installed package."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("importlinter")


def package_tree(dest: Path) -> Path:
    """``rcmae/...`` as installed: every package of pyproject's ``package-dir`` at its import path."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = setuptools["package-dir"]
    for package in setuptools["packages"]:
        top = next(p for p in sorted(folders, key=len, reverse=True) if package == p or package.startswith(p + "."))
        src = ROOT / folders[top] / Path(*package.split(".")[len(top.split(".")):])
        target = dest / Path(*package.split("."))
        target.mkdir(parents=True, exist_ok=True)
        for file in src.glob("*.py"):
            shutil.copy(file, target / file.name)
    shutil.copy(ROOT / "pyproject.toml", dest / "pyproject.toml")
    return dest


def lint_imports(tree: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(tree), "COLUMNS": "200"}  # one line per contract
    return subprocess.run([sys.executable, "-c", "from importlinter.cli import lint_imports_command as c; c()",
                           "pyproject.toml", "--no-cache"], cwd=tree, env=env, capture_output=True,
                          text=True, timeout=300)


def test_the_import_contracts_hold(tmp_path):
    res = lint_imports(package_tree(tmp_path))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Contracts: 3 kept, 0 broken." in res.stdout


@pytest.mark.parametrize("module, line, broken", [
    ("rcmae/core/run.py", "import rcmae.pretrain.rcmae", "Layers"),           # the ground floor importing a job
    ("rcmae/pretrain/train.py", "import rcmae.finetune.train", "Layers"),     # one job importing another
    ("rcmae/core/data/shards.py", "import rcmae.core.data.datasets", "No cycles"),  # a cycle inside the data package
])
def test_a_violation_breaks_a_contract(tmp_path, module, line, broken):
    tree = package_tree(tmp_path)
    path = tree / module
    path.write_text(path.read_text() + f"\n{line}  # the violation\n")
    res = lint_imports(tree)
    assert res.returncode != 0 and "BROKEN" in res.stdout, res.stdout
    assert any(broken in row and "BROKEN" in row for row in res.stdout.splitlines()), res.stdout
