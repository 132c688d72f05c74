# ViTDet Cascade Mask R-CNN, ViT-H (pretrained with patch 14, resampled to 16 when loaded), COCO, 75 epochs
# (detectron2 projects/ViTDet/configs/COCO/cascade_mask_rcnn_vitdet_h_75ep.py). Reported with MAE ViT-H:
# box AP 58.7, mask AP 51.0.
#   python tools/train_det.py --config-file configs/detection/cascade_mask_rcnn_vitdet_h_75ep.py \
#       train.init_checkpoint=output/rcmae_vit_huge/checkpoint_....pth --num-gpus 8
# The Mask R-CNN H recipe (backbone and its 16x16 pretraining grid, layer decay 0.9, weight decay on
# pos_embed and norms, 138,281 iterations) with the cascade B config's three box stages.
from .cascade_mask_rcnn_vitdet_b_100ep import model as _cascade
from .mask_rcnn_vitdet_h_75ep import dataloader, datasets, lr_multiplier, model, optimizer, train

model.roi_heads = _cascade.roi_heads
train.output_dir = "output/cascade_vitdet_h_75ep"
