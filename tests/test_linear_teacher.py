"""The linear-model analysis of the mean teacher (rcmae.analysis.linear_teacher): autograd against closed forms."""
from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from rcmae.analysis.linear_teacher import (
    RHOS,
    closed_form_consistency_grad,
    consistency_terms,
    one_thread,
    run_linear_analysis,
    similarity_experiment,
    similarity_stream,
    simulate,
)
from rcmae.core.schedules import momentum_at

F64 = torch.float64
STEPS = 32


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():  # tiny matrices: extra threads only stall on a busy CPU
        yield


def random_batches(m=3, d=20, B=5, steps=STEPS, seed=0):
    """Gaussian inputs (not orthogonal), noisy linear targets and W_0."""
    g = torch.Generator().manual_seed(seed)
    X = [torch.randn(d, B, generator=g, dtype=F64) / math.sqrt(d) for _ in range(steps)]
    A = torch.randn(m, d, generator=g, dtype=F64)
    Y = [A @ x + 0.1 * torch.randn(m, B, generator=g, dtype=F64) for x in X]
    return X, Y, torch.randn(m, d, generator=g, dtype=F64)


MOMENTA = {"constant": 0.9, "cosine": [momentum_at(t, STEPS, 0.9) for t in range(STEPS)],
           "callable": lambda t: 0.8 + 0.005 * t}


@pytest.mark.parametrize("gamma", [0.0, 0.7])
@pytest.mark.parametrize("momenta", MOMENTA)
def test_closed_forms_equal_autograd(gamma, momenta):
    eta = 0.5
    X, Y, W0 = random_batches()
    history = simulate(X, Y, W0, eta, gamma, MOMENTA[momenta])
    steps = history.steps
    scale = max(float(s.grad_consistency.abs().max()) for s in steps)
    assert scale > 1e-3  # the teacher term is not trivially small
    for t, step in enumerate(steps):
        B = step.X.shape[1]
        # the loop is the stated one: u = R X^T / B, SGD step, then the EMA towards the *new* student
        assert torch.allclose(step.update, step.residual @ step.X.T / B, rtol=0, atol=1e-13)
        if t + 1 < len(steps):
            W_next = step.W - eta * step.update
            alpha = MOMENTA[momenta] if momenta == "constant" else (
                MOMENTA[momenta][t] if momenta == "cosine" else MOMENTA[momenta](t))
            assert torch.allclose(steps[t + 1].W, W_next, rtol=0, atol=1e-13)
            assert torch.allclose(steps[t + 1].T, alpha * step.T + (1 - alpha) * W_next, rtol=0, atol=1e-13)
        autograd = step.grad_consistency
        assert torch.allclose(closed_form_consistency_grad(history, t), autograd, rtol=0, atol=1e-12 * scale)
        terms = consistency_terms(history, t)
        assert len(terms.terms) == t and terms.lags == list(range(1, t + 1))
        assert torch.allclose(terms.total, autograd, rtol=0, atol=1e-12 * scale)
        if t:
            assert torch.allclose(sum(terms.terms), autograd, rtol=0, atol=1e-12 * scale)
            assert terms.weights[0] == pytest.approx(steps[t - 1].alpha)
            assert terms.weights[-1] == pytest.approx(math.prod(s.alpha for s in steps[:t]))
            assert torch.equal(terms.grams[-1], steps[0].X.T @ step.X)


def test_tiny_case_by_hand():
    """m = 1, d = 2, B = 1, gamma = 1, eta = 1/2, alpha = 1/2: all numbers are dyadic, so exact in float."""
    eta, gamma, alpha = 0.5, 1.0, 0.5
    w0, xs, ys = [2.0, 0.0], [[1.0, 2.0], [1.0, -1.0], [0.0, 1.0]], [3.0, 1.0, 5.0]

    def dot(a, b):
        return sum(p * q for p, q in zip(a, b))

    # step 0: T = W, R_0 = w0.x0 - y0 = -1, u_0 = R_0 x0 = [-1, -2]; W_1 = [2.5, 1], T_1 = (W_0 + W_1) / 2 = [2.25, 0.5]
    R0 = dot(w0, xs[0]) - ys[0]
    # step 1: grad L_c = -eta alpha R_0 (x0.x1) x1 = [-0.25, 0.25]
    g1 = [-eta * alpha * R0 * dot(xs[0], xs[1]) * x for x in xs[1]]
    assert g1 == [-0.25, 0.25]
    # R_1 = 2 W_1.x1 - y1 - T_1.x1 = 3 - 1 - 1.75 = 0.25
    R1 = (1 + gamma) * 1.5 - ys[1] - 1.75
    # step 2: lag 1: -eta alpha R_1 (x1.x2) x2 = [0, 1/16]; lag 2: -eta alpha^2 R_0 (x0.x2) x2 = [0, 1/4]
    lag1 = [-eta * alpha * R1 * dot(xs[1], xs[2]) * x for x in xs[2]]
    lag2 = [-eta * alpha**2 * R0 * dot(xs[0], xs[2]) * x for x in xs[2]]
    assert lag1 == [0.0, 0.0625] and lag2 == [0.0, 0.25]

    X = [torch.tensor(x, dtype=F64).reshape(2, 1) for x in xs]
    Y = [torch.tensor([[y]], dtype=F64) for y in ys]
    history = simulate(X, Y, torch.tensor([w0], dtype=F64), eta, gamma, alpha)
    expected = [[0.0, 0.0], g1, [a + b for a, b in zip(lag1, lag2)]]
    for t, grad in enumerate(expected):
        grad = torch.tensor([grad], dtype=F64)
        assert torch.allclose(history.steps[t].grad_consistency, grad, rtol=0, atol=1e-15)
        assert torch.allclose(closed_form_consistency_grad(history, t), grad, rtol=0, atol=1e-15)
    terms = consistency_terms(history, 2)
    assert terms.weights == [0.5, 0.25]
    assert [g.item() for g in terms.grams] == [-1.0, 2.0]
    assert torch.allclose(terms.terms[0], torch.tensor([lag1], dtype=F64), rtol=0, atol=1e-15)
    assert torch.allclose(terms.terms[1], torch.tensor([lag2], dtype=F64), rtol=0, atol=1e-15)


def test_identical_inputs_give_terms_against_the_past_update():
    """X_s = X_t: <c_{t,i}, u_s> = -eta prod(alpha) / B ||u_s X||^2 <= 0 (and < 0 here)."""
    eta, B = 0.5, 5
    X, Y, W0 = random_batches(B=B, steps=12)
    history = simulate([X[0]] * 12, Y[:12], W0, eta, 1.0, 0.9)
    for t in (5, 11):
        terms = consistency_terms(history, t)
        for i, weight, term in zip(terms.lags, terms.weights, terms.terms):
            u = history.steps[t - i].update
            expected = -eta * weight / B * float((u @ X[0]).pow(2).sum())
            assert expected < 0
            assert float((term * u).sum()) == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("rho", [0.0, 0.6, 1.0])
def test_similarity_stream_gram_matrices(rho):
    d, B, steps = 40, 4, 10
    X, Y = similarity_stream(d, B, steps, rho, torch.Generator().manual_seed(3), m=2)
    assert len(X) == len(Y) == steps and X[0].shape == (d, B) and Y[0].shape == (2, B)
    for t in range(steps):
        for s in range(t + 1):
            assert torch.allclose(X[s].T @ X[t], rho ** (t - s) * torch.eye(B, dtype=F64), rtol=0, atol=1e-14)
    with pytest.raises(ValueError):
        similarity_stream(d, B, 11, rho, torch.Generator().manual_seed(3))


def test_one_step_ratio_formula():
    """|grad L_c(1)| / |grad L_r(1)| against the module docstring's quadratic in q = sqrt(1 - rho^2) / rho, from
    E X_0 = W_0 X_0 - Y_0 and E Z_1 = W_0 Z_1 - A Z_1, A Z_1 = (Y_1 - rho Y_0) / sqrt(1 - rho^2)."""
    d, B, m, rho, eta, alpha = 40, 4, 2, 0.6, 0.5, 0.9
    g = torch.Generator().manual_seed(1)
    X, Y = similarity_stream(d, B, 2, rho, g, m=m)
    W0 = torch.randn(m, d, generator=g, dtype=F64)
    second = simulate(X, Y, W0, eta, 1.0, alpha).steps[1]
    s = math.sqrt(1 - rho**2)
    EX0, EZ1 = W0 @ X[0] - Y[0], W0 @ (X[1] - rho * X[0]) / s - (Y[1] - rho * Y[0]) / s
    a, b, c = EX0.norm(), EZ1.norm(), (EX0 * EZ1).sum()
    k, q = 1 - eta / B, s / rho
    expected = eta * alpha * a / (B * torch.sqrt(k**2 * a**2 + q**2 * b**2 + 2 * k * q * c))
    assert float(second.grad_consistency.norm() / second.grad_recon.norm()) == pytest.approx(float(expected), rel=1e-12)
    assert float(second.grad_consistency.norm()) == pytest.approx(float(eta * alpha * rho * a / B**2), rel=1e-12)


@pytest.fixture(scope="module")
def similarity_rows():
    return similarity_experiment(RHOS, d=200, B=8, m=4, steps=20, eta=0.5, gamma=1.0, alpha=0.9, seed=0)


def test_similarity_signs(similarity_rows):
    eta, B, alpha = 0.5, 8, 0.9
    rows = {row["rho"]: row for row in similarity_rows}
    # orthogonal batches: the teacher term is exactly zero, at every step of the stream
    assert rows[0.0]["one_step_consistency_norm"] == 0.0
    assert rows[0.0]["one_step_cos"] == rows[0.0]["stream_cos_mean"] == rows[0.0]["stream_ratio_mean"] == 0.0
    assert rows[0.0]["one_step_recon_norm"] > 0
    # one step: cos = -rho exactly, |grad L_c| linear in rho, and at rho = 1 the ratio is eta alpha / (B - eta)
    per_rho = rows[1.0]["one_step_consistency_norm"]
    for rho, row in rows.items():
        assert row["one_step_cos"] == pytest.approx(-rho, abs=1e-12)
        assert row["one_step_consistency_norm"] == pytest.approx(rho * per_rho, rel=1e-12)
    assert rows[1.0]["one_step_ratio"] == pytest.approx(eta * alpha / (B - eta), rel=1e-12)
    # repeated batches: everything stays collinear with the first error, the teacher term exactly opposes the update
    assert rows[1.0]["stream_cos_mean"] == pytest.approx(-1.0, abs=1e-12)
    # stream means: cos < 0 and falling, ratio rising with rho (no exception in seeds 0-299, gamma 0 and 1)
    similar = [rows[rho] for rho in RHOS[1:]]
    assert all(row["stream_cos_mean"] < 0 for row in similar)
    assert all(a["stream_cos_mean"] > b["stream_cos_mean"] for a, b in zip(similar, similar[1:]))
    ratios = [rows[rho]["stream_ratio_mean"] for rho in RHOS]
    assert all(a < b for a, b in zip(ratios, ratios[1:]))


def test_run_linear_analysis_writes_files_and_json(tmp_path):
    result = run_linear_analysis(tmp_path, seed=0)
    json.loads(json.dumps(result, allow_nan=False))
    for name in ("linear_closed_form.csv", "linear_similarity.csv", "linear_closed_form.png", "linear_similarity.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert (tmp_path / "linear_closed_form.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(result["closed_form"]) == 4
    assert {(r["gamma"], r["alpha_schedule"]) for r in result["closed_form"]} == {
        (g, s) for g in (0.0, 1.0) for s in ("constant", "cosine")}
    assert result["max_rel_error"] < 1e-12 and result["max_abs_error"] < 1e-14
    with open(tmp_path / "linear_closed_form.csv") as f:
        assert len(list(csv.DictReader(f))) == 4 * 40
    with open(tmp_path / "linear_similarity.csv") as f:
        rows = list(csv.DictReader(f))
    assert [float(row["rho"]) for row in rows] == list(RHOS)
    assert [row["rho"] for row in result["similarity"]] == list(RHOS)
