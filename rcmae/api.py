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

    from rcmae.core.checkpoint import read_checkpoint
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
        return _masked_autoencoder(ckpt).eval()
    if "head.weight" in sd or model is not None or ckpt.source == "ours-classifier":
        from rcmae.robustness.models import load_classifier

        return load_classifier(str(path), model, None).model.eval()
    encoder = {k: v for k, v in sd.items() if is_encoder_key(k)}
    try:
        arch, img_size = infer_arch(encoder, str(path))
    except ValueError as e:
        raise CheckpointError(f"{e}: pass model=<timm model name>") from None
    vit = build_classifier(arch, img_size, num_classes=0, global_pool="token")
    vit.load_state_dict(encoder)
    return vit.eval()


def _masked_autoencoder(ckpt) -> nn.Module:
    """An RCMAE (MAE student, EMA teacher when the file has one) rebuilt from a pretraining checkpoint."""
    from rcmae.core.checkpoint import load_state
    from rcmae.core.vit import infer_arch
    from rcmae.pretrain.models import build_mae
    from rcmae.pretrain.rcmae import RCMAE

    sd = ckpt.student
    arch, img_size = infer_arch(sd, ckpt.path)
    m = (ckpt.raw.get("config") or {}).get("model", {})
    dim = sd["decoder_embed.weight"].shape[0]
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("decoder_blocks."))
    # the official decoders use 32-dimensional heads (512-d: 16 heads, ViT-S's 256-d: 8)
    student = build_mae(arch, img_size, dim, depth, m.get("decoder_heads", max(1, dim // 32)),
                        m.get("norm_pix_loss", True))
    model = RCMAE(student, m.get("mask_ratio", 0.75), gamma=1.0 if ckpt.teacher is not None else 0.0)
    load_state(model.student, sd, f"{ckpt.path} student")
    if ckpt.teacher is not None:
        load_state(model.teacher, ckpt.teacher, f"{ckpt.path} teacher")
    return model
