# CPU demo of the benchmark protocol (benchmarking_mask_rcnn_vit_b_100ep.py) on scikit-image's `coins`,
# like demo_tiny.py for ViTDet: the ViT-mini of the pretraining demo (width 128, depth 4; its patch-8
# kernel resampled to 16, its 8x8 position grid declared as 128 px), features after every block, windows
# of 8 in blocks 0 and 2, a 64-channel FPN with SyncBN (plain BN in one process), 256-px LSJ.
# From the pretraining demo's teacher: train.init_checkpoint=output/demo_pretrain/checkpoint_00000640.pth
from .benchmarking_mask_rcnn_vit_b_100ep import lr_multiplier, model, optimizer
from .common.demo_heads import shrink_heads
from .demo_tiny import dataloader, datasets, train

net = model.backbone.bottom_up.net
net.img_size, net.patch_size, net.pretrain_img_size = 256, 16, 128
net.embed_dim, net.depth, net.num_heads, net.drop_path_rate = 128, 4, 4, 0.0
net.window_size, net.window_block_indexes = 8, [0, 2]
del net  # an alias, not a config section
model.backbone.bottom_up.out_blocks = [0, 1, 2, 3]
model.backbone.square_pad = 256
shrink_heads(model)

train.output_dir = "output/demo_benchmarking_det"
optimizer.lr = 2e-4
