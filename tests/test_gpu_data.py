"""The GPU decode pipeline (rcmae/core/data/gpu.py) against the ``fast`` one, on real photos: on the CPU
everywhere, with nvJPEG where CUDA is present."""
from __future__ import annotations

import pytest
import skimage.data
import torch
from fixtures import micro_config
from PIL import Image
from test_train import metrics
from torch.utils.data import DataLoader

import rcmae.core.data.gpu as gpu_data
import rcmae.core.data.pipelines as pipelines
from rcmae.core.data.datasets import SeededImages
from rcmae.core.data.gpu import (
    EncodedRandomResizedCrop,
    EncodedSample,
    collate_encoded,
    decode_on_device,
    gpu_decodable_shape,
    jpeg_frame,
)
from rcmae.core.data.sampler import seeded
from rcmae.core.data.transforms import FastRandomResizedCrop, crop_and_flip, dct_scale
from rcmae.pretrain.train import main as pretrain

CPU = torch.device("cpu")
SIZE, MIN_SCALE = 224, 0.2
SEEDS = range(40)
PHOTOS = ("chelsea", "astronaut", "coffee", "rocket")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="nvJPEG decoding needs CUDA")
# torchvision's own bound for nvJPEG against libjpeg-turbo (test/test_image.py, test_decode_jpegs_cuda):
# mean absolute difference below 2 levels; the IDCT and chroma upsampling differ, not only the rounding
NVJPEG_MEAN_DIFF = 2.0


def save_photo(folder, name: str, fmt: str = "JPEG", mode: str = "RGB", size=(500, 375), **options) -> str:
    """A scikit-image photo at an ImageNet-like size, saved as ``fmt`` in colour ``mode``."""
    img = Image.fromarray(getattr(skimage.data, name)()).convert("RGB").resize(size, Image.BICUBIC).convert(mode)
    path = folder / f"{name}_{mode}_{size[0]}x{size[1]}_{'_'.join(map(str, options.values()))}.{fmt.lower()}"
    img.save(path, fmt, **options)
    return str(path)


def photo_files(folder) -> tuple[list[str], list[str]]:
    """JPEGs the device decodes (baseline, progressive, grayscale, portrait; quality 90), and the files
    the workers decode themselves (PNG, CMYK JPEG)."""
    jpegs = [save_photo(folder, name, quality=90) for name in PHOTOS]
    jpegs += [save_photo(folder, "coffee", quality=90, progressive=True),
              save_photo(folder, "camera", mode="L", quality=90),
              save_photo(folder, "astronaut", size=(375, 500), quality=90)]
    fallbacks = [save_photo(folder, "chelsea", "PNG"), save_photo(folder, "rocket", mode="CMYK", quality=90)]
    return jpegs, fallbacks


def image_size(path: str) -> tuple[int, int]:
    with Image.open(path) as img:
        return img.size


def pixels_diff(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.int() - b.int()).abs()


def test_header_decides_what_the_device_decodes(tmp_path):
    jpegs, (png, cmyk) = photo_files(tmp_path)
    data = {path: open(path, "rb").read() for path in jpegs + [png, cmyk]}
    assert [jpeg_frame(data[p]) for p in jpegs[:2]] == [(0xC0, 8), (0xC0, 8)]  # baseline
    assert jpeg_frame(data[jpegs[4]]) == (0xC2, 8)  # progressive
    assert all(gpu_decodable_shape(data[p]) == image_size(p)[::-1] for p in jpegs)
    assert jpeg_frame(data[png]) is None and gpu_decodable_shape(data[png]) is None
    assert jpeg_frame(data[cmyk]) == (0xC0, 8) and gpu_decodable_shape(data[cmyk]) is None  # CMYK
    assert gpu_decodable_shape(data[jpegs[0]][:-5000]) is None  # truncated: the CPU decoder rejects it
    lossless = data[jpegs[0]].replace(b"\xff\xc0", b"\xff\xc3", 1)  # any other frame type
    assert jpeg_frame(lossless) == (0xC3, 8) and gpu_decodable_shape(lossless) is None


def test_same_box_and_flip_as_crop_and_flip_for_every_seed(tmp_path):
    """Known answer: every seed draws :func:`crop_and_flip`'s box and flip at the file's full size
    (device and fallback files alike), and leaves the generator where the ``fast`` pipeline does."""
    jpegs, fallbacks = photo_files(tmp_path)
    paths = jpegs + fallbacks
    encode, fast = EncodedRandomResizedCrop(SIZE, MIN_SCALE), FastRandomResizedCrop(SIZE, MIN_SCALE)
    dataset = SeededImages(paths, encode)
    flips, boxes = set(), set()
    for i, path in enumerate(paths):
        data, (width, height) = open(path, "rb").read(), image_size(path)
        for seed in SEEDS:
            with seeded(seed, torch_only=True):
                expected = crop_and_flip(width, height, MIN_SCALE)
            with seeded(seed, torch_only=True):
                sample = encode(data)
                next_draw = torch.rand(1)
            with seeded(seed, torch_only=True):
                fast(data)
                assert torch.equal(next_draw, torch.rand(1)), (path, seed)
            assert (sample.box, sample.flip) == expected, (path, seed)
            assert dataset[(i, seed)][0][1:3] == expected
            assert (sample.data is None) == (path in fallbacks) == (sample.pixels is not None)
            flips.add(sample.flip)
            boxes.add(sample.box)
    assert flips == {False, True} and len(boxes) > len(SEEDS)


def fast_and_encoded(paths: list[str], items: list[tuple[int, int]]) -> tuple[torch.Tensor, list[EncodedSample]]:
    """The ``fast`` pipeline's images and the encoded samples of the same (index, seed) items."""
    fast = SeededImages(paths, FastRandomResizedCrop(SIZE, MIN_SCALE))
    encoded = SeededImages(paths, EncodedRandomResizedCrop(SIZE, MIN_SCALE))
    return torch.stack([fast[item][0] for item in items]), [encoded[item][0] for item in items]


def test_decode_on_device_matches_the_fast_pipeline(tmp_path):
    """ImageNet-sized JPEGs (decoded at full scale by the ``fast`` pipeline too) agree to rounding; the
    files the workers decode agree exactly. A missing flip or a misplaced box would be far off."""
    jpegs, fallbacks = photo_files(tmp_path)
    items = [(i, seed) for i in range(len(jpegs)) for seed in range(10)]
    expected, samples = fast_and_encoded(jpegs, items)
    assert all(dct_scale(s.box[2], s.box[3], SIZE) == 1 for s in samples)
    out = decode_on_device(samples, SIZE, CPU)
    assert out.shape == (len(items), 3, SIZE, SIZE) and out.dtype == torch.uint8 and out.device == CPU
    diff = pixels_diff(out, expected)
    print(f"max abs difference to the fast pipeline: {int(diff.max())}, mean {float(diff.float().mean()):.3f}")
    assert diff.max() <= 3

    flipped = [s._replace(flip=not s.flip) for s in samples]
    shifted = [s._replace(box=(s.box[0] // 2, s.box[1] // 2, s.box[2] // 2, s.box[3] // 2)) for s in samples]
    for wrong in (flipped, shifted):
        wrong_diff = pixels_diff(decode_on_device(wrong, SIZE, CPU), expected)
        assert wrong_diff.flatten(1).float().mean(1).min() > 3  # every sample, clearly

    items = [(i, seed) for i in range(len(fallbacks)) for seed in range(4)]
    expected, samples = fast_and_encoded(fallbacks, items)
    assert all(s.data is None for s in samples)
    assert torch.equal(decode_on_device(samples, SIZE, CPU), expected)


def test_mixed_batch_keeps_every_sample_in_its_place(tmp_path, monkeypatch):
    """Device and worker-decoded samples interleaved, also with a torchvision whose decoder takes one
    tensor at a time (the list form raises there)."""
    jpegs, fallbacks = photo_files(tmp_path)
    paths = [jpegs[0], fallbacks[0], jpegs[4], fallbacks[1], jpegs[5]]
    items = [(i, seed) for seed in range(3) for i in range(len(paths))]
    expected, samples = fast_and_encoded(paths, items)
    batched = decode_on_device(samples, SIZE, CPU)
    assert pixels_diff(batched, expected).max() <= 3

    single_decode = gpu_data.decode_jpeg

    def one_at_a_time(data, **kwargs):
        if isinstance(data, list):
            raise RuntimeError("Expected a value of type 'Tensor' for argument 'data'")
        return single_decode(data, **kwargs)

    monkeypatch.setattr(gpu_data, "decode_jpeg", one_at_a_time)
    assert torch.equal(decode_on_device(samples, SIZE, CPU), batched)


def test_collate_through_a_data_loader(tmp_path):
    """Batches of a real DataLoader (in the process and from a worker): samples in order, their bytes
    packed into one buffer, int64 labels and skip counts (an unreadable file and a truncated JPEG are
    replaced by the next file, as in the ``fast`` pipeline); decoded, they are the fast pipeline's."""
    jpegs, fallbacks = photo_files(tmp_path)
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    (tmp_path / "truncated.jpg").write_bytes(open(jpegs[1], "rb").read()[:20_000])
    paths = [jpegs[0], str(tmp_path / "broken.jpg"), fallbacks[0], str(tmp_path / "truncated.jpg")] + jpegs[1:4]
    labels = list(range(10, 10 + len(paths)))
    items = [(i, seed) for seed in (3, 4) for i in range(len(paths))][:12]
    expected = SeededImages(paths, FastRandomResizedCrop(SIZE, MIN_SCALE), labels)
    dataset = SeededImages(paths, EncodedRandomResizedCrop(SIZE, MIN_SCALE), labels)
    for workers in (0, 1):
        loader = DataLoader(dataset, batch_size=4, sampler=items, num_workers=workers, collate_fn=collate_encoded)
        batches = list(loader)
        assert len(batches) == 3
        for b, (samples, batch_labels, skipped) in enumerate(batches):
            want = [expected[item] for item in items[4 * b:4 * b + 4]]
            assert isinstance(samples, list) and all(isinstance(s, EncodedSample) for s in samples)
            assert batch_labels.dtype == skipped.dtype == torch.int64
            assert batch_labels.tolist() == [w[1] for w in want] and skipped.tolist() == [w[2] for w in want]
            encoded = [s.data for s in samples if s.data is not None]
            assert len({d.untyped_storage().data_ptr() for d in encoded}) == 1
            assert pixels_diff(decode_on_device(samples, SIZE, CPU), torch.stack([w[0] for w in want])).max() <= 3
        assert sum(s.tolist().count(1) for _, _, s in batches) == 4  # both bad files, both seeds


@needs_cuda
def test_nvjpeg_batch_matches_the_fast_pipeline(tmp_path):
    """One batched nvJPEG decode of device-decodable JPEGs (baseline, progressive, grayscale, portrait)
    interleaved with worker-decoded files (PNG, CMYK): every sample in its place, within nvJPEG's
    tolerance of the ``fast`` pipeline; worker-decoded pixels exactly; a flipped or misplaced crop far off."""
    jpegs, fallbacks = photo_files(tmp_path)
    paths = jpegs + fallbacks
    items = [(i, seed) for seed in range(4) for i in range(len(paths))]
    expected, samples = fast_and_encoded(paths, items)
    assert all(dct_scale(s.box[2], s.box[3], SIZE) == 1 for s in samples)  # full-scale decoding on both sides
    cuda = torch.device("cuda")
    out = decode_on_device(samples, SIZE, cuda)
    assert out.shape == (len(items), 3, SIZE, SIZE) and out.dtype == torch.uint8 and out.device.type == "cuda"
    diff = pixels_diff(out.cpu(), expected)
    per_sample = diff.flatten(1).float().mean(1)
    print(f"nvJPEG vs fast: largest difference {int(diff.max())}, mean {float(per_sample.mean()):.3f}, "
          f"worst sample mean {float(per_sample.max()):.3f}")
    on_device = torch.tensor([s.data is not None for s in samples])
    assert on_device.any() and not on_device.all()
    assert per_sample.max() < NVJPEG_MEAN_DIFF
    assert diff[~on_device].max() == 0  # decoded by the workers, copied as they are

    flipped = [s._replace(flip=not s.flip) for s in samples]
    shifted = [s._replace(box=(s.box[0] // 2, s.box[1] // 2, s.box[2] // 2, s.box[3] // 2)) for s in samples]
    for wrong in (flipped, shifted):
        wrong_diff = pixels_diff(decode_on_device(wrong, SIZE, cuda).cpu(), expected)
        # on the CPU the least wrong sample is 6.7 levels off on average: at least 4.7 with nvJPEG's 2
        assert wrong_diff.flatten(1).float().mean(1)[on_device].min() > 2 * NVJPEG_MEAN_DIFF


@needs_cuda
def test_pretraining_with_the_gpu_pipeline_on_cuda(imagenet, tmp_path, monkeypatch):
    """``data.pipeline=gpu`` on CUDA: loader workers hand over bytes, every training batch is decoded on
    the GPU, and the run trains to its end (finite losses, checkpoint and exported encoder)."""
    decoded = []

    def recording_decode(samples, size, device):
        out = decode_on_device(samples, size, device)
        decoded.append((len(samples), out.device.type, out.shape[-1]))
        return out

    monkeypatch.setattr(pipelines, "decode_on_device", recording_decode)
    cfg = micro_config(tmp_path / "run", ["data.source=folder", f"data.path={imagenet / 'train'}",
                                          "data.pipeline=gpu", "data.num_workers=2", "train.device=cuda",
                                          "optim.epochs=1", "log.every_steps=1"])
    out = pretrain(cfg)
    assert cfg["data"]["pipeline"] == "gpu"  # not switched to the CPU pipeline
    steps = out["step"]
    assert steps == out["total_steps"] == 2  # 16 images, batch 8
    # the reconstruction figure's 4 images, then one micro-batch of 8 per step, all on the GPU at 32 px
    assert decoded == [(4, "cuda", 32)] + [(8, "cuda", 32)] * steps
    losses = [r["loss"] for r in metrics(tmp_path / "run") if "loss" in r]
    assert len(losses) == steps and all(0 < loss < 10 for loss in losses)
    assert out["checkpoint"] and out["encoder"]
