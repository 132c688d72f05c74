"""The seed paper's linear-model analysis of the mean teacher (RC-MAE, ICLR 2023, Prop. 4.1), checked numerically.

Model. Student W (m x d), batch X_t (d x B), targets Y_t (m x B), EMA teacher T (detached, T_0 = W_0):
  L_r = ||W X - Y||^2 / (2B)        grad L_r = (W X - Y) X^T / B
  L_c = ||W X - T X||^2 / (2B)      grad L_c = (W - T) X X^T / B
  u_t = grad L_r + gamma grad L_c = R_t X_t^T / B,   R_t = (1 + gamma) W_t X_t - Y_t - gamma T_t X_t
  W_{t+1} = W_t - eta u_t;  then the EMA after the optimizer step: T_{t+1} = alpha_t T_t + (1 - alpha_t) W_{t+1}.

Derivation. With D_t = W_t - T_t:
  D_{t+1} = W_{t+1} - alpha_t T_t - (1 - alpha_t) W_{t+1} = alpha_t (W_{t+1} - T_t) = alpha_t (D_t - eta u_t),  D_0 = 0,
so D_t = -eta sum_{s<t} (prod_{j=s..t-1} alpha_j) u_s, and with s = t - i,
  grad L_c(t) = D_t X_t X_t^T / B = sum_{i=1..t} c_{t,i},
  c_{t,i} = -eta (prod_{j=t-i..t-1} alpha_j) R_s (X_s^T X_t) X_t^T / B^2.
Past updates come back weighted by products of momenta and by the input Gram matrix X_s^T X_t: a batch orthogonal
to the current one contributes exactly nothing, and for X_s = X_t, <c_{t,i}, u_s> = -eta prod(alpha) / B ||u_s X_t||^2
<= 0: the term points against the past update. The teacher is a momentum regulariser conditioned on feature
similarity (the paper's "conditional removal of previous gradient directions").

One step, exactly. On a stream with X_0^T X_1 = rho I and orthonormal columns (``similarity_stream``), from T_0 = W_0:
  grad L_c(1) = -eta alpha_0 rho R_0 X_1^T / B^2,  so  cos(grad L_c(1), u_0) = -rho  and
  |grad L_c(1)| = eta alpha_0 rho ||R_0|| / B^2 (linear in rho),  |grad L_r(1)| = ||W_1 X_1 - Y_1|| / B.
The ratio of the two is NOT monotone in rho in general. Without noise, E = W_0 - A, a = ||E X_0||, b = ||E Z_1||,
c = <E X_0, E Z_1>, k = 1 - eta / B and q = sqrt(1 - rho^2) / rho:
  (|grad L_c(1)| / |grad L_r(1)|)^-2 = (B / (eta alpha_0 a))^2 (k^2 a^2 + q^2 b^2 + 2 k q c),
which falls as rho grows (q shrinks) only while q b^2 + k c > 0; a negative c (the student's errors on X_0 and
on the fresh direction Z_1 partly cancel) gives a peak below rho = 1 (seen in 60 of 600 seeded runs of the default
setting, always between rho = 0.9 and 1). At rho = 1 the ratio is eta alpha_0 / (B - eta) for every draw.

``simulate`` runs the loop with autograd; ``closed_form_consistency_grad`` (recurrence) and ``consistency_terms``
(sum of the c_{t,i}) rebuild grad L_c from the recorded R_s, X_s and momenta; ``run_linear_analysis`` checks both
against autograd and measures the similarity dependence (CSVs, figures and a JSON-ready dict).
"""
from __future__ import annotations

import csv
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from rcmae.core.geometry import cosine, ratio
from rcmae.core.plotting import plt, save_figure
from rcmae.core.schedules import momentum_at

Momenta = float | Sequence[float] | Callable[[int], float]  # constant, per-step list, or step -> momentum
DTYPE = torch.float64
RHOS = (0.0, 0.25, 0.5, 0.75, 0.9, 1.0)


def momentum_at_step(alphas: Momenta, t: int) -> float:
    """alpha_t, the momentum of the EMA update that follows optimizer step t."""
    if callable(alphas):
        return float(alphas(t))
    if isinstance(alphas, (int, float)):
        return float(alphas)
    return float(alphas[t])


@dataclass
class Step:
    """Everything at optimizer step t, taken before the update: the states the gradients were evaluated at."""

    t: int
    X: torch.Tensor  # (d, B) inputs
    Y: torch.Tensor  # (m, B) targets
    W: torch.Tensor  # (m, d) student W_t
    T: torch.Tensor  # (m, d) teacher T_t
    alpha: float  # alpha_t, momentum of the EMA after this step
    grad_recon: torch.Tensor  # autograd grad L_r at (W_t, X_t, Y_t)
    grad_consistency: torch.Tensor  # autograd grad L_c at (W_t, T_t, X_t)
    update: torch.Tensor  # u_t = grad_recon + gamma * grad_consistency, the gradient SGD used
    residual: torch.Tensor  # R_t = (1 + gamma) W_t X_t - Y_t - gamma T_t X_t, so that u_t = R_t X_t^T / B


@dataclass
class History:
    """One run of ``simulate``: its learning rate, consistency weight and the record of every step."""

    eta: float
    gamma: float
    steps: list[Step]


def simulate(X_list: Sequence[torch.Tensor], Y_list: Sequence[torch.Tensor], W0: torch.Tensor, eta: float,
             gamma: float, alphas: Momenta) -> History:
    """SGD on L_r + gamma L_c with autograd gradients, the EMA teacher updated after each optimizer step.

    The EMA is written as a lerp (T + (1 - alpha)(W - T), as ``RCMAE.update_teacher`` does): the same map, and exact
    where W == T, so columns of W that no batch has touched stay identical in the teacher (alpha T + (1 - alpha) W
    can be off by an ulp there, and grad L_c on orthogonal batches would then be ~1e-17 instead of exactly 0).
    """
    W = W0.detach().to(DTYPE).clone().requires_grad_(True)
    T = W.detach().clone()
    steps = []
    for t, (X, Y) in enumerate(zip(X_list, Y_list)):
        X, Y = X.to(DTYPE), Y.to(DTYPE)
        B = X.shape[1]
        pred = W @ X
        recon = (pred - Y).pow(2).sum() / (2 * B)
        consistency = (pred - T @ X).pow(2).sum() / (2 * B)
        grad_recon, = torch.autograd.grad(recon, W, retain_graph=True)
        grad_consistency, = torch.autograd.grad(consistency, W)
        update = grad_recon + gamma * grad_consistency
        with torch.no_grad():
            residual = (1 + gamma) * (W @ X) - Y - gamma * (T @ X)
            alpha = momentum_at_step(alphas, t)
            steps.append(Step(t, X, Y, W.detach().clone(), T.clone(), alpha, grad_recon, grad_consistency, update,
                              residual))
            W -= eta * update
            T = T.lerp(W, 1.0 - alpha)
    return History(eta, gamma, steps)


def closed_form_consistency_grad(history: History, t: int) -> torch.Tensor:
    """grad L_c at step t from the recurrence D_{s+1} = alpha_s (D_s - eta u_s), u_s = R_s X_s^T / B (no autograd)."""
    steps = history.steps
    D = torch.zeros_like(steps[0].W)
    for step in steps[:t]:
        D = step.alpha * (D - history.eta * step.residual @ step.X.T / step.X.shape[1])
    X = steps[t].X
    return D @ X @ X.T / X.shape[1]


@dataclass
class ConsistencyTerms:
    """grad L_c at step t as the sum over lags i = 1..t of c_{t,i} = -eta weight_i R_s gram_i X_t^T / B^2, s = t - i
    (all lists are empty at t = 0, where the teacher still equals the student)."""

    t: int
    lags: list[int]
    weights: list[float]  # prod_{j=s..t-1} alpha_j
    grams: list[torch.Tensor]  # X_s^T X_t (B x B)
    terms: list[torch.Tensor]  # c_{t,i} (m x d)
    total: torch.Tensor  # sum of the terms


def momentum_product(history: History, s: int, t: int) -> float:
    """prod_{j=s..t-1} alpha_j: how much of the update of step s is still in D_t."""
    return math.prod(step.alpha for step in history.steps[s:t])


def consistency_terms(history: History, t: int) -> ConsistencyTerms:
    """The per-past-step contributions c_{t,i} to grad L_c at step t, with their momentum weights and Gram matrices."""
    X_t = history.steps[t].X
    B = X_t.shape[1]
    lags = list(range(1, t + 1))
    weights = [momentum_product(history, t - i, t) for i in lags]
    grams = [history.steps[t - i].X.T @ X_t for i in lags]
    terms = [-history.eta * weight * history.steps[t - i].residual @ gram @ X_t.T / B**2
             for i, weight, gram in zip(lags, weights, grams)]
    return ConsistencyTerms(t, lags, weights, grams, terms, sum(terms, torch.zeros_like(history.steps[t].W)))


def closed_form_errors(history: History) -> list[dict]:
    """Per step: the largest |closed form - autograd| entry of the recurrence and of the sum of terms, and the scale
    of the autograd gradient (its largest entry and its norm)."""
    rows = []
    for step in history.steps:
        autograd = step.grad_consistency
        recurrence = closed_form_consistency_grad(history, step.t)
        terms = consistency_terms(history, step.t).total
        rows.append({"step": step.t, "alpha": step.alpha, "grad_max_abs": float(autograd.abs().max()),
                     "grad_norm": float(autograd.norm()),
                     "abs_error_recurrence": float((recurrence - autograd).abs().max()),
                     "abs_error_terms": float((terms - autograd).abs().max())})
    return rows


def _orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    """A Haar-random n x n orthogonal matrix (QR of a Gaussian, signs fixed by R's diagonal)."""
    q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=DTYPE))
    return q * torch.sign(torch.diagonal(r))


def similarity_stream(d: int, B: int, steps: int, rho: float, generator: torch.Generator, m: int = 4,
                      noise: float = 0.0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``steps`` batches X_t (d x B, orthonormal columns) with X_{t-i}^T X_t = rho^i I, and targets Y_t = A X_t + noise.

    X_0 = Z_0 and X_t = rho X_{t-1} + sqrt(1 - rho^2) Z_t, where Z_t spans a fresh block of B coordinates (a random
    coordinate subset, mixed by a random B x B rotation), so Z_t is orthogonal to every earlier batch. Needs d >= B
    steps. Disjoint coordinate supports make rho = 0 batches orthogonal exactly in floating point, not to ~1e-16;
    since W_0 and A are isotropic Gaussians, a global rotation of the inputs would give the same distribution.
    rho = 1 repeats X_0. The draws do not depend on rho, so one seed gives the same A and bases for every rho.
    """
    if d < B * steps:
        raise ValueError(f"similarity_stream needs d >= B * steps, got d={d}, B={B}, steps={steps}")
    coordinates = torch.randperm(d, generator=generator)
    fresh = []
    for t in range(steps):
        Z = torch.zeros(d, B, dtype=DTYPE)
        Z[coordinates[t * B:(t + 1) * B]] = _orthogonal(B, generator)
        fresh.append(Z)
    A = torch.randn(m, d, generator=generator, dtype=DTYPE)
    noises = [noise * torch.randn(m, B, generator=generator, dtype=DTYPE) for _ in range(steps)]
    X_list = [fresh[0]]
    for Z in fresh[1:]:
        X_list.append(rho * X_list[-1] + math.sqrt(1.0 - rho**2) * Z)
    return X_list, [A @ X + n for X, n in zip(X_list, noises)]


def similarity_experiment(rhos: Sequence[float] = RHOS, d: int = 200, B: int = 8, m: int = 4, steps: int = 20,
                          eta: float = 0.5, gamma: float = 1.0, alpha: float = 0.9, noise: float = 0.0,
                          seed: int = 0) -> list[dict]:
    """How the consistency gradient depends on the similarity rho of consecutive batches.

    For each rho (same seed, so the same W_0, A and bases): (i) one step: T_0 = W_0, an SGD step on X_0, then at
    step 1 on X_1 (X_0^T X_1 = rho I) cos(grad L_c, u_0) and |grad L_c| / |grad L_r|; (ii) a stream of ``steps``
    steps: the means over t >= 1 of cos(grad L_c(t), u_{t-1}) and of the ratio. ``one_step_cos_closed_form`` = -rho
    and ``one_step_ratio_closed_form`` come from the formulas in the module docstring, not from autograd.
    Numerically (default setting, seeds 0-299, gamma 0 and 1): the stream means of the cosine are < 0 and fall, and
    those of the ratio rise, with rho in every run; the one-step ratio need not rise (module docstring).
    """
    rows = []
    for rho in rhos:
        generator = torch.Generator().manual_seed(seed)
        X_list, Y_list = similarity_stream(d, B, steps, rho, generator, m=m, noise=noise)
        W0 = torch.randn(m, d, generator=generator, dtype=DTYPE)
        run = simulate(X_list, Y_list, W0, eta, gamma, alpha).steps
        cosines = [cosine(run[t].grad_consistency, run[t - 1].update) for t in range(1, steps)]
        ratios = [ratio(run[t].grad_consistency, run[t].grad_recon) for t in range(1, steps)]
        first, second = run[0], run[1]
        closed_ratio = (eta * alpha * rho * first.residual.norm()
                        / (B * (second.W @ second.X - second.Y).norm()))
        rows.append({"rho": rho, "one_step_cos": cosines[0], "one_step_ratio": ratios[0],
                     "one_step_cos_closed_form": 0.0 - rho, "one_step_ratio_closed_form": float(closed_ratio),
                     "one_step_consistency_norm": float(second.grad_consistency.norm()),
                     "one_step_recon_norm": float(second.grad_recon.norm()),
                     "stream_cos_mean": sum(cosines) / len(cosines), "stream_ratio_mean": sum(ratios) / len(ratios),
                     "stream_steps": steps, "eta": eta, "gamma": gamma, "alpha": alpha})
    return rows


def plot_similarity(rows: Sequence[dict], path: str | Path) -> Path:
    """cos(grad L_c, previous update) and |grad L_c| / |grad L_r| against rho, one step and stream mean."""

    rhos = [row["rho"] for row in rows]
    fig, (ax_cos, ax_ratio) = plt.subplots(1, 2, figsize=(9, 3.6))
    ax_cos.plot(rhos, [row["one_step_cos"] for row in rows], "o-", label="one step: cos(grad L_c(1), u_0)")
    ax_cos.plot(rhos, [row["stream_cos_mean"] for row in rows], "s-", label="stream mean: cos(grad L_c(t), u_(t-1))")
    ax_cos.plot(rhos, [-r for r in rhos], "k:", label="closed form, one step: -rho")
    ax_cos.set(xlabel="rho (X_(t-1)^T X_t = rho I)", ylabel="cosine", title="teacher term vs previous update")
    ax_ratio.plot(rhos, [row["one_step_ratio"] for row in rows], "o-", label="one step")
    ax_ratio.plot(rhos, [row["stream_ratio_mean"] for row in rows], "s-", label="stream mean")
    ax_ratio.set(xlabel="rho", ylabel="|grad L_c| / |grad L_r|", title="size of the teacher term")
    for ax in (ax_cos, ax_ratio):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return save_figure(fig, path, dpi=120)


def plot_closed_form(records: Sequence[dict], path: str | Path) -> Path:
    """Left: max |closed form - autograd| per step (log scale; exact zeros, as at step 0 where T = W, are left out).
    Right: |c_{t,i}| against the lag i at the step ``term_step`` of each record. ``records`` are the dicts of
    ``check_closed_form``."""

    fig, (ax_err, ax_terms) = plt.subplots(1, 2, figsize=(9, 3.6))
    for record in records:
        errors = [(row["step"], max(row["abs_error_recurrence"], row["abs_error_terms"])) for row in record["per_step"]]
        ax_err.plot(*zip(*[(t, e) for t, e in errors if e > 0]), ".-", label=record["name"])
        label = f"{record['name']} (t={record['term_step']})"
        ax_terms.plot(record["term_lags"], record["term_norms"], ".-", label=label)
    ax_err.set(yscale="log", xlabel="step t", ylabel="max |closed form - autograd|", title="grad L_c: closed form")
    ax_terms.set(yscale="log", xlabel="lag i", ylabel="|c_(t,i)|", title="contribution of step t - i")
    for ax in (ax_err, ax_terms):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return save_figure(fig, path, dpi=120)


def random_problem(m: int, d: int, B: int, steps: int, generator: torch.Generator, noise: float = 0.1):
    """Gaussian inputs (columns of norm ~1, not orthogonal), targets A X + noise, and W_0."""
    X_list = [torch.randn(d, B, generator=generator, dtype=DTYPE) / math.sqrt(d) for _ in range(steps)]
    A = torch.randn(m, d, generator=generator, dtype=DTYPE)
    Y_list = [A @ X + noise * torch.randn(m, B, generator=generator, dtype=DTYPE) for X in X_list]
    return X_list, Y_list, torch.randn(m, d, generator=generator, dtype=DTYPE)


def check_closed_form(name: str, history: History, alpha_schedule: str) -> dict:
    """Errors of both closed forms against autograd over all steps, and the term norms at the last step."""
    per_step = closed_form_errors(history)
    last = len(history.steps) - 1
    terms = consistency_terms(history, last)
    scaled = [row for row in per_step if row["grad_max_abs"] > 0]  # step 0: grad L_c is 0 (T = W)
    return {"name": name, "gamma": history.gamma, "alpha_schedule": alpha_schedule,
            "max_abs_error_recurrence": max(row["abs_error_recurrence"] for row in per_step),
            "max_abs_error_terms": max(row["abs_error_terms"] for row in per_step),
            "max_rel_error_recurrence": max(row["abs_error_recurrence"] / row["grad_max_abs"] for row in scaled),
            "max_rel_error_terms": max(row["abs_error_terms"] / row["grad_max_abs"] for row in scaled),
            "per_step": per_step, "term_step": last, "term_lags": terms.lags, "term_weights": terms.weights,
            "term_norms": [float(term.norm()) for term in terms.terms]}


@contextmanager
def one_thread() -> Iterator[None]:
    """torch on one intra-op thread, restored after: the matrices here are tiny, so extra threads only add
    synchronisation, which under a busy CPU stalls for seconds (a 1 s analysis took 30-60 s on 2 shared cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _write_csv(path: Path, rows: Sequence[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def run_linear_analysis(out_dir: Path, seed: int = 0, m: int = 4, d: int = 200, B: int = 8, steps: int = 40,
                        eta: float = 0.5, alpha: float = 0.9, gammas: Sequence[float] = (0.0, 1.0),
                        rhos: Sequence[float] = RHOS, similarity_steps: int = 20) -> dict:
    """Closed form vs autograd (gamma x {constant alpha, cosine alpha -> 1}, random inputs), then the similarity
    experiment. Writes linear_closed_form.{csv,png} and linear_similarity.{csv,png} to ``out_dir``; returns every
    number as a JSON-serialisable dict."""
    with one_thread():
        return _run_linear_analysis(Path(out_dir), seed, m, d, B, steps, eta, alpha, gammas, rhos, similarity_steps)


def _run_linear_analysis(out_dir: Path, seed: int, m: int, d: int, B: int, steps: int, eta: float, alpha: float,
                         gammas: Sequence[float], rhos: Sequence[float], similarity_steps: int) -> dict:
    start = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    schedules = {"constant": alpha, "cosine": [momentum_at(t, steps, alpha) for t in range(steps)]}
    records = []
    for gamma in gammas:
        for schedule, alphas in schedules.items():
            X_list, Y_list, W0 = random_problem(m, d, B, steps, torch.Generator().manual_seed(seed))
            history = simulate(X_list, Y_list, W0, eta, gamma, alphas)
            records.append(check_closed_form(f"gamma={gamma:g}, {schedule} alpha", history, schedule))
    rows = similarity_experiment(rhos, d=d, B=B, m=m, steps=similarity_steps, eta=eta, gamma=max(gammas),
                                 alpha=alpha, seed=seed)
    files = {f"{name}_{ext}": out_dir / f"linear_{name}.{ext}"
             for name in ("closed_form", "similarity") for ext in ("csv", "png")}
    per_step = [{"setting": r["name"], "gamma": r["gamma"], "alpha_schedule": r["alpha_schedule"], **row}
                for r in records for row in r["per_step"]]
    _write_csv(files["closed_form_csv"], per_step)
    _write_csv(files["similarity_csv"], rows)
    plot_closed_form(records, files["closed_form_png"])
    plot_similarity(rows, files["similarity_png"])
    return {"config": {"seed": seed, "m": m, "d": d, "B": B, "steps": steps, "eta": eta, "alpha": alpha,
                       "gammas": list(gammas), "rhos": list(rhos), "similarity_steps": similarity_steps},
            "closed_form": records,
            "max_abs_error": max(max(r["max_abs_error_recurrence"], r["max_abs_error_terms"]) for r in records),
            "max_rel_error": max(max(r["max_rel_error_recurrence"], r["max_rel_error_terms"]) for r in records),
            "similarity": rows, "files": {key: str(path) for key, path in files.items()},
            "seconds": time.perf_counter() - start}
