# ViTDet Mask R-CNN, ViT-L/16, COCO, 100 epochs. Reported with MAE ViT-L: box AP 55.5, mask AP 49.2.
from functools import partial

from detectron2.modeling.backbone.vit import get_vit_lr_decay_rate

from .mask_rcnn_vitdet_b_100ep import dataloader, datasets, lr_multiplier, model, optimizer, train

model.backbone.net.embed_dim = 1024
model.backbone.net.depth = 24
model.backbone.net.num_heads = 16
model.backbone.net.drop_path_rate = 0.4
# global attention in blocks 5, 11, 17, 23; windowed elsewhere
model.backbone.net.window_block_indexes = [i for i in range(24) if i not in (5, 11, 17, 23)]
optimizer.params.lr_factor_func = partial(get_vit_lr_decay_rate, num_layers=24, lr_decay_rate=0.8)
train.output_dir = "output/vitdet_l_100ep"
