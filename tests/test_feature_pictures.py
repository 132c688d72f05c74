"""Feature pictures (rcmae.analysis.features, tools/visualize.py --kind attention,pca): the class-token
attention against known answers and an independent computation, DINOv2's PCA recipe on constructed tokens,
and the tool end to end on every kind of ViT it takes."""
import pytest
import timm
import torch
from fixtures import run_in_process
from PIL import Image

import rcmae
from rcmae.analysis import features
from rcmae.analysis.features import cls_attention, feature_vit, pca_rgb, random_vit
from rcmae.core import checkpoint as ck
from rcmae.core.errors import CheckpointError
from rcmae.core.vit import build_classifier
from rcmae.pretrain.models import build_mae, random_masking_ids
from rcmae.tools import visualize as visualize_tool

ARCH, IMG, CELL = "vit_micro_patch8", 32, 160  # 2 heads, a 4 x 4 grid; a figure cell is 2 inches at 80 dpi


def state_unchanged(vit):
    attn = vit.blocks[-1].attn
    return attn.fused_attn and not attn.attn_drop._forward_hooks and not vit.training


def test_zero_queries_and_keys_attend_uniformly():
    vit = random_vit(ARCH, IMG)
    with torch.no_grad():
        vit.blocks[-1].attn.qkv.weight.zero_()
        vit.blocks[-1].attn.qkv.bias.zero_()
    attn = cls_attention(vit, torch.randn(3, 3, IMG, IMG))
    assert attn.shape == (3, 2, 4, 4)
    torch.testing.assert_close(attn, torch.full_like(attn, 1 / 17))  # 16 patches + the class token
    assert state_unchanged(vit)


def test_cls_attention_is_the_softmax_of_the_last_block():
    torch.manual_seed(1)
    vit = build_classifier(ARCH, IMG, 0, "token").eval()
    imgs = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():  # by hand: tokens into the last block, its norm1, q and k, softmax
        x = torch.cat([vit.cls_token.expand(2, -1, -1), vit.patch_embed(imgs)], 1) + vit.pos_embed
        for blk in vit.blocks[:-1]:
            x = blk(x)
        last = vit.blocks[-1]
        q, k, _ = (last.norm1(x) @ last.attn.qkv.weight.T + last.attn.qkv.bias).reshape(2, 17, 3, 2, 16).unbind(2)
        scores = torch.einsum("bhd,bnhd->bhn", q[:, 0], k) / 16 ** 0.5
        expected = scores.softmax(-1)  # (B, heads, 1 + patches)
    attn = cls_attention(vit, imgs)
    torch.testing.assert_close(attn, expected[:, :, 1:].reshape(2, 2, 4, 4))
    torch.testing.assert_close(attn.sum((-2, -1)), 1 - expected[:, :, 0])
    assert (expected[:, :, 0] > 1e-3).all() and state_unchanged(vit)  # the class token's share is not nothing


def test_feature_vit_takes_the_teacher_or_the_student(tmp_path):
    torch.manual_seed(0)
    student, teacher = build_mae(ARCH, IMG, 32, 1, 2), build_mae(ARCH, IMG, 32, 1, 2)
    torch.save({"format": ck.FORMAT, "arch": ARCH, "student": student.state_dict(), "teacher": teacher.state_dict(),
                "config": {"model": {"decoder_heads": 2}}}, tmp_path / "ours.pth")
    model = rcmae.load_model(tmp_path / "ours.pth")
    x = torch.randn(2, 3, IMG, IMG)
    ids, _, _ = random_masking_ids(torch.arange(16.0).expand(2, -1), 0.0)
    with torch.no_grad():
        for which, mae in (("auto", teacher), ("teacher", teacher), ("student", student)):
            torch.testing.assert_close(feature_vit(model, which).forward_features(x),
                                       mae.eval().forward_encoder(x, ids))
    model.teacher = None  # an MAE: auto is the student, and there is no teacher to ask for
    assert torch.equal(feature_vit(model).blocks[0].attn.qkv.weight, student.blocks[0].attn.qkv.weight)
    with pytest.raises(CheckpointError, match="no teacher"):
        feature_vit(model, "teacher")
    with pytest.raises(CheckpointError, match="no Vision Transformer"):
        feature_vit(timm.create_model("resnet10t"))


def square_tokens(sign):
    """Tokens of 2 images of 8 x 8 patches: a foreground square (a + noise) on background (b + noise)."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(24, generator=g), torch.randn(24, generator=g)
    fg = torch.zeros(2, 8, 8, dtype=torch.bool)
    fg[0, 2:6, 3:7] = True
    fg[1, 1:4, 1:7] = True
    tokens = torch.where(fg.unsqueeze(-1), a, b) + 0.05 * torch.randn(2, 8, 8, 24, generator=g)
    return sign * tokens, fg


@pytest.mark.parametrize("svd_sign", [1, -1])
@pytest.mark.parametrize("sign", [1, -1])
def test_pca_finds_the_foreground_square_whatever_the_signs(sign, svd_sign, monkeypatch):
    svd = torch.linalg.svd
    monkeypatch.setattr(torch.linalg, "svd", lambda x, **kw: (lambda u, s, vh: (svd_sign * u, s, svd_sign * vh))(
        *svd(x, **kw)))
    tokens, fg = square_tokens(sign)
    pca = pca_rgb(tokens)
    assert torch.equal(pca.foreground, fg)
    assert (pca.first[fg] > 0).all() and (pca.first[~fg] < 0).all()
    assert (pca.rgb[~fg] == 0).all() and pca.rgb.min() >= 0 and pca.rgb.max() <= 1
    torch.testing.assert_close(pca.rgb[fg].amin(0), torch.zeros(3))  # min-max scaled over the foreground
    torch.testing.assert_close(pca.rgb[fg].amax(0), torch.ones(3))


def test_patch_pca_shapes():
    pca = features.patch_pca(random_vit(ARCH, IMG), torch.randn(3, 3, IMG, IMG))
    assert pca.rgb.shape == (3, 4, 4, 3) and pca.foreground.shape == pca.first.shape == (3, 4, 4)


def test_folders_give_one_image_per_class_in_turn(imagenet):
    classes = sorted((imagenet / "val").iterdir())
    first = [sorted(c.glob("*.JPEG"))[0] for c in classes]
    second = [sorted(c.glob("*.JPEG"))[1] for c in classes]
    assert visualize_tool.folder_images(imagenet / "val", 6) == first + second[:2]
    assert visualize_tool.folder_images(classes[0], 2) == [sorted(classes[0].glob("*.JPEG"))[k] for k in (0, 1)]


def test_visualize_draws_attention_and_pca_of_every_vit(tmp_path, imagenet):
    torch.manual_seed(0)
    student, teacher = build_mae(ARCH, IMG, 32, 1, 2), build_mae(ARCH, IMG, 32, 1, 2)
    torch.save({"format": ck.FORMAT, "arch": ARCH, "student": student.state_dict(), "teacher": teacher.state_dict(),
                "config": {"model": {"decoder_heads": 2}}}, tmp_path / "ours.pth")
    torch.save({"model": {k: v for k, v in teacher.state_dict().items() if ck.is_encoder_key(k)}},
               tmp_path / "encoder.pth")
    for name, checkpoint in (("ours", tmp_path / "ours.pth"), ("encoder", tmp_path / "encoder.pth"),
                             ("random", f"random:{ARCH}@{IMG}")):
        out = tmp_path / name / "{kind}.png"
        res = run_in_process(visualize_tool, checkpoint, imagenet / "val", "--kind", "attention,pca", "--out", out,
                             "--max-images", 3)
        assert res.returncode == 0, res.stderr[-2000:]
        written = [str(out).replace("{kind}", kind) for kind in ("attention", "pca")]
        assert res.stdout.split() == written
        assert Image.open(written[0]).size == (4 * CELL, 3 * CELL)  # image | mean | head 1 | head 2
        assert Image.open(written[1]).size == (3 * CELL, 3 * CELL)  # image | first component | RGB


def test_visualize_refuses_before_writing(tmp_path, imagenet):
    image = sorted((imagenet / "val").glob("*/*.JPEG"))[0]
    res = run_in_process(visualize_tool, f"random:{ARCH}@{IMG}", image, "--kind", "attention,pca",
                         "--out", tmp_path / "x.png")
    assert res.returncode == 2 and "{kind}" in res.stderr and list(tmp_path.iterdir()) == []
    res = run_in_process(visualize_tool, f"random:{ARCH}@{IMG}", image, "--out", tmp_path / "r.png")
    assert res.returncode == 1 and "holds no decoder" in res.stderr and list(tmp_path.iterdir()) == []
    folder = tmp_path / "resnet"
    resnet = timm.create_model("resnet10t", num_classes=10)
    timm.models.save_for_hf(resnet, str(folder), model_args={"num_classes": 10}, safe_serialization=True)
    res = run_in_process(visualize_tool, folder, image, "--kind", "attention", "--out", tmp_path / "a.png")
    assert res.returncode == 1 and "ResNet is no Vision Transformer" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "a.png").exists()


def test_a_pca_per_image_finds_each_images_object_where_the_joint_one_tells_the_images_apart():
    """Two images whose tokens differ by a large offset: the joint first component separates the images (all of
    one is 'foreground'); one PCA per image finds each image's square."""
    tokens, fg = square_tokens(1)
    offset = torch.zeros(24)
    offset[5] = 40.0
    tokens = torch.stack([tokens[0] + offset, tokens[1] - offset])
    joint, each = pca_rgb(tokens), pca_rgb(tokens, joint=False)
    assert joint.foreground[0].all() != joint.foreground[1].all()  # one whole image is foreground, the other not
    assert torch.equal(each.foreground, fg) and (each.rgb[~fg] == 0).all()
