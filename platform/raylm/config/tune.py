"""The tune section: the search space of a sweep and how Ray Tune runs its trials."""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import Field, model_validator

from raylm.config.base import StrictModel

SWEEP_DISTRIBUTIONS: tuple[str, ...] = ("grid", "choice", "uniform", "loguniform", "randint", "lograndint")


class SearchDimension(StrictModel):
    """One swept config key: exactly one of a grid, a set of choices, or a (log-)uniform range.

    ``grid`` values are all tried (Tune's grid search); ``choice`` values are
    sampled (or chosen by Optuna); ``uniform``/``loguniform`` are float ranges
    ``[low, high]`` and ``randint``/``lograndint`` integer ranges (high inclusive).
    """

    grid: Optional[list[Any]] = None
    choice: Optional[list[Any]] = None
    uniform: Optional[tuple[float, float]] = None
    loguniform: Optional[tuple[float, float]] = None
    randint: Optional[tuple[int, int]] = None
    lograndint: Optional[tuple[int, int]] = None

    @model_validator(mode="before")
    @classmethod
    def _bare_list_is_grid(cls, raw: Any) -> Any:
        return {"grid": raw} if isinstance(raw, list) else raw

    @model_validator(mode="after")
    def _exactly_one(self) -> "SearchDimension":
        given = [name for name in SWEEP_DISTRIBUTIONS if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(SWEEP_DISTRIBUTIONS)} (got {', '.join(given) or 'none'})")
        kind = given[0]
        if kind in ("grid", "choice"):
            if not getattr(self, kind):
                raise ValueError(f"{kind} is empty")
            return self
        low, high = getattr(self, kind)
        ordered = low <= high if kind.endswith("randint") else low < high  # integer ranges include high
        if not ordered:
            raise ValueError(f"{kind}: low ({low}) must be below high ({high})")
        if kind.startswith("log") and low <= 0:
            raise ValueError(f"{kind}: the range must be positive")
        return self

    @property
    def kind(self) -> str:
        return next(name for name in SWEEP_DISTRIBUTIONS if getattr(self, name) is not None)

    @property
    def values(self) -> Any:
        return getattr(self, self.kind)


class TuneConfig(StrictModel):
    """A Ray Tune sweep over dotted config keys (``raylm tune``); ignored by ``raylm train``.

    Trials are full training runs of this job config with the swept keys set;
    the scheduler and the scaling-law fit read ``metric`` (the dev loss) that
    every evaluation (``train.eval_every``) reports. Which keys a sweep may vary
    is checked by :func:`raylm.tune.space.validate_sweep`, which knows the
    sweep's rules; this section checks only its own values.
    """

    space: dict[str, SearchDimension] = Field(
        default_factory=dict, description="dotted config key -> {grid|choice: [...]} or "
                                          "{uniform|loguniform|randint|lograndint: [low, high]}")
    search: Literal["grid", "random", "optuna"] = Field(
        "grid", description="grid: every combination of grid/choice values; random: grid values crossed with "
                            "num_samples random draws of the rest; optuna: num_samples trials chosen by Optuna (TPE)")
    num_samples: int = Field(1, ge=1, description="grid: repeats of the grid; random/optuna: trials (per grid point)")
    max_trials: int = Field(64, ge=1, description="the sweep's trial limit; a larger space is a config error")
    scheduler: Literal["asha", "none"] = "asha"
    grace_period: int = Field(2, ge=1, description="asha: evaluations every trial gets before it can be stopped")
    reduction_factor: float = Field(2.0, gt=1, description="asha: keep the best 1/reduction_factor at each rung")
    metric: Literal["eval_loss"] = "eval_loss"
    max_concurrent_trials: int = Field(
        0, ge=0, description="trials at once; 0: as many as the cluster's CPUs (GPUs) hold side by side")
    trial_start_timeout_s: float = Field(
        300.0, gt=0, description="a trial whose workers cannot be placed within this time fails with a message "
                                 "(instead of waiting forever for resources the cluster does not have)")
    seed: int = Field(0, description="seed of the random / Optuna search")
    min_fit_trials: int = Field(5, ge=5, description="finished trials needed for the scaling-law fit")
    bootstrap_samples: int = Field(200, ge=0, le=10000, description="bootstrap resamples for the fit's intervals")
    export_best: bool = Field(True, description="export the best finished trial as a model folder in the sweep")
    register_best: bool = Field(False, description="also register it under tracking.model_name")
