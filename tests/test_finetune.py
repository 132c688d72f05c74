import os
import socket

import pytest
import timm
import timm.data
import torch
import torch.multiprocessing as mp
from PIL import Image
from torch.utils.data import Dataset

from rcmae.core import checkpoint as ck
from rcmae.core.config import load_config
from rcmae.core.data.sampler import shard_loader
from rcmae.core.evaluate import evaluate
from rcmae.core.knn import gather_in_order, knn_classify
from rcmae.core.vit import build_classifier
from rcmae.finetune.defaults import DEFAULTS
from rcmae.finetune.models import classifier_state, interpolate_pos_embed, linear_probe_head, load_backbone
from rcmae.finetune.train import main
from rcmae.pretrain.models import build_mae


def labelled_folder(root, classes=("n02123045", "n07920052"), per_class=8, size=40):
    for c, wnid in enumerate(classes):
        (root / wnid).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            color = (200 * c + 20, 10 * i, 120)
            Image.new("RGB", (size, size), color).save(root / wnid / f"{i}.jpg")
    return root


def ft_cfg(tmp_path, *overrides, out="ft"):
    labelled_folder(tmp_path / "train")
    labelled_folder(tmp_path / "val", per_class=3)
    base = ["model.arch=vit_micro_patch8", "model.img_size=32", f"data.train_path={tmp_path / 'train'}",
            f"data.val_path={tmp_path / 'val'}", "data.num_workers=0", "optim.batch_size=8",
            "optim.epochs=2", "optim.warmup_epochs=1", "train.micro_batch=8", "train.device=cpu",
            f"train.output_dir={tmp_path / out}", "eval.batch_size=4", "log.every_steps=1",
            "model.drop_path=0.1"]
    return load_config(DEFAULTS, None, base + list(overrides))


def test_pos_embed_interpolation():
    pe = torch.randn(1, 1 + 14 * 14, 8)
    assert interpolate_pos_embed(pe, (14, 14)) is pe
    const = torch.cat([torch.full((1, 1, 8), 7.0), torch.full((1, 196, 8), 0.5)], dim=1)
    out = interpolate_pos_embed(const, (16, 16))
    assert out.shape == (1, 1 + 256, 8)
    assert torch.equal(out[:, :1], const[:, :1])  # cls token kept
    torch.testing.assert_close(out[:, 1:], torch.full((1, 256, 8), 0.5))  # bicubic keeps a constant


def _pretrain_file(tmp_path, arch="vit_micro_patch8", img_size=32):
    torch.manual_seed(0)
    student = build_mae(arch, img_size, 32, 1, 2)
    teacher = {k: v + 1.0 for k, v in student.state_dict().items()}
    path = tmp_path / "pre.pth"
    torch.save({"format": ck.FORMAT, "student": student.state_dict(), "teacher": teacher}, path)
    return path, student.state_dict(), teacher


def test_backbone_readers_for_every_source(tmp_path):
    path, student, teacher = _pretrain_file(tmp_path)
    model = build_classifier("vit_micro_patch8", 32, 10, "avg")
    report = load_backbone(model, path)  # ours: teacher by default
    assert report.which == "teacher" and set(report.missing) == {"head.weight", "head.bias",
                                                                 "fc_norm.weight", "fc_norm.bias"}
    assert torch.equal(model.blocks[0].attn.qkv.weight, teacher["blocks.0.attn.qkv.weight"])
    assert "norm.weight" in report.dropped and "decoder_pred.weight" in report.dropped
    load_backbone(model, path, "student")
    assert torch.equal(model.blocks[0].attn.qkv.weight, student["blocks.0.attn.qkv.weight"])

    torch.save({"student": {f"module.{k}": v for k, v in student.items()}, "teacher": teacher,
                "epoch": 1}, tmp_path / "rcmae.pth")
    assert load_backbone(model, tmp_path / "rcmae.pth").source == "rcmae"
    assert torch.equal(model.cls_token, teacher["cls_token"])
    torch.save({"model": student}, tmp_path / "mae.pth")
    assert load_backbone(model, tmp_path / "mae.pth").which == "student"

    # timm: a classifier with another head and pooling, as a bare state dict and under "state_dict"
    vit = build_classifier("vit_micro_patch8", 32, 1000, "token")
    torch.save(vit.state_dict(), tmp_path / "timm_bare.pth")
    torch.save({"state_dict": vit.state_dict()}, tmp_path / "timm.pth")
    for f in ("timm_bare.pth", "timm.pth"):
        report = load_backbone(model, tmp_path / f)
        assert report.source == "timm" and {"head.weight", "norm.weight"} <= set(report.dropped)
        assert torch.equal(model.blocks[1].mlp.fc2.weight, vit.blocks[1].mlp.fc2.weight)

    # a larger input size: position embeddings interpolated, everything else loaded
    big = build_classifier("vit_micro_patch8", 48, 10, "avg")
    load_backbone(big, path)
    assert big.pos_embed.shape[1] == 1 + 36 and torch.equal(big.pos_embed[:, 0], teacher["pos_embed"][:, 0])

    with pytest.raises(ck.CheckpointError, match="shape mismatch"):
        load_backbone(build_classifier("vit_mini_patch8", 32, 10, "avg"), path)
    bad = dict(student, **{"blocks.0.extra": torch.zeros(1)})
    torch.save({"model": bad}, tmp_path / "bad.pth")
    with pytest.raises(ck.CheckpointError, match=r"unexpected keys \['blocks.0.extra'\]"):
        load_backbone(model, tmp_path / "bad.pth")


def test_saved_classifier_loads_into_timm_and_agrees(tmp_path):
    torch.manual_seed(0)
    ours = build_classifier("vit_tiny_patch16", 224, 1000, "avg").eval()
    vit = timm.create_model("vit_tiny_patch16_224", global_pool="avg", num_classes=1000).eval()
    vit.load_state_dict(classifier_state(ours))  # strict: no key surgery
    x = torch.randn(1, 3, 224, 224)
    torch.testing.assert_close(vit(x), ours(x))

    probe = build_classifier("vit_micro_patch8", 32, 5, "token")
    linear_probe_head(probe)
    probe.train()
    for _ in range(3):  # give the BatchNorm real statistics
        probe(torch.randn(8, 3, 32, 32) * 3 + 1)
    probe.eval()
    plain = build_classifier("vit_micro_patch8", 32, 5, "token").eval()
    plain.load_state_dict(classifier_state(probe))  # BatchNorm folded into the linear head
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(plain(x), probe(x), rtol=1e-4, atol=1e-5)


class Coded(Dataset):
    """Image i is filled with its predicted class; labels make 5 of 7 predictions right."""

    preds, labels = [0, 1, 2, 0, 1, 2, 0], [0, 1, 2, 0, 2, 1, 0]

    def __len__(self):
        return 7

    def __getitem__(self, item):
        i, _ = item
        return torch.full((3, 4, 4), float(self.preds[i])), self.labels[i], 0


class OneHot(torch.nn.Module):
    def forward(self, x):
        return torch.nn.functional.one_hot(x[:, 0, 0, 0].long(), 3).float()


def _distributed_worker(rank, port, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    loader = shard_loader(Coded(), 2, 2, rank, 0, False)  # rank 0: 4 images, rank 1: 3
    acc = evaluate(OneHot(), loader, torch.device("cpu"))
    feats = torch.arange(rank, 7, 2, dtype=torch.float32)[:, None].repeat(1, 3)
    idx = torch.arange(rank, 7, 2)
    f, y = gather_in_order(feats, idx * 10, idx)
    results[rank] = (acc, f[:, 0].tolist(), y.tolist())
    torch.distributed.destroy_process_group()


def test_exact_distributed_counting_with_an_uneven_split():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_distributed_worker, args=(port, results), nprocs=2, join=True)
    for rank in (0, 1):
        acc, feats, labels = results[rank]
        assert (acc["n"], acc["correct1"], acc["correct5"]) == (7, 5, 7)  # not 8: no padding
        assert acc["top1"] == pytest.approx(500 / 7)
        assert feats == list(range(7)) and labels == [10 * i for i in range(7)]
    single = evaluate(OneHot(), shard_loader(Coded(), 3, 1, 0, 0, False), torch.device("cpu"))
    assert single["correct1"] == 5 and single["n"] == 7


def test_knn_weighted_vote_known_answer():
    train = torch.nn.functional.normalize(torch.tensor([[1.0, 0], [0.9, 0.1], [0, 1.0], [0.1, 0.9]]), dim=1)
    labels = torch.tensor([0, 0, 1, 1])
    val = torch.nn.functional.normalize(torch.tensor([[1.0, 0.05], [0.05, 1.0], [0.6, 0.4]]), dim=1)
    out = knn_classify(train, labels, val, torch.tensor([0, 1, 1]), 2, k=4, temperature=0.07)
    assert out["knn_top1"] == pytest.approx(200 / 3)  # the third is closer to class 0
    assert out["knn_top5"] == 100.0 and out["knn_n"] == 3
    out = knn_classify(train, labels, val[:2], torch.tensor([0, 1]), 2, k=1)
    assert out["knn_top1"] == 100.0


def test_finetune_resume_is_exact(tmp_path):
    # mixup/cutmix, RandAugment, random erasing and drop path all active
    straight = main(ft_cfg(tmp_path, out="straight"))
    main(ft_cfg(tmp_path, "train.stop_at_step=3", out="split"))
    resumed = main(ft_cfg(tmp_path, out="split"))
    assert straight["step"] == resumed["step"] == 4
    a = torch.load(straight["checkpoint"], weights_only=True)
    b = torch.load(resumed["checkpoint"], weights_only=True)
    for k in a["train_model"]:
        assert torch.equal(a["train_model"][k], b["train_model"][k]), k
    assert a["eval"]["n"] == 6 and a["eval"] == b["eval"]
    best = torch.load(tmp_path / "straight" / "classifier_best.pth", weights_only=True)
    vit = build_classifier("vit_micro_patch8", 32, 2, "avg")
    vit.load_state_dict(best["model"])  # strict
    folder = timm.create_model(f"local-dir:{tmp_path / 'straight' / 'classifier_best'}", pretrained=True)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(folder.eval()(x), vit.eval()(x))
    data = timm.data.resolve_data_config({}, model=folder)
    assert tuple(data["mean"]) == (0.485, 0.456, 0.406) and data["crop_pct"] == 0.875


def test_linear_probe_keeps_the_backbone_frozen(tmp_path):
    path, _, teacher = _pretrain_file(tmp_path)
    out = main(ft_cfg(tmp_path, "train.mode=linprobe", "model.global_pool=token", "optim.name=lars",
                      "optim.base_lr=0.1", "optim.weight_decay=0.0", "aug.mixup=0.0", "aug.cutmix=0.0",
                      "aug.smoothing=0.0", "aug.rand_augment=null", "aug.reprob=0.0",
                      f"init.checkpoint={path}", out="lp"))
    state = torch.load(out["checkpoint"], weights_only=True)
    for k in ("blocks.0.attn.qkv.weight", "cls_token", "norm.weight"):
        assert torch.equal(state["train_model"][k], teacher[k]), k
    assert "head.0.running_mean" in state["train_model"] and state["model"]["head.weight"].shape == (2, 32)


def test_unreadable_validation_image_is_counted_apart(tmp_path):
    cfg = ft_cfg(tmp_path, "optim.epochs=1", out="bad")
    (tmp_path / "val" / "n02123045" / "0.jpg").write_bytes(b"broken")
    out = main(cfg)
    assert out["eval"]["n"] == 5 and out["eval"]["unreadable"] == 1


def test_bad_config_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.val_path: image folder"):
        main(ft_cfg(tmp_path, f"data.val_path={tmp_path / 'none'}", out="e1"))
    labelled_folder(tmp_path / "odd", classes=("cats", "dogs"))
    with pytest.raises(ValueError, match="not ImageNet-1k wnids"):
        main(ft_cfg(tmp_path, f"data.train_path={tmp_path / 'odd'}", "data.label_space=imagenet1k", out="e2"))


def lars_steps(optimizer, params, grads):
    """Run ``optimizer`` with the given gradients, one list per step; returns the parameters after each."""
    after = []
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        optimizer.step()
        after.append([p.detach().clone() for p in params])
    return after


@pytest.mark.parametrize("wd", [0.0, 0.05])
def test_lars_is_maes_rule(wd):
    """Two steps on a 2x2 weight and a bias, against the closed form of MAE's ``util/lars.py``: the
    matrix's update u = g + wd w is scaled by 0.001 |w| / |u| (the norm of the *decayed* update);
    the bias gets neither decay nor scaling; momentum buffer b = m b + u', w -= lr b."""
    from rcmae.core.optim import LARS

    f64 = torch.float64
    w0 = torch.tensor([[1.0, -2.0], [0.5, 3.0]], dtype=f64)
    b0 = torch.tensor([0.3, -0.1], dtype=f64)
    grads = [[torch.tensor([[0.2, 0.1], [-0.4, 0.3]], dtype=f64), torch.tensor([1.0, -2.0], dtype=f64)],
             [torch.tensor([[-0.1, 0.5], [0.2, 0.2]], dtype=f64), torch.tensor([0.5, 0.5], dtype=f64)]]
    lr, m, trust = 0.7, 0.9, 0.001
    w, b = w0.clone().requires_grad_(), b0.clone().requires_grad_()
    got = lars_steps(LARS([w, b], lr=lr, weight_decay=wd, momentum=m), [w, b], grads)

    def scaled(g, weight):
        u = g + wd * weight
        return trust * weight.norm() / u.norm() * u

    bw1 = scaled(grads[0][0], w0)
    w1 = w0 - lr * bw1
    w2 = w1 - lr * (m * bw1 + scaled(grads[1][0], w1))
    b1 = b0 - lr * grads[0][1]
    b2 = b1 - lr * (m * grads[0][1] + grads[1][1])
    for (gw, gb), (ew, eb) in zip(got, [(w1, b1), (w2, b2)]):
        torch.testing.assert_close(gw, ew, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(gb, eb, rtol=1e-12, atol=1e-12)


def test_lars_without_weight_decay_matches_the_previous_optimizer():
    """At wd 0 (the shipped probe recipes) the rule is timm's Lars as the probe used it, up to timm's 1e-8 eps;
    at wd 0.05 timm's rule (|g| + wd |w| in the denominator) trains another probe."""
    from timm.optim import Lars

    from rcmae.core.optim import LARS

    torch.manual_seed(0)
    grads = [[torch.randn(10, 32), torch.randn(10)] for _ in range(4)]
    start = [torch.randn(10, 32), torch.randn(10)]

    def run(make):
        params = [p.clone().requires_grad_() for p in start]
        return lars_steps(make(params), params, grads)[-1]

    def timm_lars(wd):
        return lambda ps: Lars([{"params": ps[:1], "weight_decay": wd, "always_adapt": True},
                                {"params": ps[1:], "weight_decay": 0.0, "always_adapt": False}], lr=0.5, momentum=0.9)

    for a, b in zip(run(lambda ps: LARS(ps, lr=0.5, weight_decay=0.0, momentum=0.9)), run(timm_lars(0.0))):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    ours, theirs = run(lambda ps: LARS(ps, lr=0.5, weight_decay=0.05, momentum=0.9))[0], run(timm_lars(0.05))[0]
    moved = ours - start[0]
    assert ((ours - theirs).norm() / moved.norm()).item() > 1e-3  # a visible difference, not rounding


def test_linear_probe_builds_maes_lars(tmp_path):
    from rcmae.core.optim import LARS

    model = build_classifier("vit_micro_patch8", 32, 2, "token")
    linear_probe_head(model)
    cfg = load_config(DEFAULTS, None, ["optim.name=lars", "optim.weight_decay=0.05"])
    from rcmae.core.optim import build_finetune_optimizer

    optimizer = build_finetune_optimizer(model, cfg["optim"], "cpu")
    assert isinstance(optimizer, LARS) and optimizer.param_groups[0]["weight_decay"] == 0.05
    assert {p.ndim for g in optimizer.param_groups for p in g["params"]} == {1, 2}  # the head's weight and bias
