# ViTDet Mask R-CNN, ViT-B/16 backbone, COCO, 100 epochs (Li et al. 2022; detectron2 projects/ViTDet).
# Reported with MAE ViT-B: box AP 51.6, mask AP 45.9.
#   python tools/train_det.py --config-file configs/detection/mask_rcnn_vitdet_b_100ep.py \
#       train.init_checkpoint=output/rcmae_vit_base/checkpoint_....pth --num-gpus 8
from functools import partial

from fvcore.common.param_scheduler import MultiStepParamScheduler

from detectron2 import model_zoo
from detectron2.config import LazyCall as L
from detectron2.modeling.backbone.vit import get_vit_lr_decay_rate
from detectron2.solver import WarmupParamScheduler

from .common.coco_loader_lsj import dataloader

model = model_zoo.get_config("common/models/mask_rcnn_vitdet.py").model  # window 14, global 2/5/8/11,
model.backbone.net.drop_path_rate = 0.1                                  # rel pos, SFP 4/2/1/0.5, LN heads

train = model_zoo.get_config("common/train.py").train
train.amp.enabled = True
train.ddp.fp16_compression = True
train.output_dir = "output/vitdet_b_100ep"
train.init_checkpoint = ""  # our pretrain checkpoint (teacher by default), MAE or RC-MAE file: required
train.init_which = "auto"   # auto: teacher when present; or "student"
train.allow_scratch = False  # True: an empty init_checkpoint trains from random weights on purpose
train.max_iter = 184375     # 100 epochs at batch 64
train.eval_period = 10000
train.checkpointer = dict(period=5000, max_to_keep=2)

lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(MultiStepParamScheduler)(
        values=[1.0, 0.1, 0.01],
        milestones=[163889, 177546],  # upstream's numbers (~88.9 % and ~96.3 % of max_iter)
        num_updates=train.max_iter,
    ),
    warmup_length=250 / train.max_iter,
    warmup_factor=0.001,
)

optimizer = model_zoo.get_config("common/optim.py").AdamW  # lr 1e-4, betas (0.9, 0.999), wd 0.1
optimizer.params.lr_factor_func = partial(get_vit_lr_decay_rate, num_layers=12, lr_decay_rate=0.7)
optimizer.params.overrides = {"pos_embed": {"weight_decay": 0.0}}

# COCO-format datasets registered by path: {name: dict(json_file=..., image_root=...)}; the standard
# coco_2017_{train,val} need only DETECTRON2_DATASETS pointing at the usual layout.
datasets = {}
