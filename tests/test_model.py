import math

import pytest
import torch

from rcmae.core.optim import pretrain_param_groups
from rcmae.core.schedules import lr_at, momentum_at
from rcmae.core.vit import sincos_pos_embed
from rcmae.pretrain.models import build_mae, masked_mean, patchify, random_masking_ids, unpatchify
from rcmae.pretrain.rcmae import RCMAE


def micro(**kw):
    torch.manual_seed(0)
    return build_mae("vit_micro_patch8", 32, 32, 1, 2, **kw)


def test_masking_exact_ratio_and_determinism():
    noise = torch.rand(5, 196)
    ids_keep, ids_restore, mask = random_masking_ids(noise, 0.75)
    assert ids_keep.shape == (5, 49)
    assert torch.all(mask.sum(1) == 196 - 49)
    # visible patches are exactly the kept ids
    assert torch.all(torch.gather(mask, 1, ids_keep) == 0)
    # ids_restore inverts the shuffle
    assert torch.equal(torch.gather(torch.argsort(noise, 1), 1, ids_restore),
                       torch.arange(196).expand(5, -1))
    again = random_masking_ids(noise.clone(), 0.75)
    assert all(torch.equal(a, b) for a, b in zip((ids_keep, ids_restore, mask), again))


def test_patchify_layout_and_round_trip():
    imgs = torch.randn(2, 3, 32, 48)
    x = patchify(imgs, 8)
    assert x.shape == (2, 4 * 6, 8 * 8 * 3)
    # patch (row 1, col 2) holds that 8x8 window with pixels ordered (row, col, channel)
    window = imgs[:, :, 8:16, 16:24].permute(0, 2, 3, 1).reshape(2, -1)
    assert torch.equal(x[:, 1 * 6 + 2], window)
    square = torch.randn(2, 3, 32, 32)
    assert torch.equal(unpatchify(patchify(square, 8), 8), square)


def test_sincos_closed_form():
    dim, grid = 16, 3
    emb = sincos_pos_embed(dim, grid)[0]
    assert emb.shape == (1 + grid * grid, dim)
    assert torch.all(emb[0] == 0)
    q = dim // 4
    for row in range(grid):
        for col in range(grid):
            v = emb[1 + row * grid + col]
            for i in range(q):
                w = 1 / 10000 ** (i / q)
                expected = [math.sin(col * w), math.cos(col * w), math.sin(row * w), math.cos(row * w)]
                got = [v[i], v[q + i], v[2 * q + i], v[3 * q + i]]
                assert [float(g) for g in got] == pytest.approx(expected, abs=1e-6)


def test_recon_loss_closed_form_norm_pix():
    # zero prediction: per-patch MSE against a unit-variance (unbiased) target is (P-1)/P
    model = RCMAE(micro(norm_pix_loss=True), 0.75, gamma=0)
    torch.nn.init.zeros_(model.student.decoder_pred.weight)
    torch.nn.init.zeros_(model.student.decoder_pred.bias)
    imgs = torch.randn(3, 3, 32, 32)
    out = model(imgs, torch.rand(3, 16))
    pixels = 8 * 8 * 3
    assert out["loss"].item() == pytest.approx((pixels - 1) / pixels, rel=1e-4)


def test_recon_loss_only_on_masked_patches():
    model = RCMAE(micro(norm_pix_loss=False), 0.75, gamma=0)
    torch.nn.init.zeros_(model.student.decoder_pred.weight)
    torch.nn.init.zeros_(model.student.decoder_pred.bias)
    imgs = torch.randn(2, 3, 32, 32)
    noise = torch.rand(2, 16)
    _, _, mask = random_masking_ids(noise, 0.75)
    per_patch = (patchify(imgs, 8) ** 2).mean(-1)
    expected = (per_patch * mask).sum() / mask.sum()
    assert model(imgs, noise)["loss"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_consistency_loss_closed_form():
    model = RCMAE(micro(), 0.75, gamma=0.5)
    for net, bias in ((model.student, 0.3), (model.teacher, -0.2)):
        torch.nn.init.zeros_(net.decoder_pred.weight)
        torch.nn.init.constant_(net.decoder_pred.bias, bias)
    out = model(torch.randn(2, 3, 32, 32), torch.rand(2, 16))
    assert out["consistency"].item() == pytest.approx(0.5 ** 2, rel=1e-5)
    assert out["loss"].item() == pytest.approx(out["recon"].item() + 0.5 * 0.25, rel=1e-5)


def test_gamma_zero_is_mae_without_teacher():
    model = RCMAE(micro(), 0.75, gamma=0)
    assert model.teacher is None
    assert all(not n.startswith("teacher") for n, _ in model.named_parameters())
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    model(imgs, noise)["loss"].backward()
    ours = {n: p.grad.clone() for n, p in model.student.named_parameters() if p.grad is not None}
    # MAE by hand: predictions of the student, MSE on masked patches of the normalised target
    ref = micro()
    ids_keep, ids_restore, mask = random_masking_ids(noise, 0.75)
    pred = ref(imgs, ids_keep, ids_restore)
    masked_mean(((pred - ref.target(imgs)) ** 2).mean(-1), mask).backward()
    for n, p in ref.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(ours[n], p.grad)


def test_teacher_starts_as_copy_and_gets_no_gradients():
    model = RCMAE(micro(), 0.75, gamma=1.0)
    for (ns, s), (nt, t) in zip(model.student.state_dict().items(), model.teacher.state_dict().items()):
        assert ns == nt and torch.equal(s, t)
    out = model(torch.randn(2, 3, 32, 32), torch.rand(2, 16))
    assert out["consistency"].item() == 0.0  # same weights, same mask
    out["loss"].backward()
    assert all(p.grad is None and not p.requires_grad for p in model.teacher.parameters())
    assert not model.teacher.training
    groups, names = pretrain_param_groups(model.student, 0.05)
    assert not any(n.startswith("teacher") for n in names)


def test_ema_update_closed_form():
    model = RCMAE(micro(), 0.75, gamma=1.0)
    t0 = {n: p.clone() for n, p in model.teacher.named_parameters()}
    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(torch.randn_like(p))
    model.update_teacher(0.9)
    s = dict(model.student.named_parameters())
    for n, p in model.teacher.named_parameters():
        torch.testing.assert_close(p, 0.9 * t0[n] + 0.1 * s[n])


def test_schedules():
    assert momentum_at(0, 100, 0.996) == pytest.approx(0.996)
    assert momentum_at(50, 100, 0.996) == pytest.approx(0.998)
    assert momentum_at(100, 100, 0.996) == pytest.approx(1.0)
    assert lr_at(0, 10, 100, 1.0) == 0.0
    assert lr_at(5, 10, 100, 1.0) == pytest.approx(0.5)
    assert lr_at(10, 10, 100, 1.0) == pytest.approx(1.0)
    assert lr_at(55, 10, 100, 1.0, 0.1) == pytest.approx(0.55)
    assert lr_at(100, 10, 100, 1.0) == pytest.approx(0.0)


@pytest.mark.parametrize("decay_tokens", [True, False])
def test_no_weight_decay_on_biases_and_norms(decay_tokens):
    groups, names = pretrain_param_groups(micro(), 0.05, decay_tokens)
    no_decay = set(names[:len(groups[0]["params"])])
    assert {"blocks.0.norm1.weight", "blocks.0.attn.qkv.bias", "norm.bias", "decoder_pred.bias"} <= no_decay
    assert "pos_embed" not in names  # fixed: not trained at all
    decay = set(names) - no_decay
    assert {"blocks.0.attn.qkv.weight", "patch_embed.proj.weight", "decoder_pred.weight"} <= decay
    # the official codebases decay the (1, 1, D) tokens; decay_tokens=False exempts them
    assert {"cls_token", "mask_token"} <= (decay if decay_tokens else no_decay)
    assert groups[0]["weight_decay"] == 0.0 and groups[1]["weight_decay"] == 0.05


def test_different_mask_variant_gives_teacher_its_own_mask():
    model = RCMAE(micro(), 0.75, gamma=1.0, teacher_mask="different")
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 2, 16)
    # at init the teacher equals the student: only a different mask makes the predictions differ
    assert model(imgs, noise)["consistency"].item() > 0
    same = torch.stack([noise[0], noise[0]])
    assert model(imgs, same)["consistency"].item() == 0.0
    with pytest.raises(ValueError, match="teacher_mask"):
        RCMAE(micro(), 0.75, 1.0, teacher_mask="random")
