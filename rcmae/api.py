"""One call from a file to a model, for notebooks: ``rcmae.load_model(path)``.

    import rcmae
    mae = rcmae.load_model("checkpoint_01600000.pth")        # RC-MAE: student + EMA teacher (RCMAE)
    mae = rcmae.load_model("mae_pretrain_vit_base_full.pth")  # official MAE: the MAE (RCMAE, no teacher)
    vit = rcmae.load_model("mae_pretrain_vit_base.pth")       # an encoder: timm VisionTransformer, features
    clf = rcmae.load_model("classifier_best.pth")             # a classifier (ours, MAE fine-tuned)
    clf = rcmae.load_model("resnet50.pth", model="resnet50")  # any timm classifier's state dict
    vit = rcmae.load_model("encoder_teacher/")                # a timm folder (our exports)
"""
from __future__ import annotations

from pathlib import Path

import torch.nn as nn


def load_model(path: str | Path, model: str | None = None, which: str = "auto") -> nn.Module:
    """The model a checkpoint of any supported origin holds, in eval mode, weights loaded strictly.

    Pretraining checkpoints (ours, official MAE "full", official RC-MAE) give an :class:`RCMAE` (the
    student and, for RC-MAE, the teacher; ``which`` picks the teacher's weights for an encoder-only
    view); files with a classification head give the classifier; encoder-only files give timm's
    ``VisionTransformer`` (``num_classes=0``); a folder written by our exports (or timm) gives what
    ``timm.create_model("local-dir:...")`` builds. ``model`` names a timm architecture where the file
    does not tell it (a timm state dict).
    """
    import timm

    from rcmae.core.checkpoint import load_state, read_checkpoint
    from rcmae.core.errors import CheckpointError
    from rcmae.core.vit import build_classifier, infer_arch, is_encoder_key

    path = Path(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CheckpointError(f"{path} is a folder without config.json: not a timm / Hugging Face model folder")
        return timm.create_model(f"local-dir:{path}", pretrained=True).eval()
    ckpt = read_checkpoint(path)
    chosen, sd = ckpt.model(which)
    if "decoder_pred.weight" in sd:
        from rcmae.pretrain.rcmae import rcmae_from_checkpoint

        return rcmae_from_checkpoint(ckpt).eval()
    if "head.weight" in sd or model is not None or ckpt.source == "ours-classifier":
        from rcmae.robustness.models import check_model_name, load_classifier  # any number of classes

        if model is not None:
            check_model_name(model, "load_model(model=...)")
        return load_classifier(str(path), model, None).model.eval()
    encoder = {k: v for k, v in sd.items() if is_encoder_key(k)}
    try:
        arch, img_size = infer_arch(encoder, str(path))
    except ValueError as e:
        raise CheckpointError(f"{e}: pass model=<timm model name>") from None
    vit = build_classifier(arch, img_size, num_classes=0, global_pool="token")
    load_state(vit, encoder, f"{path} ({ckpt.source}, {chosen} encoder)", source=ckpt.source, which=chosen)
    return vit.eval()
