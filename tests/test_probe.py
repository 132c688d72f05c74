"""The gradient probe of a real RC-MAE (pretrain/probe.py)."""
import json

import pytest
import torch

from rcmae.analysis.mean_teacher import update_experiment
from rcmae.pretrain.models import build_mae
from rcmae.pretrain.probe import (
    TrainingProbe,
    block_of,
    gradient_stats,
    loss_gradients,
    student_params,
)
from rcmae.pretrain.rcmae import RCMAE
from rcmae.pretrain.train import main


def rcmae(gamma=1.0, seed=0, teacher_mask="same"):
    torch.manual_seed(seed)
    model = RCMAE(build_mae("vit_micro_patch8", 32, 32, 1, 2), 0.75, gamma, teacher_mask)
    with torch.no_grad():  # a teacher that differs from the student, so L_c has a gradient
        for p in model.teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def batch(seed, n=4):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 32, 32, generator=g), torch.rand(n, 16, generator=g)


@pytest.mark.parametrize("gamma", [1.0, 0.5])
def test_the_two_gradients_add_up_to_the_training_gradient(gamma):
    model = rcmae(gamma)
    imgs, noise = batch(1)
    g_r, g_c = loss_gradients(model, imgs, noise)
    model(imgs, noise)["loss"].backward()
    for n, p in student_params(model).items():
        torch.testing.assert_close(g_r[n] + gamma * g_c[n], p.grad, rtol=1e-5, atol=1e-7)
    assert all(p.grad is None for p in model.teacher.parameters())
    assert any(g.abs().sum() > 0 for g in g_c.values())


def test_statistics_against_hand_computed_values():
    g_r = {"blocks.0.w": torch.tensor([1.0, 0.0]), "decoder_pred.bias": torch.tensor([0.0, 2.0])}
    g_c = {"blocks.0.w": torch.tensor([1.0, 1.0]), "decoder_pred.bias": torch.tensor([0.0, 0.0])}
    update = {"blocks.0.w": torch.tensor([-1.0, -1.0]), "decoder_pred.bias": torch.tensor([5.0, 0.0])}
    s = gradient_stats(g_r, g_c, update)
    # whole: g_r = (1, 0, 0, 2), g_c = (1, 1, 0, 0), -g_c . update = 2, |g_c| = sqrt 2, |update| = sqrt 27
    assert s["cos_r_c"] == pytest.approx(1 / (5 ** 0.5 * 2 ** 0.5))
    assert s["ratio_c_r"] == pytest.approx(2 ** 0.5 / 5 ** 0.5)
    assert s["cos_c_update"] == pytest.approx(2 / (2 ** 0.5 * 27 ** 0.5))
    assert s["blocks"]["blocks.0"] == pytest.approx({"cos_r_c": 2 ** -0.5, "ratio_c_r": 2 ** 0.5, "cos_c_update": 1.0})
    assert s["blocks"]["decoder_pred"] == {"cos_r_c": 0.0, "ratio_c_r": 0.0, "cos_c_update": 0.0}  # no direction
    assert [block_of(n) for n in ("blocks.11.attn.qkv.weight", "decoder_blocks.0.norm1.bias", "cls_token")] == [
        "blocks.11", "decoder_blocks.0", "cls_token"]


def test_update_experiment_signs():
    model = rcmae()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    b1, n1 = batch(1)
    _, n2 = batch(2)
    unrelated, _ = batch(3)
    cases = {"same_masks": (b1, n1), "new_masks": (b1, n2), "unrelated": (unrelated, n2)}
    # momentum 0: the teacher follows the student at once, nothing to be consistent with
    for s in update_experiment(model, cases, (b1, n1), lr=1e-3, momentum=0.0).values():
        assert s["ratio_c_r"] == 0.0 and s["cos_c_update"] == 0.0
    # a small step: grad L_c ~ alpha J^T J Delta, so -grad L_c points against the update (first order)
    result = update_experiment(model, cases, (b1, n1), lr=1e-3, momentum=0.9)
    assert all(s["cos_c_update"] < 0 for s in result.values()), result
    assert result["same_masks"]["cos_c_update"] < -0.5  # the repeated batch undoes most of its own step
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # ran on a copy
    with pytest.raises(ValueError, match="needs a teacher"):
        loss_gradients(RCMAE(build_mae("vit_micro_patch8", 32, 32, 1, 2), gamma=0.0), b1, n1)


def test_training_probe_measures_against_the_previous_step():
    model = rcmae()
    probe = TrainingProbe(model, every_steps=2)
    imgs, noise = batch(1)
    assert probe.measure(1, imgs, noise) is None  # not due; step 2 is, so the weights are kept
    start = {n: p.detach().clone() for n, p in student_params(model).items()}
    with torch.no_grad():  # "the optimizer step"
        for p in student_params(model).values():
            p.add_(0.01 * torch.randn_like(p))
    probe.after_step()
    record = probe.measure(2, imgs, noise)
    change = {n: p.detach() - start[n] for n, p in student_params(model).items()}
    expected = gradient_stats(*loss_gradients(model, imgs, noise), change)["cos_c_update"]
    assert record["cos_c_update"] == pytest.approx(expected)
    # nothing kept until the step before the next probe
    assert probe.last_update is None and probe.weights_before is None


def test_probe_in_training_writes_its_records(micro_cfg, tmp_path):
    main(micro_cfg("optim.epochs=1", "analysis.every_steps=2", "log.every_steps=1"))
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    probes = [r for r in lines if "probe_cos_r_c" in r]
    assert [r["step"] for r in probes] == [0, 2]  # 4 steps per epoch
    assert "probe_cos_c_update" not in probes[0]  # no update before the first step
    assert -1 <= probes[1]["probe_cos_c_update"] <= 1 and probes[1]["probe_ratio_c_r"] > 0
    assert set(probes[1]["probe_blocks"]) >= {"blocks.0", "decoder_blocks.0", "decoder_pred"}


def test_probe_needs_a_teacher(micro_cfg):
    from rcmae.core.errors import ConfigError

    with pytest.raises(ConfigError, match="no teacher"):
        main(micro_cfg("analysis.every_steps=2", "rcmae.gamma=0", "export.which=student"))
