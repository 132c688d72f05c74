# The benchmark protocol (benchmarking_mask_rcnn_vit_b_100ep.py), 25 epochs: MIMDet's
# benchmarking_mask_rcnn_base_FPN_25ep_LSJ_mae.py quarters max_iter and quadruples the warmup fraction.
# MIMDet's MAE ViT-B: 48.0 box / 43.0 mask AP.
from .benchmarking_mask_rcnn_vit_b_100ep import dataloader, datasets, lr_multiplier, model, optimizer, train

train.max_iter = 184375 // 4
lr_multiplier.warmup_length *= 4
train.output_dir = "output/benchmarking_vit_b_25ep"
