"""rcmae.core.optim against reference implementations of the official rules, written here from their spec:
per parameter (lr scale, weight decay) and the order of groups and of parameters in them, which
checkpoints depend on (``optimizer_param_names``, official optimizer states mapped by official order)."""
import pytest
import torch
from timm.optim import param_groups_layer_decay

from rcmae.core.engine import TrainStep
from rcmae.core.errors import ConfigError
from rcmae.core.optim import (
    LARS,
    LR_SCALE,
    build_finetune_optimizer,
    build_pretrain_optimizer,
    layer_decay_param_groups,
    param_names,
    pretrain_param_groups,
)
from rcmae.core.vit import build_classifier
from rcmae.pretrain.models import build_mae
from rcmae.pretrain.rcmae import RCMAE


def mae_param_groups_lrd(model, weight_decay, no_weight_decay_list, layer_decay):
    """MAE ``util/lr_decay.param_groups_lrd``: groups keyed "layer_{id}_{decay}" in first-seen order,
    ``layer_scales[i] = layer_decay ** (num_layers - i)`` with ``num_layers = depth + 1``."""
    num_layers = len(model.blocks) + 1
    layer_scales = [layer_decay ** (num_layers - i) for i in range(num_layers + 1)]

    def get_layer_id_for_vit(name):
        if name in ("cls_token", "pos_embed"):
            return 0
        if name.startswith("patch_embed"):
            return 0
        if name.startswith("blocks"):
            return int(name.split(".")[1]) + 1
        return num_layers

    groups = {}
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim == 1 or n in no_weight_decay_list:
            g_decay, this_decay = "no_decay", 0.0
        else:
            g_decay, this_decay = "decay", weight_decay
        layer = get_layer_id_for_vit(n)
        group = groups.setdefault(f"layer_{layer}_{g_decay}",
                                  {"lr_scale": layer_scales[layer], "weight_decay": this_decay, "params": []})
        group["params"].append(n)
    return list(groups.values())


def timm032_add_weight_decay(model, weight_decay, skip_list=()):
    """timm 0.3.2 ``optim_factory.add_weight_decay`` (the official MAE / RC-MAE pretraining calls it with
    an empty skip list): always two groups, [no decay, decay], each in named_parameters order."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if len(param.shape) == 1 or name.endswith(".bias") or name in skip_list:
            no_decay.append(name)
        else:
            decay.append(name)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def named(model, groups, keys=("lr_scale", "weight_decay")):
    """Groups as (their values of ``keys``, parameter names in order): exact floats, exact order."""
    by_id = {id(p): n for n, p in model.named_parameters()}
    return [(tuple(g.get(k) for k in keys), [by_id[id(p)] if not isinstance(p, str) else p for p in g["params"]])
            for g in groups]


@pytest.mark.parametrize("layer_decay", [0.75, 0.65])
@pytest.mark.parametrize("pool", ["avg", "token"])
def test_layer_decay_groups_are_maes_param_groups_lrd(pool, layer_decay):
    model = build_classifier("vit_micro_patch8", 32, 10, pool)
    ours = layer_decay_param_groups(model, 0.05, layer_decay)
    ref = mae_param_groups_lrd(model, 0.05, model.no_weight_decay(), layer_decay)
    assert named(model, ours) == named(model, ref)  # per parameter, group order and order within
    assert all(set(g) == {"params", LR_SCALE, "weight_decay"} for g in ours)
    # and through the builder, whose names are what a checkpoint records
    opt = build_finetune_optimizer(model, {"name": "adamw", "weight_decay": 0.05, "layer_decay": layer_decay,
                                           "betas": (0.9, 0.999)}, "cpu")
    assert named(model, opt.param_groups) == named(model, ref)
    assert param_names(model, opt) == [n for g in ref for n in g["params"]]
    assert {n for n, _ in model.named_parameters()} == set(param_names(model, opt))


def test_timm_layer_decay_differs_from_mae_only_on_the_final_norm():
    """Why layer_decay_param_groups is not timm's ``param_groups_layer_decay``: timm's group_matcher
    puts the final ``norm`` (token pooling) into the last block's layer; with ``fc_norm`` (avg) they agree."""
    def per_param(model, groups):
        return {n: v for v, names in named(model, groups) for n in names}

    avg = build_classifier("vit_micro_patch8", 32, 10, "avg")
    timm_avg = param_groups_layer_decay(avg, 0.05, avg.no_weight_decay(), layer_decay=0.75)
    assert named(avg, timm_avg) == named(avg, layer_decay_param_groups(avg, 0.05, 0.75))
    token = build_classifier("vit_micro_patch8", 32, 10, "token")
    timm_token = per_param(token, param_groups_layer_decay(token, 0.05, token.no_weight_decay(), layer_decay=0.75))
    ours = per_param(token, layer_decay_param_groups(token, 0.05, 0.75))
    assert {n for n in ours if ours[n] != timm_token[n]} == {"norm.weight", "norm.bias"}
    assert ours["norm.weight"] == (1.0, 0.0) and timm_token["norm.weight"] == (0.75, 0.0)


@pytest.mark.parametrize("weight_decay", [0.05, 0.0])
@pytest.mark.parametrize("decay_tokens", [True, False])
def test_pretrain_groups_are_timm032_add_weight_decay(decay_tokens, weight_decay):
    """Official (decay_tokens): the skip list is empty, so cls_token and mask_token are decayed; ours
    (decay_tokens=False): model.no_weight_decay() is the skip list. Weight decay 0 keeps both groups and the
    official order (restoring an official checkpoint maps its optimizer state by that order)."""
    model = RCMAE(build_mae("vit_micro_patch8", 32, 32, 1, 2), 0.75, gamma=1.0)
    student = model.student
    ref = timm032_add_weight_decay(student, weight_decay, () if decay_tokens else student.no_weight_decay())
    groups, names = pretrain_param_groups(student, weight_decay, decay_tokens)
    assert named(student, groups, ("weight_decay",)) == named(student, ref, ("weight_decay",))
    assert names == ref[0]["params"] + ref[1]["params"]
    assert {"cls_token", "mask_token"} <= set(ref[1 if decay_tokens else 0]["params"])
    assert "pos_embed" not in names and "decoder_pos_embed" not in names  # fixed sin-cos
    opt, opt_names = build_pretrain_optimizer(student, weight_decay, (0.9, 0.95), "cpu", decay_tokens)
    assert opt_names == names == param_names(student, opt)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0, weight_decay]
    assert opt.param_groups[0]["betas"] == (0.9, 0.95)


def test_the_official_pretraining_order_does_not_depend_on_weight_decay():
    student = build_mae("vit_micro_patch8", 32, 32, 1, 2)
    assert pretrain_param_groups(student, 0.0)[1] == pretrain_param_groups(student, 0.05)[1]


def test_finetune_builder_lars_sgd_and_unknown_name():
    model = build_classifier("vit_micro_patch8", 32, 10, "token")
    o = {"weight_decay": 0.05, "momentum": 0.9}
    lars = build_finetune_optimizer(model, {**o, "name": "lars"}, "cpu")
    assert isinstance(lars, LARS) and len(lars.param_groups) == 1
    assert param_names(model, lars) == [n for n, _ in model.named_parameters()]
    sgd = build_finetune_optimizer(model, {**o, "name": "sgd"}, "cpu")
    assert [g["weight_decay"] for g in sgd.param_groups] == [0.05, 0.0]
    assert all(p.ndim > 1 for p in sgd.param_groups[0]["params"])
    with pytest.raises(ConfigError, match="optim.name"):
        build_finetune_optimizer(model, {**o, "name": "adam"}, "cpu")


def test_train_step_scales_each_groups_lr_by_lr_scale():
    model = build_classifier("vit_micro_patch8", 32, 10, "avg")
    opt = build_finetune_optimizer(model, {"name": "adamw", "weight_decay": 0.05, "layer_decay": 0.5,
                                           "betas": (0.9, 0.999)}, "cpu")
    opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(1))]})  # no LR_SCALE: the plain lr

    def forward(imgs):
        return {"loss": model(imgs).square().mean() + 0 * opt.param_groups[-1]["params"][0].sum()}

    TrainStep(model, forward, opt, None, torch.device("cpu"))([(torch.randn(2, 3, 32, 32),)], 0.1)
    assert [g["lr"] for g in opt.param_groups] == [0.1 * g.get(LR_SCALE, 1.0) for g in opt.param_groups]
    assert {g["lr"] for g in opt.param_groups[:-1]} == {0.1 * 0.5 ** k for k in range(4)}
    assert opt.param_groups[-1]["lr"] == 0.1
