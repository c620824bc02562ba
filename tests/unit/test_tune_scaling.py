"""The scaling-law fit (Chinchilla approach 3) and the compute-optimal allocation, on synthetic points."""

import math

import numpy as np
import pytest

from raylm.tune.scaling import FitError, ScalingFit, ScalingPoint, compute_optimal, fit_scaling_law, holdout_error

CHINCHILLA = {"E": 1.69, "A": 406.4, "alpha": 0.34, "B": 410.7, "beta": 0.28}


def _points(params, noise=0.004, seed=0, sizes=(1e7, 3e7, 1e8, 3e8, 1e9), tokens=(1e9, 3e9, 1e10, 3e10)):
    rng = np.random.default_rng(seed)
    points = []
    for n in sizes:
        for d in tokens:
            loss = params["E"] + params["A"] / n ** params["alpha"] + params["B"] / d ** params["beta"]
            points.append(ScalingPoint(n, d, float(loss * math.exp(rng.normal(0, noise)))))
    return points


@pytest.mark.parametrize("truth", [CHINCHILLA, {"E": 1.8, "A": 1500.0, "alpha": 0.4, "B": 2000.0, "beta": 0.32}])
def test_fit_recovers_known_exponents(truth):
    fit = fit_scaling_law(_points(truth), bootstrap_samples=20, seed=1)
    assert fit.alpha == pytest.approx(truth["alpha"], rel=0.10)
    assert fit.beta == pytest.approx(truth["beta"], rel=0.10)
    assert fit.E == pytest.approx(truth["E"], rel=0.10)
    assert fit.r2 > 0.99
    # Intervals come from the resamples and bracket the point estimate.
    assert len(fit.bootstrap) >= 15
    for name in ("alpha", "beta", "E"):
        low, high = fit.intervals[name]
        assert low <= getattr(fit, name) <= high and low < high


def test_fit_is_robust_to_one_outlier():
    """The Huber loss on log L keeps one diverged run from dragging the exponents."""
    points = _points(CHINCHILLA, noise=0.002)
    points[3] = ScalingPoint(points[3].N, points[3].D, points[3].L * 1.5)
    fit = fit_scaling_law(points, bootstrap_samples=0)
    assert fit.alpha == pytest.approx(CHINCHILLA["alpha"], rel=0.10)
    assert fit.beta == pytest.approx(CHINCHILLA["beta"], rel=0.10)


def test_compute_optimal_allocation_grows_with_budget_and_spends_it():
    previous = (0.0, 0.0)
    for flops in (1e19, 1e20, 1e21, 1e22):
        n, d = compute_optimal(CHINCHILLA, flops)
        assert 6 * n * d == pytest.approx(flops, rel=1e-9)
        assert n > previous[0] and d > previous[1]
        previous = (n, d)
        # The optimum beats nearby allocations of the same budget.
        # The closed form is the minimum of L along the iso-compute line (searched numerically here).
        fit = ScalingFit(**CHINCHILLA, r2=1.0, num_points=0)
        grid = n * np.logspace(-1, 1, 2001)
        searched = grid[np.argmin(fit.predict(grid, flops / (6 * grid)))]
        assert searched == pytest.approx(n, rel=0.01)


def test_holdout_predicts_the_largest_model():
    result = holdout_error(_points(CHINCHILLA, noise=0.002))
    assert result["held_out_N"] == 1e9 and result["num_held_out"] == 4
    assert result["relative_error"] < 0.02


def test_too_few_or_degenerate_points_are_errors():
    points = _points(CHINCHILLA)
    with pytest.raises(FitError, match="at least 5"):
        fit_scaling_law(points[:4])
    with pytest.raises(FitError, match="2 model sizes"):
        fit_scaling_law([p for p in points if p.N == 1e8] * 2)
    with pytest.raises(FitError, match="no compute-optimal"):
        compute_optimal({**CHINCHILLA, "beta": -0.1}, 1e20)


def test_fit_round_trips_through_json():
    fit = fit_scaling_law(_points(CHINCHILLA), bootstrap_samples=5)
    again = ScalingFit.from_dict(fit.to_dict())
    assert again.params() == fit.params() and again.intervals == fit.intervals
    assert float(again.predict(1e8, 1e10)) == pytest.approx(float(fit.predict(1e8, 1e10)))
