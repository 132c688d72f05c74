"""The pretraining augmentation: RandomResizedCrop (scale ``data.crop_min_scale``-1, bicubic) + flip, as MAE."""
from __future__ import annotations

from torchvision import transforms

from rcmae.core.data import IMAGENET_MEAN, IMAGENET_STD


def pretrain_transform(img_size: int, min_scale: float):
    return transforms.Compose([
        transforms.RandomResizedCrop(img_size, scale=(min_scale, 1.0),
                                     interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


