# The benchmark protocol (benchmarking_mask_rcnn_vit_b_100ep.py), 50 epochs: MIMDet's
# benchmarking_mask_rcnn_base_FPN_50ep_LSJ_mae.py halves max_iter and doubles the warmup fraction (the
# same ~461 warmup iterations). MIMDet's MAE ViT-B: 50.2 box / 44.9 mask AP.
from .benchmarking_mask_rcnn_vit_b_100ep import dataloader, datasets, lr_multiplier, model, optimizer, train

train.max_iter = 184375 // 2
lr_multiplier.warmup_length *= 2
train.output_dir = "output/benchmarking_vit_b_50ep"
