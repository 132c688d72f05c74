# ViTDet Mask R-CNN, ViT-H (pretrained with patch 14; the patch embedding is resampled to 16 when
# loaded), COCO, 75 epochs. Reported with MAE ViT-H: box AP 56.7, mask AP 50.2.
from functools import partial

from detectron2.modeling.backbone.vit import get_vit_lr_decay_rate

from .mask_rcnn_vitdet_b_100ep import dataloader, datasets, lr_multiplier, model, optimizer, train

model.backbone.net.embed_dim = 1280
model.backbone.net.depth = 32
model.backbone.net.num_heads = 16
model.backbone.net.drop_path_rate = 0.5
# the 224-px patch-14 pretraining has a 16x16 position grid: declare it (16 x 16 px) so the
# checkpoint's pos_embed fits; ViT interpolates it to the 64x64 grid of 1024 px at run time
model.backbone.net.pretrain_img_size = 256
# global attention in blocks 7, 15, 23, 31; windowed elsewhere
model.backbone.net.window_block_indexes = [i for i in range(32) if i not in (7, 15, 23, 31)]
optimizer.params.lr_factor_func = partial(get_vit_lr_decay_rate, num_layers=32, lr_decay_rate=0.9)
# as upstream's ViT-H: weight decay on pos_embed and on the norms too
optimizer.params.overrides = {}
optimizer.params.weight_decay_norm = None
train.max_iter = 138281  # 75 epochs at batch 64: upstream's 184375 * 3 // 4
lr_multiplier.scheduler.milestones = [122916, 133159]  # upstream's B/L milestones * 3 // 4
lr_multiplier.scheduler.num_updates = train.max_iter
# warmup_length stays B's fraction, 250 / 184375, as upstream's H config leaves it: ~187 of 138,281 iterations
train.output_dir = "output/vitdet_h_75ep"
