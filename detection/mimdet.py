"""What hustvl/MIMDet's benchmark code (``models/benchmarking.py``, ``configs/common.py``) does
differently from our protocol config, for ``benchmarking_mask_rcnn_vit_b_100ep_mimdet.py``.

Position grid: MIMDet discards the pretrained position embedding and trains a new one covering the
whole 64 x 64 input grid, initialised with 2-D sin-cos (``build_2d_sincos_position_embedding``). Its
``torch.meshgrid(grid_w, grid_h)`` (``ij`` indexing) makes ``grid_w`` vary along the row axis of
the flattened token order, so the first half of the channels encodes the token's row, the second
half its column: the transpose of MAE's layout (first half column, second half row).

Padding: MIMDet's data mapper pads every image to 1024 x 1024 (``FixedSizeCrop``, value 128 before
normalisation, bottom and right), so the model takes the padded square for the image size and maps
detections back with one factor (``lsj_postprocess``), not detectron2's factor per axis.
"""
from __future__ import annotations

import torch
from detectron2.modeling import GeneralizedRCNN
from detectron2.structures import Instances, ROIMasks

from rcmae.core.vit import sincos_pos_embed


def mimdet_pos_grid(dim: int, side: int) -> torch.Tensor:
    """MIMDet's sin-cos grid, shape (1, side * side, dim), no cls row: token (row r, column c) holds
    [sin(r w), cos(r w), sin(c w), cos(c w)], w_i = 1 / 10000**(i / (dim/4)); MAE's grid transposed."""
    mae = sincos_pos_embed(dim, side, cls_token=False).reshape(side, side, dim)
    return mae.transpose(0, 1).reshape(1, side * side, dim)


def rescale_from_padded(results: Instances, height: int, width: int, mask_threshold: float = 0.5) -> Instances:
    """Detections on an input padded at the bottom and right (``results.image_size`` is the padded
    size) in the pixels of the original ``height`` x ``width`` image: one scale, the larger of the
    two ratios (the image's long side filled the input), then boxes clipped to the image and masks
    pasted at its size. detectron2's ``detector_postprocess`` would scale the short axis by the
    padded size instead and shrink every detection along it."""
    scale = max(height / results.image_size[0], width / results.image_size[1])
    out = Instances((height, width), **results.get_fields())
    out.pred_boxes.scale(scale, scale)
    out.pred_boxes.clip((height, width))
    out = out[out.pred_boxes.nonempty()]
    if out.has("pred_masks"):  # (N, 1, M, M) mask probabilities in the box
        out.pred_masks = ROIMasks(out.pred_masks[:, 0]).to_bitmasks(out.pred_boxes, height, width,
                                                                      mask_threshold).tensor
    return out


class PrePaddedRCNN(GeneralizedRCNN):
    """Mask R-CNN for inputs the data mapper has already padded to a fixed square (MIMDet): predictions
    are mapped back to the original image by :func:`rescale_from_padded`."""

    def inference(self, batched_inputs, detected_instances=None, do_postprocess: bool = True):
        results = super().inference(batched_inputs, detected_instances, do_postprocess=False)
        if not do_postprocess:
            return results
        return [{"instances": rescale_from_padded(r, inp.get("height", r.image_size[0]),
                                                  inp.get("width", r.image_size[1]))}
                for r, inp in zip(results, batched_inputs)]
