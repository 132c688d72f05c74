"""Known answers that a plausible bug would change, each from a closed form or a constant typed from its
public source (never from the code under test): the lr schedule a real run logs, the consistency loss's
averaging, gradient clipping, the fine-tuning recipe's mixing and head, position-embedding interpolation
and ImageNet-C's AlexNet normalisers."""
import math

import pytest
import torch
import torch.nn as nn
from test_train import metrics
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy

from rcmae.core.config import load_config
from rcmae.core.engine import TrainStep
from rcmae.core.schedules import lr_at, momentum_at
from rcmae.finetune import train as finetune_train
from rcmae.finetune.defaults import DEFAULTS as FT_DEFAULTS
from rcmae.finetune.models import interpolate_pos_embed
from rcmae.pretrain.models import build_mae, random_masking_ids
from rcmae.pretrain.rcmae import RCMAE
from rcmae.pretrain.train import main as pretrain
from rcmae.robustness.metrics import ALEXNET_ERR, ALEXNET_ERR_EXTRA, SEVERITIES, corruption_errors

COS_QUARTER = (2 + math.sqrt(2)) / 4  # 0.5 (1 + cos(pi / 4)): a half-cycle cosine a quarter of the way
COS_THREE_QUARTERS = (2 - math.sqrt(2)) / 4  # a line gives 3/4 and 1/4 there


# ---- a. b. the lr schedule: half-cycle cosine, peak base_lr x batch / 256 ------------------------

def test_lr_and_momentum_cosines_at_their_quarter_points():
    peak, min_lr, warmup, total = 2.0, 0.1, 10, 90  # cosine over steps 10..90: quarters at 30, 50, 70
    for step, fraction in ((30, COS_QUARTER), (50, 0.5), (70, COS_THREE_QUARTERS)):
        assert lr_at(step, warmup, total, peak, min_lr) == pytest.approx(min_lr + (peak - min_lr) * fraction, rel=1e-12)
        # the momentum rises from the base to 1 as 1 - (1 - base) x the same falling cosine
        assert momentum_at(step - warmup, total - warmup, 0.99) == pytest.approx(1 - 0.01 * fraction, rel=1e-12)
    assert lr_at(3, warmup, total, peak, min_lr) == pytest.approx(peak * 3 / 10)  # warmup from 0, not min_lr


def test_logged_lr_of_a_real_run_is_the_recipe_schedule(micro_cfg, tmp_path):
    """Accumulation 2 (micro-batch 4, batch 8) on 16 images: 2 steps an epoch, 1 warmup epoch, 5 in all.
    Every logged lr against MAE's rule lr = base_lr x batch / 256 (the batch, not the micro-batch) with a
    per-step linear warmup and a half-cycle cosine to 0; the cosine's quarter points tell it from a line."""
    base_lr, batch = 1.5e-3, 8
    pretrain(micro_cfg("data.synthetic_size=16", f"optim.batch_size={batch}", "train.micro_batch=4",
                       f"optim.base_lr={base_lr}", "optim.epochs=5", "optim.warmup_epochs=1", "log.every_steps=1",
                       "checkpoint.every_epochs=0"))
    peak = base_lr * batch / 256  # 4.6875e-5
    logged = {r["step"] - 1: r for r in metrics(tmp_path / "run") if "lr" in r}  # a record follows its step
    assert sorted(logged) == list(range(10))
    expected = {0: 0.0, 1: peak / 2, 2: peak, 4: peak * COS_QUARTER, 6: peak / 2, 8: peak * COS_THREE_QUARTERS}
    for step, lr in expected.items():
        assert logged[step]["lr"] == pytest.approx(lr, rel=1e-9, abs=1e-15), step
    # the teacher's cosine over the 10 steps: 1 - (1 - 0.996) (1 + cos(pi k / 10)) / 2 at step k
    for step, record in logged.items():
        assert record["momentum"] == pytest.approx(1 - 0.004 * (1 + math.cos(math.pi * step / 10)) / 2, rel=1e-12)


# ---- c. the consistency loss: mean over pixels, then over the *masked* patches ------------------

def test_consistency_averages_over_masked_patches_only():
    torch.manual_seed(0)
    model = RCMAE(build_mae("vit_micro_patch8", 32, 32, 1, 2), 0.75, gamma=0.5)
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    mask = random_masking_ids(noise, 0.75)[2]  # 12 masked of 16 patches per image
    student = torch.zeros(2, 16, 8 * 8 * 3)
    per_patch = torch.tensor([1.0, 3.0]).view(2, 1, 1)  # the teacher's offset on image 0's / image 1's patches

    def consistency(offset_on):
        teacher = student + per_patch * offset_on[..., None]
        model.student.forward = lambda *args: student
        model.teacher.forward = lambda *args: teacher
        return model(imgs, noise)

    visible_only = consistency(1 - mask)
    assert visible_only["consistency"].item() == 0.0
    masked_only = consistency(mask)
    # 12 masked patches of squared error 1 and 12 of 9: (12 + 108) / 24
    assert masked_only["consistency"].item() == pytest.approx(5.0, rel=1e-6)
    assert masked_only["loss"].item() == pytest.approx(masked_only["recon"].item() + 0.5 * 5.0, rel=1e-6)


# ---- d. gradient clipping ----------------------------------------------------------------------

class LinearLoss(nn.Module):
    """loss = w . x, so the gradient of a micro-batch is x."""

    def __init__(self, w0: torch.Tensor):
        super().__init__()
        self.w = nn.Parameter(w0.clone())

    def forward(self, x):
        return {"loss": (self.w * x).sum()}


def test_clipping_below_the_gradient_norm_rescales_the_update_to_the_threshold():
    w0 = torch.tensor([1.0, -2.0, 0.5, 4.0])
    x1, x2 = torch.tensor([3.0, 0.0, 4.0, 0.0]), torch.tensor([3.0, 0.0, -4.0, 10.0])
    model = LinearLoss(w0)
    grad, norm, clip, lr = torch.tensor([3.0, 0.0, 0.0, 5.0]), math.sqrt(34.0), 1.5, 0.1  # grad = (x1 + x2) / 2
    seen = {}

    class RecordingSGD(torch.optim.SGD):
        def step(self, closure=None):
            seen["clipped_norm"] = model.w.grad.norm().item()
            return super().step(closure)

    step = TrainStep(model, model, RecordingSGD(model.parameters(), lr=lr), None, torch.device("cpu"), clip_grad=clip)
    sums = step([(x1,), (x2,)], lr)
    assert sums["grad_norm"].item() == pytest.approx(norm, rel=1e-6)  # reported: the norm before clipping
    assert seen["clipped_norm"] == pytest.approx(clip, rel=1e-6)
    torch.testing.assert_close(model.w.detach(), w0 - lr * grad * clip / norm, rtol=1e-6, atol=1e-7)


# ---- e. fine-tuning: MAE's mixup 0.8 / cutmix 1.0 / smoothing 0.1, head std 2e-5 ----------------

def test_finetuning_mixes_every_batch_and_starts_from_a_tiny_head(imagenet, tmp_path, monkeypatch):
    """The recipe's defaults through ``finetune.main``: every batch goes through timm's Mixup with MAE's
    constants; the criterion gets lam x smooth(y) + (1 - lam) x smooth(y flipped), smooth = 0.9 one-hot +
    0.1 / 1000, lam strictly inside (0, 1); the model gets the mixed images (a blend with the flipped
    batch, or its box pasted in with area 1 - lam). The head starts at std 2e-5, bias 0."""
    classes, smoothing = 1000, 0.1
    cfg = load_config(FT_DEFAULTS, None, [
        "model.arch=vit_micro_patch8", "model.img_size=32", f"data.train_path={imagenet / 'train'}",
        f"data.val_path={imagenet / 'val'}", "data.label_space=imagenet1k", "data.num_workers=0",
        "optim.batch_size=8", "optim.epochs=1", "optim.warmup_epochs=0", "train.micro_batch=8", "train.device=cpu",
        f"train.output_dir={tmp_path / 'ft'}", "eval.batch_size=16", "checkpoint.every_epochs=0"])
    mixes, criterion_targets, model_inputs, heads = [], [], [], []
    mix, criterion, loss_forward, init_head = (Mixup.__call__, SoftTargetCrossEntropy.forward,
                                               finetune_train.ClassifierLoss.forward, finetune_train.init_head)

    def recording_mix(mixup, x, target):
        before = (x.clone(), target.clone())  # Mixup mixes in place
        out = mix(mixup, x, target)
        mixes.append((mixup, *before, out[0].clone(), out[1].clone()))
        return out

    def recording_init(model, std):
        init_head(model, std)
        heads.append((model.head.weight.detach().clone(), model.head.bias.detach().clone()))

    monkeypatch.setattr(Mixup, "__call__", recording_mix)
    monkeypatch.setattr(SoftTargetCrossEntropy, "forward", lambda self, x, t: (criterion_targets.append(t.clone()),
                                                                               criterion(self, x, t))[1])
    monkeypatch.setattr(finetune_train.ClassifierLoss, "forward", lambda self, imgs, t: (model_inputs.append(
        imgs.clone()), loss_forward(self, imgs, t))[1])
    monkeypatch.setattr(finetune_train, "init_head", recording_init)
    assert finetune_train.main(cfg)["step"] == 2  # 16 images, batch 8

    assert len(mixes) == len(criterion_targets) == len(model_inputs) == 2
    off = smoothing / classes
    for (mixup, x, labels, mixed, soft), target, seen in zip(mixes, criterion_targets, model_inputs):
        assert (mixup.mixup_alpha, mixup.cutmix_alpha, mixup.label_smoothing, mixup.num_classes) == (
            0.8, 1.0, smoothing, classes)
        smooth = torch.full((8, classes), off).scatter_(1, labels.view(-1, 1), 1 - smoothing + off)
        i = next(i for i in range(8) if labels[i] != labels.flip(0)[i])
        lam = (soft[i, labels[i]] - off).item() / (1 - smoothing)
        assert 0 < lam < 1
        torch.testing.assert_close(target, lam * smooth + (1 - lam) * smooth.flip(0))
        torch.testing.assert_close(target, soft)
        assert torch.equal(seen, mixed)
        blend = lam * x + (1 - lam) * x.flip(0)
        if not torch.allclose(mixed, blend, atol=1e-5):  # cutmix: the flipped batch's box, area 1 - lam
            pasted = (mixed != x).any(0).any(0)
            rows, cols = pasted.any(1).nonzero(), pasted.any(0).nonzero()
            box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
            assert box.item() / (32 * 32) == pytest.approx(1 - lam, abs=1e-6)
            inside = torch.zeros(32, 32, dtype=torch.bool)
            inside[rows.min():rows.max() + 1, cols.min():cols.max() + 1] = True
            assert torch.equal(mixed, torch.where(inside, x.flip(0), x))

    (weight, bias), = heads
    assert weight.shape == (classes, 32)
    # 32,000 normal draws: the sample std is within 1 % of 2e-5 (the relative standard error is 0.4 %)
    assert weight.std().item() == pytest.approx(2e-5, rel=0.01)
    assert abs(weight.mean().item()) < 5 * 2e-5 / math.sqrt(weight.numel())
    assert torch.equal(bias, torch.zeros(classes))


# ---- f. position-embedding interpolation ---------------------------------------------------------

def keys_cubic(t: float, a: float = -0.75) -> float:
    """The cubic convolution kernel (Keys 1981) with PyTorch's bicubic constant a = -0.75."""
    t = abs(t)
    if t <= 1:
        return (a + 2) * t ** 3 - (a + 3) * t ** 2 + 1
    return a * t ** 3 - 5 * a * t ** 2 + 8 * a * t - 4 * a if t < 2 else 0.0


def cubic_resample(values: list[float], size: int) -> list[float]:
    """``values`` resampled to ``size`` samples: half-pixel centres, x = (i + 0.5) n / size - 0.5, four taps
    around x, the edge sample repeated beyond the ends."""
    n, out = len(values), []
    for i in range(size):
        x = (i + 0.5) * n / size - 0.5
        taps = range(math.floor(x) - 1, math.floor(x) + 3)
        out.append(sum(values[min(max(k, 0), n - 1)] * keys_cubic(x - k) for k in taps))
    return out


def test_pos_embed_interpolation_keeps_rows_and_columns_apart():
    """Channel 0 holds the row index, channel 1 the squared column, channel 2 their product, on a 14 x 14
    grid resized to 16 rows x 20 columns. Bicubic resizing is a tensor product of two 1-D resizes, so the
    result is R(i), C(j), R(i) C(j) with R, C the 1-D resizes of (0 .. 13) and (0, 1, 4 .. 169): a
    transposed grid or swapped output size puts column values on rows."""
    old, (h, w) = 14, (16, 20)
    rows, cols = torch.meshgrid(torch.arange(old, dtype=torch.float64), torch.arange(old, dtype=torch.float64),
                                indexing="ij")
    grid = torch.stack([rows, cols ** 2, rows * cols ** 2], dim=-1).reshape(1, old * old, 3)
    cls = torch.tensor([[[7.0, -7.0, 0.5]]], dtype=torch.float64)
    out = interpolate_pos_embed(torch.cat([cls, grid], dim=1), (h, w))
    assert out.shape == (1, 1 + h * w, 3) and torch.equal(out[:, :1], cls)
    r = torch.tensor(cubic_resample([float(k) for k in range(old)], h), dtype=torch.float64)
    c = torch.tensor(cubic_resample([float(k * k) for k in range(old)], w), dtype=torch.float64)
    expected = torch.stack([r[:, None].expand(h, w), c[None, :].expand(h, w), r[:, None] * c[None, :]], dim=-1)
    torch.testing.assert_close(out[0, 1:].reshape(h, w, 3), expected, rtol=1e-5, atol=1e-4)  # float32 inside


# ---- g. ImageNet-C: AlexNet's errors (hendrycks/robustness README, commit ac836a5, 2020-02-27) -----

# corruption: (average, severity 1..5), as printed in the README's "AlexNet ImageNet-C Error" table
ALEXNET_TABLE = {
    "gaussian_noise": (0.886428, (0.69528, 0.82542, 0.93554, 0.98138, 0.99452)),
    "shot_noise": (0.894468, (0.71224, 0.85108, 0.93574, 0.98182, 0.99146)),
    "impulse_noise": (0.922640, (0.78374, 0.89808, 0.94870, 0.98720, 0.99548)),
    "defocus_blur": (0.819880, (0.65624, 0.73202, 0.85036, 0.91364, 0.94714)),
    "glass_blur": (0.826268, (0.64308, 0.75054, 0.88806, 0.91622, 0.93344)),
    "motion_blur": (0.785948, (0.58430, 0.70048, 0.82108, 0.89750, 0.92638)),
    "zoom_blur": (0.798360, (0.70008, 0.76992, 0.80784, 0.84198, 0.87198)),
    "snow": (0.866816, (0.71726, 0.88392, 0.86468, 0.91870, 0.94952)),
    "frost": (0.826572, (0.61390, 0.79734, 0.88790, 0.89942, 0.93430)),
    "fog": (0.819324, (0.67474, 0.76050, 0.84378, 0.87260, 0.94500)),
    "brightness": (0.564592, (0.45140, 0.48502, 0.54048, 0.62166, 0.72440)),
    "contrast": (0.853204, (0.64548, 0.76150, 0.88874, 0.97760, 0.99270)),
    "elastic_transform": (0.646056, (0.52596, 0.70116, 0.55686, 0.64076, 0.80554)),
    "pixelate": (0.717840, (0.52218, 0.54620, 0.73728, 0.87092, 0.91262)),
    "jpeg_compression": (0.606500, (0.51002, 0.54718, 0.57294, 0.65458, 0.74778)),
}
ALEXNET_EXTRA_TABLE = {
    "speckle_noise": (0.845388, (0.66192, 0.74440, 0.90246, 0.94548, 0.97268)),
    "gaussian_blur": (0.787108, (0.54732, 0.70444, 0.82574, 0.89864, 0.95940)),
    "spatter": (0.717512, (0.47196, 0.62194, 0.75052, 0.84132, 0.90182)),
    "saturate": (0.658248, (0.59342, 0.65514, 0.51174, 0.70834, 0.82260)),
}


def test_alexnet_normalisers_are_the_published_table():
    for table in (ALEXNET_TABLE, ALEXNET_EXTRA_TABLE):  # the typed averages are the typed severities' means
        for name, (average, by_severity) in table.items():
            assert sum(by_severity) / 5 == pytest.approx(average, abs=6e-7), name
    assert ALEXNET_ERR == {name: average for name, (average, _) in ALEXNET_TABLE.items()}
    assert ALEXNET_ERR_EXTRA == {name: average for name, (average, _) in ALEXNET_EXTRA_TABLE.items()}
    # AlexNet's own per-severity errors score CE 100 on each of the 19 corruptions
    alexnet = {name: dict(zip(SEVERITIES, by_severity))
               for name, (_, by_severity) in {**ALEXNET_TABLE, **ALEXNET_EXTRA_TABLE}.items()}
    out = corruption_errors(alexnet)
    assert out["mCE"] == pytest.approx(100.0, abs=1e-3) and out["extra_mCE"] == pytest.approx(100.0, abs=1e-3)
    assert all(ce == pytest.approx(100.0, abs=2e-3) for ce in {**out["CE"], **out["extra_CE"]}.values())


def test_mce_by_hand():
    """A model with error 0.5 at every noise and blur cell and 0.25 at every other: CE = 100 e / AlexNet's
    average; mCE = the mean of the 15 (worked out here from the table's averages)."""
    half = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur", "zoom_blur")
    errors = {name: {s: 0.5 if name in half else 0.25 for s in SEVERITIES} for name in ALEXNET_TABLE}
    out = corruption_errors(errors)
    assert out["CE"]["gaussian_noise"] == pytest.approx(50 / 0.886428)  # 56.4062
    assert out["CE"]["brightness"] == pytest.approx(25 / 0.564592)  # 44.2800
    # (50 (1/0.886428 + ... + 1/0.798360) + 25 (1/0.866816 + ... + 1/0.606500)) / 15
    assert out["mCE"] == pytest.approx(46.1443, abs=1e-4)
    assert out["mean_error"] == pytest.approx(100 * (7 * 0.5 + 8 * 0.25) / 15)
