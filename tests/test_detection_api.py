"""Every detectron2 API the project uses exists in the installed detectron2 (and, given a detectron2
git clone in DETECTRON2_GIT_DIR, at the commit tools/install_detectron2.sh pins).

The names are collected from the sources (detection/, tools/train_det.py, configs/detection/), not
listed by hand: modules, functions and classes imported from detectron2, attributes read from them,
methods our subclasses override, the model-zoo files the configs load and the config keys they set.
"""
import ast
import importlib
import json
import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("detectron2", reason="run tools/install_detectron2.sh")

from fixtures import ROOT  # noqa: E402

SOURCES = sorted([*ROOT.glob("detection/*.py"), ROOT / "tools" / "train_det.py",
                  *ROOT.glob("configs/detection/**/*.py")])
CONFIGS = sorted(p for p in ROOT.glob("configs/detection/*.py"))
INSTALL_SCRIPT = ROOT / "tools" / "install_detectron2.sh"
OUR_TRAIN_KEYS = {"init_which", "allow_scratch"}  # keys this project adds to detectron2's `train` dict
# used on detectron2 objects, which the import-based collection cannot see
CLASS_MEMBERS = ["detectron2.checkpoint.DetectionCheckpointer.has_checkpoint",
                 "detectron2.checkpoint.DetectionCheckpointer.get_checkpoint_file",
                 "detectron2.checkpoint.DetectionCheckpointer.load",
                 "detectron2.engine.SimpleTrainer.reset_data_loader"]
VIT_ATTRIBUTES = ("pretrain_use_cls_token", "pos_embed", "patch_embed")
OPTIONAL = {"detectron2._C"}  # compiled ops, absent from the pure-Python fallback (evaluation.has_compiled_ops)


def used_names(source: str) -> set[str]:
    """Dotted detectron2 names a Python file uses."""
    tree = ast.parse(source)
    alias, used = {}, set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "detectron2":
                    used.add(a.name)
                    alias[a.asname or "detectron2"] = a.name if a.asname else "detectron2"
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module.split(".")[0] == "detectron2":
            for a in node.names:
                used.add(f"{node.module}.{a.name}")
                alias[a.asname or a.name] = f"{node.module}.{a.name}"

    def dotted(node):
        parts = []
        while isinstance(node, ast.Attribute):
            parts.append(node.attr)
            node = node.value
        if isinstance(node, ast.Name) and node.id in alias:
            return ".".join([alias[node.id], *reversed(parts)])
        return None

    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and dotted(node):
            used.add(dotted(node))
        elif isinstance(node, ast.ClassDef):  # an override of a method the base lacks would never run
            for base in filter(None, map(dotted, node.bases)):
                used.update(f"{base}.{f.name}" for f in node.body if isinstance(f, ast.FunctionDef))
    return used


def resolve(name: str):
    """The object a dotted name stands for; AttributeError / ImportError if it does not exist."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        module_name = ".".join(parts[:i])
        try:
            obj = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if not (module_name == e.name or module_name.startswith(f"{e.name}.")):
                raise  # the module exists but needs something missing
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(name)


def api_problems() -> list[str]:
    """What the project uses and the importable detectron2 lacks, one line each."""
    from detectron2 import model_zoo
    from detectron2.config import LazyConfig
    from detectron2.data import DatasetCatalog

    from rcmae.detection.preflight import unknown_arguments

    problems = []
    names = set().union(*(used_names(p.read_text()) for p in SOURCES), CLASS_MEMBERS) - OPTIONAL
    for name in sorted(names):
        try:
            resolve(name)
        except (AttributeError, ImportError) as e:
            problems.append(f"{name}: {type(e).__name__}: {e}")
    vit = resolve("detectron2.modeling.ViT")(img_size=32, patch_size=16, embed_dim=16, depth=1, num_heads=1)
    problems += [f"a ViT has no attribute {a}" for a in VIT_ATTRIBUTES if not hasattr(vit, a)]

    zoo_uses = {m for p in SOURCES for m in re.findall(r"model_zoo\.get_config\(\s*\"([^\"]+)\"\s*\)\.(\w+)",
                                                       p.read_text())}
    assert len(zoo_uses) >= 4, zoo_uses  # models, train, data, optim: the collection itself works
    for file, attr in sorted(zoo_uses):
        try:
            getattr(model_zoo.get_config(file), attr)
        except Exception as e:  # noqa: BLE001 - reported, whatever it is
            problems.append(f"model zoo {file}: .{attr}: {type(e).__name__}: {e}")
    zoo_train_keys = set(model_zoo.get_config("common/train.py").train)
    builtins = set(DatasetCatalog.list())
    for path in CONFIGS:
        cfg = LazyConfig.load(str(path))
        problems += [f"{path.name}: {p}" for p in unknown_arguments(cfg)]
        problems += [f"{path.name}: train.{k} is not a key of the model zoo's common/train.py"
                     for k in sorted(set(cfg.train) - OUR_TRAIN_KEYS - zoo_train_keys)]
        for split in ("train", "test"):
            name = cfg.dataloader[split].dataset.names
            if name not in builtins and name not in cfg.get("datasets", {}):
                problems.append(f"{path.name}: dataset {name} is neither registered by path nor a builtin")
    return problems


def test_collection_finds_what_the_sources_use():
    names = set().union(*(used_names(p.read_text()) for p in SOURCES))
    for name in ("detectron2.utils.comm.create_local_process_group", "detectron2.engine.hooks.EvalHook",
                 "detectron2.data.transforms.ResizeScale", "detectron2.model_zoo.get_config",
                 "detectron2.evaluation.COCOEvaluator.evaluate", "detectron2.engine.create_ddp_model"):
        assert name in names, name


def test_every_detectron2_api_used_exists_in_the_installed_detectron2():
    assert api_problems() == []


def test_the_api_check_reports_what_is_missing(monkeypatch):
    from detectron2.utils import comm

    monkeypatch.delattr(comm, "create_local_process_group")
    assert api_problems() == ["detectron2.utils.comm.create_local_process_group: AttributeError: module "
                              "'detectron2.utils.comm' has no attribute 'create_local_process_group'"]


def pinned_commit() -> str:
    commits = re.findall(r"^COMMIT=([0-9a-f]+)$", INSTALL_SCRIPT.read_text(), re.M)
    assert len(commits) == 1 and len(commits[0]) == 40, commits  # one full hash
    return commits[0]


@pytest.mark.skipif(not os.environ.get("DETECTRON2_GIT_DIR"),
                    reason="set DETECTRON2_GIT_DIR to a clone of facebookresearch/detectron2")
def test_pinned_commit_is_on_main_and_has_every_api_used(tmp_path):
    git = ["git", "--git-dir", os.environ["DETECTRON2_GIT_DIR"]]
    commit = pinned_commit()
    main = next(ref for ref in ("refs/remotes/origin/main", "refs/heads/main")
                if subprocess.run([*git, "rev-parse", "--verify", "-q", ref], capture_output=True).returncode == 0)
    on_main = subprocess.run([*git, "merge-base", "--is-ancestor", commit, main], capture_output=True)
    assert on_main.returncode == 0, f"{commit} is not on detectron2's {main}"
    archive = subprocess.run([*git, "archive", commit], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tmp_path)], input=archive, check=True)
    # an install copies configs/ into the package; the source tree only has them at the top
    (tmp_path / "detectron2" / "model_zoo" / "configs").symlink_to(tmp_path / "configs")
    script = ("import json, sys; import detectron2, test_detection_api as t; "
              f"assert detectron2.__file__.startswith({str(tmp_path)!r}), detectron2.__file__; "
              "print(json.dumps(t.api_problems()))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT), str(ROOT / "tests")])}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
