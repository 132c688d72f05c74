# The CPU demos' small detector heads (a 64-channel pyramid, one class), shared by demo_tiny.py (ViTDet)
# and benchmarking_demo_tiny.py (the benchmark's FPN): both pyramids take `out_channels`.
from detectron2.layers import ShapeSpec


def shrink_heads(model):
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
