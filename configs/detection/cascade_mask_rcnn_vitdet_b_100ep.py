# ViTDet Cascade Mask R-CNN, ViT-B/16 backbone, COCO, 100 epochs (Li et al. 2022; detectron2
# projects/ViTDet/configs/COCO/cascade_mask_rcnn_vitdet_b_100ep.py). Reported with MAE ViT-B: box AP 54.0, mask AP 46.7.
#   python tools/train_det.py --config-file configs/detection/cascade_mask_rcnn_vitdet_b_100ep.py \
#       train.init_checkpoint=output/rcmae_vit_base/checkpoint_....pth --num-gpus 8
# The Mask R-CNN B recipe (backbone, pyramid, RPN, mask head, RoI sampler, LSJ, optimizer, schedule)
# with its one box stage replaced by three: the same 4conv1fc LN head and predictor, class-agnostic
# box regression, trained on proposals matched at IoU 0.5 / 0.6 / 0.7 with box deltas scaled 1x / 2x / 3x.
import copy

from detectron2.modeling.roi_heads import CascadeROIHeads

from .mask_rcnn_vitdet_b_100ep import dataloader, datasets, lr_multiplier, model, optimizer, train

# Mask R-CNN's box head (4conv1fc, LN), predictor (score threshold 0.05, deltas (10, 10, 5, 5)) and
# matcher (IoU 0.5, no low-quality matches) are the templates of the stages (CascadeROIHeads takes lists, not these keys)
_head, _predictor, _matcher = (model.roi_heads.pop(k) for k in ("box_head", "box_predictor", "proposal_matcher"))
_predictor.cls_agnostic_bbox_reg = True
_predictor.num_classes = "${...num_classes}"  # roi_heads.num_classes, seen from roi_heads.box_predictors[i]
_stages = (((10, 10, 5, 5), 0.5), ((20, 20, 10, 10), 0.6), ((30, 30, 15, 15), 0.7))
model.roi_heads._target_ = CascadeROIHeads
model.roi_heads.box_heads = [copy.deepcopy(_head) for _ in _stages]
model.roi_heads.box_predictors = [copy.deepcopy(_predictor) for _ in _stages]
model.roi_heads.proposal_matchers = [copy.deepcopy(_matcher) for _ in _stages]
for _i, (_weights, _iou) in enumerate(_stages):
    model.roi_heads.box_predictors[_i].box2box_transform.weights = _weights
    model.roi_heads.proposal_matchers[_i].thresholds = [_iou]

train.output_dir = "output/cascade_vitdet_b_100ep"
