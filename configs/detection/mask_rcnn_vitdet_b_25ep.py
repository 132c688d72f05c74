# ViTDet Mask R-CNN, ViT-B/16, a quarter of the 100-epoch schedule (mask_rcnn_vitdet_b_100ep.py): the
# benchmark's quick preset. The lr steps stay at upstream's fractions of max_iter (~88.9 % and ~96.3 %),
# the warmup at 250 iterations. Not a published recipe: for a first look at a backbone.
from .mask_rcnn_vitdet_b_100ep import dataloader, datasets, lr_multiplier, model, optimizer, train

train.max_iter = 184375 // 4
train.output_dir = "output/vitdet_b_25ep"
lr_multiplier.scheduler.milestones = [163889 // 4, 177546 // 4]
lr_multiplier.scheduler.num_updates = train.max_iter
lr_multiplier.warmup_length = 250 / train.max_iter
