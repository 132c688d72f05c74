"""The pretraining augmentation, MAE's: RandomResizedCrop(size, scale (``data.crop_min_scale``, 1), ratio
3/4-4/3, bicubic) + horizontal flip. Two implementations of the same distribution (``data.pipeline``):

- ``torchvision``: the official code's transforms as they are (decode all, PIL resize, float tensor);
- ``gpu``: the loader workers only read the bytes and draw the same crop box and flip; the batch is
  decoded by nvJPEG and cropped / resized on the device (``gpu_data.py``);
- ``fast`` (default): the same crop box and flip drawn from the same random numbers, but the JPEG is
  decoded by libjpeg-turbo (simplejpeg) straight into an array, at the smallest DCT scale (1/2, 1/4, 1/8)
  that still leaves the crop at least the output size; the resize is torch's antialiased bicubic on
  uint8 (PIL's filter), and the result stays uint8 (the device normalises it:
  ``rcmae.core.data.to_model_input``). Other formats (PNG, CMYK JPEGs) go through PIL.
  ``benchmarks/data_throughput.py`` measures both, and their difference on the same crop boxes.
"""
from __future__ import annotations

import io

import numpy as np
import simplejpeg
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms

from rcmae.core.data import IMAGENET_MEAN, IMAGENET_STD, to_model_input

PIPELINES = ("fast", "torchvision", "gpu")
RATIO = (3 / 4, 4 / 3)


def pretrain_transform(img_size: int, min_scale: float, pipeline: str = "fast"):
    if pipeline == "fast":
        return FastRandomResizedCrop(img_size, min_scale)
    if pipeline == "gpu":
        from rcmae.pretrain.gpu_data import EncodedRandomResizedCrop  # builds on this module

        return EncodedRandomResizedCrop(img_size, min_scale)
    if pipeline == "torchvision":
        return transforms.Compose([
            transforms.RandomResizedCrop(img_size, scale=(min_scale, 1.0), ratio=RATIO,
                                         interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    raise ValueError(f"data.pipeline must be one of {PIPELINES}, got {pipeline!r}")


def collate_for(pipeline: str):
    """The loader's ``collate_fn``: the GPU pipeline's samples are bytes of different lengths."""
    if pipeline != "gpu":
        return None
    from rcmae.pretrain.gpu_data import collate_encoded

    return collate_encoded


def model_input(imgs, device: torch.device, img_size: int) -> torch.Tensor:
    """A loader batch as the model takes it, on ``device``: the GPU pipeline's encoded samples are
    decoded there first; uint8 pixels are normalised there (``to_model_input``)."""
    if isinstance(imgs, list):
        from rcmae.pretrain.gpu_data import decode_on_device

        imgs = decode_on_device(imgs, img_size, device)
    return to_model_input(imgs, device)


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
