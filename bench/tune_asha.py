"""ASHA against the full grid on the same space, and the scaling-law fit of the grid: one JSON object.

The space (``jobs/configs/sweep_demo.yaml``'s by default): 2 run lengths x 5
widths of a 2-layer GPT-2 = 10 configurations on the demo corpus, the WSD
schedule, one Ray Train worker per trial. The grid runs every configuration to
the end (``tune.scheduler=none``); ASHA runs the same space with the config's
grace period and reduction factor, counted in evaluations. Both are full
``raylm tune`` sweeps (Ray Tune over Ray Train V2, data prepared once, MLflow
parent and child runs) in one local Ray, run one after the other.

Figures: each sweep's total training steps and best final dev loss;
``asha_best_gap`` = ASHA's best / grid's best - 1 (target <= 0.02);
``asha_step_fraction`` = ASHA's steps / grid's steps (target <= 0.5); the
fit's R^2 on the grid's finished trials; ``fit_holdout_error`` = relative error
of the loss predicted for the largest model when its runs are left out of the
fit (target <= 0.10); and the recommendation for 10x the largest trial's
compute. The load average at the start is recorded: figures from a busy
machine are slower, not different in kind (steps and losses do not depend on it).

    python bench/tune_asha.py [--config jobs/configs/sweep_demo.yaml] [key=value ...]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from raylm.config import load_config  # noqa: E402


def run(config: str, overrides: list[str], workdir: str, scheduler: str) -> tuple[dict, float]:
    from raylm.tune.sweep import run_sweep

    job = load_config(config, [*overrides, f"workdir={workdir}", f"run_name=bench-{scheduler}",
                               f"tune.scheduler={scheduler}", "tune.export_best=false"])
    started = time.time()
    # Ray Tune prints its own tables to stdout; this script's stdout is the one JSON object.
    with contextlib.redirect_stdout(sys.stderr):
        results = run_sweep(job)
    return results, time.time() - started


def summarise(results: dict) -> dict:
    finished = [row for row in results["trials"] if row["status"] == "finished"]
    return {"trials": len(results["trials"]), "finished": len(finished), "stopped": results["num_stopped"],
            "errors": results["num_errors"], "total_steps": results["total_steps"],
            "best_eval_loss": results["best_eval_loss"], "best_trial_params":
            next((row["params"] for row in finished if row["trial_id"] == results["best_trial"]), None)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="jobs/configs/sweep_demo.yaml")
    parser.add_argument("--workdir", default=None, help="default: a temporary folder")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    load_at_start = os.getloadavg()
    workdir = args.workdir or tempfile.mkdtemp(prefix="raylm-tune-bench-")

    from raylm.tune.recommend import recommend
    from raylm.tune.scaling import holdout_error
    from raylm.tune.sweep import scaling_points

    grid, grid_seconds = run(args.config, args.overrides, workdir, "none")
    asha, asha_seconds = run(args.config, args.overrides, workdir, "asha")
    grid_summary, asha_summary = summarise(grid), summarise(asha)
    points = scaling_points(grid["trials"])
    sizes = sorted({point.N for point in points})
    figures = {
        "benchmark": "tune_asha",
        "load_average_at_start": [round(value, 2) for value in load_at_start],
        "num_configs": len(grid["trials"]), "num_model_sizes": len({row["N"] for row in grid["trials"]}),
        "grid": {**grid_summary, "wall_seconds": round(grid_seconds, 1)},
        "asha": {**asha_summary, "wall_seconds": round(asha_seconds, 1)},
        "asha_best_gap": None, "asha_step_fraction": None,
        "fit_r2": grid["fit"]["r2"] if grid["fit"] else None,
        "fit": {key: grid["fit"][key] for key in ("E", "A", "alpha", "B", "beta", "intervals")} if grid["fit"] else None,
        "fit_problem": grid.get("fit_problem"),
        "fit_holdout_error": None,
        "targets": {"asha_best_gap": "<= 0.02", "asha_step_fraction": "<= 0.5", "fit_holdout_error": "<= 0.10"},
        "sweep_dirs": {"grid": grid["sweep_dir"], "asha": asha["sweep_dir"]},
    }
    if grid_summary["best_eval_loss"] and asha_summary["best_eval_loss"]:
        figures["asha_best_gap"] = asha_summary["best_eval_loss"] / grid_summary["best_eval_loss"] - 1
    if grid_summary["total_steps"]:
        figures["asha_step_fraction"] = asha_summary["total_steps"] / grid_summary["total_steps"]
    if len(sizes) >= 3:
        held = holdout_error(points)
        figures["fit_holdout_error"] = held["relative_error"]
        figures["fit_holdout"] = held
    if grid["fit"]:
        largest = max(6.0 * row["N"] * row["D"] for row in grid["trials"] if row["status"] == "finished")
        rec = recommend(grid, 10 * largest, out=Path(workdir) / "recommended-10x.yaml")
        figures["recommendation_10x_largest"] = {key: rec[key] for key in (
            "flops", "N", "D", "tokens_per_parameter", "predicted_loss", "predicted_loss_interval", "model",
            "model_N", "max_steps", "config_path")}
    print(json.dumps(figures, default=str))


if __name__ == "__main__":
    main()
