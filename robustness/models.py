"""The classifier under evaluation and its preprocessing, from a checkpoint of any supported origin.

Origins: our fine-tuning / linear-probe checkpoints (they name their architecture and input size),
official MAE fine-tuned files (``{"model"}`` with ``head``, ``fc_norm``: architecture and input size
are read off the tensor shapes), and state dicts of any timm classifier (``--model`` names it: ViT,
ResNet, ConvNeXt, ...). Preprocessing follows the weights: MAE's evaluation (ImageNet mean / std,
bicubic, crop 224/256) for ours and MAE's files, whatever model class reads them; timm's data config
of the model for a timm state dict read by a timm model name; ``model.preprocessing`` overrides it.
The choice is stated in every output.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass

import torch.nn as nn

from rcmae.core.checkpoint import load_state, read_checkpoint
from rcmae.core.data.transforms import mae_eval_config
from rcmae.core.errors import CheckpointError, ConfigError
from rcmae.core.vit import ARCHS, build_classifier, infer_arch

PREPROCESSING = ("auto", "mae", "timm")


@dataclass
class Classifier:
    model: nn.Module
    description: str
    data_config: dict  # timm's keys: input_size, interpolation, mean, std, crop_pct, crop_mode
    preprocessing: str  # where data_config comes from

    @property
    def img_size(self) -> int:
        return self.data_config["input_size"][-1]


def check_model_name(arch: str, what: str = "model.arch (--model)") -> None:
    """``arch`` (the setting ``what``) is one of our ViTs or a timm model name; otherwise a ConfigError
    naming timm's closest names (nothing is built or downloaded)."""
    import timm
    from timm.models import parse_model_name

    source, _ = parse_model_name(arch)
    if arch in ARCHS or source or timm.is_model(arch):  # source: hf-hub: / local-dir: names, timm resolves them
        return
    close = difflib.get_close_matches(arch, timm.list_models(), n=5, cutoff=0.6)
    hint = f"close matches: {', '.join(close)}" if close else "timm.list_models('*part*') lists the names"
    raise ConfigError(f"{what}: unknown timm model {arch!r}; {hint}")


def load_classifier(checkpoint: str | None, arch: str | None, img_size: int | None,
                    preprocessing: str = "auto", crop_pct: float | None = None) -> Classifier:
    """The classifier of ``checkpoint``, whatever its number of classes (architecture and input size
    from the file where it tells them; ``arch`` / ``img_size`` otherwise, or to override the shapes
    an MAE file is read as). Without a checkpoint, ``arch`` must be a timm model name and timm's
    pretrained weights are loaded."""
    import timm

    if arch is not None:
        check_model_name(arch)
    if preprocessing not in PREPROCESSING:
        raise ConfigError(f"model.preprocessing must be one of {PREPROCESSING}, got {preprocessing!r}")
    if checkpoint is None:
        if arch is None or arch in ARCHS:
            raise ConfigError("model.checkpoint (--checkpoint) is required, or a timm model name as "
                              "model.arch (--model) for timm's pretrained weights")
        model = timm.create_model(arch, pretrained=True)
        return _with_preprocessing(model, f"timm:{arch} (pretrained)", "timm", preprocessing, crop_pct, None)
    ckpt = read_checkpoint(checkpoint)
    sd = ckpt.student
    if ckpt.source in ("ours", "rcmae"):
        raise CheckpointError(f"{checkpoint} is a pretraining checkpoint ({ckpt.source}): it has no classifier. "
                              "Fine-tune it first (tools/finetune.py) and evaluate classifier_best.pth")
    pool = "avg" if "fc_norm.weight" in sd else "token"
    if ckpt.source == "ours-classifier":
        saved_arch, saved_size = ckpt.raw["arch"], ckpt.raw["img_size"]
        for key, flag, given, saved in (("model.arch", "--model", arch, saved_arch),
                                        ("model.img_size", "--img-size", img_size, saved_size)):
            if given is not None and given != saved:  # the file's own would be used: refuse, not ignore
                raise ConfigError(f"{key} ({flag})={given!r}: {checkpoint} is a classifier of ours and names "
                                  f"its architecture itself ({saved_arch}, {saved_size} px); drop {flag}")
        arch, img_size, pool = saved_arch, saved_size, ckpt.raw["global_pool"]
    elif arch is None or (arch in ARCHS and img_size is None):
        try:
            found, size = infer_arch(sd, checkpoint)
        except ValueError as e:
            raise CheckpointError(f"{e}: pass --model with the timm model name of this checkpoint") from None
        arch, img_size = arch or found, img_size or size
    if arch in ARCHS:
        if "head.weight" not in sd:
            raise CheckpointError(f"{checkpoint} ({ckpt.source}) has no classification head: fine-tune it "
                                  "first (tools/finetune.py), or pass a classifier checkpoint")
        model, family = build_classifier(arch, img_size, sd["head.weight"].shape[0], pool), "mae"
    else:
        head = timm.models.get_pretrained_cfg_value(arch, "classifier")  # its state-dict prefix: fc, head.fc, ...
        num_classes = sd[f"{head}.weight"].shape[0] if f"{head}.weight" in sd else 1000
        model = timm.create_model(arch, num_classes=num_classes,
                                  **({"global_pool": "avg"} if "fc_norm.weight" in sd else {}))
        family = "timm"
    load_state(model, sd, f"{checkpoint} ({ckpt.source}) as model {arch!r}", source=ckpt.source,
               hint="Set --model to the checkpoint's architecture.")
    what = f"{checkpoint} ({ckpt.source}, {arch}" + (f", {pool} pooling)" if family == "mae" else ")")
    trained_as = "timm" if family == "timm" and ckpt.source == "timm" else "mae"  # MAE / our weights
    return _with_preprocessing(model, what, trained_as, preprocessing, crop_pct, img_size)


def _with_preprocessing(model: nn.Module, what: str, trained_as: str, preprocessing: str,
                        crop_pct: float | None, img_size: int | None) -> Classifier:
    import timm.data

    chosen = trained_as if preprocessing == "auto" else preprocessing
    if chosen == "mae":
        if img_size is None:  # a timm model: its own input size
            img_size = timm.data.resolve_data_config({}, model=model)["input_size"][-1]
        return Classifier(model, what, mae_eval_config(img_size, crop_pct),
                          "MAE's evaluation (ImageNet mean / std, bicubic, crop 224/256 up to 224 px)")
    config = timm.data.resolve_data_config({} if crop_pct is None else {"crop_pct": crop_pct}, model=model)
    name = getattr(model, "pretrained_cfg", {}).get("architecture") or type(model).__name__
    fixed = fixed_input_size(model)
    if fixed is not None and config["input_size"][-1] != fixed:  # else a shape error deep inside the model
        raise ConfigError(f"model.preprocessing=timm (--preprocessing timm) makes {config['input_size'][-1]}-px "
                          f"inputs (timm's data config of {name}), but {what} takes {fixed} px only: use "
                          f"--preprocessing mae (MAE's evaluation at {fixed} px) or auto")
    return Classifier(model, what, config, f"timm's data config of {name}")


def fixed_input_size(model: nn.Module) -> int | None:
    """The one input size a model takes (a ViT's patch embedding checks it), None where any size passes."""
    patch_embed = getattr(model, "patch_embed", None)
    if patch_embed is None or not getattr(patch_embed, "strict_img_size", False):
        return None
    return patch_embed.img_size[-1]
