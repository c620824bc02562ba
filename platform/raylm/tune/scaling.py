"""The scaling law L(N, D) = E + A / N^alpha + B / D^beta, fitted as Chinchilla's approach 3.

Hoffmann et al. (2022, approach 3) and its replication by Besiroglu et al.
(2024, "Chinchilla Scaling: A replication attempt"): minimise the Huber loss
(delta = 1e-3) between the predicted and observed log loss,

    log L_hat = LSE(a - alpha log N, b - beta log D, e),  A = exp(a), B = exp(b), E = exp(e),

with L-BFGS started from a grid of initialisations, keeping the best optimum.
The grid is evaluated in one vectorised pass and L-BFGS starts from its best
points. Confidence intervals come from refitting bootstrap resamples of the
points (Besiroglu et al. show how much narrower-than-honest intervals the
original fit reported).

Which points enter the fit is the caller's choice (:mod:`raylm.tune.sweep`):
one point per run trained to the end of its own schedule, (N, D, final dev
loss). An intermediate evaluation of a run whose learning rate has not yet
decayed understates what a run trained to that D reaches, so it is no point of
the law.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np

HUBER_DELTA = 1e-3
PARAMETERS = ("E", "A", "alpha", "B", "beta")


class FitError(ValueError):
    """The points cannot support a fit (too few, or degenerate); the message says why."""


@dataclass(frozen=True)
class ScalingPoint:
    """One finished run: N non-embedding parameters, D training tokens, L final dev loss (nats/token)."""

    N: float
    D: float
    L: float
    label: str = ""


@dataclass
class ScalingFit:
    """Fitted parameters, their bootstrap intervals and the goodness of fit."""

    E: float
    A: float
    alpha: float
    B: float
    beta: float
    r2: float
    num_points: int
    huber_delta: float = HUBER_DELTA
    confidence: float = 0.95
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)
    bootstrap: list[dict[str, float]] = field(default_factory=list)

    def predict(self, N: Any, D: Any) -> Any:
        """L(N, D) under the point estimate."""
        return predict_loss(self.params(), N, D)

    def params(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in PARAMETERS}

    def compute_optimal(self, flops: float) -> tuple[float, float]:
        """(N, D) minimising L under C = 6ND (Hoffmann et al. 2022, eq. 4)."""
        return compute_optimal(self.params(), flops)

    def interval(self, values: Sequence[float]) -> tuple[float, float]:
        tail = (1 - self.confidence) / 2 * 100
        finite = [value for value in values if math.isfinite(value)]
        if not finite:
            return (math.nan, math.nan)
        low, high = np.percentile(finite, [tail, 100 - tail])
        return float(low), float(high)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["intervals"] = {name: list(bounds) for name, bounds in self.intervals.items()}
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ScalingFit":
        data = dict(data)
        data["intervals"] = {name: tuple(bounds) for name, bounds in data.get("intervals", {}).items()}
        return cls(**data)

    def describe(self) -> list[str]:
        """One line per parameter with its interval, then R^2."""
        lines = []
        for name in PARAMETERS:
            low, high = self.intervals.get(name, (math.nan, math.nan))
            lines.append(f"{name:>5} = {getattr(self, name):.4g}  [{low:.4g}, {high:.4g}]")
        lines.append(f"  R^2 = {self.r2:.4f} on {self.num_points} points "
                     f"({int(self.confidence * 100)}% bootstrap intervals, {len(self.bootstrap)} resamples)")
        return lines


def predict_loss(params: dict[str, float], N: Any, D: Any) -> Any:
    """E + A / N^alpha + B / D^beta."""
    N = np.asarray(N, dtype=float)
    D = np.asarray(D, dtype=float)
    return params["E"] + params["A"] / N ** params["alpha"] + params["B"] / D ** params["beta"]


def compute_optimal(params: dict[str, float], flops: float) -> tuple[float, float]:
    """Compute-optimal (N, D) for ``flops`` under C = 6ND: N = G (C/6)^(beta/(alpha+beta)), D = (C/6)/N."""
    alpha, beta = params["alpha"], params["beta"]
    if alpha <= 0 or beta <= 0:
        raise FitError(f"the fit has alpha={alpha:.3g}, beta={beta:.3g}: loss does not fall with both N and D, "
                       "so there is no compute-optimal allocation; sweep a wider range of sizes and steps")
    scale = (alpha * params["A"] / (beta * params["B"])) ** (1 / (alpha + beta))
    budget = flops / 6.0
    optimal_n = scale * budget ** (beta / (alpha + beta))
    return optimal_n, budget / optimal_n


def _log_terms(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray) -> np.ndarray:
    a, b, e, alpha, beta = theta
    return np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])


def _objective(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray,
               delta: float) -> tuple[float, np.ndarray]:
    """Huber loss of log L and its gradient in (a, b, e, alpha, beta)."""
    terms = _log_terms(theta, log_n, log_d)
    top = terms.max(axis=0)
    weights = np.exp(terms - top)
    total = weights.sum(axis=0)
    predicted = top + np.log(total)
    weights /= total
    residual = predicted - log_l
    small = np.abs(residual) <= delta
    loss = np.where(small, 0.5 * residual ** 2, delta * (np.abs(residual) - 0.5 * delta)).sum()
    slope = np.where(small, residual, delta * np.sign(residual))
    gradient = np.array([
        (slope * weights[0]).sum(),
        (slope * weights[1]).sum(),
        (slope * weights[2]).sum(),
        -(slope * weights[0] * log_n).sum(),
        -(slope * weights[1] * log_d).sum(),
    ])
    # In units of delta^2: the same minimiser, but values of order one, so that L-BFGS's
    # default stopping tolerances (absolute below |f| = 1) do not stop it early.
    return float(loss) / delta ** 2, gradient / delta ** 2


def _grid() -> np.ndarray:
    """Starting points (a, b, e, alpha, beta), as Hoffmann et al.'s grid but finer in the exponents."""
    exponents = np.linspace(0.0, 2.0, 9)
    return np.array(list(itertools.product(np.arange(0, 30, 5.0), np.arange(0, 30, 5.0),
                                           np.linspace(-1.0, 1.5, 6), exponents, exponents)))


def _grid_losses(grid: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray, delta: float) -> np.ndarray:
    a, b, e, alpha, beta = (grid[:, i:i + 1] for i in range(5))
    terms = np.stack([a - alpha * log_n, b - beta * log_d, np.broadcast_to(e, (len(grid), len(log_n)))])
    predicted = np.logaddexp.reduce(terms, axis=0)
    residual = np.abs(predicted - log_l)
    return np.where(residual <= delta, 0.5 * residual ** 2, delta * (residual - 0.5 * delta)).sum(axis=1)


def _minimise(starts: Iterable[np.ndarray], log_n, log_d, log_l, delta) -> np.ndarray:
    from scipy.optimize import minimize

    best, best_loss = None, math.inf
    for start in starts:
        result = minimize(_objective, start, args=(log_n, log_d, log_l, delta), jac=True, method="L-BFGS-B",
                          options={"maxiter": 1000})
        if np.all(np.isfinite(result.x)) and result.fun < best_loss:
            best, best_loss = result.x, result.fun
    if best is None:
        raise FitError("the scaling-law fit did not converge from any starting point")
    return best


def _to_params(theta: np.ndarray) -> dict[str, float]:
    a, b, e, alpha, beta = (float(value) for value in theta)
    return {"E": math.exp(e), "A": math.exp(a), "alpha": alpha, "B": math.exp(b), "beta": beta}


def r_squared(params: dict[str, float], points: Sequence[ScalingPoint]) -> float:
    """1 - SS_res / SS_tot of the loss itself (not its log)."""
    observed = np.array([p.L for p in points])
    predicted = predict_loss(params, [p.N for p in points], [p.D for p in points])
    total = float(((observed - observed.mean()) ** 2).sum())
    return 1.0 - float(((observed - predicted) ** 2).sum()) / total if total > 0 else math.nan


def fit_scaling_law(points: Sequence[ScalingPoint], bootstrap_samples: int = 200, seed: int = 0,
                    delta: float = HUBER_DELTA, num_starts: int = 16, confidence: float = 0.95) -> ScalingFit:
    """Fit L(N, D) to ``points``; intervals from ``bootstrap_samples`` resamples of the points.

    Needs at least five points (five parameters) spanning more than one N and
    more than one D; raises :class:`FitError` otherwise.
    """
    points = [p for p in points if p.N > 0 and p.D > 0 and p.L > 0 and math.isfinite(p.L)]
    if len(points) < 5:
        raise FitError(f"the scaling-law fit needs at least 5 finished runs, got {len(points)}")
    if len({p.N for p in points}) < 2 or len({p.D for p in points}) < 2:
        raise FitError("the scaling-law fit needs runs of at least 2 model sizes and 2 token counts")
    import scipy.optimize  # noqa: F401  (load its BLAS before limiting the threads of every loaded BLAS)
    from threadpoolctl import threadpool_limits

    # L-BFGS-B's tiny matrix products on a multi-threaded BLAS spend their time spinning
    # threads (15x slower on a busy 2-core machine than on one thread).
    with threadpool_limits(limits=1):
        return _fit(points, bootstrap_samples, seed, delta, num_starts, confidence)


def _fit(points: Sequence[ScalingPoint], bootstrap_samples: int, seed: int, delta: float, num_starts: int,
         confidence: float) -> ScalingFit:
    log_n = np.log([p.N for p in points])
    log_d = np.log([p.D for p in points])
    log_l = np.log([p.L for p in points])
    grid = _grid()
    order = np.argsort(_grid_losses(grid, log_n, log_d, log_l, delta))
    starts = [grid[index] for index in order[:num_starts]]
    theta = _minimise(starts, log_n, log_d, log_l, delta)
    params = _to_params(theta)
    fit = ScalingFit(**params, r2=r_squared(params, points), num_points=len(points), huber_delta=delta,
                     confidence=confidence)
    rng = np.random.default_rng(seed)
    # A resample's optimum lies near the full fit's: start there and from the best grid point.
    resample_starts = [theta, starts[0]]
    for _ in range(bootstrap_samples):
        chosen = rng.integers(0, len(points), len(points))
        if len(set(log_n[chosen])) < 2 or len(set(log_d[chosen])) < 2:
            continue  # a resample without N or D variation cannot identify the exponents
        try:
            fit.bootstrap.append(_to_params(_minimise(resample_starts, log_n[chosen], log_d[chosen],
                                                      log_l[chosen], delta)))
        except FitError:
            continue
    if fit.bootstrap:
        fit.intervals = {name: fit.interval([sample[name] for sample in fit.bootstrap]) for name in PARAMETERS}
    return fit


def holdout_error(points: Sequence[ScalingPoint], bootstrap_samples: int = 0, seed: int = 0) -> dict[str, Any]:
    """Fit without the largest model's points and predict them: mean relative error of the predicted loss."""
    largest = max(p.N for p in points)
    held_out = [p for p in points if p.N == largest]
    fit = fit_scaling_law([p for p in points if p.N < largest], bootstrap_samples=bootstrap_samples, seed=seed)
    errors = [abs(float(fit.predict(p.N, p.D)) - p.L) / p.L for p in held_out]
    return {"held_out_N": largest, "num_held_out": len(held_out), "relative_error": float(np.mean(errors)),
            "max_relative_error": float(np.max(errors)), "fit": fit.params()}
