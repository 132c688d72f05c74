"""Every command of the README's and the manual's (docs/) shell and Python blocks, read from the files and
run here in reading order (:func:`docs_in_reading_order`: the README, then the manual's pages in the order
of the ``nav`` of mkdocs.yml), as a user following them would: in a fresh working directory whose absolute paths (``/data/...``,
``/ckpt/...``, ``/imagenet/...``) are miniatures laid out like the real data, and where ``output/...`` is what
the commands above wrote. A flag renamed in the code or the docs breaks a test here, not a user.

The rewrites, the same for every command (:func:`rehearsal`):
- ``pip install``, ``tools/install_detectron2.sh`` and ``python -m pytest`` are not run: CI runs exactly them;
- absolute paths live under the workspace; ``checkpoint_N.pth`` of a step a miniature run does not reach is
  that folder's last checkpoint; ``key=...`` / ``--flag ...`` / a trailing ``...`` take the value the command
  above gave;
- a submission (``--slurm``) and a full-size detection config are rehearsed with ``--dry-run``: every check,
  nothing submitted or trained;
- real runs get the miniature's model and a short schedule, appended (later overrides win), and 2 processes
  where the docs say 8 (gloo on CPU), after a ``--dry-run`` at the world size written (torchrun's variables)
  so that the 2 processes cannot hide a batch that does not split; a tool called without arguments is called
  with ``--demo``, its documented equivalent; a command the docs give twice runs once;
- a benchmark of the miniature's backbones (ViT-mini: no published recipe has its size) takes the demo
  recipes where the docs name ``--preset paper`` or ``quick``, with batches that split over the processes
  the docs name (:data:`MINI_PRESET`);
- a command that needs CUDA runs only where there is a GPU.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import timm
import torch
import yaml
from fixtures import ROOT, free_port, make_imagenet

from rcmae.core.checkpoint import find_last_checkpoint, read_checkpoint


class _AnyTagLoader(yaml.SafeLoader):
    """mkdocs.yml may hold tags for MkDocs (``!ENV``, ``!!python/name:``): read them as nothing."""


_AnyTagLoader.add_multi_constructor("", lambda loader, suffix, node: None)


def docs_in_reading_order() -> list[Path]:
    """README.md, then the pages of docs/ in the order of mkdocs.yml's ``nav``: a command may use what a
    command of an earlier page wrote (the pretraining page's checkpoints, say), as it does for a reader
    going through the manual; pages the nav leaves out follow, sorted."""
    def pages(entry) -> list[str]:
        if isinstance(entry, str):
            return [entry] if entry.endswith(".md") and "://" not in entry else []
        if isinstance(entry, dict):
            return [p for value in entry.values() for p in pages(value)]
        if isinstance(entry, list):
            return [p for item in entry for p in pages(item)]
        return []

    docs_dir = ROOT / "docs"
    config = yaml.load((ROOT / "mkdocs.yml").read_text(), Loader=_AnyTagLoader)
    nav = [docs_dir / p for p in pages(config.get("nav", []))]
    rest = sorted(set(docs_dir.glob("**/*.md")) - set(nav))
    return [ROOT / "README.md", *[p for p in nav if p.is_file()], *rest]


DOCS = docs_in_reading_order()
NOT_RUN = (re.compile(r"^(\w+=\S+ )*(pip install|bash tools/install_detectron2\.sh|python -m pytest)\b"),
           "installs and the test suite: CI runs exactly these (.ci/run)")

# the miniature's models: the pretraining demo's ViT-mini, so that every checkpoint fits every consumer
# (the detection demo's backbone included); decoder and schedule shrunk
MINI = ["model.arch=vit_mini_patch8", "model.img_size=64"]
SHRINK = {
    "tools/pretrain.py": [*MINI, "model.decoder_dim=32", "model.decoder_depth=1", "model.decoder_heads=2",
                          "optim.batch_size=16", "optim.epochs=1", "optim.warmup_epochs=0", "train.micro_batch=8",
                          "data.num_workers=0", "train.device=cpu", "knn.batch_size=16"],
    "tools/finetune.py": [*MINI, "optim.batch_size=8", "optim.epochs=1", "optim.warmup_epochs=0",
                          "train.micro_batch=4", "data.num_workers=0", "train.device=cpu", "eval.batch_size=8"],
    "tools/knn.py": [*MINI, "data.num_workers=0", "train.device=cpu"],
    "tools/train_det.py": ["train.max_iter=4", "train.eval_period=4", "lr_multiplier.scheduler.milestones=[2,3]",
                           "lr_multiplier.scheduler.num_updates=4"],
    "tools/eval_robustness.py": ["--workers", "0", "--batch-size", "8", "train.device=cpu"],
    "tools/analyze_teacher.py": ["compare.seeds=[0]", "compare.variants=[rcmae_same]",
                                 "compare.probe_every_steps=2", "compare.heldout_images=16", "probe.trials=2",
                                 "probe.batch_size=8"],
    "benchmarks/pretrain_throughput.py": ["--arch", "vit_micro_patch8", "--img-size", "32", "--batch", "8",
                                          "--steps", "2", "--warmup", "1", "--decoder-dim", "32",
                                          "--decoder-depth", "1", "--decoder-heads", "2", "--workers", "1"],
    "benchmarks/data_throughput.py": ["--images", "32", "--rounds", "1", "--workers", "1", "--quality-samples", "4"],
    "tools/measure_cost.py": ["--batch-size", "4", "--iters", "1"],
    "benchmarks/linprobe_grid.py": ["--images-per-class", "8", "--batch", "4", "--epochs", "1",
                                    "--base-lrs", "0.1,1", "--rounds", "1", "--arch", "vit_micro_patch8",
                                    "--img-size", "32", "--device", "cpu", "--precision", "fp32", "--workers", "0"],
    "tools/benchmark.py": [f"--override={job}:{o}" for job, o in (
        ("finetune", "optim.epochs=1"), ("linprobe", "optim.epochs=1"), ("cost", "cost.iters=1"),
        ("detection", "train.max_iter=4"), ("detection", "train.eval_period=4"),
        ("detection", "lr_multiplier.scheduler.milestones=[2,3]"),
        ("detection", "lr_multiplier.scheduler.num_updates=4"))],
}
SHRINK["tools/linprobe.py"] = SHRINK["tools/finetune.py"]
SHRINK["tools/analyze_teacher.py"].append("compare.pretrain_overrides=[" + ",".join(
    [*SHRINK["tools/pretrain.py"], "log.every_steps=1", "checkpoint.every_epochs=1", "knn.every_epochs=1"]) + "]")
# the benchmark's recipes for the miniature's ViT-mini: the demo configs, batches that split over 4 x 8 processes
MINI_PRESET = {
    "cost": {"overrides": ["cost.batch_size=4", "cost.iters=1"]},
    "knn": {"config": "knn/demo.yaml", "overrides": ["data.source=folder"]},
    **{p: {"config": f"{p}/demo.yaml", "overrides": ["data.source=folder", "optim.batch_size=64"]}
       for p in ("linprobe", "finetune")},
    "detection_vitdet": {"config": "detection/demo_tiny.py", "overrides": ["dataloader.train.total_batch_size=32"]},
    "detection_paper": {"config": "detection/benchmarking_demo_tiny.py",
                        "overrides": ["dataloader.train.total_batch_size=32"]},
    "robustness": {"overrides": ["data.imagenet_c_resize=true"]},
}
# only where a full-size model cannot run on 2 CPU cores in seconds: every check, no training
FULL_SIZE_DETECTION = re.compile(r"^(configs/)?detection/(?!demo_tiny)")


@dataclass
class Command:
    doc: str
    line: int
    text: str  # as written, continuation lines joined, comment dropped
    language: str = "bash"


def doc_commands() -> list[Command]:
    """The commands of every fenced ``bash`` / ``python`` block of the docs, in order; a bash line with
    ``&&`` is one command per part."""
    commands = []
    for doc in DOCS:
        lines, language, start, block = doc.read_text().splitlines(), None, 0, []
        for n, line in enumerate(lines, 1):
            fence = re.match(r"^```(\w*)", line)
            if fence and language is None:
                language, start, block = fence.group(1), n, []
            elif fence:
                name = doc.relative_to(ROOT).as_posix()
                if language == "python":
                    commands.append(Command(name, start + 1, "\n".join(block), "python"))
                elif language in ("bash", "sh", "shell"):
                    commands += bash_commands(name, start, block)
                language = None
            elif language is not None:
                block.append(line)
    return commands


def bash_commands(doc: str, start: int, block: list[str]) -> list[Command]:
    commands, pending, first = [], "", 0
    for n, line in enumerate(block, start + 1):
        code = re.sub(r"(^|\s)#.*$", "", line).rstrip()
        if not pending:
            first = n
        if code.endswith("\\"):
            pending += code[:-1] + " "
            continue
        text = " ".join((pending + code).split())
        pending = ""
        commands += [Command(doc, first, part.strip()) for part in text.split("&&") if part.strip()]
    return commands


COMMANDS = doc_commands()


def test_the_docs_have_the_commands_this_file_rehearses():
    """The extraction itself: a README without its commands would make every rehearsal vacuous."""
    texts = [c.text for c in COMMANDS]
    assert "python tools/pretrain.py" in texts and len(COMMANDS) >= 30, texts
    assert any(c.language == "python" for c in COMMANDS)
    assert all("\\" not in c.text and "#" not in c.text for c in COMMANDS if c.language == "bash")


# ----------------------------------------------------------------------------------------------- workspace
@pytest.fixture(scope="module")
def workspace(tmp_path_factory, imagenet):
    """A user's directory: the checkout's tools / configs / benchmarks, the miniature data where the docs'
    absolute paths point, and the files a user downloads (official MAE pretraining and fine-tuned
    checkpoints, a timm ResNet-50 state dict) or writes (a COCO-format set, an evaluation config)."""
    ws = tmp_path_factory.mktemp("user")
    for name in ("tools", "configs", "benchmarks"):
        (ws / name).symlink_to(ROOT / name)
    data = ws / "data"
    make_imagenet(data / "imagenet", size=64)
    (ws / "imagenet").symlink_to(data / "imagenet")  # the analysis section writes /imagenet/...
    build_robustness_sets(data, data / "imagenet" / "val")
    build_coco(ws)
    build_downloads(ws)
    return ws


def build_robustness_sets(data: Path, val: Path) -> None:
    """ImageNet-C (2 corruptions x 2 severities at 224 px, as stored), -A (2 of its 200 classes), -R and
    -Sketch (the val images under their wnids)."""
    from PIL import Image

    images = sorted(val.glob("*/*.JPEG"))
    for corruption in ("fog", "contrast"):
        for severity in (1, 3):
            for src in images[::2]:
                dst = data / "imagenet-c" / corruption / str(severity) / src.parent.name / src.name
                dst.parent.mkdir(parents=True, exist_ok=True)
                Image.open(src).resize((224, 224)).save(dst, quality=85)
    for wnid in ("n01498041", "n02123394"):  # stingray, Persian cat
        (data / "imagenet-a" / wnid).mkdir(parents=True)
        for src in images[:2]:
            shutil.copy(src, data / "imagenet-a" / wnid / src.name)
    r_wnids = {"n02123045", "n03792782"}  # tabby, moped: ImageNet-R classes of the miniature
    for src in images:
        if src.parent.name in r_wnids:
            (data / "imagenet-r" / src.parent.name).mkdir(parents=True, exist_ok=True)
            shutil.copy(src, data / "imagenet-r" / src.parent.name / src.name)
    shutil.copytree(val, data / "imagenet-sketch" / "sketch")


def build_coco(ws: Path) -> None:
    """COCO 2017 under $DETECTRON2_DATASETS/coco (the coins set as train2017 and val2017) and a user's
    5-class COCO-format set as ``train.json`` / ``val.json`` / ``images/``."""
    from rcmae.detection.data import build_coins_dataset

    json_file, image_root = build_coins_dataset(ws / "coins")
    coco = ws / "datasets" / "coco"
    (coco / "annotations").mkdir(parents=True)
    for split in ("train2017", "val2017"):
        shutil.copytree(image_root, coco / split)
        shutil.copy(json_file, coco / "annotations" / f"instances_{split}.json")
    shutil.copytree(image_root, ws / "images")
    content = json.loads(Path(json_file).read_text())
    content["categories"] = [{"id": k, "name": f"class_{k}"} for k in range(1, 6)]
    for k, ann in enumerate(content["annotations"]):
        ann["category_id"] = k % 5 + 1
    for name in ("train.json", "val.json"):
        (ws / name).write_text(json.dumps(content))


def build_downloads(ws: Path) -> None:
    """The official files the docs name, of the miniature's size, in the official layouts."""
    import timm

    from rcmae.core import checkpoint as ck
    from rcmae.core.vit import build_classifier
    from rcmae.pretrain.models import build_mae

    torch.manual_seed(0)
    mae = build_mae("vit_mini_patch8", 64, 32, 1, 2)
    torch.save({"model": mae.state_dict(), "epoch": 799}, ws / "mae_pretrain_vit_base_full.pth")
    classifier = build_classifier("vit_micro_patch8", 224, 1000, "avg")  # the benchmarks' 224 px
    torch.save({"model": classifier.state_dict()}, ws / "mae_finetuned_vit_base.pth")  # MAE's layout
    best = ws / "output" / "finetune_rcmae_vit_base" / "classifier_best.pth"  # the same weights, ours
    best.parent.mkdir(parents=True)
    torch.save({"format": ck.CLASSIFIER_FORMAT, "model": classifier.state_dict(), "arch": "vit_micro_patch8",
                "img_size": 224, "global_pool": "avg", "num_classes": 1000}, best)
    torch.save(timm.create_model("resnet50", num_classes=1000).state_dict(), ws / "resnet50_a1.pth")
    detector = ws / "output" / "vitdet_b_100ep" / "model_final.pth"  # a 100-epoch run's: only dry-run here
    detector.parent.mkdir(parents=True)
    torch.save({"model": {}, "iteration": 184375}, detector)
    (ws / "my_eval.yaml").write_text(
        f"model:\n  checkpoint: {best}\ndata:\n  imagenet_val: {ws / 'data/imagenet/val'}\n"
        f"  imagenet_c: {ws / 'data/imagenet-c'}\ntrain:\n  output_dir: out/my_eval\n")


# ----------------------------------------------------------------------------------------------- rewrites
SCRIPT = re.compile(r"^(tools|benchmarks)/\w+\.(py|sh)$")


def script_of(argv: list[str]) -> str | None:
    return next((a for a in argv if SCRIPT.match(a)), None)


def previous_value(commands: list[Command], index: int, key: str) -> str:
    """The value ``key`` (``name=`` or ``--flag``) had in the nearest command above."""
    for c in reversed(commands[:index]):
        tokens = shlex.split(c.text) if c.language == "bash" else []
        for k, token in enumerate(tokens):
            if key.endswith("=") and token.startswith(key) and token != key + "...":
                return token[len(key):]
            if not key.endswith("=") and token == key and k + 1 < len(tokens) and tokens[k + 1] != "...":
                return tokens[k + 1]
    raise AssertionError(f"'{key}...' in {commands[index].text!r} but no command above gives {key}")


def previous_flags(commands: list[Command], index: int, script: str) -> list[str]:
    """A trailing ``...``: the options of the nearest command above that runs the same script, minus its
    checkpoint, model and output."""
    own = {"--checkpoint", "--model", "--output", "--config-file"}
    for c in reversed(commands[:index]):
        tokens = shlex.split(c.text)
        if script in tokens and "..." not in tokens:
            rest = tokens[tokens.index(script) + 1:]
            flags, k = [], 0
            while k < len(rest):
                if rest[k] in own:
                    k += 2
                    continue
                flags.append(rest[k])
                k += 1
            return flags
    raise AssertionError(f"a trailing '...' in {commands[index].text!r} with no full command above")


def placeholder_path(token: str, ws: Path) -> str:
    """Absolute paths under the workspace; ``checkpoint_N.pth`` a miniature run did not reach: the last."""
    def one(path: str) -> str:
        if path.startswith("/"):
            path = str(ws) + path
        p = Path(path) if Path(path).is_absolute() else ws / path
        if re.fullmatch(r"checkpoint_\d+\.pth", p.name) and not p.exists() and p.parent.is_dir():
            last = find_last_checkpoint(p.parent)
            return str(last) if last else path
        return path

    key, eq, value = token.partition("=")
    if eq and re.fullmatch(r"[\w.]+", key):
        return f"{key}={one(value)}" if value.startswith(("/", "output/")) else token
    return one(token) if token.startswith(("/", "output/")) or token.endswith(".pth") else token


def with_flags(tokens: list[str], script_at: int, flags: list[str]) -> list[str]:
    """``flags`` right after the script: detectron2's parser takes everything after the first override as
    overrides."""
    return [*tokens[:script_at + 1], *flags, *tokens[script_at + 1:]]


def rehearsal(commands: list[Command], index: int, ws: Path) -> list[tuple[list[str], dict]]:
    """The steps (argv, extra environment) of a docs command under the rewrites of this module's
    docstring; a torchrun line is first checked with ``--dry-run`` at the world size it is written for
    (torchrun's variables), so that rehearsing it on 2 processes cannot hide a batch that does not split."""
    c = commands[index]
    tokens = [t for t in shlex.split(c.text) if not re.fullmatch(r"\[.*\]", t)]  # [--optional] flags
    tokens = [t.replace("$HEAD", "127.0.0.1") for t in tokens]
    script = script_of(tokens)
    out = []
    for k, token in enumerate(tokens):
        if token == "...":
            if k > 0 and tokens[k - 1].startswith("--"):
                out.append(previous_value(commands, index, tokens[k - 1]))
            else:
                out += previous_flags(commands, index, script)
        elif token.endswith("=..."):
            out.append(token[:-3] + previous_value(commands, index, token[:-3]))
        else:
            out.append(token)
    tokens = [placeholder_path(t, ws) for t in out]
    if script == "tools/benchmark.py" and "--preset" in tokens:
        preset = ws / "benchmark_mini.yaml"
        preset.write_text(yaml.safe_dump(MINI_PRESET))
        tokens[tokens.index("--preset") + 1] = str(preset)
    k = tokens.index(script)
    dry = "--slurm" in tokens or "--dry-run" in tokens or (
        script == "tools/train_det.py" and any(FULL_SIZE_DETECTION.search(t) for t in tokens))
    if dry:
        return [(with_flags(tokens, k, [] if "--dry-run" in tokens else ["--dry-run"]), {})]
    steps = []
    if tokens[0] == "torchrun":
        launcher = dict(zip(tokens[1:k:2], tokens[2:k:2]))
        world = int(launcher.get("--nnodes", 1)) * int(launcher["--nproc-per-node"])
        steps.append((with_flags(["python", *tokens[k:]], 1, ["--dry-run"]), {"RANK": "0", "WORLD_SIZE": str(world)}))
        tokens = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
                  "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", *tokens[k:]]
    tokens = [re.sub(r"(--nproc-per-node=)\d+", r"\g<1>2", t) for t in tokens]
    k = tokens.index(script)
    if "--num-gpus" in tokens:
        tokens[tokens.index("--num-gpus") + 1] = "2"
        tokens = with_flags(tokens, k, ["--dist-url", "auto"])
    if tokens[-1] == script and script.startswith("tools/"):
        tokens.append("--demo")
    return [*steps, ([*tokens, *SHRINK.get(script, [])], {})]


# ----------------------------------------------------------------------------------------------- the runs
class Docs:
    """The docs' commands run in one workspace, each once; a command runs after every command above it, as a
    user following the docs runs them."""

    def __init__(self, ws: Path):
        self.ws, self.done = ws, {}

    def index(self, start: str) -> int:
        return next(i for i, c in enumerate(COMMANDS) if c.text.startswith(start))

    def run(self, index: int) -> subprocess.CompletedProcess | str:
        """The finished process, or why the command is not run here; a command the docs give twice
        (the Quick start's demo and its section's) runs once."""
        for i in range(index + 1):
            if i not in self.done:
                first = next(j for j, c in enumerate(COMMANDS) if c.text == COMMANDS[i].text)
                self.done[i] = self.done[first] if first < i else self.rehearse(i)
        return self.done[index]

    def rehearse(self, index: int) -> subprocess.CompletedProcess | str:
        c = COMMANDS[index]
        if NOT_RUN[0].match(c.text):
            return NOT_RUN[1]
        if c.text.startswith("bash benchmarks/gpu_session.sh") and not torch.cuda.is_available():
            return "needs a CUDA device"
        steps = [([sys.executable, "-c", c.text], {})] if c.language == "python" else rehearsal(COMMANDS, index,
                                                                                                 self.ws)
        for argv, extra in steps:
            if argv[0] == "python":
                argv = [sys.executable, *argv[1:]]
            env = {**os.environ, "OMP_NUM_THREADS": "1", "DETECTRON2_DATASETS": str(self.ws / "datasets"), **extra}
            res = subprocess.run(argv, cwd=self.ws, env=env, capture_output=True, text=True, timeout=900)
            if res.returncode:
                break
        return res


@pytest.fixture(scope="module")
def docs(workspace):
    return Docs(workspace)


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(COMMANDS)),
                         ids=[f"{c.doc}:{c.line}:{c.text[:60]}" for c in COMMANDS])
def test_docs_command_runs_as_written(index, docs):
    c, res = COMMANDS[index], docs.run(index)
    if isinstance(res, str):
        pytest.skip(res)
    assert res.returncode == 0, f"{c.doc} line {c.line}: {c.text}\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}"


# ------------------------------------------------------------------------------- what the commands wrote
def finished(docs: Docs, start: str) -> Path:
    res = docs.run(docs.index(start))
    assert not isinstance(res, str) and res.returncode == 0, f"{start!r} did not run: see its own test"
    return docs.ws


@pytest.mark.slow
def test_pretraining_without_config_file_trains_the_recipe_on_the_given_folder(docs):
    """``python tools/pretrain.py data.path=/data/imagenet/train``: no config file, so the default recipe
    (RC-MAE ViT-B/16, shrunk here), on the folder given, never the demo."""
    ws = finished(docs, "python tools/pretrain.py data.path=")
    out, train = ws / "output" / "pretrain", ws / "data" / "imagenet" / "train"
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["data"]["source"] == "folder" and cfg["data"]["path"] == str(train)
    assert cfg["optim"]["base_lr"] == 1.5e-4 and cfg["rcmae"]["gamma"] == 1.0  # the recipe, not the demo's
    ckpt = read_checkpoint(find_last_checkpoint(out))
    assert ckpt.raw["step"] == 16 // 16  # 16 training images, batch 16, 1 epoch
    enc = timm.create_model(f"local-dir:{out / 'encoder_teacher'}", pretrained=True)
    torch.testing.assert_close(enc.blocks[0].attn.qkv.weight, ckpt.teacher["blocks.0.attn.qkv.weight"])


@pytest.mark.slow
def test_torchrun_pretraining_equals_one_process(docs):
    """``torchrun --nproc-per-node 8 tools/pretrain.py --config-file configs/pretrain/rcmae_vit_base.yaml ...``
    (2 processes here) trains the same teacher as the one-process command above it: the config file is the
    default recipe, the effective batch the same."""
    ws = finished(docs, "torchrun --nproc-per-node 8 tools/pretrain.py")
    two, one = (read_checkpoint(find_last_checkpoint(ws / d)) for d in ("ckpt/rcmae_b", "output/pretrain"))
    assert two.raw["step"] == one.raw["step"] == 1
    for k, v in one.teacher.items():
        torch.testing.assert_close(two.teacher[k], v, rtol=0, atol=1e-5, msg=k)


@pytest.mark.slow
def test_robustness_under_torchrun_counts_every_image_once(docs):
    """``torchrun --nproc-per-node 8 tools/eval_robustness.py --checkpoint mae_finetuned_vit_base.pth ...`` (2
    processes here) gives the results of the one-process command above it: the two files hold the same
    weights, in MAE's layout and in ours."""
    ws = finished(docs, "torchrun --nproc-per-node 8 tools/eval_robustness.py")
    two, one = (json.loads((ws / d / "robustness.json").read_text()) for d in ("out/robust_mae_b", "out/robust_b"))
    assert two["settings"]["processes"] == 2
    for key in ("imagenet_val", "imagenet_a", "imagenet_r", "imagenet_sketch"):
        assert two[key]["n"] == one[key]["n"] > 0 and two[key]["correct1"] == one[key]["correct1"], key


@pytest.mark.slow
def test_robustness_demo_writes_every_benchmark_and_the_report(docs):
    """``python tools/eval_robustness.py``: the demo's trees (all 19 corruptions x 5 severities generated),
    every output file, complete mCE."""
    out = finished(docs, "python tools/eval_robustness.py") / "output" / "demo_robustness"
    for name in ("robustness.json", "summary.md", "imagenet_c_errors.csv", "imagenet_c.png"):
        assert (out / name).is_file(), name
    r = json.loads((out / "robustness.json").read_text())
    assert r["imagenet_c"]["mCE_status"] == "complete" and r["imagenet_c"]["mCE"] is not None
    assert len(r["imagenet_c"]["cells"]) == 19 * 5
    assert r["imagenet_a"]["classes"] == 2 and r["imagenet_r"]["classes"] == 3
    assert r["imagenet_sketch"]["n"] == 12 and r["imagenet_val"]["n"] == 12
    csv_rows = (out / "imagenet_c_errors.csv").read_text().splitlines()
    assert len(csv_rows) == 1 + 19 and "| this model |" in (out / "summary.md").read_text()
