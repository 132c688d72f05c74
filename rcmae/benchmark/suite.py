"""``rcmae-benchmark``'s work: plan, check, run or submit, show the state, write the report card.

An output directory is one benchmark: ``benchmark.json`` keeps its settings and backbones, so that a
later call with another backbone adds it (the others' finished jobs are kept), and ``--status`` or
``--report`` need no arguments but ``--output``.
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

from rcmae.benchmark.card import report_card
from rcmae.benchmark.plan import (
    Backbone,
    DataRoots,
    Job,
    Launch,
    Settings,
    absolute,
    build_plan,
    check_settings,
    load_preset,
)
from rcmae.benchmark.report import write_report, write_text
from rcmae.benchmark.runner import STATES, JobState, command, job_state, run_plan
from rcmae.core.errors import ConfigError

STATE = "benchmark.json"


def load_benchmark(out: Path) -> dict | None:
    path = out / STATE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not readable JSON ({e}); it records this benchmark's settings") from None


def merge(out: Path, backbones: list[Backbone], s: Settings) -> list[Backbone]:
    """The backbones of this output directory: those benchmarked before and the new ones, under the same
    settings (another preset, protocol set or dataset would mix numbers of different protocols)."""
    saved = load_benchmark(out)
    if saved is None:
        return backbones
    before = Settings.from_json(saved["settings"])
    if before != s:
        diff = {k: (v, getattr(s, k)) for k, v in vars(before).items() if getattr(s, k) != v}
        diff = "; ".join(f"{k}: {a} there, {b} now" for k, (a, b) in diff.items())
        raise ConfigError(f"{out} holds a benchmark with other settings ({diff}); use another --output, or the "
                          "same settings to add backbones to it")
    known = {b["name"]: Backbone(**b) for b in saved["backbones"]}
    for b in backbones:
        if b.name in known and known[b.name].checkpoint != b.checkpoint:
            raise ConfigError(f"backbone {b.name} of {out} was {known[b.name].checkpoint}, now {b.checkpoint}: "
                              "give the new one another name (NAME=PATH)")
        known[b.name] = b
    return list(known.values())


def save_benchmark(out: Path, backbones: list[Backbone], s: Settings, launch: Launch) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / STATE, json.dumps({"settings": s.to_json(), "backbones": [asdict(b) for b in backbones],
                                        "launch": asdict(launch)}, indent=2) + "\n")


# ------------------------------------------------------------------------------------------------ dry run
def stand_ins(job: Job, backbone: Backbone) -> tuple[list[str], str]:
    """The job's arguments with the files upstream jobs will write replaced by what can be checked now:
    the exported encoder by the backbone's checkpoint (the same weights; every tool reads both), the
    fine-tuned classifier by timm's model of the same architecture (every other setting checked)."""
    args, note = list(job.args), ""
    for path, upstream in job.inputs.items():
        if Path(path).exists():
            continue
        if upstream.endswith("/export"):
            args = [a.replace(path, backbone.checkpoint) for a in args]
            continue
        from rcmae.core.vit import ARCHS

        timm_name = ARCHS[backbone.arch]["timm_name"]
        i = args.index(path)
        if timm_name is None:
            return [], f"not checked now: {upstream} makes its input {path}"
        args[i - 1:i + 1] = ["--model", timm_name]
        note = f" (the classifier {upstream} makes stood in for by {timm_name})"
    return args, note


def check_job(job: Job, b: Backbone, launch: Launch) -> tuple[bool, str]:
    """One job's own checks (its tool with ``--dry-run``): (passed, the line that says so)."""
    if job.protocol == "export":
        return True, f"  ok    {job.name}: {b.checkpoint} reads as {b.arch}, {b.img_size} px ({b.origin})"
    args, note = stand_ins(job, b)
    if not args:
        return True, f"  -     {job.name}: {note}"
    cmd = command(Job(**{**asdict(job), "args": args}), launch, flags=["--dry-run"])
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode == 0:
        return True, f"  ok    {job.name}: the tool's checks passed{note}"
    reason = (out.stderr.strip() or out.stdout.strip()).splitlines()[-1:] or ["(no output)"]
    return False, f"  FAIL  {job.name}: {reason[0]}\n        {shlex.join(cmd)}"


def check_jobs(jobs: list[Job], backbones: dict[str, Backbone], launch: Launch) -> list[str]:
    """Every job's own checks, a few at a time (each is a process importing torch), printed in plan order;
    returns the names of the jobs that failed them."""
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        results = pool.map(lambda job: check_job(job, backbones[job.backbone], launch), jobs)
        failures = []
        for job, (passed, line) in zip(jobs, results):
            print(line, flush=True)
            if not passed:
                failures.append(job.name)
    return failures


def resources(job: Job, launch: Launch) -> str:
    if job.spread == "here" or launch.launcher != "slurm":
        procs = launch.nproc if launch.launcher == "torchrun" and job.spread != "single" else 1
        return "here" if procs == 1 else f"here, {procs} processes"
    s = job.slurm
    gpus = f"{s['gpus_per_node']} GPU(s)" if s.get("gpus_per_node") else "CPU"
    return f"{s['nodes']} node(s) x {gpus}, {s['timeout']} min"


def print_plan(backbones: list[Backbone], jobs: list[Job], s: Settings, launch: Launch, out: Path) -> None:
    preset_path, _ = load_preset(s.preset)
    print(f"benchmark plan: {len(backbones)} backbone(s) x {', '.join(s.protocols)} (detection: {s.detection}); "
          f"preset {s.preset} ({preset_path}); launcher {launch.launcher}; output {out}")
    print("backbones:")
    for b in backbones:
        print(f"  {b.name:12s} {b.arch} {b.img_size} px, {b.origin}: {b.checkpoint or '-'}"
              + (f" (pretraining run {b.run_dir})" if b.run_dir else ""))
    print(f"jobs ({len(jobs)}), in order:")
    for job in jobs:
        after = ", ".join(job.deps) or "-"
        print(f"  {job.name:22s} after {after:22s} {resources(job, launch)}\n    {shlex.join(command(job, launch))}")


# ------------------------------------------------------------------------------------------------ status
def print_status(jobs: list[Job], states: dict[str, JobState]) -> None:
    counts = {k: sum(st.state == k for st in states.values()) for k in STATES}
    print("benchmark status: " + ", ".join(f"{n} {k}" for k, n in counts.items() if n))
    for job in jobs:
        st = states[job.name]
        values = ", ".join(f"{k} {v['value']:.2f}{'*' if v['partial'] else ''}" for k, v in st.outcome.cells.items()
                           if v["value"] is not None)
        where = f" [SLURM {st.slurm_id}]" if st.slurm_id else ""
        print(f"  {job.name:24s} {st.state:11s}{where} {st.outcome.progress or st.detail}"
              + (f" | {values}" if values else ""))


def write_card(backbones, jobs, states, s, launch, out: Path, cmd: str) -> dict:
    card = report_card(backbones, jobs, states, s, out, cmd, lambda job: command(job, launch))
    return write_report(card, out)


# ------------------------------------------------------------------------------------------------ main
def benchmark(specs: list[Backbone], s: Settings | None, launch: Launch | None, out: Path, *, dry_run=False,
              status=False, report_only=False, cmd: str = "") -> int:
    """Plan, check and run (or submit) the benchmark in ``out``; with ``status`` / ``report_only`` only
    show or rewrite what is there. Returns the exit status: 1 when a job failed or is blocked."""
    out = Path(absolute(out))
    saved = load_benchmark(out)
    if status or report_only:
        if saved is None:
            raise ConfigError(f"{out}: no benchmark there ({STATE} is missing): start one first")
        s, launch = Settings.from_json(saved["settings"]), Launch(**saved["launch"])
        backbones = [Backbone(**b) for b in saved["backbones"]]
    else:
        check_settings(s)
        backbones = merge(out, specs, s)
    jobs = build_plan(backbones, s, out, launch)
    if dry_run:
        print_plan(backbones, jobs, s, launch, out)
        print("checks (each tool's own, with --dry-run):")
        failures = check_jobs(jobs, {b.name: b for b in backbones}, launch)
        print(f"dry run: {len(failures)} job(s) failed their checks. Nothing was run, written or submitted."
              if failures else "dry run: every check passed. Nothing was run, written or submitted.")
        return 1 if failures else 0
    if status or report_only:
        states = {j.name: job_state(j) for j in jobs}
    else:
        from rcmae.core.run import lock_output_dir

        out.mkdir(parents=True, exist_ok=True)
        lock_output_dir(out)  # one benchmark call at a time in a folder (--status and --report only read)
        save_benchmark(out, backbones, s, launch)
        started = time.time()
        states = run_plan(jobs, launch)
        print(f"benchmark call took {time.time() - started:.0f} s")
    print_status(jobs, states)
    paths = write_card(backbones, jobs, states, s, launch, out, cmd)
    print(f"report: {paths['markdown']}, {paths['html']}, {paths['json']}")
    return 1 if any(st.state in ("failed", "blocked") for st in states.values()) else 0


def build_demo_coco(root: Path) -> Path:
    """COCO 2017's layout (``annotations/instances_{train,val}2017.json``, ``train2017/``, ``val2017/``)
    around the coins set (4 views, every coin an instance with its mask); train = val."""
    from rcmae.detection.data import build_coins_dataset

    coco = root / "coco"
    if not (coco / "annotations" / "instances_val2017.json").is_file():
        json_file, images = build_coins_dataset(root / "coins")
        (coco / "annotations").mkdir(parents=True, exist_ok=True)
        for split in ("train", "val"):
            (coco / f"{split}2017").unlink(missing_ok=True)
            (coco / f"{split}2017").symlink_to(images.resolve())
            (coco / "annotations" / f"instances_{split}2017.json").write_text(json_file.read_text())
    return coco


def demo_inputs(root: Path) -> tuple[list[str], DataRoots]:
    """The demo's backbones and data: the pretraining demo's teacher (``output/demo_pretrain``; the demo
    runs first if it has not finished) and a random ViT-mini; ImageNet, COCO and the robustness sets in
    miniature, from scikit-image's photos, laid out as the real ones."""
    from rcmae.core.data.demo import build_demo_benchmarks, build_demo_labelled
    from rcmae.robustness.imagenet_c import make_imagenet_c

    data = root / "data"
    imagenet = build_demo_labelled(data / "imagenet")
    sets = build_demo_benchmarks(data / "robustness", make_imagenet_c)
    coco = build_demo_coco(data)
    pretrain = Path("output/demo_pretrain")  # the pretraining demo's own folder (python tools/pretrain.py)
    if not (pretrain / "encoder_teacher.pth").is_file():  # written at its end
        print(f"the demo benchmarks the pretraining demo's teacher: running the pretraining demo first (about two "
              f"minutes; log in {pretrain / 'log.txt'})")
        run = subprocess.run([sys.executable, "-m", "rcmae.tools.pretrain"], stdout=subprocess.DEVNULL)
        if run.returncode != 0:
            raise ConfigError(f"the pretraining demo failed (exit status {run.returncode}): see {pretrain / 'log.txt'}")
    roots = DataRoots(imagenet=str(imagenet), coco=str(coco), imagenet_c=str(sets["imagenet_c"]),
                      imagenet_a=str(sets["imagenet_a"]), imagenet_r=str(sets["imagenet_r"]),
                      imagenet_sketch=str(sets["imagenet_sketch"]))
    return [f"teacher={pretrain}", "random=random:vit_mini_patch8@64"], roots
