# ViTDet Cascade Mask R-CNN, ViT-L/16, COCO, 100 epochs (detectron2
# projects/ViTDet/configs/COCO/cascade_mask_rcnn_vitdet_l_100ep.py). Reported with MAE ViT-L: box AP 57.6, mask AP 50.0.
#   python tools/train_det.py --config-file configs/detection/cascade_mask_rcnn_vitdet_l_100ep.py \
#       train.init_checkpoint=output/rcmae_vit_large/checkpoint_....pth --num-gpus 8
# The Mask R-CNN L recipe (backbone, layer decay 0.8, schedule) with the cascade B config's three box stages.
from .cascade_mask_rcnn_vitdet_b_100ep import model as _cascade
from .mask_rcnn_vitdet_l_100ep import dataloader, datasets, lr_multiplier, model, optimizer, train

model.roi_heads = _cascade.roi_heads
train.output_dir = "output/cascade_vitdet_l_100ep"
