"""The fast pretraining pipeline (rcmae/core/data/transforms.py) against torchvision's, on real photos."""
import pytest
import skimage.data
import torch
from PIL import Image
from torchvision import transforms

from rcmae.core.data.datasets import SeededImages
from rcmae.core.data.pipelines import pretrain_transform
from rcmae.core.data.sampler import seeded
from rcmae.core.data.transforms import IMAGENET_MEAN, IMAGENET_STD, crop_and_flip, dct_scale, to_model_input

CPU = torch.device("cpu")


def photo_file(tmp_path, name="chelsea", size=(500, 375), fmt="JPEG", mode="RGB", **save):
    img = Image.fromarray(getattr(skimage.data, name)()).resize(size, Image.BICUBIC).convert(mode)
    path = tmp_path / f"{name}_{size[0]}_{mode}.{fmt.lower()}"
    img.save(path, fmt, **save)
    return path


def pixels(x: torch.Tensor) -> torch.Tensor:
    """A pipeline's output as 0-255 floats (the torchvision one is normalised, ours uint8)."""
    if x.dtype == torch.uint8:
        return x.float()
    return (x * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) * 255


def psnr(a, b):
    return float(10 * torch.log10(255 ** 2 / ((pixels(a) - pixels(b)) ** 2).mean()))


def test_same_crop_and_flip_as_torchvision_for_every_seed(tmp_path):
    """On a lossless image both pipelines decode the same pixels: any other box or flip would cost
    tens of dB; only the rounding of two implementations of PIL's bicubic filter remains."""
    path = photo_file(tmp_path, fmt="PNG")
    fast, reference = (SeededImages([str(path)], pretrain_transform(64, 0.2, p)) for p in ("fast", "torchvision"))
    for seed in range(20):
        ours, theirs = fast[(0, seed)][0], reference[(0, seed)][0]
        assert ours.dtype == torch.uint8 and ours.shape == (3, 64, 64)
        assert (pixels(ours) - pixels(theirs)).abs().max() <= 3, seed
    assert not torch.equal(fast[(0, 0)][0], fast[(0, 1)][0]) and torch.equal(fast[(0, 5)][0], fast[(0, 5)][0])


def test_crop_parameters_are_torchvisions_draws():
    for seed in range(10):
        with seeded(seed):
            box, flip = crop_and_flip(500, 375, 0.2)
        with seeded(seed):
            expected = transforms.RandomResizedCrop.get_params(torch.empty(3, 375, 500), (0.2, 1.0), (3 / 4, 4 / 3))
            expected_flip = bool(torch.rand(1) < 0.5)
        assert box == expected and flip == expected_flip


def test_dct_scale_keeps_the_crop_at_least_the_output_size():
    assert [dct_scale(s, s, 224) for s in (223, 447, 448, 895, 896, 1791, 1792, 5000)] == [1, 1, 2, 2, 4, 4, 8, 8]
    assert dct_scale(2000, 300, 224) == 1  # the short side decides


def test_reduced_decoding_of_large_photos_stays_close(tmp_path):
    """A 2400 x 1800 JPEG: whole-image crops are decoded at 1/4 (DCT scaling) and still match the
    full decode + PIL resize closely; ImageNet-sized files are decoded whole and match to rounding."""
    big, small = photo_file(tmp_path, size=(2400, 1800), quality=90), photo_file(tmp_path, quality=90)
    for path, floor in ((big, 30.0), (small, 45.0)):
        fast = SeededImages([str(path)], pretrain_transform(224, 0.9, "fast"))
        ref = SeededImages([str(path)], pretrain_transform(224, 0.9, "torchvision"))
        worst = min(psnr(fast[(0, s)][0], ref[(0, s)][0]) for s in range(6))
        assert worst > floor, (path.name, worst)


@pytest.mark.parametrize("mode,fmt", [("L", "JPEG"), ("CMYK", "JPEG"), ("RGB", "PNG"), ("RGBA", "PNG")])
def test_other_formats_and_colour_modes(tmp_path, mode, fmt):
    path = photo_file(tmp_path, "astronaut", (120, 90), fmt, mode)
    out = SeededImages([str(path)], pretrain_transform(32, 0.2, "fast"))[(0, 3)][0]
    ref = SeededImages([str(path)], pretrain_transform(32, 0.2, "torchvision"))[(0, 3)][0]
    assert out.shape == (3, 32, 32) and out.dtype == torch.uint8
    assert psnr(out, ref) > 30  # CMYK: two converters, a little apart


def test_unreadable_files_are_skipped_not_fatal(tmp_path):
    good = photo_file(tmp_path)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[:2000])
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"not an image")
    images = SeededImages([str(truncated), str(garbage), str(good)], pretrain_transform(32, 0.2, "fast"))
    out, _, skipped = images[(0, 1)]
    assert skipped == 2 and torch.equal(out, images[(2, 1)][0])


def test_device_normalisation_equals_to_tensor_and_normalize():
    raw = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    pil = [Image.fromarray(x.permute(1, 2, 0).numpy()) for x in raw]
    reference = torch.stack([transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)(transforms.ToTensor()(p)) for p in pil])
    torch.testing.assert_close(to_model_input(raw, CPU), reference, rtol=0, atol=1e-5)
    assert to_model_input(reference, CPU) is reference  # float batches are already normalised



def test_folder_and_shards_train_identically_and_resume_exactly(tmp_path, imagenet):
    """The fast pipeline end to end: a JPEG folder and its shards give the same weights, and a run
    stopped mid-epoch and resumed (with a loader worker this time) ends where the straight run does;
    ``data.pipeline=gpu`` without CUDA says so and trains exactly as ``fast``."""
    import json

    from fixtures import micro_config

    from rcmae.core.checkpoint import find_last_checkpoint, read_checkpoint
    from rcmae.core.data.shard_writer import write_shards
    from rcmae.pretrain.train import main

    write_shards(imagenet / "train", tmp_path / "shards", shard_bytes=20_000, progress=False)
    folder = ["data.source=folder", f"data.path={imagenet / 'train'}", "optim.epochs=3"]
    runs = {"straight": folder, "shards": ["data.source=shards", f"data.path={tmp_path / 'shards'}", "optim.epochs=3"],
            "gpu_on_cpu": [*folder, "data.pipeline=gpu"]}
    for name, overrides in runs.items():
        main(micro_config(tmp_path / name, overrides))
    main(micro_config(tmp_path / "split", [*folder, "train.stop_at_step=3"]))
    (imagenet / "train" / "n07920052" / "late_arrival.JPEG").write_bytes(b"")  # the folder changes meanwhile
    try:
        main(micro_config(tmp_path / "split", [*folder, "data.num_workers=1"]))
    finally:
        (imagenet / "train" / "n07920052" / "late_arrival.JPEG").unlink()
    final = {name: read_checkpoint(find_last_checkpoint(tmp_path / name))
             for name in ("straight", "shards", "split", "gpu_on_cpu")}
    assert final["straight"].raw["step"] == 6 and final["split"].raw["step"] == 6
    assert "data.pipeline=gpu decodes with nvJPEG and needs CUDA" in (tmp_path / "gpu_on_cpu" / "log.txt").read_text()
    for name in ("shards", "split", "gpu_on_cpu"):
        for k, v in final["straight"].teacher.items():
            assert torch.equal(final[name].teacher[k], v), (name, k)
    listed = json.loads((tmp_path / "split" / "image_list.json").read_text())
    assert len(listed["files"]) == 16 and not any("late_arrival" in f for f in listed["files"])
