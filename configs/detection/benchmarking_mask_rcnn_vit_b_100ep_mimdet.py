# The benchmark protocol (benchmarking_mask_rcnn_vit_b_100ep.py) with hustvl/MIMDet's own choices where
# its code differs from ours (models/benchmarking.py, configs/common.py and
# configs/benchmarking/benchmarking_mask_rcnn_base_FPN_100ep_LSJ_mae.py at fb0aaa1d):
# - position embedding: a new trainable 64 x 64 grid (no cls row), initialised with 2-D sin-cos in
#   MIMDet's layout, the transpose of MAE's: the first half of the channels encodes the token's row, the
#   second half its column (MAE: column, then row); the checkpoint's grid is not loaded; no weight decay;
# - padding: the data mapper pads every image to 1024 x 1024 with 128 before normalisation, bottom and
#   right (FixedSizeCrop(crop_size=(1024, 1024), pad=True, pad_value=128)), in training and test; the
#   model then maps detections back with one scale, as MIMDet's lsj_postprocess (detection/mimdet.py);
# - augmentation order: ResizeScale, FixedSizeCrop, then the horizontal flip (which moves the padding of
#   a flipped image to its left).
# 118,565,872 parameters. What remains different from MIMDet:
# - relative positions: detectron2's decomposed tables in every block (rel_pos_h / rel_pos_w, 96,768
#   parameters) where MIMDet adds BEiT-style bias tables, one shared by the windowed blocks and one by
#   the global blocks (205,080): 118,565,872 + 108,312 = MIMDet's 118,674,184 (118.67M);
# - the rescaling deconvolutions keep PyTorch's initialisation (MIMDet: LeCun normal).
#   python tools/train_det.py --config-file configs/detection/benchmarking_mask_rcnn_vit_b_100ep_mimdet.py \
#       train.init_checkpoint=output/rcmae_vit_base/checkpoint_....pth --num-gpus 8
from rcmae.detection.mimdet import PrePaddedRCNN

from .benchmarking_mask_rcnn_vit_b_100ep import dataloader, datasets, lr_multiplier, model, optimizer, train

model._target_ = PrePaddedRCNN
model.backbone.bottom_up.net.pretrain_img_size = 1024  # the grid covers the padded input: 64 x 64
model.backbone.bottom_up.net.pretrain_use_cls_token = False
model.backbone.bottom_up.sincos_pos_grid = True

_flip, _resize, _crop = dataloader.train.mapper.augmentations  # the protocol's LSJ
_crop.pad, _crop.pad_value = True, 128.0
dataloader.train.mapper.augmentations = [_resize, _crop, _flip]
dataloader.test.mapper.augmentations = [*dataloader.test.mapper.augmentations, _crop]

train.output_dir = "output/benchmarking_vit_b_100ep_mimdet"
