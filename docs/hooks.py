"""MkDocs hook: let mkdocstrings (griffe) find ``rcmae.pretrain``, ``rcmae.finetune``, ... by their import names.

The ``rcmae`` namespace is mapped onto the repository's folders by ``[tool.setuptools.package-dir]`` in
``pyproject.toml`` (``pretrain/`` is ``rcmae.pretrain``, ...). Python follows that mapping (the editable
install's finder, or the installed wheel), but griffe reads packages from disk by folder name and would
look for ``rcmae/pretrain/``. So before the build this hook lays out the namespace as Python sees it, in
a temporary folder of symbolic links (``rcmae/`` with the entries of the ``rcmae`` folder, plus
``rcmae/pretrain`` -> ``pretrain/``, ...), read from ``pyproject.toml``, and puts that folder first in
the Python handler's ``paths``. The source files are the repository's own: nothing is copied.

It also publishes the measurements of ``benchmarks/results/`` (figures, CSVs) with the site, under the
same path, so that the pages can show them without a copy in ``docs/``.
"""
from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

import tomllib
from mkdocs.plugins import event_priority
from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parent.parent
PUBLISHED = ("benchmarks/results",)  # folders of the repository served with the site, at the same path


def package_dirs(root: Path = ROOT) -> dict[str, Path]:
    """``{import name: folder}`` of ``[tool.setuptools.package-dir]``."""
    setuptools = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    return {name: root / folder for name, folder in setuptools.get("package-dir", {}).items() if name}


def _materialise(link: Path) -> None:
    """A folder of links to the entries of the folder ``link`` points to, in place of the link itself."""
    target = link.resolve()
    link.unlink()
    link.mkdir()
    for entry in target.iterdir():
        if entry.name != "__pycache__":
            (link / entry.name).symlink_to(entry)


def build_view(dest: Path, mapping: dict[str, Path]) -> Path:
    """The namespace of ``mapping`` as folders under ``dest``; parents before children."""
    for name, folder in sorted(mapping.items(), key=lambda item: item[0].count(".")):
        path = dest.joinpath(*name.split("."))
        parent = path.parent
        if parent != dest:
            if parent.is_symlink():
                _materialise(parent)
            elif not parent.is_dir():
                raise FileNotFoundError(f"{name}: its parent package has no folder in [tool.setuptools.package-dir]")
        if path.is_symlink() or path.exists():
            if path.is_symlink():
                path.unlink()
            else:
                shutil.rmtree(path)
        path.symlink_to(folder, target_is_directory=True)
        if parent == dest:
            _materialise(path)  # top-level: a real folder, so that mapped subpackages can be added to it
    return dest


@event_priority(100)  # before mkdocstrings' own on_config, which starts the handlers
def on_config(config, **kwargs):
    view = Path(tempfile.mkdtemp(prefix="rcmae-docs-view-"))
    atexit.register(shutil.rmtree, view, ignore_errors=True)
    build_view(view, package_dirs())
    python = config.plugins["mkdocstrings"].config.handlers.setdefault("python", {})
    python["paths"] = [str(view), *python.get("paths", [])]
    return config


def on_files(files, config, **kwargs):
    for folder in PUBLISHED:
        for path in sorted((ROOT / folder).rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                files.append(File.generated(config, path.relative_to(ROOT).as_posix(), abs_src_path=str(path)))
    return files
