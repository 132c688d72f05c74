"""The README's benchmark commands, shrunk (their numbers are only meaningful on real hardware)."""
import json

import pytest
from test_readme_commands import run


@pytest.mark.slow
def test_data_throughput_prints_the_per_core_ratio(tmp_path, imagenet):
    out = tmp_path / "data.json"
    res = run("benchmarks/data_throughput.py", "--data", imagenet / "train", "--images", 64, "--workers", 1,
              "--quality-samples", 8, "--json", out)
    last = res.stdout.strip().splitlines()[-1]
    result = json.loads(out.read_text())
    assert last == f"per-core speedup vs torchvision: {result['per_core_speedup']:.2f}"
    assert [r["pipeline"] for r in result["rows"]] == ["torchvision (official MAE)", "fast"]
    assert result["quality"]["samples"] == 8 and result["quality"]["psnr_min"] > 35


@pytest.mark.slow
def test_step_benchmark_synthetic_and_end_to_end(tmp_path, imagenet):
    tiny = ["--arch", "vit_micro_patch8", "--img-size", 32, "--batch", 8, "--steps", 3, "--warmup", 1,
            "--decoder-dim", 32, "--decoder-depth", 1, "--decoder-heads", 2]
    for extra in ([], ["--data", imagenet / "train", "--workers", 1]):
        out = tmp_path / "step.json"
        run("benchmarks/pretrain_throughput.py", *tiny, *extra, "--json", out)
        report = json.loads(out.read_text())
        assert [r["mode"] for r in report["results"]] == ["RC-MAE", "MAE"]
        assert all(r["img_per_s"] > 0 and 0 <= r["data_wait"] <= 1 for r in report["results"])
        assert (report["args"]["data"] is None) == (not extra)
