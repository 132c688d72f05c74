"""The README's benchmark commands, shrunk (their numbers are only meaningful on real hardware)."""
import importlib.util
import json

import pytest
import torch
from fixtures import ROOT
from test_readme_commands import run
from torch.utils.data import DataLoader


@pytest.fixture(scope="module")
def data_throughput():
    spec = importlib.util.spec_from_file_location("data_throughput", ROOT / "benchmarks" / "data_throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class CountingImages(torch.utils.data.Dataset):
    """A dataset that counts the items it hands out (workers=0: in this process)."""

    def __init__(self, dataset):
        self.dataset, self.items = dataset, 0

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        self.items += 1
        return self.dataset[i]


def test_images_are_counted_in_every_pipelines_batch_structure(data_throughput, imagenet):
    """torchvision's ImageFolder yields [images, labels]; ours a tensor of images: 3 images either way."""
    from rcmae.core.data.datasets import SeededImages
    from rcmae.core.data.folder import list_images
    from rcmae.core.data.pipelines import pretrain_transform

    root = imagenet / "train"
    fast = data_throughput.Seeded(SeededImages(list_images(root), pretrain_transform(224, 0.2, "fast")))
    for dataset in (data_throughput.official_dataset(root), fast):
        assert data_throughput.images_in(next(iter(DataLoader(dataset, batch_size=3)))) == 3
    with pytest.raises(TypeError, match="no image batch"):
        data_throughput.images_in([torch.zeros(3), torch.zeros(3)])


def test_a_round_reports_the_images_it_processed(data_throughput, imagenet):
    """16 images a pass (one batch of 16): the first batch is untimed, then whole batches until 40 images."""
    dataset = CountingImages(data_throughput.official_dataset(imagenet / "train"))
    images, seconds = data_throughput.timed_round(dataset, 40, workers=0)
    assert images == dataset.items - 16 == 48 and seconds > 0


def test_speedup_is_the_median_of_paired_rounds(data_throughput, monkeypatch):
    """Rounds alternate A B A B ...; one round slowed by a busy machine moves the median ratio, not the mean."""
    order, speeds = [], {"a": iter([100, 100, 10, 100, 100]), "b": iter([250, 260, 250, 300, 240])}

    def fake_round(dataset, n, workers, on_gpu=False):
        order.append(dataset)
        return n, n / next(speeds[dataset])

    monkeypatch.setattr(data_throughput, "timed_round", fake_round)
    timed = data_throughput.alternating_rounds({"a": "a", "b": "b"}, 50, workers=1, rounds=5)
    assert order == ["a", "b"] * 5
    rates = {name: [n / seconds for n, seconds in rounds] for name, rounds in timed.items()}
    assert rates["a"] == pytest.approx([100, 100, 10, 100, 100]) and all(n == 10 for n, _ in timed["a"])
    # paired ratios 2.5, 2.6, 25 (the busy round), 3.0, 2.4: the median 2.6 (the mean would be 7.1)
    assert data_throughput.median_ratio(rates["b"], rates["a"]) == pytest.approx(2.6)


@pytest.mark.slow
def test_data_throughput_prints_the_per_core_ratio(tmp_path, imagenet):
    out = tmp_path / "data.json"
    res = run("benchmarks/data_throughput.py", "--data", imagenet / "train", "--images", 64, "--rounds", 3,
              "--workers", 1, "--quality-samples", 8, "--json", out)
    last = res.stdout.strip().splitlines()[-1]
    result = json.loads(out.read_text())
    assert last == f"per-core speedup vs torchvision: {result['per_core_speedup']:.2f}"
    assert [r["pipeline"] for r in result["rows"]] == ["torchvision (official MAE)", "fast"]
    # 3 rounds of at least 64 / 3 images: one batch of 16 images (the whole folder) at a time, 2 a round
    for row in result["rows"]:
        assert row["per_core_images"] == row["total_images"] == 3 * 32, row
        assert len(row["per_core_rounds"]) == len(row["total_rounds"]) == 3
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
