"""A sweep's outcome: one row per trial, the scaling-law fit, tables and plots, the best model, MLflow.

:func:`collect_outcomes` reads Tune's result grid and the trials' records;
:func:`finish_sweep` fits the scaling law on the trials that trained to the
end of their schedule, writes the table and plots, exports the best model and
logs it all to the sweep's MLflow parent run.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient

from raylm.common import tracking
from raylm.compat.ray import result_grid_trials
from raylm.config import JobConfig
from raylm.train.checkpoint import find_valid_checkpoint
from raylm.train.driver import export_model
from raylm.tune import report
from raylm.tune.records import RESULTS_FILE, SWEEP_RECORD, TABLE_FILE, TRIAL_RECORD, read_json, write_json
from raylm.tune.scaling import FitError, ScalingPoint, fit_scaling_law
from raylm.tune.trial import terminate_run, trial_job

logger = logging.getLogger(__name__)


def collect_outcomes(sweep_dir: Path, result_grid, stopped: set[str] = frozenset()) -> list[dict[str, Any]]:
    """One row per trial: its params, status (finished / stopped / error / unfinished), N, D, losses, curve.

    A trial is *finished* when it reached its ``train.max_steps``; *stopped*
    when the scheduler ended it before that (ASHA: the ids in ``stopped``);
    *error* when it failed; *unfinished* when the sweep was interrupted before
    it ended. (Tune's result grid shows the trial in flight at a Ctrl-C as
    terminated, like an ASHA stop; its saved state keeps it running, and a
    resume runs it again.)
    """
    outcomes = []
    # ResultGrid keeps its trials in this order; their Tune status tells stopped from interrupted.
    trials = result_grid_trials(result_grid)
    for index, trial in enumerate(trials):
        result = result_grid[index]
        metrics = dict(result.metrics or {})
        trial_id = trial.trial_id
        record = read_json(sweep_dir / "trials" / str(trial_id) / TRIAL_RECORD)
        history = []
        if result.metrics_dataframe is not None and "eval_loss" in result.metrics_dataframe:
            frame = result.metrics_dataframe
            by_step: dict[int, dict[str, float]] = {}
            for _, row in frame[frame["eval_loss"].notna()].iterrows():
                # A trial restored from a checkpoint reports the steps after it again: keep the last.
                by_step[int(row["step"])] = {"step": int(row["step"]), "tokens_seen": float(row["tokens_seen"]),
                                             "flops_seen": float(row.get("flops_seen", math.nan)),
                                             "eval_loss": float(row["eval_loss"])}
            history = [by_step[step] for step in sorted(by_step)]
        max_steps = int(record.get("max_steps") or 0)
        step = int(metrics.get("step") or 0)
        # Tune's view decides: a trial whose last report was its final step finished, even if its actor
        # was stopped before the trial function returned (its record then still says running).
        if trial.status == "ERROR":
            status = "error"
        elif trial.status == "TERMINATED" and max_steps and step >= max_steps:
            status = "finished"
        elif trial.status == "TERMINATED" and str(trial_id) in stopped:
            status = "stopped"
        else:
            status = "unfinished"
        eval_losses = [row["eval_loss"] for row in history]
        outcomes.append({
            "trial_id": str(trial_id),
            "params": record.get("params") or {k.removeprefix("config/"): v for k, v in metrics.items()
                                                if k.startswith("config/")},
            "model": record.get("model"),
            "status": status,
            "error": record.get("error") or (str(result.error).splitlines()[0][:300] if result.error else None),
            "step": step,
            "max_steps": max_steps,
            "evaluations": int(metrics.get("evaluations") or 0),
            "N": record.get("non_embedding_parameters"),
            "D": float(metrics.get("tokens_seen") or 0),
            "flops_seen": float(metrics.get("flops_seen") or 0),
            "eval_loss": eval_losses[-1] if eval_losses else None,
            "best_eval_loss": min(eval_losses) if eval_losses else None,
            "history": history,
            "mlflow_run_id": record.get("mlflow_run_id"),
            # TuneReportCallback adds the path of each reported checkpoint to the metrics.
            "checkpoint_dir": record.get("checkpoint_dir") or metrics.get("checkpoint_path"),
            "run_dir": str(sweep_dir / "trials" / str(trial_id)),
        })
    ranked = sorted(outcomes, key=lambda row: (row["eval_loss"] is None, row["eval_loss"] or 0.0))
    for rank, row in enumerate(ranked, 1):
        row["rank"] = rank
    return ranked


def scaling_points(outcomes: list[dict[str, Any]]):
    """The fit's points: (N, D, final dev loss) of each trial that trained to the end of its schedule.

    Trials ASHA stopped, and every intermediate evaluation, are left out: their
    learning rate had not decayed, so their loss overstates what a run trained
    to that many tokens reaches (the law describes runs trained to D).
    """
    return [ScalingPoint(N=float(row["N"]), D=row["D"], L=row["eval_loss"], label=row["trial_id"])
            for row in outcomes if row["status"] == "finished" and row["eval_loss"] is not None and row["N"]]


def finish_sweep(job: JobConfig, sweep_dir: Path, record: dict[str, Any], outcomes: list[dict[str, Any]],
                 tokenizer, interrupted: bool = False) -> dict[str, Any]:
    """Fit, plot, tabulate, export the best model and log everything to the parent run."""
    tracking_uri = job.resolved_tracking_uri()
    for row in outcomes:  # a trial Tune stopped ends with its actor, before it could close its run
        if row["mlflow_run_id"] and tracking_uri and row["status"] in ("stopped", "finished"):
            if row["status"] == "stopped":
                terminate_run(tracking_uri, row["mlflow_run_id"], "KILLED", "stopped_early")
            else:
                terminate_run(tracking_uri, row["mlflow_run_id"], "FINISHED", "finished")
    points = scaling_points(outcomes)
    fit, fit_problem = None, None
    if job.train.lora is not None:
        fit_problem = "a LoRA sweep adapts one pretrained model: there is no model size to fit a scaling law over"
    elif len(points) >= job.tune.min_fit_trials:
        try:
            fit = fit_scaling_law(points, bootstrap_samples=job.tune.bootstrap_samples, seed=job.tune.seed)
        except FitError as err:
            fit_problem = str(err)
    else:
        fit_problem = (f"{len(points)} trials finished; the scaling-law fit needs tune.min_fit_trials="
                       f"{job.tune.min_fit_trials}")
    finished = [row for row in outcomes if row["status"] == "finished"]
    best = min(finished, key=lambda row: row["eval_loss"]) if finished else None
    results = {
        "sweep_id": record["sweep_id"], "sweep_dir": str(sweep_dir), "status": "interrupted" if interrupted else
        "finished", "base_config": job.public_dict(), "trials": outcomes,
        "num_trials": len(outcomes), "num_finished": len(finished),
        "num_stopped": sum(1 for row in outcomes if row["status"] == "stopped"),
        "num_errors": sum(1 for row in outcomes if row["status"] == "error"),
        "total_steps": sum(row["step"] for row in outcomes),
        "best_trial": best["trial_id"] if best else None,
        "best_eval_loss": best["eval_loss"] if best else None,
        "fit": fit.to_dict() if fit else None, "fit_problem": fit_problem,
        "parent_run_id": record.get("parent_run_id"),
    }
    artifacts = [report.write_table(outcomes, sweep_dir / TABLE_FILE)]
    plot = report.plot_loss_vs_compute(outcomes, fit, sweep_dir / "loss_vs_compute.png")
    if plot:
        artifacts.append(plot)
    if fit:
        artifacts.append(report.plot_fit(points, fit, sweep_dir / "scaling_fit.png"))
    write_json(sweep_dir / RESULTS_FILE, results)
    artifacts.append(sweep_dir / RESULTS_FILE)
    for line in report.format_table(outcomes):
        logger.info(line)
    if fit:
        logger.info("scaling-law fit L(N, D) = E + A/N^alpha + B/D^beta on the finished trials:")
        for line in fit.describe():
            logger.info(line)
    elif fit_problem:
        logger.info(f"no scaling-law fit: {fit_problem}")
    model_dir = None
    if best and job.tune.export_best and not interrupted:
        model_dir = export_best_model(best, job, sweep_dir, tokenizer, record)
        results["best_model_dir"] = str(model_dir)
        logger.info(f"best trial {best['trial_id']} ({best['model']}, eval loss {best['eval_loss']:.4f}) "
                    f"-> {model_dir}")
    if record.get("parent_run_id") and tracking_uri:
        results["registry_uri"] = log_sweep_to_parent(job, record["parent_run_id"], tracking_uri, results,
                                                      artifacts, model_dir, interrupted)
        write_json(sweep_dir / RESULTS_FILE, results)
    record["status"] = results["status"]
    write_json(sweep_dir / SWEEP_RECORD, record)
    return results


def export_best_model(best: dict[str, Any], job: JobConfig, sweep_dir: Path, tokenizer,
                      record: dict[str, Any]) -> Path:
    """The best finished trial's final checkpoint as a model folder (``<sweep>/best_model``)."""
    checkpoint, problems = find_valid_checkpoint(best["checkpoint_dir"])
    if checkpoint is None:
        raise RuntimeError(f"the best trial {best['trial_id']} left no valid checkpoint: {'; '.join(problems)}")
    trial = trial_job({"base": job.public_dict(), "sweep_dir": str(sweep_dir)}, best["params"], best["trial_id"])
    card = {"sweep_id": record["sweep_id"], "trial_id": best["trial_id"], "params": best["params"],
            "config": trial.public_dict(), "data_fingerprint": record.get("data_fingerprint"),
            "train_metrics": {"eval_loss": best["eval_loss"]}}
    return export_model(Path(checkpoint), tokenizer, sweep_dir / "best_model", card, lora=trial.train.lora,
                        base=trial.model.init_from if trial.train.lora is not None else None)


def log_sweep_to_parent(job: JobConfig, parent_run_id: str, tracking_uri: str, results: dict[str, Any],
                        artifacts: list[Path], model_dir: Path | None, interrupted: bool) -> str | None:
    """Summary metrics, the table, plots and fit on the parent run; the best model registered if asked."""
    metrics = {"num_trials": results["num_trials"], "num_finished": results["num_finished"],
               "num_stopped": results["num_stopped"], "total_steps": results["total_steps"]}
    if results["best_eval_loss"] is not None:
        metrics["best_eval_loss"] = results["best_eval_loss"]
    if results["fit"]:
        metrics.update({f"fit_{name}": results["fit"][name] for name in ("E", "A", "alpha", "B", "beta", "r2")})
    tracking.log_metrics(tracking_uri, parent_run_id, metrics)
    client = MlflowClient(tracking_uri=tracking_uri)
    client.set_tag(parent_run_id, "raylm.best_trial", str(results["best_trial"]))
    for artifact in artifacts:
        client.log_artifact(parent_run_id, str(artifact))
    if interrupted:
        client.set_terminated(parent_run_id, status="KILLED")
        return None
    if model_dir is not None:
        name = job.tracking.model_name if job.tune.register_best and job.tracking.register_model else None
        return tracking.finish_run(tracking_uri, parent_run_id, model_dir, {}, name)
    client.set_terminated(parent_run_id, status="FINISHED")
    return None
