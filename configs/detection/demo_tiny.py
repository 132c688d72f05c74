# CPU demo: a tiny ViTDet Mask R-CNN (the ViT-mini of the pretraining demo: width 128, depth 4; its
# patch-8 kernel is resampled to 16 when loaded, its 8x8 position grid declared as 128 px) with
# windows of 8 and global blocks 1 and 3, on scikit-image's `coins` (4 views, 21 coins each,
# polygon masks), 256-px LSJ. Trains a few dozen iterations, evaluates, draws predictions. Trains
# from a random backbone by default (train.allow_scratch).
# From the pretraining demo's teacher: train.init_checkpoint=output/demo_pretrain/checkpoint_00000640.pth
import detectron2.data.transforms as T
from detectron2.config import LazyCall as L

from .common.demo_heads import shrink_heads
from .mask_rcnn_vitdet_b_100ep import dataloader, lr_multiplier, model, optimizer, train

net = model.backbone.net
net.img_size, net.patch_size, net.pretrain_img_size = 256, 16, 128
net.embed_dim, net.depth, net.num_heads, net.drop_path_rate = 128, 4, 4, 0.0
net.window_size, net.window_block_indexes = 8, [0, 2]
del net  # an alias, not a config section
model.backbone.square_pad = 256
shrink_heads(model)

datasets = dict(coins_demo=dict(json_file="{demo}/coins.json", image_root="{demo}/images"))
dataloader.train.dataset.names = "coins_demo"
dataloader.test.dataset.names = "coins_demo"
dataloader.train.total_batch_size = 2
dataloader.train.num_workers = 0
dataloader.test.num_workers = 0
dataloader.train.mapper.augmentations = [
    L(T.RandomFlip)(horizontal=True),
    L(T.ResizeScale)(min_scale=0.5, max_scale=1.5, target_height=256, target_width=256),
    L(T.FixedSizeCrop)(crop_size=(256, 256), pad=False),
]
dataloader.test.mapper.augmentations = [L(T.ResizeShortestEdge)(short_edge_length=256, max_size=256)]

train.device = "cpu"
train.allow_scratch = True  # random backbone unless train.init_checkpoint is given
train.amp.enabled = False
train.output_dir = "output/demo_det"
train.max_iter = 60
train.eval_period = 60
train.log_period = 10
train.checkpointer = dict(period=30, max_to_keep=2)
optimizer.lr = 2e-4
optimizer.params.lr_factor_func.keywords["num_layers"] = 4
lr_multiplier.scheduler.milestones = [50, 56]
lr_multiplier.scheduler.num_updates = train.max_iter
lr_multiplier.warmup_length = 10 / train.max_iter
