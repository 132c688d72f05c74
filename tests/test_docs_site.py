"""The manual (docs/, a MkDocs site) builds with ``mkdocs build --strict``: no broken link or anchor between
its pages, every page in the nav, every API page's module found (mkdocstrings); and the README stays a
short front page whose links to the manual lead to existing pages and anchors."""
import importlib.util
import os
import re
import shutil
import subprocess
import sys

import pytest
from fixtures import ROOT

README_MAX_LINES = 200
LINK = re.compile(r"\]\(([^)\s]+)\)")


def slugs(markdown: str) -> set[str]:
    """The anchors MkDocs' toc extension gives the headings of a page (its default slugify)."""
    out = set()
    fence = False
    for line in markdown.splitlines():
        if line.startswith("```"):
            fence = not fence
        m = re.match(r"^#{1,6} (.+?)\s*#*$", line)
        if m and not fence:
            text = re.sub(r"[^\w\s-]", "", m.group(1).replace("`", "")).strip().lower()
            out.add(re.sub(r"[-\s]+", "-", text))
    return out


def test_readme_is_short():
    n = len((ROOT / "README.md").read_text().splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines: move reference text to docs/ (at most {README_MAX_LINES})"


def test_readme_links_to_the_manual_exist():
    links = [t for t in LINK.findall((ROOT / "README.md").read_text()) if t.startswith("docs/")]
    assert links, "the README links to no page of the manual"
    for target in links:
        path, _, anchor = target.partition("#")
        page = ROOT / path
        assert page.is_file(), f"README links to {path}, which does not exist"
        if anchor:
            assert anchor in slugs(page.read_text()), f"README links to {target}: {path} has no heading '{anchor}'"


def test_readme_keeps_the_quick_start_commands():
    """.ci/run reads the test command from the Quick start's block; users copy the first line."""
    text = (ROOT / "README.md").read_text()
    block = text.split("## Quick start", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    assert block.splitlines() == [
        "pip install torch==2.14.1 torchvision==0.29.1 -e . && python tools/pretrain.py",
        ('pip install torch==2.14.1 torchvision==0.29.1 -e ".[dev]" && bash tools/install_detectron2.sh && '
         "python -m pytest -n 2 --dist loadfile"),
    ]


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("material") is None
                    or importlib.util.find_spec("mkdocstrings") is None,
                    reason="mkdocs, mkdocs-material or mkdocstrings is not installed (pip install -e '.[dev]')")
def test_site_builds_strict(tmp_path):
    """``mkdocs build --strict``: any warning (a link to a missing page, a missing anchor, a page out of
    the nav, a module mkdocstrings cannot collect) fails the build."""
    site = tmp_path / "site"
    res = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"),
                          "-d", str(site)], check=False, cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    for page in ("index.html", "pretrain/index.html", "api/pretrain/index.html"):
        assert (site / page).is_file(), page
    api = (site / "api" / "pretrain" / "index.html").read_text()
    assert 'id="rcmae.pretrain.rcmae.RCMAE"' in api, "mkdocstrings did not document rcmae.pretrain.rcmae"
    assert (site / "benchmarks" / "results" / "analyze_teacher" / "compare_curves.png").is_file()
    shutil.rmtree(site)

