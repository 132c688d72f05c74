"""COCO-format datasets: validation with actionable errors, registration by path, the coins demo set."""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)


class DatasetError(ValueError):
    """A COCO-format dataset that cannot be used (the message names the file and the problem)."""


def validate_coco_json(json_file: str | Path, image_root: str | Path) -> dict:
    """Check a COCO instances file before detectron2 reads it; errors name the file and the problem."""
    json_file, image_root = Path(json_file), Path(image_root)
    if not json_file.is_file():
        raise DatasetError(f"annotation file {json_file} does not exist")
    if not image_root.is_dir():
        raise DatasetError(f"image root {image_root} (for {json_file}) does not exist")
    try:
        data = json.loads(json_file.read_text())
    except json.JSONDecodeError as e:
        raise DatasetError(f"{json_file}: not valid JSON ({e})") from None
    missing = [k for k in ("images", "annotations", "categories") if k not in data]
    if missing:
        raise DatasetError(f"{json_file}: missing top-level keys {missing} (a COCO instances file has "
                           "images, annotations and categories)")
    images = {}
    for img in data["images"]:
        absent = [k for k in ("id", "file_name", "height", "width") if k not in img]
        if absent:
            raise DatasetError(f"{json_file}: image {img.get('id', img)} lacks {absent}")
        images[img["id"]] = img
    categories = {c["id"] for c in data["categories"]}
    problems = []
    for ann in data["annotations"]:
        aid = ann.get("id", "?")
        if ann.get("image_id") not in images:
            problems.append(f"annotation {aid}: image_id {ann.get('image_id')} is not in images")
        if ann.get("category_id") not in categories:
            problems.append(f"annotation {aid}: category_id {ann.get('category_id')} is not in categories")
        box = ann.get("bbox")
        if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)
                and all(math.isfinite(v) for v in box) and box[2] >= 0 and box[3] >= 0):
            problems.append(f"annotation {aid}: bbox must be [x, y, width, height] with width, height >= 0, "
                            f"got {box}")
        seg = ann.get("segmentation")
        if isinstance(seg, list):
            bad = [len(p) for p in seg if not isinstance(p, list) or len(p) < 6 or len(p) % 2]
            if bad:
                problems.append(f"annotation {aid}: polygons need an even number >= 6 of coordinates, "
                                f"got lengths {bad}")
        elif isinstance(seg, dict):
            if not {"counts", "size"} <= seg.keys():
                problems.append(f"annotation {aid}: an RLE segmentation needs 'counts' and 'size'")
        elif seg is not None:
            problems.append(f"annotation {aid}: segmentation must be polygons or RLE, got {type(seg).__name__}")
        if len(problems) >= 5:
            break
    if problems:
        raise DatasetError(f"{json_file}: malformed annotations:\n  " + "\n  ".join(problems))
    first = next(iter(images.values()), None)
    if first is not None and not (image_root / first["file_name"]).is_file():
        raise DatasetError(f"{json_file}: image {first['file_name']} not found under {image_root}")
    return data


def register_coco(name: str, json_file: str | Path, image_root: str | Path) -> None:
    """Register (once) a validated COCO-format instances dataset under ``name``."""
    from detectron2.data import DatasetCatalog
    from detectron2.data.datasets import register_coco_instances

    if name in DatasetCatalog.list():
        log.info("dataset %s is already registered", name)
        return
    validate_coco_json(json_file, image_root)
    register_coco_instances(name, {}, str(json_file), str(image_root))
    log.info("registered dataset %s: %s (images in %s)", name, json_file, image_root)


def coin_masks() -> tuple[np.ndarray, list[np.ndarray]]:
    """scikit-image's ``coins`` photo (as RGB) and one binary mask per coin (Otsu threshold of the
    smoothed image, holes filled, regions under 300 px and touching the border removed)."""
    from scipy import ndimage
    from skimage import data, filters, measure, segmentation

    gray = data.coins()
    smooth = filters.gaussian(gray, sigma=2)
    fg = smooth > filters.threshold_otsu(smooth)
    fg = segmentation.clear_border(ndimage.binary_fill_holes(fg))
    labels = measure.label(fg)
    masks = [labels == r.label for r in measure.regionprops(labels) if r.area >= 300]
    return np.stack([gray] * 3, axis=-1), masks


def mask_to_annotation(mask: np.ndarray, ann_id: int, image_id: int) -> dict:
    from skimage import measure

    polygons = []
    for contour in measure.find_contours(np.pad(mask, 1).astype(float), 0.5):
        xy = (contour[:, ::-1] - 1).clip(min=0)  # (row, col) -> (x, y), undo the padding
        if len(xy) >= 3:
            polygons.append([round(float(v), 2) for v in xy.reshape(-1)])
    ys, xs = np.nonzero(mask)
    x0, y0 = float(xs.min()), float(ys.min())
    return {"id": ann_id, "image_id": image_id, "category_id": 1, "iscrowd": 0,
            "bbox": [x0, y0, float(xs.max() + 1 - x0), float(ys.max() + 1 - y0)],
            "area": float(mask.sum()), "segmentation": polygons}


def build_coins_dataset(root: str | Path) -> tuple[Path, Path]:
    """``root/images/*.png`` + ``root/coins.json``: the coins photo and its 3 flips / rotations,
    every coin an instance of category ``coin`` with polygon masks. Returns (json, image root)."""
    root = Path(root)
    json_file, image_root = root / "coins.json", root / "images"
    if json_file.is_file():
        return json_file, image_root
    image_root.mkdir(parents=True, exist_ok=True)
    photo, masks = coin_masks()
    views = {"coins": lambda a: a, "coins_flip": lambda a: a[:, ::-1], "coins_vflip": lambda a: a[::-1],
             "coins_rot180": lambda a: a[::-1, ::-1]}
    images, annotations = [], []
    for image_id, (name, view) in enumerate(views.items(), start=1):
        Image.fromarray(np.ascontiguousarray(view(photo))).save(image_root / f"{name}.png")
        images.append({"id": image_id, "file_name": f"{name}.png", "height": photo.shape[0],
                       "width": photo.shape[1]})
        for m in masks:
            annotations.append(mask_to_annotation(np.ascontiguousarray(view(m)), len(annotations) + 1,
                                                  image_id))
    coco = {"images": images, "annotations": annotations,
            "categories": [{"id": 1, "name": "coin", "supercategory": "coin"}]}
    tmp = json_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(coco))
    tmp.replace(json_file)
    return json_file, image_root
