# The Mask R-CNN benchmark of Li et al. 2021 ("Benchmarking Detection Transfer Learning with Vision
# Transformers") as hustvl/MIMDet reproduces it on detectron2
# (configs/benchmarking/benchmarking_mask_rcnn_base_FPN_100ep_LSJ_mae.py at fb0aaa1d): the protocol of
# the RC-MAE paper's COCO table, ViT-B/16, 100 epochs. Published: MAE 50.3 box / 44.9 mask AP, RC-MAE
# 51.0 / 45.4, RC-MAE with a different teacher mask 50.7 / 45.2 (RC-MAE paper); MIMDet's MAE 50.4 / 44.9.
#   python tools/train_det.py --config-file configs/detection/benchmarking_mask_rcnn_vit_b_100ep.py \
#       train.init_checkpoint=output/rcmae_vit_base/checkpoint_....pth --num-gpus 8
# Differences from ViTDet (mask_rcnn_vitdet_b_100ep.py): features after blocks 2/5/8/11 rescaled to
# strides 4-32 (detection/multidepth_vit.py) and an FPN with SyncBN instead of the simple pyramid with
# LN; windows of 16 (64 / 16, no padding); box and mask heads with synchronised BN; AdamW lr 8e-5, wd 0.1,
# no layer decay; cosine schedule after 0.25 % warmup.
# 115,571,440 parameters (115.57M); MIMDet reports 118.67M (118,674,184): its new trainable 64 x 64
# position grid (3,145,728 against the pretrained 14 x 14 grid + cls row we keep, 151,296: +2,994,432)
# and its BEiT-style relative position bias tables (205,080 against detectron2's decomposed tables,
# 96,768: +108,312). benchmarking_mask_rcnn_vit_b_100ep_mimdet.py takes MIMDet's position grid and padding.
from functools import partial

import torch.nn as nn
from fvcore.common.param_scheduler import CosineParamScheduler

from detectron2 import model_zoo
from detectron2.config import LazyCall as L
from detectron2.modeling.backbone import FPN
from detectron2.modeling.backbone.fpn import LastLevelMaxPool
from detectron2.modeling.backbone.vit import ViT
from detectron2.solver import WarmupParamScheduler
from rcmae.detection.multidepth_vit import OUT_FEATURES, MultiDepthViT

from .common.coco_loader_lsj import dataloader
from .mask_rcnn_vitdet_b_100ep import datasets, train

model = model_zoo.get_config("common/models/mask_rcnn_fpn.py").model
model.backbone = L(FPN)(
    bottom_up=L(MultiDepthViT)(
        net=L(ViT)(img_size=1024, patch_size=16, embed_dim=768, depth=12, num_heads=12, drop_path_rate=0.1,
                   window_size=16, mlp_ratio=4, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6),
                   window_block_indexes=[0, 1, 3, 4, 6, 7, 9, 10], use_rel_pos=True),  # global: 2, 5, 8, 11
        out_blocks=[2, 5, 8, 11],
    ),
    in_features=list(OUT_FEATURES),
    out_channels=256,
    norm="SyncBN",
    top_block=L(LastLevelMaxPool)(),
    # every image padded to 1024 x 1024 (a 64 x 64 grid) by the model, after normalisation;
    # GeneralizedRCNN.preprocess_image reads the outer backbone's (this FPN's) padding, not bottom_up's
    square_pad=1024,
)
model.pixel_mean = [123.675, 116.28, 103.53]
model.pixel_std = [58.395, 57.12, 57.375]
model.input_format = "RGB"
model.proposal_generator.head.conv_dims = [-1, -1]  # two 3x3 convs
model.roi_heads.box_head.conv_dims = [256, 256, 256, 256]  # 4conv1fc
model.roi_heads.box_head.fc_dims = [1024]
model.roi_heads.box_head.conv_norm = "naiveSyncBN_N"  # MIMDet: NaiveSyncBatchNorm(stats_mode="N")
model.roi_heads.mask_head.conv_norm = "naiveSyncBN_N"

train.output_dir = "output/benchmarking_vit_b_100ep"
train.max_iter = 184375  # 100 epochs at batch 64
dataloader.train.total_batch_size = 64

optimizer = model_zoo.get_config("common/optim.py").AdamW  # betas (0.9, 0.999), no decay on norms
optimizer.lr = 8e-5
optimizer.weight_decay = 0.1
optimizer.params.overrides = {name: {"weight_decay": 0.0} for name in ("pos_embed", "rel_pos_h", "rel_pos_w")}

lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(CosineParamScheduler)(start_value=1.0, end_value=0.0),
    warmup_length=0.25 / 100,  # a quarter of an epoch
    warmup_factor=0.001,
)
