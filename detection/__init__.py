"""ViTDet Mask R-CNN on detectron2 from RC-MAE / MAE backbones (see tools/train_det.py)."""
