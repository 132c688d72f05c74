"""rcmae-benchmark end to end on miniatures laid out like the real data (ImageNet wnid folders, COCO 2017,
ImageNet-C ``corruption/severity/wnid``, -A, -Sketch): every protocol run here as its tool's command line,
the report's numbers against the tools' own result files and the image counts against the folders; a
backbone added later, a failed job run again, nothing else redone; then on a real SLURM cluster: the
dependencies honoured, an interrupted job resumed and its dependant resubmitted behind it."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from fixtures import ROOT, make_benchmarks, make_imagenet, micro_config, run_in_process
from PIL import Image

from rcmae.benchmark.runner import SLURM_RUNNING, slurm_job_state
from rcmae.benchmark.suite import build_demo_coco
from rcmae.tools import benchmark as tool

pytestmark = pytest.mark.slow

CPU = ["data.num_workers=0", "train.device=cpu"]
# the tools' demo recipes (a 64-px ViT-mini) on micro schedules
PRESET = {
    "cost": {"overrides": ["cost.batch_size=4", "cost.iters=1", "cost.warmup_iters=1", "train.device=cpu"]},
    "knn": {"overrides": [*CPU, "knn.batch_size=16"]},
    "linprobe": {"config": "linprobe/demo.yaml",
                 "overrides": [*CPU, "data.source=folder", "optim.batch_size=8", "optim.epochs=1",
                               "optim.warmup_epochs=0", "train.micro_batch=8", "eval.batch_size=16"]},
    "finetune": {"config": "finetune/demo.yaml",
                 "overrides": [*CPU, "data.source=folder", "optim.batch_size=8", "optim.epochs=2",
                               "optim.warmup_epochs=0", "train.micro_batch=8", "eval.batch_size=16",
                               "eval.every_epochs=1"]},
    "detection_vitdet": {"config": "detection/demo_tiny.py",
                         "overrides": ["train.max_iter=4", "train.eval_period=4",
                                       "lr_multiplier.scheduler.milestones=[2,3]",
                                       "lr_multiplier.scheduler.num_updates=4"]},
    "robustness": {"overrides": [*CPU, "data.batch_size=16", "data.imagenet_c_resize=true"]},
}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """The data roots, a micro pretraining run of the ViT-mini (its run directory: curves known) and the
    test preset."""
    from rcmae.pretrain.train import main as pretrain

    root = tmp_path_factory.mktemp("bench_inputs")
    imagenet = make_imagenet(root / "imagenet", per_class=4, size=64)
    sets = make_benchmarks(root / "robustness", imagenet)
    run = root / "pretrain"
    pretrain(micro_config(run, ["model.arch=vit_mini_patch8", "model.img_size=64", "optim.epochs=1"]))
    preset = root / "micro.yaml"
    preset.write_text(yaml.safe_dump(PRESET))
    args = ["--preset", preset, "--imagenet", imagenet, "--coco", build_demo_coco(root), "--imagenet-c", sets / "c",
            "--imagenet-a", sets / "a", "--imagenet-sketch", sets / "sketch"]
    return run, args


def attempts(out: Path) -> dict[str, int]:
    return {f"{d.parent.name}/{d.name}": len(read_record_of(d)) for d in out.glob("*/*")
            if (d / "benchmark_job.json").is_file()}


def read_record_of(job_dir: Path) -> list[dict]:
    return json.loads((job_dir / "benchmark_job.json").read_text())["attempts"]


def files(folder: Path) -> int:
    return sum(1 for p in folder.rglob("*") if p.is_file())


def test_every_protocol_here_then_a_backbone_added_later_and_a_failed_job_run_again(tmp_path, inputs):
    run, args = inputs
    out = tmp_path / "bench"
    first = run_in_process(tool, f"teacher={run}", *args, "--output", out)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert attempts(out) == {f"teacher/{p}": 1 for p in ("export", "cost", "pictures", "knn", "linprobe",
                                                         "finetune", "detection", "robustness")}
    report = json.loads((out / "report.json").read_text())
    (row,) = report["rows"]
    cells = row["cells"]
    # each number is the tool's own, with the image count of the folder it was measured on
    knn = json.loads((out / "teacher/knn/knn.json").read_text())
    assert cells["knn_top1"]["value"] == round(knn["knn_top1"], 2) and cells["knn_top1"]["images"] == 16
    evals = [r for r in map(json.loads, (out / "teacher/finetune/metrics.jsonl").read_text().splitlines())
             if "eval_top1" in r]
    assert cells["finetune_top1"] == {**cells["finetune_top1"], "value": round(evals[-1]["eval_top1"], 2),
                                      "images": files(run.parent / "imagenet" / "val"), "status": "done"}
    assert cells["linprobe_top1"]["status"] == "done" and cells["linprobe_top1"]["images"] == 16
    det = json.loads((out / "teacher/detection/eval_results.json").read_text())
    assert cells["coco_box_ap_vitdet"]["value"] == round(det["bbox"]["AP"], 2)
    assert cells["coco_mask_ap_vitdet"]["images"] == 4  # the 4 views of coins
    assert cells["in_a_top1"]["images"] == files(run.parent / "robustness" / "a")
    assert cells["in_sketch_top1"]["images"] == files(run.parent / "robustness" / "sketch")
    # 2 of ImageNet-C's 15 corruptions: no mCE, said why; ImageNet-R was not given
    assert cells["in_c_mce"]["value"] is None and "incomplete" in cells["in_c_mce"]["note"]
    assert cells["in_r_top1"]["value"] is None and cells["in_r_top1"]["status"] == "missing"
    for c in cells.values():
        if c["value"] is not None:
            assert (out / c["log"]).is_file() and (out / c["job_dir"]).is_dir()
    assert report["figures"]["pretraining"]["teacher"]["loss"]  # the run directory's curves
    assert {"finetune", "linprobe", "robustness", "detection"} <= set(report["figures"])
    (cost,) = report["costs"]
    assert cost["status"] == "done" and cost["params_m"] > 0 and cost["throughput_img_per_s"] > 0
    # robustness ran on the fine-tuned classifier, after fine-tuning ended
    ft, rob = read_record_of(out / "teacher/finetune")[-1], read_record_of(out / "teacher/robustness")[-1]
    assert rob["started"] >= ft["ended"] and str(out / "teacher/finetune/classifier_best.pth") in rob["command"]
    assert rob["command"][1:3] == ["-m", "rcmae.tools.eval_robustness"]
    html = (out / "report.html").read_text()
    assert "teacher/knn/log.txt" in html and "data:image/png;base64," in html
    # the feature pictures of the exported encoder (the teacher), 4 val images of 4 classes: 160 px a cell
    (pictures,) = report["pictures"]
    assert pictures["status"] == "done" and Image.open(out / pictures["attention"]).size == (160 * (2 + 4), 160 * 4)
    assert Image.open(out / pictures["pca"]).size == (160 * 3, 160 * 4)
    md = (out / "report.md").read_text()
    assert "](teacher/pictures/attention.png)" in md and "](teacher/pictures/pca.png)" in md
    assert str(out / "teacher/export/encoder.pth") in read_record_of(out / "teacher/pictures")[-1]["command"]

    # a backbone added later: its jobs run, the teacher's are not redone, both are in the report
    second = run_in_process(tool, f"teacher={run}", "random=random:vit_mini_patch8@64", *args, "--output", out)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    counts = attempts(out)
    assert all(n == 1 for n in counts.values()) and len(counts) == 15
    assert [r["backbone"] for r in json.loads((out / "report.json").read_text())["rows"]] == ["teacher", "random"]

    # a failed job: --status says so; the same command runs it again, and only it
    (out / "teacher/knn/knn.json").unlink()
    failed = {"launcher": "here", "command": ["x"], "started": time.time(), "pid": 1 << 22, "rc": 1}
    (out / "teacher/knn/benchmark_job.json").write_text(json.dumps({"attempts": [*read_record_of(out / "teacher/knn"),
                                                                                 failed]}))
    status = run_in_process(tool, "--output", out, "--status")
    assert status.returncode == 1 and re.search(r"teacher/knn +failed", status.stdout), status.stdout
    assert json.loads((out / "report.json").read_text())["rows"][0]["cells"]["knn_top1"]["status"] == "failed"
    (out / "report.md").unlink()
    rewritten = run_in_process(tool, "--output", out, "--report")  # only the report, from the folders
    assert rewritten.returncode == 1 and (out / "report.md").is_file() and "benchmark status" in rewritten.stdout
    third = run_in_process(tool, f"teacher={run}", *args, "--output", out)
    assert third.returncode == 0, third.stdout[-3000:]
    assert attempts(out) == {**counts, "teacher/knn": 3}


def test_other_settings_in_the_same_folder_are_refused(tmp_path, inputs):
    run, args = inputs
    out = tmp_path / "bench"
    (out).mkdir()
    (out / "benchmark.json").write_text(json.dumps({"settings": {
        "protocols": ["knn"], "detection": "vitdet", "preset": "paper", "data": {}, "overrides": {}},
        "backbones": [], "launch": {}}))
    res = run_in_process(tool, f"teacher={run}", *args, "--output", out, "--protocols", "knn")
    assert res.returncode == 1 and "holds a benchmark with other settings" in res.stderr and "preset" in res.stderr


def test_dry_run_checks_every_job_and_writes_nothing(tmp_path, inputs):
    run, args = inputs
    out = tmp_path / "bench"
    res = run_in_process(tool, f"teacher={run}", *args, "--output", out, "--dry-run", "--launcher", "slurm",
                         "--gpus-per-node", "2", "--protocols", "linprobe,finetune,robustness")
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count("  ok    teacher/") == 5 and "not checked now: teacher/finetune makes" in res.stdout
    assert "teacher/pictures: the tool's checks passed" in res.stdout
    assert "1 node(s) x 2 GPU(s)" in res.stdout and "train.micro_batch=4" in res.stdout and not out.exists()
    bad = run_in_process(tool, f"teacher={run}", *args, "--output", out, "--dry-run", "--protocols", "finetune",
                         "--override", "finetune:optim.epochs=0")
    assert bad.returncode == 1 and "FAIL  teacher/finetune: error: optim.epochs" in bad.stdout and not out.exists()


def test_under_torchrun_each_job_runs_on_two_processes(tmp_path, inputs):
    """--launcher torchrun: the classifier jobs on 2 gloo processes each (the batch split, accumulation kept),
    the cost measurement on one."""
    run, args = inputs
    out = tmp_path / "bench"
    res = run_in_process(tool, f"teacher={run}", *args, "--output", out, "--protocols", "knn,linprobe",
                         "--launcher", "torchrun", "--nproc-per-node", "2")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    for protocol in ("knn", "linprobe"):
        (start,) = [json.loads(line) for line in (out / "teacher" / protocol / "runs.jsonl").read_text().splitlines()]
        assert start["world_size"] == 2
        assert read_record_of(out / "teacher" / protocol)[-1]["command"][1:3] == ["-m", "torch.distributed.run"]
    assert "train.micro_batch=4" in read_record_of(out / "teacher/linprobe")[-1]["command"]  # 8 = 2 x 4
    assert read_record_of(out / "teacher/cost")[-1]["command"][1:3] == ["-m", "rcmae.tools.measure_cost"]
    cells = json.loads((out / "report.json").read_text())["rows"][0]["cells"]
    assert cells["knn_top1"]["images"] == cells["linprobe_top1"]["images"] == 16  # every image once, 2 shares


def test_on_slurm_dependencies_hold_and_an_interrupted_job_resumes(slurm, tmp_path, inputs):
    """Submitted with afterok; the fine-tuning job cancelled after its first checkpoint: the next call submits
    it again (it resumes) and cancels and resubmits the robustness job queued behind the cancelled one."""
    run, args = inputs
    out = tmp_path / "bench"
    cmd = [sys.executable, str(ROOT / "tools" / "benchmark.py"), f"teacher={run}", *map(str, args),
           "--protocols", "finetune,robustness", "--override", "finetune:optim.epochs=30",
           "--output", str(out), "--launcher", "slurm", "--gpus-per-node", "0", "--cpus-per-task", "1",
           "--timeout", "10"]
    # the node is busy while the benchmark submits: no job starts (and ends) before the test watches it
    busy = slurm.sbatch("-c", str(slurm.cpus), "-o", "/dev/null", "--wrap", "sleep 300")
    slurm.wait_for(busy, states=("RUNNING",))
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stdout + first.stderr
    ft_id = read_record_of(out / "teacher/finetune")[-1]["slurm_id"]
    rob = read_record_of(out / "teacher/robustness")[-1]
    assert rob["dependency"] == [ft_id]
    assert "Dependency" in slurm.job_info(rob["slurm_id"])["Reason"]
    slurm.cancel(busy)
    deadline = time.time() + 120
    while not (out / "teacher/finetune/last_checkpoint").is_file():
        assert time.time() < deadline, "no checkpoint from the fine-tuning job"
        time.sleep(0.2)
    slurm.cancel(ft_id)
    slurm.wait_for(ft_id, states=("CANCELLED",))
    while slurm_job_state(ft_id) in SLURM_RUNNING:  # COMPLETING while the job saves its step: still running
        assert time.time() < deadline + 60, "the cancelled job does not end"
        time.sleep(0.2)

    second = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout + second.stderr
    ft_again = read_record_of(out / "teacher/finetune")[-1]["slurm_id"]
    rob_again = read_record_of(out / "teacher/robustness")[-1]
    assert ft_again != ft_id and rob_again["dependency"] == [ft_again] and rob_again["slurm_id"] != rob["slurm_id"]
    slurm.wait_for(rob["slurm_id"], states=("CANCELLED",))
    info = slurm.wait_for(rob_again["slurm_id"], timeout=240)
    assert info["StartTime"] >= slurm.job_info(ft_again)["EndTime"]
    assert "resumed from" in (out / "teacher/finetune/log.txt").read_text()

    third = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert third.returncode == 0 and "submitted" not in third.stdout, third.stdout
    cells = json.loads((out / "report.json").read_text())["rows"][0]["cells"]
    assert cells["finetune_top1"]["status"] == "done" and cells["in_a_top1"]["status"] == "done"
    assert cells["knn_top1"]["status"] == "missing"  # not planned
