"""Every shipped recipe config against its source, key by key, with the source file named.

The expected values are written here from the official files (read in youngwanLEE/rc-mae and
facebookresearch/mae), not taken from the configs: a config that drifts from its source fails.
"""
import math

import numpy as np
import pytest
import torch
from fixtures import ROOT, micro_config

import rcmae.core.trainer as trainer_module
from rcmae.core.checkpoint import find_last_checkpoint
from rcmae.core.config import load_config
from rcmae.core.data.transforms import eval_crop_pct, eval_transform
from rcmae.core.engine import TrainStep
from rcmae.core.errors import ConfigError
from rcmae.core.optim import build_finetune_optimizer as build_ft_optimizer
from rcmae.core.optim import build_pretrain_optimizer
from rcmae.core.vit import build_classifier
from rcmae.finetune.defaults import DEFAULTS as FT_DEFAULTS
from rcmae.finetune.defaults import LINPROBE_DEFAULTS
from rcmae.pretrain import train as pretrain_train
from rcmae.pretrain.defaults import DEFAULTS as PT_DEFAULTS
from rcmae.pretrain.models import build_mae
from rcmae.pretrain.rcmae import RCMAE, StepSchedules, official_micro_batches
from rcmae.pretrain.train import validate

RC = "youngwanLEE/rc-mae"
MAE = "facebookresearch/mae"
PT_COMMON = {"optim.batch_size": 4096, "optim.base_lr": 1.5e-4, "optim.weight_decay": 0.05,
             "optim.warmup_epochs": 40, "optim.betas": [0.9, 0.95], "optim.min_lr": 0.0,
             "optim.decay_tokens": True,  # timm 0.3.2 add_weight_decay decays cls/mask tokens
             "model.mask_ratio": 0.75, "model.norm_pix_loss": True, "model.img_size": 224,
             "data.crop_min_scale": 0.2}
RC_TEACHER = {"rcmae.gamma": 1.0, "rcmae.momentum": 0.996}  # run_pretrain.py defaults
DEC_512 = {"model.decoder_dim": 512, "model.decoder_depth": 8, "model.decoder_heads": 16}

PRETRAIN = {
    "rcmae_vit_small": ([f"{RC}", "scripts/pretrain_rc_mae_vit_small_1600ep.sh", "models_rc.py"],
                        {**RC_TEACHER, "model.arch": "vit_small_patch16", "optim.epochs": 1600,
                         "model.decoder_dim": 256, "model.decoder_depth": 4, "model.decoder_heads": 8,
                         "train.micro_batch": 512}),  # 8 GPUs x 512, accum 1
    "rcmae_vit_base": ([f"{RC}", "scripts/pretrain_rc_mae_vit_base_1600ep.sh"],
                       {**RC_TEACHER, **DEC_512, "model.arch": "vit_base_patch16", "optim.epochs": 1600,
                        "train.micro_batch": 256}),  # 8 GPUs x 256, accum 2
    "rcmae_vit_large": ([f"{RC}", "scripts/pretrain_rc_mae_vit_large_1600ep.sh"],
                        {**RC_TEACHER, **DEC_512, "model.arch": "vit_large_patch16", "optim.epochs": 1600,
                         "train.micro_batch": 256}),
    "rcmae_vit_huge": ([f"{MAE}", "PRETRAIN.md", "FINETUNE.md", "no official RC-MAE ViT-H recipe"],
                       {**RC_TEACHER, **DEC_512, "model.arch": "vit_huge_patch14", "optim.epochs": 1600}),
    "mae_vit_base": ([f"{MAE}", "PRETRAIN.md", "FINETUNE.md"],
                     {**DEC_512, "rcmae.gamma": 0.0, "model.arch": "vit_base_patch16", "optim.epochs": 1600,
                      "export.which": "student", "train.micro_batch": 64}),  # 8 nodes x 8 GPUs x 64
}

SEMI_VIT = "amazon-science/semi-vit"
SEMI_COMMON = {"model.arch": "vit_base_patch16", "optim.epochs": 100, "optim.batch_size": 512,
               "optim.layer_decay": 0.65}
# main_finetune.py / run_finetune.py defaults and the commands' common flags
FT_COMMON = {"optim.name": "adamw", "optim.batch_size": 1024, "optim.weight_decay": 0.05,
             "optim.betas": [0.9, 0.999], "optim.warmup_epochs": 5, "optim.min_lr": 1e-6,
             "aug.rand_augment": "rand-m9-mstd0.5-inc1", "aug.reprob": 0.25, "aug.mixup": 0.8,
             "aug.cutmix": 1.0, "aug.smoothing": 0.1, "model.global_pool": "avg",
             "model.head_init_std": 2e-5, "model.img_size": 224, "data.crop_pct": None,
             "train.mode": "finetune"}
FINETUNE = {
    "mae_vit_base": ([MAE, "FINETUNE.md"], {"model.arch": "vit_base_patch16", "optim.epochs": 100,
                     "optim.base_lr": 5e-4, "optim.layer_decay": 0.65, "model.drop_path": 0.1}),
    "mae_vit_large": ([MAE, "FINETUNE.md"], {"model.arch": "vit_large_patch16", "optim.epochs": 50,
                      "optim.base_lr": 1e-3, "optim.layer_decay": 0.75, "model.drop_path": 0.2}),
    "mae_vit_huge": ([MAE, "FINETUNE.md"], {"model.arch": "vit_huge_patch14", "optim.epochs": 50,
                     "optim.base_lr": 1e-3, "optim.layer_decay": 0.75, "model.drop_path": 0.3}),
    "rcmae_vit_small": ([RC, "scripts/finetune_rc_mae_small.sh"],
                        {"model.arch": "vit_small_patch16", "optim.epochs": 300, "optim.base_lr": 5e-4,
                         "optim.layer_decay": 0.75, "model.drop_path": 0.1, "init.which": "teacher"}),
    "rcmae_vit_base": ([RC, "scripts/finetune_rc_mae_base.sh"],
                       {"model.arch": "vit_base_patch16", "optim.epochs": 100, "optim.base_lr": 5e-4,
                        "optim.layer_decay": 0.65, "model.drop_path": 0.1, "init.which": "teacher"}),
    "rcmae_vit_large": ([RC, "scripts/finetune_rc_mae_large.sh"],
                        {"model.arch": "vit_large_patch16", "optim.epochs": 100, "optim.base_lr": 5e-4,
                         "optim.layer_decay": 0.65, "model.drop_path": 0.2, "init.which": "teacher"}),
    # Semi-ViT's supervised fine-tuning of MAE ViT-B on 1 % / 10 % (FINETUNE.md at 4785cbc7, main_finetune.py
    # defaults), on SimCLR's image lists
    "vit_base_1percent": ([SEMI_VIT, "FINETUNE.md", "google-research/simclr", "1percent.txt"],
                          {**SEMI_COMMON, "optim.base_lr": 5e-5, "model.drop_path": 0.0, "aug.mixup": 0.0,
                           "aug.cutmix": 0.0, "aug.reprob": 0.0,
                           "data.subset_file": "configs/subsets/imagenet_1percent.txt.gz"}),
    "vit_base_10percent": ([SEMI_VIT, "FINETUNE.md", "google-research/simclr", "10percent.txt"],
                           {**SEMI_COMMON, "optim.base_lr": 2.5e-4, "model.drop_path": 0.1,
                            "data.subset_file": "configs/subsets/imagenet_10percent.txt.gz"}),
}

# main_linprobe.py / run_linprobe.py: LARS, blr 0.1, wd 0, warmup 10, min lr 0, cls token, no mixup
LP_COMMON = {"train.mode": "linprobe", "optim.name": "lars", "optim.batch_size": 16384, "optim.base_lr": 0.1,
             "optim.weight_decay": 0.0, "optim.warmup_epochs": 10, "optim.min_lr": 0.0,
             "model.global_pool": "token", "aug.mixup": 0.0, "aug.cutmix": 0.0, "aug.rand_augment": None,
             "aug.reprob": 0.0, "aug.smoothing": 0.0}
LINPROBE = {
    "vit_base": ([MAE, "FINETUNE.md", RC, "scripts/linear_rc_mae_vit_base.sh"],
                 {"model.arch": "vit_base_patch16", "optim.epochs": 90, "grid.base_lrs": [], "grid.features": []}),
    # MAE's probe as a grid; DINOv2's feature kinds (class tokens of the last 1 or 4 blocks, +/- the patch mean)
    "grid_vit_base": ([MAE, "FINETUNE.md", "facebookresearch/dinov2", "dinov2/eval/linear.py"],
                      {"model.arch": "vit_base_patch16", "optim.epochs": 90,
                       "grid.base_lrs": [0.01, 0.03, 0.1, 0.3, 1.0], "grid.held_out_fraction": 0.01,
                       "grid.features": ["cls", "avgpool", "cls_last4", "cls_last4+avgpool"]}),
    "vit_large": ([MAE, "FINETUNE.md", RC, "scripts/linear_rc_mae_vit_large.sh"],
                  {"model.arch": "vit_large_patch16", "optim.epochs": 50}),
    "vit_huge": ([MAE, "FINETUNE.md"], {"model.arch": "vit_huge_patch14", "optim.epochs": 50}),
}

TABLES = [("pretrain", PT_DEFAULTS, PRETRAIN, PT_COMMON), ("finetune", FT_DEFAULTS, FINETUNE, FT_COMMON),
          ("linprobe", LINPROBE_DEFAULTS, LINPROBE, LP_COMMON)]
CASES = [(kind, defaults, name, sources, {**common, **values})
         for kind, defaults, table, common in TABLES for name, (sources, values) in table.items()]


def value(cfg: dict, key: str):
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


@pytest.mark.parametrize("kind,defaults,name,sources,expected", CASES,
                         ids=[f"{c[0]}/{c[2]}" for c in CASES])
def test_recipe_matches_its_source(kind, defaults, name, sources, expected):
    path = ROOT / "configs" / kind / f"{name}.yaml"
    text = path.read_text()
    for source in sources:
        assert source in text, f"{path} does not name its source {source!r}"
    cfg = load_config(defaults, path)
    wrong = {k: (value(cfg, k), v) for k, v in expected.items() if value(cfg, k) != v}
    assert not wrong, f"{path}: (config, source) differ: {wrong}"


@pytest.mark.parametrize("kind", ["pretrain", "finetune", "linprobe"])
def test_every_shipped_recipe_is_checked(kind):
    shipped = {p.stem for p in (ROOT / "configs" / kind).glob("*.yaml") if not p.stem.startswith("demo")}
    listed = {name for k, _, name, _, _ in CASES if k == kind}
    assert shipped == listed


def test_official_layout_gives_the_official_accumulation(imagenet):
    """The RC-MAE configs' micro-batches reproduce the scripts' accumulation on 8 processes."""
    for name, accum in (("rcmae_vit_small", 1), ("rcmae_vit_base", 2), ("rcmae_vit_large", 2)):
        cfg = load_config(PT_DEFAULTS, ROOT / "configs" / "pretrain" / f"{name}.yaml", [f"data.path={imagenet / 'train'}"])
        assert validate(cfg, world=8) == accum, name


# ---- the official teacher schedule ------------------------------------------------------------

def dino_cosine_table(base_value, final_value, epochs, niter_per_ep):
    """The official ``util/lr_sched.cosine_scheduler`` (from DINO) without warmup, as written there."""
    iters = np.arange(epochs * niter_per_ep)
    return final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / len(iters)))


def official_lr(epoch: float, lr: float, warmup_epochs: int, epochs: int, min_lr: float = 0.0) -> float:
    """The official ``util/lr_sched.adjust_learning_rate`` (``epoch``: a float), as written there."""
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup_epochs) / (epochs - warmup_epochs)))


def test_official_schedule_on_the_imagenet_layout(imagenet):
    """ViT-B/L on ImageNet-1k (1,281,167 images, 8 x 256, accumulation 2): the official loader yields 625
    micro-batches per process and epoch; 312 optimizer steps take 624. Every lr and momentum of the
    official loop (``train_one_epoch``: lr set before every ``accum_iter``-th micro-batch at
    ``data_iter_step / 625 + epoch``, EMA after every micro-batch with ``momentum_schedule[data_iter_step]``)
    over epochs in the warmup, at its end, in the cosine and the last."""
    images, epochs, warmup, peak, base = 1_281_167, 1600, 40, 1.5e-4 * 4096 / 256, 0.996
    per_epoch = official_micro_batches(images, 8, 256)
    assert per_epoch == 625 and images // 4096 == 312
    assert official_micro_batches(images, 8, 512) == 312  # ViT-S: 8 x 512, no accumulation, nothing left over
    ours = StepSchedules("official", 312, epochs, 2, warmup, peak, 0.0, base, per_epoch)
    assert ours.leftover == 1
    table = dino_cosine_table(base, 1, epochs, per_epoch)
    for epoch in (0, 1, 39, 40, 41, 800, 1599):
        lrs, momenta = [], []  # per micro-batch of the official loop
        for data_iter_step in range(per_epoch):
            if data_iter_step % 2 == 0:
                lr = official_lr(data_iter_step / per_epoch + epoch, peak, warmup, epochs)
            lrs.append(lr)
            momenta.append(table[data_iter_step])
        got_lr, got_momenta = [], []
        for step in range(epoch * 312, (epoch + 1) * 312):
            got_lr += [ours.lr(step)] * 2  # both micro-batches of the step run at its lr
            got_momenta += ours.momenta(step) + ours.leftover_momenta(step)
        np.testing.assert_allclose(got_lr, lrs[:624], rtol=1e-12, atol=0)  # the 625th updates no weight
        np.testing.assert_allclose(got_momenta, momenta, rtol=0, atol=1e-15)
    assert ours.leftover_momenta(310) == [] and len(ours.leftover_momenta(311)) == 1
    # the official index restarts every epoch: the momentum never leaves the start of the cosine
    assert max(ours.momenta(epochs * 312 - 1)) < base + (1 - base) * 0.01
    # ours: one update per optimizer step, the cosine over the run's steps, nothing left over
    cosine = StepSchedules("cosine", 312, epochs, 2, warmup, peak, 0.0, base)
    assert cosine.momenta(epochs * 312) == [pytest.approx(1.0)] and cosine.leftover_momenta(311) == []
    with pytest.raises(ConfigError, match="momentum_schedule"):
        StepSchedules("step", 312, epochs, 2, warmup, peak, 0.0, base)
    # 35 images, 2 processes x 3 x accumulation 3: the official sampler pads to 36, 6 micro-batches make 2
    # optimizer steps an epoch where our sampler has 35 // 18 = 1; no exact replica there
    with pytest.raises(ConfigError, match="official loop would run 2 optimizer steps an epoch"):
        StepSchedules("official", 35 // 18, epochs, 3, warmup, peak, 0.0, base, official_micro_batches(35, 2, 3))
    with pytest.raises(ConfigError, match="momentum_schedule"):
        validate(load_config(PT_DEFAULTS, None, [f"data.path={imagenet / 'train'}", "rcmae.momentum_schedule=dino"]),
                 world=8)


def test_official_schedule_reproduces_the_official_loop(tmp_path, monkeypatch):
    """A pretraining run with ``rcmae.momentum_schedule=official`` against the official ``train_one_epoch``
    written out here, with a micro-batch left over each epoch as ImageNet-1k's 625th on 8 x 256: 36
    images, micro-batch 4, accumulation 2, one process, so the official loader yields 9 micro-batches an
    epoch and 4 optimizer steps take 8. Per micro-batch lr, every EMA momentum and the final weights."""
    epochs, warmup, accum, micro, images, base, peak = 2, 1, 2, 4, 36, 0.9, 1e-2
    per_epoch = images // micro  # official: ceil(36 / 1) // 4, an odd count
    cfg = micro_config(tmp_path / "ours", [f"data.synthetic_size={images}", f"train.micro_batch={micro}",
                                           f"optim.epochs={epochs}", f"optim.warmup_epochs={warmup}",
                                           f"optim.lr={peak}", f"rcmae.momentum={base}",
                                           "rcmae.momentum_schedule=official"])
    seen = {"lr": [], "inputs": [], "momenta": []}

    class RecordingStep(TrainStep):
        def __call__(self, micro_batches, lr, update_args=()):
            seen["lr"] += [lr] * len(micro_batches)  # the lr each micro-batch runs at
            seen["inputs"] += [tuple(x.clone() for x in inputs) for inputs in micro_batches]
            return super().__call__(micro_batches, lr, update_args)

    update_teacher = RCMAE.update_teacher
    monkeypatch.setattr(trainer_module, "TrainStep", RecordingStep)  # the frame builds the step
    monkeypatch.setattr(RCMAE, "update_teacher", lambda model, m: (seen["momenta"].append(m), update_teacher(model, m)))
    assert pretrain_train.main(cfg)["step"] == epochs * 4
    monkeypatch.undo()

    torch.manual_seed(cfg["train"]["seed"])  # the run's initial weights
    official = RCMAE(build_mae("vit_micro_patch8", 32, 32, 1, 2), 0.75, 1.0)
    optimizer, _ = build_pretrain_optimizer(official.student, 0.05, (0.9, 0.95), "cpu")
    table = dino_cosine_table(base, 1, epochs, per_epoch)
    inputs = iter(seen["inputs"])
    leftover = (torch.randn(micro, 3, 32, 32), torch.rand(micro, 16))  # any data: its gradient is discarded
    lrs, momenta = [], []
    for epoch in range(epochs):
        optimizer.zero_grad()
        for data_iter_step in range(per_epoch):
            if data_iter_step % accum == 0:
                for group in optimizer.param_groups:
                    group["lr"] = official_lr(data_iter_step / per_epoch + epoch, peak, warmup, epochs)
            lrs.append(optimizer.param_groups[0]["lr"])
            samples = leftover if data_iter_step == per_epoch - 1 else next(inputs)
            (official(*samples)["loss"] / accum).backward()
            if (data_iter_step + 1) % accum == 0:
                optimizer.step()
                optimizer.zero_grad()
            ms = table[data_iter_step]
            momenta.append(ms)
            with torch.no_grad():
                for q, k in zip(official.student.parameters(), official.teacher.parameters()):
                    k.mul_(ms).add_((1 - ms) * q)

    ran = [lr for i, lr in enumerate(lrs) if i % per_epoch != per_epoch - 1]  # ours runs no leftover forward
    np.testing.assert_allclose(seen["lr"], ran, rtol=1e-12, atol=0)
    np.testing.assert_allclose(seen["momenta"], momenta, rtol=0, atol=1e-15)
    state = torch.load(find_last_checkpoint(tmp_path / "ours"), map_location="cpu", weights_only=True)
    for part in ("student", "teacher"):
        for name, value in getattr(official, part).state_dict().items():
            ours = state[part][name]
            if name.endswith("qkv.bias"):  # the key bias's gradient is 0 but for rounding, which AdamW
                dim = value.shape[0] // 3  # scales up to ~lr: it differs by noise; query and value must agree
                ours, value = torch.cat([ours[:dim], ours[2 * dim:]]), torch.cat([value[:dim], value[2 * dim:]])
            torch.testing.assert_close(ours, value, rtol=0, atol=1e-6, msg=lambda m: f"{part}.{name}: {m}")


# ---- weight decay, layer decay, evaluation crop -----------------------------------------------

def test_tokens_are_weight_decayed_as_in_the_official_code():
    student = build_mae("vit_micro_patch8", 32, 32, 1, 2)

    def decay_of(optimizer, names):
        params = dict(student.named_parameters())
        return {n: next(g["weight_decay"] for g in optimizer.param_groups if any(p is params[n] for p in g["params"]))
                for n in names}

    names = ("cls_token", "mask_token", "blocks.0.attn.qkv.weight", "blocks.0.attn.qkv.bias", "norm.weight")
    official, _ = build_pretrain_optimizer(student, 0.05, (0.9, 0.95), "cpu")
    assert decay_of(official, names) == {"cls_token": 0.05, "mask_token": 0.05, "blocks.0.attn.qkv.weight": 0.05,
                                         "blocks.0.attn.qkv.bias": 0.0, "norm.weight": 0.0}
    exempt, _ = build_pretrain_optimizer(student, 0.05, (0.9, 0.95), "cpu", decay_tokens=False)
    assert decay_of(exempt, names)["cls_token"] == decay_of(exempt, names)["mask_token"] == 0.0


@pytest.mark.parametrize("pool", ["avg", "token"])
def test_layer_decay_follows_mae_param_groups_lrd(pool):
    """MAE ``util/lr_decay.py``: layer id 0 for cls/pos/patch embedding, i + 1 for block i, depth + 1
    for everything else, so the final ``norm`` (token pooling) keeps the full lr."""
    model = build_classifier("vit_base_patch16", 224, 1000, pool)
    opt = build_ft_optimizer(model, dict(FT_DEFAULTS["optim"], layer_decay=0.65), "cpu")
    depth, seen = 12, 0
    for name, p in model.named_parameters():
        group = next(g for g in opt.param_groups if any(q is p for q in g["params"]))
        if name in ("cls_token", "pos_embed") or name.startswith("patch_embed"):
            layer = 0
        elif name.startswith("blocks."):
            layer = int(name.split(".")[1]) + 1
        else:  # norm / fc_norm, head
            layer = depth + 1
        assert group["lr_scale"] == pytest.approx(0.65 ** (depth + 1 - layer)), name
        no_decay = p.ndim <= 1 or name in ("pos_embed", "cls_token")
        assert group["weight_decay"] == (0.0 if no_decay else 0.05), name
        seen += 1
    assert seen == len(list(model.parameters()))
    assert any(n.startswith("norm.") for n, _ in model.named_parameters()) == (pool == "token")


def test_eval_crop_follows_mae():
    """MAE ``util/datasets.py``: crop_pct 224/256 up to 224 px, 1.0 above; an explicit value wins."""
    assert eval_crop_pct(224) == 0.875 and eval_crop_pct(192) == 0.875
    assert eval_crop_pct(384) == 1.0 and eval_crop_pct(448) == 1.0
    assert eval_crop_pct(448, 0.9) == 0.9
    for size, resized in ((224, 256), (448, 448)):
        resize = eval_transform(size, None).transforms[0]
        assert resize.size in (resized, [resized]) and math.isclose(size / eval_crop_pct(size), resized)


@pytest.mark.parametrize("defaults,config", [
    (PT_DEFAULTS, "pretrain/rcmae_vit_base.yaml"),
    (FT_DEFAULTS, "finetune/mae_vit_base.yaml"),
    (LINPROBE_DEFAULTS, "linprobe/vit_base.yaml")])
def test_tool_defaults_are_the_vit_base_recipe(defaults, config):
    """A call without --config-file trains the published ViT-B recipe (only where the outputs go and
    the per-process micro-batch may differ)."""
    from rcmae.core.config import flatten

    recipe = flatten(load_config(defaults, ROOT / "configs" / config))
    own = flatten(load_config(defaults))
    differ = {k for k in own if own[k] != recipe[k]}
    assert differ <= {"train.output_dir", "train.micro_batch", "init.which"}, differ
