"""rcmae.load_model on every advertised origin, and tools/visualize.py (MAE's demo figure)."""

import pytest
import timm
import torch
from fixtures import run_in_process
from PIL import Image

import rcmae
from rcmae.core import checkpoint as ck
from rcmae.core.vit import build_classifier
from rcmae.pretrain.models import build_mae, random_masking_ids
from rcmae.pretrain.rcmae import RCMAE
from rcmae.tools import visualize as visualize_tool


def pretrained(tmp_path):
    """Our checkpoint of a micro RC-MAE whose teacher differs from its student, and the same nets in
    the official MAE ("full") and RC-MAE formats."""
    torch.manual_seed(0)
    student, teacher = build_mae("vit_micro_patch8", 32, 32, 1, 2), build_mae("vit_micro_patch8", 32, 32, 1, 2)
    cfg = {"model": {"decoder_heads": 2, "norm_pix_loss": True, "mask_ratio": 0.75}}
    torch.save({"format": ck.FORMAT, "arch": "vit_micro_patch8", "student": student.state_dict(),
                "teacher": teacher.state_dict(), "config": cfg}, tmp_path / "ours.pth")
    torch.save({"student": {f"module.{k}": v for k, v in student.state_dict().items()},
                "teacher": teacher.state_dict()}, tmp_path / "rcmae.pth")
    return student, teacher


def test_pretraining_checkpoints_give_the_masked_autoencoder(tmp_path):
    student, teacher = pretrained(tmp_path)
    for name in ("ours", "rcmae"):
        model = rcmae.load_model(tmp_path / f"{name}.pth")
        assert isinstance(model, RCMAE) and model.teacher is not None and not model.training
        for k, v in teacher.state_dict().items():
            assert torch.equal(model.teacher.state_dict()[k], v), k
        assert torch.equal(model.student.decoder_pred.weight, student.decoder_pred.weight)


def test_encoders_classifiers_and_timm_folders(tmp_path):
    student, teacher = pretrained(tmp_path)
    # an encoder-only file (MAE's released format): timm's VisionTransformer with the same features
    encoder = {k: v for k, v in teacher.state_dict().items() if k.startswith(("cls_token", "pos_embed",
                                                                               "patch_embed", "blocks", "norm"))}
    torch.save({"model": encoder}, tmp_path / "encoder.pth")
    vit = rcmae.load_model(tmp_path / "encoder.pth")
    x = torch.randn(2, 3, 32, 32)
    ids, _, _ = random_masking_ids(torch.arange(16.0).expand(2, -1), 0.0)
    torch.testing.assert_close(vit.forward_features(x), teacher.eval().forward_encoder(x, ids))
    # our export's timm folder
    ck.export_encoder(tmp_path / "ours.pth", "teacher", tmp_path / "exp.pth")
    torch.testing.assert_close(rcmae.load_model(tmp_path / "exp").forward_features(x), vit.forward_features(x))
    # a fine-tuned classifier (MAE's format) and a timm ResNet state dict
    clf = build_classifier("vit_micro_patch8", 32, 1000, "avg").eval()
    torch.save({"model": clf.state_dict()}, tmp_path / "mae_finetuned.pth")
    torch.testing.assert_close(rcmae.load_model(tmp_path / "mae_finetuned.pth")(x), clf(x))
    resnet = timm.create_model("resnet18", num_classes=1000).eval()
    torch.save(resnet.state_dict(), tmp_path / "resnet18.pth")
    torch.testing.assert_close(rcmae.load_model(tmp_path / "resnet18.pth", model="resnet18")(x), resnet(x))
    with pytest.raises(ck.CheckpointError, match="without config.json"):
        rcmae.load_model(tmp_path)


def test_visualize_tool_writes_the_demo_figure(tmp_path, imagenet):
    """RC-MAE: original | masked | student | teacher (4 columns); MAE: 3; one row per image."""
    student, _ = pretrained(tmp_path)
    torch.save({"model": student.state_dict()}, tmp_path / "mae_full.pth")
    images = sorted((imagenet / "val").glob("*/*.JPEG"))[:2]
    sizes = {}
    for name in ("ours", "mae_full"):
        out = tmp_path / f"{name}.png"
        res = run_in_process(visualize_tool, tmp_path / f"{name}.pth", *images, "--out", out)  # tools/visualize.py
        assert res.returncode == 0, res.stderr[-2000:]
        sizes[name] = Image.open(out).size
    assert sizes["ours"] == (4 * 2 * 80, 2 * 2 * 80) and sizes["mae_full"] == (3 * 2 * 80, 2 * 2 * 80)
    torch.save({"model": {k: v for k, v in student.state_dict().items() if not k.startswith(("decoder", "mask"))}},
               tmp_path / "encoder.pth")
    res = run_in_process(visualize_tool, tmp_path / "encoder.pth", images[0])
    assert res.returncode != 0 and "holds no decoder" in res.stderr and "Traceback" not in res.stderr


def finetuned_classifier(path, num_classes):
    """A classifier as tools/finetune.py saves it (``rcmae/core/checkpoint.py``'s fine-tuning format)."""
    torch.manual_seed(0)
    model = build_classifier("vit_micro_patch8", 32, num_classes, "avg").eval()
    torch.save({"format": ck.CLASSIFIER_FORMAT, "arch": "vit_micro_patch8", "img_size": 32, "global_pool": "avg",
                "num_classes": num_classes, "mode": "finetune", "model": model.state_dict(),
                "train_model": model.state_dict(), "best": {"top1": 50.0}, "eval": {}}, path)
    return model


def test_classifiers_of_any_class_count_load(tmp_path):
    """A 10-class fine-tuned classifier is a legitimate model to load: no ImageNet-1k requirement here."""
    ten = finetuned_classifier(tmp_path / "classifier_best.pth", 10)
    x = torch.randn(2, 3, 32, 32)
    loaded = rcmae.load_model(tmp_path / "classifier_best.pth")
    assert loaded.num_classes == 10 and not loaded.training
    torch.testing.assert_close(loaded(x), ten(x))
    resnet = timm.create_model("resnet18", num_classes=10).eval()
    torch.save(resnet.state_dict(), tmp_path / "resnet18_10.pth")
    torch.testing.assert_close(rcmae.load_model(tmp_path / "resnet18_10.pth", model="resnet18")(x), resnet(x))


def test_visualize_refuses_a_classifier_in_its_own_words(tmp_path, imagenet):
    from rcmae.tools import visualize

    finetuned_classifier(tmp_path / "classifier_best.pth", 10)
    image = sorted((imagenet / "val").glob("*/*.JPEG"))[0]
    with pytest.raises(SystemExit, match="holds no decoder") as raised:
        visualize.main([str(tmp_path / "classifier_best.pth"), str(image), "--out", str(tmp_path / "fig.png")])
    assert "benchmark" not in str(raised.value) and not (tmp_path / "fig.png").exists()


def test_load_model_names_close_timm_models(tmp_path):
    torch.save(timm.create_model("resnet18", num_classes=10).state_dict(), tmp_path / "r.pth")
    with pytest.raises(ValueError, match=r"load_model\(model=...\): unknown timm model 'resnet1'.*resnet18"):
        rcmae.load_model(tmp_path / "r.pth", model="resnet1")
