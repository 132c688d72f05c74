"""COCO-format datasets: validation with actionable errors, registration by path, the coins demo set."""
from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)


class DatasetError(ValueError):
    """A COCO-format dataset that cannot be used (the message names the file and the problem)."""


def validate_coco_json(json_file: str | Path, image_root: str | Path) -> dict:
    """Check a COCO instances file before detectron2 reads it (its keys and annotations, that it has
    images and annotations, that every image file exists); errors name the file and the problem. Boxes
    beyond their image are a logged warning with their count."""
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
    if not images:
        raise DatasetError(f"{json_file}: lists no images")
    if not data["annotations"]:
        raise DatasetError(f"{json_file}: has no annotations for its {len(images)} images: nothing to train on "
                           "or to evaluate against")
    absent = missing_files(image_root, [img["file_name"] for img in images.values()])
    if absent:
        raise DatasetError(f"{json_file}: {len(absent)} of its {len(images)} images are not under {image_root}, "
                           f"e.g. {', '.join(absent[:5])}")
    warn_boxes_outside(json_file, data["annotations"], images)
    return data


def missing_files(root: Path, names: list[str]) -> list[str]:
    """The ``names`` (paths relative to ``root``) that are not files. One directory listing per folder
    instead of a stat per image: seconds for COCO's 118k images, even on a network file system."""
    listed: dict[Path, set[str]] = {}
    absent = []
    for name in names:
        folder = (root / name).parent
        if folder not in listed:
            try:
                listed[folder] = {e.name for e in os.scandir(folder) if e.is_file()}
            except (FileNotFoundError, NotADirectoryError):
                listed[folder] = set()
        if Path(name).name not in listed[folder]:
            absent.append(name)
    return absent


BOX_TOLERANCE = 1.0  # px: COCO's own float boxes overshoot their image by rounding


def warn_boxes_outside(json_file: Path, annotations: list[dict], images: dict) -> None:
    """Log how many boxes reach beyond their image by more than :data:`BOX_TOLERANCE` (detectron2 clips
    them to the image, so such boxes train on a smaller region than annotated), with examples."""
    outside = []
    for ann in annotations:
        x, y, w, h = ann["bbox"]
        img = images[ann["image_id"]]
        if min(x, y) < -BOX_TOLERANCE or x + w > img["width"] + BOX_TOLERANCE or y + h > img["height"] + BOX_TOLERANCE:
            outside.append(f"annotation {ann.get('id', '?')} {ann['bbox']} in {img['file_name']} "
                           f"({img['width']}x{img['height']})")
    if outside:
        log.warning("%s: %d of %d boxes extend beyond their image (detectron2 clips them to it), e.g. %s",
                    json_file, len(outside), len(annotations), "; ".join(outside[:3]))


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
