"""rcmae/benchmark/report.py: report.md / .html / .json and the figures, from report dicts built by hand."""
import base64
import copy
import json
import re

import pytest

from rcmae.benchmark import report as report_mod
from rcmae.benchmark.report import write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
COLUMNS = [
    {"key": "finetune_top1", "label": "IN-1K fine-tune top-1", "unit": "%", "better": "higher",
     "protocol": "finetune"},
    {"key": "linprobe_top1", "label": "linear probe top-1", "unit": "%", "better": "higher", "protocol": "linprobe"},
    {"key": "knn_top1", "label": "k-NN top-1", "unit": "%", "better": "higher", "protocol": "knn"},
    {"key": "coco_box_ap", "label": "COCO AP box (ViTDet)", "unit": "AP", "better": "higher",
     "protocol": "detection"},
    {"key": "in_c_mce", "label": "IN-C mCE", "unit": "%", "better": "lower", "protocol": "robustness"},
]
NOTE_TO_ESCAPE = 'stopped at 40 of 90 epochs <b>& "resumed"'


def done(value, job, images=50000, note=None):
    return {"value": value, "status": "done", "images": images, "job_dir": job, "log": f"{job}/log.txt",
            "note": note}


def make_report():
    """Two backbones (teacher: all done but a missing robustness cell; student: partial, failed, running,
    queued), published MAE rows of the base size and of a size we did not run, and every figure kind."""
    teacher = {"finetune_top1": done(83.61, "teacher/finetune", note="final epoch 100 of 100 (best 83.70 at 97)"),
               "linprobe_top1": done(68.04, "teacher/linprobe"),
               "knn_top1": done(51.2, "teacher/knn"),
               "coco_box_ap": done(51.93, "teacher/detection", images=5000),
               "in_c_mce": {"value": None, "status": "missing", "note": "robustness not planned"}}
    student = {"finetune_top1": {"value": None, "status": "failed", "job_dir": "student/finetune",
                                 "log": "student/finetune/log.txt", "note": "CUDA out of memory"},
               "linprobe_top1": {**done(61.5, "student/linprobe", images=10000), "status": "partial",
                                 "note": NOTE_TO_ESCAPE},
               "knn_top1": {"value": None, "status": "running", "log": "student/knn/log.txt"},
               "coco_box_ap": {"value": None, "status": "queued"}}
    return {
        "title": "RC-MAE benchmark", "created": "2026-11-30T01:02:03+00:00",
        "command": "rcmae-benchmark --backbones teacher=/ckpt/a.pth student=/ckpt/a.pth --preset paper",
        "preset": "paper", "columns": COLUMNS,
        "rows": [{"backbone": "teacher", "source": "/abs/ckpt/checkpoint_00000640.pth",
                  "origin": "ours (RC-MAE pretraining)", "arch": "vit_base_patch16", "size": "base", "img_size": 224,
                  "cells": teacher},
                 {"backbone": "student", "source": "/abs/ckpt/checkpoint_00000640.pth",
                  "origin": "ours (RC-MAE pretraining)", "arch": "vit_base_patch16", "size": "base", "img_size": 224,
                  "cells": student}],
        "published": [{"method": "MAE", "size": "base", "label": "MAE ViT-B (published)",
                       "cells": {"finetune_top1": {"value": 83.6, "source": 1}, "coco_box_ap": {"value": 51.6,
                                                                                                 "source": 2}}},
                      {"method": "MAE", "size": "large", "label": "MAE ViT-L (published)",
                       "cells": {"finetune_top1": {"value": 85.9, "source": 1}}}],
        "sources": {"1": "He et al., Masked Autoencoders Are Scalable Vision Learners, CVPR 2022, Table 3",
                    "2": "Li et al., Exploring Plain Vision Transformer Backbones for Object Detection, ECCV 2022"},
        "figures": {
            "pretraining": {b: {"loss": [[s, 1.0 - s / 2000 + i / 10] for s in range(0, 1000, 100)],
                                "knn_top1": [[s, 10 + s / 50 + i] for s in range(0, 1000, 250)]}
                            for i, b in enumerate(["teacher", "student"])},
            "finetune": {"teacher": {"train_loss": [[e, 3 - e / 50] for e in range(100)],
                                     "val_top1": [[e, 70 + e / 10] for e in range(0, 100, 10)]}},
            "linprobe": {"student": {"train_loss": [[e, 4 - e / 30] for e in range(40)],
                                     "val_top1": [[e, 50 + e / 4] for e in range(40)]}},
            "robustness": {"teacher": {"gaussian_noise": 45.1, "shot_noise": 47.0, "fog": 38.2},
                           "student": {"gaussian_noise": 49.3, "fog": 40.0}},
            "detection": {"teacher": {"box": {"APs": 30.1, "APm": 50.2, "APl": 60.3},
                                      "mask": {"APs": 25.0, "APm": 44.1, "APl": 58.8}},
                          "student": {"box": {"APs": 28.4, "APm": 48.0, "APl": 59.1}}}},
        "costs": [{"backbone": "teacher", "status": "done", "params_m": 85.8, "gflops_per_image": 17.6,
                   "flops_counting": "fvcore, one multiply-add = one FLOP", "throughput_img_per_s": 1234.5,
                   "batch_size": 64, "precision": "bf16", "device": "NVIDIA H200", "peak_memory_gib": 3.2,
                   "memory_kind": "cuda max_memory_allocated", "job_dir": "teacher/cost",
                   "log": "teacher/cost/log.txt"},
                  {"backbone": "student", "status": "queued", "job_dir": "student/cost"}],
        "jobs": [{"name": "teacher/finetune", "backbone": "teacher", "protocol": "finetune", "state": "done",
                  "job_dir": "teacher/finetune", "log": "teacher/finetune/log.txt",
                  "command": "python -m rcmae.tools.finetune --x 'a<b'", "progress": "epoch 100 of 100"},
                 {"name": "student/linprobe", "backbone": "student", "protocol": "linprobe", "state": "interrupted",
                  "job_dir": "student/linprobe", "log": "student/linprobe/log.txt", "command": "python -m ...",
                  "progress": "epoch 40 of 90"}],
    }


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """The full report, written once for the module's tests (figures are the slow part)."""
    report = make_report()
    out = tmp_path_factory.mktemp("report")
    paths = write_report(report, out)
    return report, out, paths


def table_rows(markdown, heading):
    """The rows of the table under ``## heading`` as lists of cell texts (split on unescaped pipes)."""
    section = markdown.split(f"## {heading}\n", 1)[1]
    lines = [line for line in section.split("\n\n", 1)[0].splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:-1]] for line in lines]


def results(markdown):
    """The results table as {first cell: row cells}, header and alignment rows left out."""
    rows = table_rows(markdown, "Results")
    return rows[0], {row[0]: row for row in rows[2:]}


def test_paths_returned_and_files_written(written):
    _, out, paths = written
    kinds = {"pretraining", "finetune", "linprobe", "robustness", "detection"}
    assert set(paths) == {"json", "markdown", "html"} | kinds
    assert paths["markdown"] == str(out / "report.md") and paths["html"] == str(out / "report.html")
    for kind in kinds:
        assert paths[kind] == str(out / "figures" / f"{kind}.png")
        assert (out / "figures" / f"{kind}.png").read_bytes().startswith(PNG_SIGNATURE)


def test_table_has_every_row_and_the_columns(written):
    report, out, _ = written
    header, rows = results((out / "report.md").read_text())
    assert header[0] == "backbone" and len(header) == 1 + len(COLUMNS)
    assert header[1] == "IN-1K fine-tune top-1 (%) ↑" and header[4] == "COCO AP box (ViTDet) ↑"
    assert header[5] == "IN-C mCE (%) ↓"
    assert list(rows) == ["**teacher** <sub>vit_base_patch16</sub>", "**student** <sub>vit_base_patch16</sub>",
                          "*MAE ViT-B (published)*"]  # published rows after ours, of our size only
    assert all(len(row) == len(header) for row in rows.values())


def test_value_links_to_its_log_and_states_its_image_count(written):
    _, out, _ = written
    _, rows = results((out / "report.md").read_text())
    teacher = next(row for name, row in rows.items() if "teacher" in name)
    assert teacher[1].startswith("[83.61](teacher/finetune/log.txt ")  # its note as the link's title
    assert "<sub>[n=50,000](teacher/finetune)</sub>" in teacher[1]
    assert teacher[4] == "[51.93](teacher/detection/log.txt) <sub>[n=5,000](teacher/detection)</sub>"


def test_cells_without_a_value_show_no_number(written):
    _, out, _ = written
    _, rows = results((out / "report.md").read_text())
    teacher, student = (next(row for name, row in rows.items() if b in name) for b in ("teacher", "student"))
    assert teacher[5] == "—" and student[5] == "—"  # missing, and absent from the cells
    assert student[1] == "[failed](student/finetune/log.txt)"
    assert student[3] == "[running](student/knn/log.txt)" and student[4] == "queued"
    for cell in (teacher[5], student[1], student[3], student[4], student[5]):
        assert not re.search(r"\d", re.sub(r"\(.*?\)", "", cell))  # no digit outside the link target


def test_partial_value_is_marked_and_its_note_listed(written):
    _, out, _ = written
    markdown = (out / "report.md").read_text()
    _, rows = results(markdown)
    student = next(row for name, row in rows.items() if "student" in name)
    assert student[2].startswith("[61.5](student/linprobe/log.txt") and "\\*" in student[2]
    notes = markdown.split("### Notes\n", 1)[1].split("###", 1)[0]
    assert "linear probe top-1 (partial\\*): stopped at 40 of 90 epochs \\<b\\>& \"resumed\"" in notes
    assert "IN-1K fine-tune top-1 (failed): CUDA out of memory" in notes
    assert "robustness not planned" not in notes  # a missing cell: the legend explains —


def test_published_values_carry_their_source(written):
    _, out, _ = written
    markdown = (out / "report.md").read_text()
    _, rows = results(markdown)
    mae = rows["*MAE ViT-B (published)*"]
    assert mae[1] == "83.6<sup>1</sup>" and mae[4] == "51.6<sup>2</sup>" and mae[2] == "—"
    sources = markdown.split("### Sources\n", 1)[1].split("###", 1)[0]
    assert "- **1** He et al., Masked Autoencoders" in sources and "- **2** Li et al." in sources
    assert "### Legend" in markdown


def test_cost_figures_and_jobs_sections(written):
    _, out, _ = written
    markdown = (out / "report.md").read_text()
    cost = table_rows(markdown, "Cost")
    assert cost[0][:3] == ["backbone", "params (M)", "GFLOPs / image"]
    teacher, student = cost[2], cost[3]
    assert teacher[1] == "[85.8](teacher/cost/log.txt)"
    assert "1,234.5" in teacher[3] and "batch 64, bf16" in teacher[3]
    assert teacher[2] == "[17.6](teacher/cost/log.txt)"
    assert "FLOPs: fvcore, one multiply-add = one FLOP." in markdown.split("## Cost", 1)[1]
    assert teacher[4] == "[3.2](teacher/cost/log.txt) <sub>cuda max_memory_allocated</sub>"
    assert student[1:5] == ["queued"] * 4 and student[5] == "—"
    assert "![Pretraining: loss and k-NN top-1 per step](figures/pretraining.png)" in markdown
    jobs = table_rows(markdown, "Jobs")
    assert jobs[2][0].startswith("[teacher/finetune](teacher/finetune/log.txt") and jobs[2][1:3] == [
        "done", "epoch 100 of 100"] and jobs[2][3] == "[teacher/finetune](teacher/finetune)"
    assert jobs[3][1] == "interrupted"


def test_html_is_self_contained_and_escaped(written):
    _, out, _ = written
    page = (out / "report.html").read_text()
    assert 'src="http' not in page and "<script" not in page and "<link" not in page and "<style>" in page
    images = re.findall(r"<img [^>]*>", page)
    assert len(images) == 5
    for tag in images:
        data = re.fullmatch(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)" alt="[^"]*">', tag).group(1)
        assert base64.b64decode(data).startswith(PNG_SIGNATURE)
    assert "stopped at 40 of 90 epochs &lt;b&gt;&amp; &quot;resumed&quot;" in page and "<b>&" not in page
    assert "--x &#x27;a&lt;b&#x27;" in page  # a job's command, on hover
    assert '<a href="teacher/finetune/log.txt" title="final epoch 100 of 100 (best 83.70 at 97)">83.61</a>' in page
    assert '<td class="num">83.6<sup>1</sup></td>' in page


def test_json_round_trips(written):
    report, out, _ = written
    loaded = json.loads((out / "report.json").read_text())
    assert loaded.pop("figure_files") == {k: f"figures/{k}.png" for k in report["figures"]}
    assert loaded == report


def test_report_without_figures_writes_none(tmp_path):
    report = make_report()
    del report["figures"]
    paths = write_report(report, tmp_path)
    assert set(paths) == {"json", "markdown", "html"}
    assert not (tmp_path / "figures").exists()
    assert "## Figures" not in (tmp_path / "report.md").read_text()
    assert "<img" not in (tmp_path / "report.html").read_text()


def test_only_the_kinds_present_are_drawn(tmp_path):
    """A kind absent (or empty) has no figure; rewriting drops the figure an earlier report had."""
    report = make_report()
    write_report(report, tmp_path)
    report["figures"] = {"robustness": report["figures"]["robustness"], "finetune": {}}
    paths = write_report(report, tmp_path)
    assert set(paths) == {"json", "markdown", "html", "robustness"}
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == ["robustness.png"]


def test_rewriting_leaves_no_temporary_files(tmp_path):
    report = make_report()
    report["figures"] = {"detection": report["figures"]["detection"]}
    write_report(report, tmp_path)
    report["title"] = "RC-MAE benchmark, second pass"
    write_report(report, tmp_path)
    names = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    assert names == ["figures", "figures/detection.png", "report.html", "report.json", "report.md"]
    assert (tmp_path / "report.md").read_text().startswith("# RC-MAE benchmark, second pass\n")


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "report.md"
    path.write_text("old report\n")

    def half_then_fail(tmp):
        tmp.write_text("new rep")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        report_mod.atomic_write(path, half_then_fail)
    assert path.read_text() == "old report\n" and [p.name for p in tmp_path.iterdir()] == ["report.md"]


def test_the_input_is_not_changed_and_odd_paths_are_quoted(tmp_path):
    report = make_report()
    del report["figures"]
    report["rows"][0]["cells"]["knn_top1"].update(job_dir="teacher/k nn (2)", log="teacher/k nn (2)/log|1.txt")
    before = copy.deepcopy(report)
    write_report(report, tmp_path)
    assert report == before
    markdown = (tmp_path / "report.md").read_text()
    assert "[51.2](teacher/k%20nn%20%282%29/log%7C1.txt)" in markdown
    assert 'href="teacher/k%20nn%20%282%29/log%7C1.txt"' in (tmp_path / "report.html").read_text()


def test_feature_pictures_of_each_backbone_or_why_not(tmp_path):
    """A backbone's drawn pictures appear under its name (linked in Markdown, embedded in HTML); one whose job
    failed shows that state linked to its log, never an image."""
    from PIL import Image

    (tmp_path / "teacher" / "pictures").mkdir(parents=True)
    for kind, color in (("attention", "red"), ("pca", "blue")):
        Image.new("RGB", (8, 4), color).save(tmp_path / "teacher" / "pictures" / f"{kind}.png")
    report = {**make_report(), "figures": {}, "pictures": [
        {"backbone": "teacher", "status": "done", "log": "teacher/pictures/console.log",
         "attention": "teacher/pictures/attention.png", "pca": "teacher/pictures/pca.png"},
        {"backbone": "student", "status": "failed", "log": "student/pictures/console.log"}]}
    write_report(report, tmp_path)
    markdown = (tmp_path / "report.md").read_text()
    section = markdown.split("## Feature pictures\n", 1)[1].split("\n## ", 1)[0]
    teacher, student = section.split("### student")
    assert "](teacher/pictures/attention.png)" in teacher and "](teacher/pictures/pca.png)" in teacher
    assert "![" not in student and "[failed](student/pictures/console.log)" in student
    html = (tmp_path / "report.html").read_text()
    embedded = [base64.b64decode(data) for data in re.findall(r'src="data:image/png;base64,([^"]+)"', html)]
    assert {(tmp_path / "teacher" / "pictures" / f"{k}.png").read_bytes() for k in ("attention", "pca")} <= set(
        embedded)
