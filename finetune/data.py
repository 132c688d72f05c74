"""Labelled image folders, ImageNet class indices, the embedded labelled demo set, transforms."""
from __future__ import annotations

from timm.data import create_transform
from torchvision import transforms

from rcmae.core.data import IMAGENET_MEAN, IMAGENET_STD


def train_transform(img_size: int, aug: dict, mode: str):
    """Fine-tuning: timm's RandAugment / random-erasing pipeline; linear probing: crop + flip only."""
    if mode == "linprobe":
        return transforms.Compose([
            transforms.RandomResizedCrop(img_size, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.RandomHorizontalFlip(), transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    return create_transform(img_size, is_training=True, auto_augment=aug["rand_augment"] or None,
                            color_jitter=None, interpolation="bicubic", re_prob=aug["reprob"],
                            re_mode="pixel", re_count=1, mean=IMAGENET_MEAN, std=IMAGENET_STD)


