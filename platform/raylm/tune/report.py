"""A sweep's table and pictures: the ranked trials, loss against compute, the fit against the observations."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Sequence

import numpy as np

TABLE_COLUMNS = ("rank", "trial_id", "status", "model", "N", "D", "step", "max_steps", "eval_loss",
                 "best_eval_loss", "compute_6ND")


def _compute(row: dict[str, Any]) -> float:
    return 6.0 * float(row["N"] or 0) * float(row["D"] or 0)


def write_table(outcomes: Sequence[dict[str, Any]], path: Path) -> Path:
    """The ranked trials as CSV: the table columns, then one column per swept key."""
    keys = sorted({key for row in outcomes for key in row["params"]})
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([*TABLE_COLUMNS, *keys])
        for row in outcomes:
            values = {**row, "compute_6ND": _compute(row)}
            writer.writerow([values.get(column) for column in TABLE_COLUMNS] + [row["params"].get(k) for k in keys])
    return path


def format_table(outcomes: Sequence[dict[str, Any]]) -> list[str]:
    """The ranked trial table as aligned text lines (best final dev loss first)."""
    keys = sorted({key for row in outcomes for key in row["params"]})
    header = ["rank", "trial", "status", "N", "D", "steps", "eval_loss", *keys]
    rows = []
    for row in outcomes:
        loss = f"{row['eval_loss']:.4f}" if row["eval_loss"] is not None else "-"
        rows.append([str(row["rank"]), row["trial_id"], row["status"], f"{row['N'] or 0:.3g}", f"{row['D']:.3g}",
                     f"{row['step']}/{row['max_steps']}", loss, *[str(row["params"].get(key)) for key in keys]])
    widths = [max(len(line[i]) for line in [header, *rows]) for i in range(len(header))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)) for line in [header, *rows]]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def frontier(fit, compute: np.ndarray) -> np.ndarray:
    """The fitted loss of the compute-optimal model at each budget (C = 6ND)."""
    losses = []
    for flops in compute:
        optimal_n, optimal_d = fit.compute_optimal(float(flops))
        losses.append(float(fit.predict(optimal_n, optimal_d)))
    return np.array(losses)


def plot_loss_vs_compute(outcomes: Sequence[dict[str, Any]], fit, path: Path) -> Path | None:
    """Dev loss against compute (6ND) at every evaluation, one curve per model size, and the fitted frontier."""
    by_size: dict[float, list[dict[str, Any]]] = {}
    for row in outcomes:
        if row["N"] and row["history"]:
            by_size.setdefault(float(row["N"]), []).append(row)
    if not by_size:
        return None
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7, 5))
    colours = plt.cm.viridis(np.linspace(0, 0.9, len(by_size)))
    all_compute = []
    for colour, (size, rows) in zip(colours, sorted(by_size.items())):
        for index, row in enumerate(rows):
            compute = [6.0 * size * point["tokens_seen"] for point in row["history"]]
            losses = [point["eval_loss"] for point in row["history"]]
            all_compute.extend(compute)
            style = "-" if row["status"] == "finished" else ":"
            axis.plot(compute, losses, style, color=colour, alpha=0.8,
                      label=f"N={size:.3g}" if index == 0 else None)
            if row["status"] == "finished":
                axis.plot(compute[-1], losses[-1], "o", color=colour)
    if fit is not None and all_compute:
        grid = np.logspace(np.log10(min(all_compute)), np.log10(max(all_compute) * 10), 60)
        axis.plot(grid, frontier(fit, grid), "k--", label="fitted compute-optimal frontier")
    axis.set_xscale("log")
    axis.set_xlabel("compute C = 6ND (FLOPs)")
    axis.set_ylabel("dev loss (nats/token)")
    axis.set_title("dev loss against compute (dotted: stopped early; dots: final)")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def plot_fit(points, fit, path: Path) -> Path:
    """Observed final dev loss against tokens, per model size, with the fitted L(N, D) curves."""
    plt = _pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    sizes = sorted({point.N for point in points})
    colours = plt.cm.viridis(np.linspace(0, 0.9, len(sizes)))
    tokens = np.array([point.D for point in points])
    grid = np.logspace(np.log10(tokens.min() / 1.5), np.log10(tokens.max() * 1.5), 50)
    for colour, size in zip(colours, sizes):
        mine = [point for point in points if point.N == size]
        left.plot([point.D for point in mine], [point.L for point in mine], "o", color=colour, label=f"N={size:.3g}")
        left.plot(grid, fit.predict(size, grid), "-", color=colour)
    left.set_xscale("log")
    left.set_xlabel("tokens D")
    left.set_ylabel("final dev loss")
    left.set_title("observations and fitted L(N, D)")
    left.legend(fontsize=8)
    observed = np.array([point.L for point in points])
    predicted = np.array([float(fit.predict(point.N, point.D)) for point in points])
    right.plot(observed, predicted, "o")
    low, high = min(observed.min(), predicted.min()), max(observed.max(), predicted.max())
    right.plot([low, high], [low, high], "k--")
    right.set_xlabel("observed")
    right.set_ylabel("predicted")
    right.set_title(f"fit: R^2 = {fit.r2:.3f}, alpha = {fit.alpha:.2f}, beta = {fit.beta:.2f}")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
