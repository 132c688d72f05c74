# CPU demo of the benchmark protocol (benchmarking_mask_rcnn_vit_b_100ep.py) on scikit-image's `coins`,
# like demo_tiny.py for ViTDet: the ViT-mini of the pretraining demo (width 128, depth 4; its patch-8
# kernel resampled to 16, its 8x8 position grid declared as 128 px), features after every block, windows
# of 8 in blocks 0 and 2, a 64-channel FPN with SyncBN (plain BN in one process), 256-px LSJ.
# From the pretraining demo's teacher: train.init_checkpoint=output/demo_pretrain/checkpoint_00000640.pth
from detectron2.layers import ShapeSpec

from .benchmarking_mask_rcnn_vit_b_100ep import lr_multiplier, model, optimizer
from .demo_tiny import dataloader, datasets, train

net = model.backbone.bottom_up.net
net.img_size, net.patch_size, net.pretrain_img_size = 256, 16, 128
net.embed_dim, net.depth, net.num_heads, net.drop_path_rate = 128, 4, 4, 0.0
net.window_size, net.window_block_indexes = 8, [0, 2]
del net  # an alias, not a config section
model.backbone.bottom_up.out_blocks = [0, 1, 2, 3]
model.backbone.bottom_up.square_pad = 256
model.backbone.out_channels = 64
model.proposal_generator.head.in_channels = 64
model.proposal_generator.pre_nms_topk = (500, 500)
model.proposal_generator.post_nms_topk = (100, 100)
model.roi_heads.num_classes = 1
model.roi_heads.batch_size_per_image = 128
model.roi_heads.box_head.input_shape = ShapeSpec(channels=64, height=7, width=7)
model.roi_heads.box_head.conv_dims = [64]
model.roi_heads.box_head.fc_dims = [128]
model.roi_heads.box_predictor.input_shape = ShapeSpec(channels=128)
model.roi_heads.mask_head.input_shape = ShapeSpec(channels=64, height=14, width=14)
model.roi_heads.mask_head.conv_dims = [64, 64]

train.output_dir = "output/demo_benchmarking_det"
optimizer.lr = 2e-4
