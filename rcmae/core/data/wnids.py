"""The canonical ImageNet class lists (wnids), as timm ships them: ImageNet-1k in its label order, and
the ImageNet-A / -R subsets."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import timm.data


@lru_cache(maxsize=None)
def imagenet_wnids(name: str = "imagenet_synsets.txt") -> tuple[str, ...]:
    """The canonical ImageNet wnid lists shipped with timm (1k order; A and R subsets)."""
    path = Path(timm.data.__file__).parent / "_info" / name
    return tuple(path.read_text().split())
