"""The transforms: evaluation (MAE's resize + centre crop), fine-tuning / linear probing (MAE's recipes
on timm's ``create_transform``), and the pretraining augmentation, MAE's: RandomResizedCrop(size, scale
(``data.crop_min_scale``, 1), ratio 3/4-4/3, bicubic) + horizontal flip, implemented three times for the
same distribution (``data.pipeline``, :mod:`rcmae.core.data.pipelines`):

- ``torchvision``: the official code's transforms as they are (decode all, PIL resize, float tensor);
- ``gpu``: the loader workers only read the bytes and draw the same crop box and flip; the batch is
  decoded by nvJPEG and cropped / resized on the device (:mod:`rcmae.core.data.gpu`);
- ``fast`` (default): the same crop box and flip drawn from the same random numbers, but the JPEG is
  decoded by libjpeg-turbo (simplejpeg) straight into an array, at the smallest DCT scale (1/2, 1/4, 1/8)
  that still leaves the crop at least the output size; the resize is torch's antialiased bicubic on
  uint8 (PIL's filter), and the result stays uint8 (the device normalises it:
  :func:`to_model_input`). Other formats (PNG, CMYK JPEGs) go through PIL.
  ``benchmarks/data_throughput.py`` measures both, and their difference on the same crop boxes.
"""
from __future__ import annotations

import io
from functools import lru_cache

import numpy as np
import simplejpeg
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data import create_transform
from torchvision import transforms

IMAGENET_MEAN = (0.485, 0.456, 0.406)


IMAGENET_STD = (0.229, 0.224, 0.225)
RATIO = (3 / 4, 4 / 3)


def crop_and_flip(width: int, height: int, min_scale: float) -> tuple[tuple[int, int, int, int], bool]:
    """The crop box (top, left, height, width) and flip of one sample, drawn exactly as torchvision's
    ``RandomResizedCrop`` then ``RandomHorizontalFlip`` draw them (same generator, same order), so every
    pipeline crops a seeded sample identically."""
    box = transforms.RandomResizedCrop.get_params(torch.empty(0, height, width), (min_scale, 1.0), RATIO)
    return box, bool(torch.rand(1) < 0.5)


def dct_scale(crop_h: int, crop_w: int, size: int) -> int:
    """The largest JPEG DCT reduction (1, 2, 4 or 8) that keeps a crop at least ``size`` on both sides."""
    scale = 1
    while scale < 8 and min(crop_h, crop_w) >= 2 * scale * size:
        scale *= 2
    return scale


def resize_crop(pixels: torch.Tensor, box: tuple[float, float, float, float], size: int, flip: bool) -> torch.Tensor:
    """``pixels`` (H, W, 3) uint8 -> the crop ``box`` (top, left, height, width, in these pixels), flipped
    on request, resized to ``size`` x ``size`` with antialiased bicubic (PIL's filter): (3, size, size)
    uint8, channels-last in memory (batching makes it contiguous). Flipping before resizing equals
    flipping after: the filter is symmetric."""
    top, left, h, w = (round(v) for v in box)
    crop = pixels[top:top + max(h, 1), left:left + max(w, 1)].permute(2, 0, 1)[None]
    if flip:
        crop = crop.flip(-1)
    crop = crop.contiguous(memory_format=torch.channels_last)
    return F.interpolate(crop, size=(size, size), mode="bicubic", antialias=True)[0]


class FastRandomResizedCrop:
    """MAE's crop + flip (module docstring), decoding only what the crop needs. Takes the file's bytes
    (``decodes``: see :class:`rcmae.core.data.SeededImages`); returns (3, size, size) uint8. Draws its
    random numbers from torch alone."""

    decodes = True

    def __init__(self, size: int, min_scale: float):
        self.size, self.min_scale = size, min_scale

    def __call__(self, data: bytes) -> torch.Tensor:
        try:
            height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        except ValueError:  # not a JPEG
            colorspace = None
        if colorspace not in ("YCbCr", "Gray", "RGB"):  # PNG, CMYK, ...: decoded whole by PIL
            with Image.open(io.BytesIO(data)) as img:
                pixels = torch.from_numpy(np.array(img.convert("RGB")))
            box, flip = crop_and_flip(pixels.shape[1], pixels.shape[0], self.min_scale)
            return resize_crop(pixels, box, self.size, flip)
        (top, left, h, w), flip = crop_and_flip(width, height, self.min_scale)
        scale = dct_scale(h, w, self.size)
        reduced = {"min_height": -(-height // scale), "min_width": -(-width // scale)} if scale > 1 else {}
        pixels = torch.from_numpy(simplejpeg.decode_jpeg(data, colorspace="RGB", **reduced))
        sy, sx = pixels.shape[0] / height, pixels.shape[1] / width
        return resize_crop(pixels, (top * sy, left * sx, h * sy, w * sx), self.size, flip)


def eval_crop_pct(img_size: int, crop_pct: float | None = None) -> float:
    """``crop_pct`` when given, else MAE's rule (``util/datasets.py build_transform``): 224/256 up
    to 224 px, 1.0 (no crop margin) above."""
    if crop_pct is not None:
        return crop_pct
    return 224 / 256 if img_size <= 224 else 1.0


def mae_eval_config(img_size: int, crop_pct: float | None = None) -> dict:
    """MAE's evaluation preprocessing as a timm data config (``timm.data.create_transform(**it)``;
    also what exported weights declare): bicubic resize to ``img_size / crop_pct``, centre crop,
    ImageNet mean / std."""
    return {"input_size": (3, img_size, img_size), "interpolation": "bicubic", "mean": IMAGENET_MEAN,
            "std": IMAGENET_STD, "crop_pct": eval_crop_pct(img_size, crop_pct), "crop_mode": "center"}


def eval_transform(img_size: int, crop_pct: float | None):
    """Resize the short side to ``img_size / crop_pct`` (256 for 224) bicubic, centre crop;
    ``crop_pct`` None follows MAE (:func:`pretrain.data.eval_crop_pct`)."""
    return create_transform(**mae_eval_config(img_size, crop_pct), is_training=False)


def to_model_input(imgs: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A batch as the model takes it, on ``device``: uint8 batches (the fast pipelines hand over raw
    pixels, 4x less to copy) are normalised there with the ImageNet mean / std; float batches are
    already normalised."""
    imgs = imgs.to(device, non_blocking=True)
    if imgs.dtype != torch.uint8:
        return imgs
    mean, std = pixel_mean_std(device)
    return (imgs.float() - mean) / std


@lru_cache(maxsize=None)
def pixel_mean_std(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """ImageNet mean / std in 0-255 units on ``device``, made once: a fresh ``torch.tensor(..., device=cuda)``
    every step would be a blocking host-to-device copy in the training step."""
    return tuple(torch.tensor(v, device=device).view(1, 3, 1, 1) * 255 for v in (IMAGENET_MEAN, IMAGENET_STD))


def classifier_train_transform(img_size: int, aug: dict, mode: str):
    """Training a classifier. Fine-tuning: timm's RandAugment / random-erasing pipeline; linear probing:
    crop + flip only."""
    if mode == "linprobe":
        return transforms.Compose([
            transforms.RandomResizedCrop(img_size, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.RandomHorizontalFlip(), transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    return create_transform(img_size, is_training=True, auto_augment=aug["rand_augment"] or None,
                            color_jitter=None, interpolation="bicubic", re_prob=aug["reprob"],
                            re_mode="pixel", re_count=1, mean=IMAGENET_MEAN, std=IMAGENET_STD)


def mae_pretrain_transform(img_size: int, min_scale: float):
    """MAE's pretraining transform as written (``data.pipeline=torchvision``): PIL decode, bicubic
    RandomResizedCrop, flip, normalise."""
    return transforms.Compose([
        transforms.RandomResizedCrop(img_size, scale=(min_scale, 1.0), ratio=RATIO,
                                     interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
