"""The pretraining input pipelines (``data.pipeline``): ``fast`` (simplejpeg, DCT-scaled decode, uint8
to the device), ``torchvision`` (MAE's transform as written) and ``gpu`` (nvJPEG decode on the device);
the same crops and flips for the same seed in all three."""
from __future__ import annotations

import torch

from rcmae.core.data.gpu import EncodedRandomResizedCrop, collate_encoded, decode_on_device
from rcmae.core.data.transforms import FastRandomResizedCrop, mae_pretrain_transform, to_model_input

PIPELINES = ("fast", "torchvision", "gpu")


def pretrain_transform(img_size: int, min_scale: float, pipeline: str = "fast"):
    if pipeline == "fast":
        return FastRandomResizedCrop(img_size, min_scale)
    if pipeline == "gpu":
        return EncodedRandomResizedCrop(img_size, min_scale)
    if pipeline == "torchvision":
        return mae_pretrain_transform(img_size, min_scale)
    raise ValueError(f"data.pipeline must be one of {PIPELINES}, got {pipeline!r}")


def collate_for(pipeline: str):
    """The loader's ``collate_fn``: the GPU pipeline's samples are bytes of different lengths."""
    if pipeline != "gpu":
        return None
    return collate_encoded


def model_input(imgs, device: torch.device, img_size: int) -> torch.Tensor:
    """A loader batch as the model takes it, on ``device``: the GPU pipeline's encoded samples are
    decoded there first; uint8 pixels are normalised there (``to_model_input``)."""
    if isinstance(imgs, list):  # the GPU pipeline's encoded samples
        imgs = decode_on_device(imgs, img_size, device)
    return to_model_input(imgs, device)
