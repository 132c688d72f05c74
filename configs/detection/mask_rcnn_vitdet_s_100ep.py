# ViTDet Mask R-CNN, ViT-S/16 (width 384, 12 blocks, 6 heads: the ViT-S/16 of our pretraining recipe
# configs/pretrain/rcmae_vit_small.yaml), COCO, 100 epochs.
# No published ViTDet recipe exists for ViT-S (the paper and detectron2's projects/ViTDet cover B, L and
# H): every other value is the B config's. ViT-S has B's depth, hence B's global-attention blocks
# (2, 5, 8, 11) and layer-wise lr decay (0.7 over 12 layers); window 14, drop path 0.1, 100 epochs.
# There is no published number to compare with.
#   python tools/train_det.py --config-file configs/detection/mask_rcnn_vitdet_s_100ep.py \
#       train.init_checkpoint=output/rcmae_vit_small/checkpoint_....pth --num-gpus 8
from .mask_rcnn_vitdet_b_100ep import dataloader, datasets, lr_multiplier, model, optimizer, train

model.backbone.net.embed_dim = 384
model.backbone.net.num_heads = 6
train.output_dir = "output/vitdet_s_100ep"
