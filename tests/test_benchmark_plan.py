"""rcmae-benchmark's plan, presets, job states and numbers, without running the tools: the graph and its
command lines, what each preset asks of a cluster, the published numbers, and how each job's folder is read
(finished, partial, failed, queued on SLURM)."""
from __future__ import annotations

import json
import os
import stat

import pytest
import torch
import yaml

from rcmae.benchmark.card import published_rows
from rcmae.benchmark.collect import outcome
from rcmae.benchmark.plan import (
    Backbone,
    DataRoots,
    Job,
    Launch,
    Settings,
    build_plan,
    check_settings,
    load_preset,
    micro_batch,
    read_backbone,
)
from rcmae.benchmark.runner import add_attempt, command, job_state
from rcmae.core.errors import CheckpointError, ConfigError
from rcmae.core.vit import build_classifier

DATA = DataRoots(imagenet="/data/imagenet", coco="/data/coco", imagenet_c="/data/in-c", imagenet_a="/data/in-a")
ALL = ["knn", "linprobe", "finetune", "detection", "robustness"]


def vit_file(path, arch="vit_micro_patch8", img_size=32, wrap=lambda sd: {"model": sd}):
    sd = build_classifier(arch, img_size, num_classes=0, global_pool="token").state_dict()
    torch.save(wrap(sd), path)
    return path


def base(name="b", checkpoint="/ckpt/b.pth"):
    return Backbone(name, checkpoint, "vit_base_patch16", 224, "MAE-format")


# ------------------------------------------------------------------------------------------------ backbones
def test_backbones_of_every_origin_read_their_architecture(tmp_path):
    mae = vit_file(tmp_path / "mae.pth")
    timm_sd = vit_file(tmp_path / "timm.pth", wrap=lambda sd: sd)
    rcmae = vit_file(tmp_path / "rc.pth", wrap=lambda sd: {"student": {f"module.{k}": v for k, v in sd.items()},
                                                          "teacher": sd})
    assert read_backbone(f"m={mae}") == Backbone("m", str(mae), "vit_micro_patch8", 32, "MAE-format")
    assert read_backbone(str(timm_sd)).name == "timm" and read_backbone(str(timm_sd)).origin == "timm state dict"
    assert read_backbone(str(rcmae)).origin == "official RC-MAE, teacher weights"
    meta = {"which": "teacher", "source": "ours", "from": "c.pth"}
    exported = vit_file(tmp_path / "enc.pth", wrap=lambda sd: {"model": sd, "meta": meta})
    assert read_backbone(str(exported)).origin == "exported encoder (teacher weights of ours c.pth)"
    assert read_backbone("r=random:vit_base_patch16") == Backbone("r", None, "vit_base_patch16", 224,
                                                                  "random initialisation")
    assert read_backbone("random:vit_mini_patch8@64").img_size == 64


def test_a_run_directory_is_its_last_checkpoint_and_its_curves(tmp_path):
    run = tmp_path / "rcmae_run"
    run.mkdir()
    vit_file(run / "checkpoint_00000008.pth")
    (run / "last_checkpoint").write_text("checkpoint_00000008.pth")
    (run / "metrics.jsonl").write_text("")
    b = read_backbone(str(run))
    assert (b.name, b.checkpoint, b.run_dir) == ("rcmae_run", str(run / "checkpoint_00000008.pth"), str(run))
    assert read_backbone(str(run / "checkpoint_00000008.pth")).run_dir == str(run)  # a checkpoint in its run


@pytest.mark.parametrize("spec, message", [
    ("{tmp}/missing.pth", "does not exist"),
    ("{tmp}", "without a last_checkpoint pointer"),
    ("a/b={tmp}/mae.pth", "is not a folder name"),
    ("random:vit_gigantic", "unknown architecture"),
])
def test_bad_backbones_are_refused_with_what_to_write(tmp_path, spec, message):
    vit_file(tmp_path / "mae.pth")
    with pytest.raises(ConfigError, match=message):
        read_backbone(spec.format(tmp=tmp_path))


def test_a_file_that_is_no_vit_is_refused(tmp_path):
    torch.save({"model": {"conv1.weight": torch.zeros(1)}}, tmp_path / "resnet.pth")
    with pytest.raises(CheckpointError, match="not a ViT"):
        read_backbone(str(tmp_path / "resnet.pth"))


# ------------------------------------------------------------------------------------------------ the plan
def test_the_plan_is_the_graph_of_the_issue(tmp_path):
    """export -> cost, pictures, k-NN, linear probe, fine-tuning, detection; fine-tuning -> robustness; each job
    its tool's command line, in its own folder, reading the exported encoder."""
    jobs = build_plan([base()], Settings(ALL, "vitdet", "paper", DATA), tmp_path, Launch())
    by = {j.protocol: j for j in jobs}
    assert [j.protocol for j in jobs] == ["export", "cost", "pictures", "knn", "linprobe", "finetune", "detection",
                                          "robustness"]
    encoder = str(tmp_path / "b" / "export" / "encoder.pth")
    assert by["export"].args[:2] == ["/ckpt/b.pth", encoder]
    assert by["pictures"].args[:2] == [encoder, "/data/imagenet/val"] and by["pictures"].spread == "here"
    for p in ("cost", "pictures", "knn", "linprobe", "finetune", "detection"):
        assert by[p].deps == ["b/export"] and by[p].dir == str(tmp_path / "b" / p)
        assert any(encoder in a for a in by[p].args)
    assert by["robustness"].deps == ["b/finetune"]
    assert ["--checkpoint", str(tmp_path / "b" / "finetune" / "classifier_best.pth")] == by["robustness"].args[:2]
    assert "--config-file" in by["finetune"].args and "finetune/rcmae_vit_base.yaml" in by["finetune"].args
    det = by["detection"].args
    assert det[det.index("--config-file") + 1] == "detection/mask_rcnn_vitdet_b_100ep.py"
    assert ["--dataset", "benchmark_coco_val", "/data/coco/annotations/instances_val2017.json",
            "/data/coco/val2017"] == det[det.index("benchmark_coco_val") - 1:][:4]
    assert command(by["knn"], Launch())[1:3] == ["-m", "rcmae.tools.knn"]
    paper = build_plan([base()], Settings(["detection"], "paper", "paper", DATA), tmp_path, Launch())
    assert "detection/benchmarking_mask_rcnn_vit_b_100ep.py" in paper[-1].args


def test_a_random_backbone_has_no_export_and_detection_trains_from_scratch(tmp_path):
    b = read_backbone("random:vit_base_patch16")
    jobs = build_plan([b], Settings(ALL, "vitdet", "paper", DATA), tmp_path, Launch())
    assert [j.protocol for j in jobs][0] == "cost" and not any("init.checkpoint" in a for j in jobs for a in j.args)
    assert "train.allow_scratch=True" in jobs[5].args
    assert jobs[1].protocol == "pictures" and jobs[1].args[0] == "random:vit_base_patch16@224"


def test_the_recipes_effective_batch_is_kept_on_any_world_size():
    """MAE's fine-tuning batch 1024 at micro-batch 128: 8 GPUs x 128 = 1024, one step; 32 GPUs take 32 each
    (32 x 32 = 1024), 16 GPUs 64 each; the linear probe's 16384 splits over 32 x 512 as it is."""
    assert micro_batch("finetune", "finetune/rcmae_vit_base.yaml", [], 8) == []
    assert micro_batch("finetune", "finetune/rcmae_vit_base.yaml", [], 32) == ["train.micro_batch=32"]
    assert micro_batch("finetune", "finetune/rcmae_vit_base.yaml", [], 16) == ["train.micro_batch=64"]  # 1024 / 16
    assert micro_batch("linprobe", "linprobe/vit_base.yaml", [], 32) == []
    # mixup / cutmix mix pairs: 144 over 8 processes at most 9 each takes 6 (9 is odd), 9 without them
    nine = ["optim.batch_size=144", "train.micro_batch=9"]
    assert micro_batch("finetune", "finetune/demo.yaml", nine, 8) == ["train.micro_batch=6"]
    assert micro_batch("finetune", "finetune/demo.yaml", [*nine, "aug.mixup=0", "aug.cutmix=0"], 8) == []
    with pytest.raises(ConfigError, match="does not split over 32 processes"):
        micro_batch("finetune", "finetune/demo.yaml", ["optim.batch_size=96"], 32)  # 3 each: odd, mixup on
    with pytest.raises(ConfigError, match="does not split over 3 processes"):
        micro_batch("finetune", "finetune/rcmae_vit_base.yaml", ["optim.batch_size=1000"], 3)


def test_each_job_gets_its_share_of_the_cluster(tmp_path):
    """The command line's 4 nodes x 8 GPUs for training; the preset lowers it where a job needs less (cost: one
    GPU; k-NN and robustness: one node) and sets each job's time limit."""
    launch = Launch("slurm", 1, dict(nodes=4, gpus_per_node=8, timeout=100, partition="gpu"))
    jobs = {j.protocol: j for j in build_plan([base()], Settings(ALL, "vitdet", "paper", DATA), tmp_path, launch)}
    assert (jobs["cost"].slurm["nodes"], jobs["cost"].slurm["gpus_per_node"]) == (1, 1)
    assert (jobs["knn"].slurm["nodes"], jobs["knn"].slurm["gpus_per_node"]) == (1, 8)
    assert (jobs["finetune"].slurm["nodes"], jobs["finetune"].slurm["timeout"]) == (4, 4320)
    assert "train.micro_batch=32" in jobs["finetune"].args  # 32 processes
    cmd = command(jobs["robustness"], launch, ["17"])
    assert cmd[3:5] == ["--slurm", "--job-name"] and cmd[cmd.index("--after") + 1] == "17"
    assert cmd[cmd.index("--partition") + 1] == "gpu"
    assert command(jobs["export"], launch)[3:] == jobs["export"].args  # runs here, before anything reads it
    torchrun = command(jobs["finetune"], Launch("torchrun", 4))
    assert torchrun[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4"]
    assert command(jobs["detection"], Launch("torchrun", 4))[3:5] == ["--num-gpus", "4"]  # detectron2's launch


def test_a_job_submitted_after_another_is_checked_again_when_it_starts(tmp_path, imagenet):
    """--after: sbatch's afterok, and a check failing on an input the earlier job is to write is a warning at
    submission (the job runs the checks again when it starts); without --after it is the error it always was."""
    from fixtures import run_in_process

    from rcmae.tools import knn

    args = ["--slurm", "--dry-run", "--gpus-per-node", "0", "--cpus-per-task", "1", "model.arch=vit_micro_patch8",
            "model.img_size=32", f"data.train_path={imagenet / 'train'}", f"data.val_path={imagenet / 'val'}",
            f"init.checkpoint={tmp_path / 'later.pth'}", "--output-dir", tmp_path / "knn"]
    now = run_in_process(knn, *args)
    assert now.returncode == 1 and "later.pth does not exist" in now.stderr
    after = run_in_process(knn, *args, "--after", "17:18")
    assert after.returncode == 0 and "#SBATCH --dependency=afterok:17:18" in after.stdout, after.stderr
    assert "warning:" in after.stderr and "later.pth does not exist" in after.stderr
    assert not (tmp_path / "knn").exists()


@pytest.mark.parametrize("settings, message", [
    (Settings(["knn"], "vitdet", "paper", DataRoots()), r"--imagenet \(for knn\)"),
    (Settings(["detection"], "vitdet", "paper", DataRoots(imagenet="/x")), r"--coco \(for detection\)"),
    (Settings(["robustness"], "vitdet", "paper", DATA), "add finetune"),
    (Settings(["segmentation"], "vitdet", "paper", DATA), "choose among"),
    (Settings(["knn"], "vitdet", "paper", DATA, {"knnn": ["a=1"]}), "no such job"),
])
def test_settings_without_their_data_are_refused(settings, message):
    with pytest.raises(ConfigError, match=message):
        check_settings(settings)


def test_a_size_the_preset_has_no_recipe_for_is_named(tmp_path):
    small = Backbone("s", "/c.pth", "vit_small_patch16", 224, "x")
    with pytest.raises(ConfigError, match="linprobe has no recipe for ViT-small"):
        build_plan([small], Settings(["linprobe"], "vitdet", "paper", DATA), tmp_path, Launch())


@pytest.mark.parametrize("preset, message", [
    ({"finetun": {}}, "finetun: unknown section"),
    ({"knn": {"confg": "x"}}, r"knn: unknown key\(s\) \['confg'\]"),
    ({"finetune": {"config": {"base": "finetune/nope.yaml"}}}, "finetune/nope"),
    ({"finetune": {"config": {"bigg": "finetune/rcmae_vit_base.yaml"}}}, "'bigg' is no ViT size"),
    ({"knn": {"overrides": ["k"]}}, "key=value"),
    ({"knn": {"slurm": {"gpus": 1}}}, r"unknown key\(s\) \['gpus'\]"),
])
def test_a_users_preset_is_checked_key_by_key(tmp_path, preset, message):
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(preset))
    with pytest.raises(ConfigError, match=message):
        load_preset(str(path))


def test_the_shipped_presets_load():
    for name in ("paper", "quick", "demo"):
        assert load_preset(name)[1]


def test_published_numbers_are_the_papers(tmp_path):
    """The numbers beside ours are those of the sources (REFERENCE: MAE ViT-B 83.6 fine-tuning, RC-MAE ViT-B
    68.4 linear probe, ViTDet MAE ViT-B 51.6 / 45.9, MAE ViT-L IN-C 41.8), each with its source."""
    from rcmae.benchmark.card import columns

    rows, sources = published_rows(["base", "large"], columns("vitdet"))
    cell = {(r["method"], r["size"]): r["cells"] for r in rows}
    assert cell[("MAE", "base")]["finetune_top1"]["value"] == 83.6
    assert cell[("MAE", "base")]["coco_box_ap_vitdet"]["value"] == 51.6
    assert cell[("MAE", "base")]["coco_mask_ap_vitdet"]["value"] == 45.9
    assert cell[("RC-MAE", "base")]["linprobe_top1"]["value"] == 68.4
    assert cell[("MAE", "large")]["in_c_mce"]["value"] == 41.8
    assert "knn_top1" not in cell[("MAE", "base")]  # no published k-NN: missing, not filled
    assert "coco_box_ap_paper" not in cell[("RC-MAE", "base")]  # another protocol's column is not shown
    assert all(c["source"] in sources for r in rows for c in r["cells"].values())
    assert "Lee et al." in sources[cell[("RC-MAE", "base")]["linprobe_top1"]["source"]]
    paper, _ = published_rows(["base"], columns("paper"))
    assert {r["method"]: r["cells"]["coco_box_ap_paper"]["value"] for r in paper} == {"MAE": 50.3, "RC-MAE": 51.0}


# ------------------------------------------------------------------------------------------------ job folders
def job(tmp_path, protocol, section=None):
    return Job("b", protocol, section or protocol, [], str(tmp_path / protocol))


def write_jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_fine_tuning_reports_the_final_epoch_and_is_partial_before_it(tmp_path):
    ft = job(tmp_path, "finetune")
    d = tmp_path / "finetune"
    write_jsonl(d / "metrics.jsonl", [{"step": 5, "epoch": 1.0, "loss": 2.0},
                                      {"step": 5, "epoch": 1, "eval_top1": 70.0, "eval_n": 50},
                                      {"step": 10, "epoch": 2, "eval_top1": 65.0, "eval_n": 50}])
    (d / "config.yaml").write_text(yaml.safe_dump({"optim": {"epochs": 4}}))
    o = outcome(ft)
    assert not o.done and o.started and o.cells["finetune_top1"]["partial"]
    assert o.cells["finetune_top1"]["value"] == 65.0 and "epoch 2 of 4" in o.cells["finetune_top1"]["note"]
    (d / "config.yaml").write_text(yaml.safe_dump({"optim": {"epochs": 2}}))
    o = outcome(ft)
    assert o.done and o.cells["finetune_top1"] == {"value": 65.0, "images": 50, "partial": False,
                                                   "note": "final epoch 2 of 2 (best 70.00 at epoch 1)"}
    assert o.figures == {"train_loss": [[1.0, 2.0]], "val_top1": [[1, 70.0], [2, 65.0]]}


def test_detection_is_done_after_the_last_iterations_evaluation(tmp_path):
    det = job(tmp_path, "detection", "detection_paper")
    d = tmp_path / "detection"
    d.mkdir()
    ap = {"AP": 40.0, "APs": float("nan"), "APm": 41.0, "APl": 42.0}
    results = {"bbox": ap, "segm": {**ap, "AP": 35.0},
               "evaluated": {"dataset": "val", "images": 4, "iteration": 8, "max_iter": 10}}
    (d / "eval_results.json").write_text(json.dumps(results))
    o = outcome(det)
    assert not o.done and o.cells["coco_box_ap_paper"]["partial"] and o.progress == "iteration 8 of 10"
    results["evaluated"]["iteration"] = 10
    (d / "eval_results.json").write_text(json.dumps(results))
    (d / "model_final.pth").write_bytes(b"")
    o = outcome(det)
    assert o.done and o.cells["coco_mask_ap_paper"]["value"] == 35.0 and o.cells["coco_box_ap_paper"]["images"] == 4
    assert o.figures["box"] == {"APs": None, "APm": 41.0, "APl": 42.0}  # NaN (no small objects): no bar


def test_robustness_reports_an_incomplete_mce_as_missing(tmp_path):
    rob = job(tmp_path, "robustness")
    d = tmp_path / "robustness"
    d.mkdir()
    (d / "robustness.json").write_text(json.dumps({
        "imagenet_a": {"top1": 10.0, "n": 7500, "classes": 200},
        "imagenet_c": {"mCE": None, "mCE_status": "incomplete: missing fog", "images": 100, "classes": 4,
                       "error": {"snow": {"1": 50.0, "2": 70.0}}}, "problems": {}}))
    o = outcome(rob)
    assert o.done and o.cells["in_a_top1"] == {"value": 10.0, "images": 7500, "note": "200 classes", "partial": False}
    assert o.cells["in_c_mce"]["value"] is None and "missing fog" in o.cells["in_c_mce"]["note"]
    assert o.figures == {"snow": 60.0}


def test_job_states_from_the_folder_and_the_record(tmp_path):
    knn = job(tmp_path, "knn")
    assert job_state(knn).state == "todo"
    add_attempt(knn, {"launcher": "here", "command": ["x"], "started": 1.0, "pid": 1 << 22, "rc": 1})
    assert job_state(knn).state == "failed"
    (tmp_path / "knn" / "knn.json").write_text(json.dumps({"knn_top1": 50.0, "knn_n": 8, "train_images": 16}))
    assert job_state(knn).state == "done"
    ft = job(tmp_path, "finetune")
    add_attempt(ft, {"launcher": "here", "command": ["x"], "started": 1.0, "pid": 1 << 22, "rc": 143})
    (tmp_path / "finetune" / "last_checkpoint").write_text("checkpoint_00000004.pth")
    assert job_state(ft).state == "interrupted"  # the tool resumes from it


@pytest.mark.parametrize("slurm_state, expected", [("PENDING", "queued"), ("RUNNING", "running"),
                                                   ("FAILED", "failed"), (None, "failed")])
def test_slurm_job_states_come_from_the_queue(tmp_path, monkeypatch, slurm_state, expected):
    """squeue's answer (a stand-in executable on PATH): waiting and running jobs are left alone, a job the
    queue no longer has and that wrote nothing failed (the next call submits it again)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    squeue = bin_dir / "squeue"
    squeue.write_text(f"#!/bin/sh\necho {slurm_state}\n" if slurm_state else "#!/bin/sh\nexit 1\n")
    squeue.chmod(squeue.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}/usr/bin:/bin")
    knn = job(tmp_path, "knn")
    add_attempt(knn, {"launcher": "slurm", "command": ["x"], "started": 1.0, "slurm_id": "42"})
    st = job_state(knn)
    assert (st.state, st.slurm_id) == (expected, "42")


def test_a_job_runs_while_its_process_does_and_a_reused_pid_is_not_it(tmp_path):
    import subprocess
    import sys

    knn = job(tmp_path, "knn")
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "-m", "rcmae.tools.knn"])
    try:
        add_attempt(knn, {"launcher": "here", "command": ["x"], "started": 1.0, "pid": child.pid})
        assert job_state(knn).state == "running"
        add_attempt(knn, {"launcher": "here", "command": ["x"], "started": 2.0, "pid": os.getpid()})
        assert job_state(knn).state == "failed"  # a live process, but not this job's command
    finally:
        child.kill()
        child.wait()


def test_a_second_benchmark_call_in_the_same_folder_is_refused(tmp_path, imagenet):
    """Two calls would run the same jobs at once: the folder is locked, its holder named."""
    import subprocess
    import sys

    from fixtures import run_in_process

    from rcmae.tools import benchmark

    out = tmp_path / "bench"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time\nf = open(sys.argv[1], 'a+')\n"
                               "fcntl.flock(f, fcntl.LOCK_EX)\nprint('locked', flush=True)\ntime.sleep(60)",
                               str(out / "run.lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        res = run_in_process(benchmark, "random:vit_micro_patch8@32", "--protocols", "knn", "--imagenet", imagenet,
                             "--output", out)
        assert res.returncode == 1 and "is in use by another run" in res.stderr, res.stderr
        assert not (out / "random").exists() and not (out / "benchmark.json").exists()
    finally:
        holder.kill()
        holder.wait()
