"""One trial of a sweep: a ``raylm train`` run of the sweep's config with the trial's parameters.

:func:`run_trial` is the Tune function trainable. It builds the same
``TorchTrainer`` as ``raylm train`` (:func:`raylm.train.driver.build_trainer`)
with Tune's ``TuneReportCallback``, in the trial's own folder
``<sweep>/trials/<trial id>`` (so a restored sweep resumes the trial from its
own checkpoints), with an MLflow child run under the sweep's parent run.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.util.placement_group import placement_group_table, remove_placement_group

from raylm.common import tracking
from raylm.compat.ray import on_worker_group_start, placement_group_from_hex
from raylm.config import JobConfig
from raylm.models.shapes import non_embedding_parameters
from raylm.train.driver import build_trainer, fit_trainer
from raylm.tune.records import TRIAL_RECORD, read_json, write_json
from raylm.tune.space import validate_trial


def trial_job(sweep: dict[str, Any], params: dict[str, Any], trial_id: str) -> JobConfig:
    """The job config of trial ``trial_id``: the sweep's base config with ``params``, in the sweep's folder."""
    job = validate_trial(sweep["base"], params)
    if sweep.get("tracking_uri"):
        # The default store lives in the workdir, which a trial moves: keep the sweep's store.
        job.tracking.tracking_uri = sweep["tracking_uri"]
    job.workdir = str(Path(sweep["sweep_dir"]) / "trials")
    job.run_name = "trial"
    job.run_id = trial_id
    return job


def start_child_run(sweep: dict[str, Any], job: JobConfig, trial_id: str, params: dict[str, Any]) -> str | None:
    if not sweep.get("parent_run_id"):
        return None
    tags = {"mlflow.parentRunId": sweep["parent_run_id"], "raylm.sweep_id": sweep["sweep_id"],
            "raylm.trial_id": trial_id, "raylm.trial_params": json.dumps(params, default=str)}
    for attempt in range(5):  # trials start together and share the tracking store
        try:
            return tracking.start_run(sweep["tracking_uri"], sweep["experiment"], f"{sweep['sweep_id']}/{trial_id}",
                                      job.public_dict(), tags=tags)
        except Exception:
            if attempt == 4:
                raise
            time.sleep(1 + attempt)
    return None


def run_trial(config: dict[str, Any], sweep: dict[str, Any], data: dict[str, Any]) -> None:
    """Tune function trainable: one ``raylm train`` run of the sweep's config with ``config`` set.

    The run's folder and Ray Train storage come from the Tune trial id, so a
    restored sweep resumes the trial from its own checkpoints; its MLflow child
    run is reopened, not duplicated. Metrics reach Tune through
    ``TuneReportCallback`` at every evaluation.
    """
    trial_id = tune.get_context().get_trial_id()
    params = dict(config)
    job = trial_job(sweep, params, trial_id)
    job.run_dir.mkdir(parents=True, exist_ok=True)
    record_path = job.run_dir / TRIAL_RECORD
    record = read_json(record_path) or {"trial_id": trial_id, "params": params, "starts": 0,
                                         # A LoRA sweep adapts one pretrained model: no N to fit over.
                                         "non_embedding_parameters": None if job.model.init_from
                                         else non_embedding_parameters(job.model),
                                         "model": job.model.describe(), "max_steps": job.train.max_steps}
    if record.get("status") == "finished" and record.get("metrics"):
        # The sweep was interrupted after this trial finished but before Tune recorded it as done
        # (its experiment state still said running): a restored sweep reruns the trial function.
        # Give Tune the final result again instead of training (or restarting) anything.
        tune.report(dict(record["metrics"]))
        return
    record.update(status="running", starts=record["starts"] + 1, started=time.time())
    if record.get("mlflow_run_id"):
        tracking.reopen_run(sweep["tracking_uri"], record["mlflow_run_id"])
    else:
        record["mlflow_run_id"] = start_child_run(sweep, job, trial_id, params)
    write_json(record_path, record)

    # Read by Ray Train when it starts the controller, and propagated to it and its workers (as is the
    # health-check interval fit_trainer sets).
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = str(sweep["trial_start_timeout_s"])
    trainer = build_trainer(job, data["train"], data["dev"], data["tokenizer"],
                            mlflow_run_id=record["mlflow_run_id"],
                            callbacks=[TuneReportCallback(), placement_group_recorder(str(job.run_dir))])
    # A worker group that cannot be placed is a controller failure, which Ray Train retries
    # forever by default: fail the trial after one start timeout instead.
    trainer.run_config.failure_config.controller_failure_limit = 0
    try:
        result = fit_trainer(job, trainer)
    except Exception as err:
        message = describe_trial_error(err, job, sweep["trial_start_timeout_s"])
        record.update(status="error", error=message, ended=time.time())
        write_json(record_path, record)
        if record["mlflow_run_id"]:
            tracking.fail_run(sweep["tracking_uri"], record["mlflow_run_id"])
        raise RuntimeError(message) from None
    metrics = {key: value for key, value in result.metrics.items() if isinstance(value, (int, float))}
    record.update(status="finished", ended=time.time(), metrics=metrics, checkpoint_dir=str(result.checkpoint_dir),
                  best_checkpoint_dir=str(result.best_checkpoint_dir) if result.best_checkpoint_dir else None)
    write_json(record_path, record)
    if record["mlflow_run_id"]:
        final = {"final_eval_loss": metrics.get("eval_loss"), "non_embedding_parameters":
                 record["non_embedding_parameters"], "tokens_seen": metrics.get("tokens_seen")}
        tracking.log_metrics(sweep["tracking_uri"], record["mlflow_run_id"],
                             {key: value for key, value in final.items() if value is not None})
        terminate_run(sweep["tracking_uri"], record["mlflow_run_id"], "FINISHED", "finished")


def describe_trial_error(err: Exception, job: JobConfig, timeout_s: float) -> str:
    """One line that says why a trial failed: missing resources, or the innermost exception of the worker."""
    text = f"{type(err).__name__}: {err}"
    if "WorkerGroupStartupTimeoutError" in text or "worker group startup timed out" in text:
        train = job.train
        needs = f"{train.num_workers} x {train.cpus_per_worker} CPU" + (f" + {train.num_workers} GPU"
                                                                        if train.use_gpu else "")
        return (f"the trial's {train.num_workers} workers ({needs}) could not be placed within "
                f"{timeout_s:g} s (tune.trial_start_timeout_s): the cluster lacks the resources")
    # Ray wraps the worker's exception in a WorkerGroupError whose first line says only that:
    # name the innermost exception instead.
    causes = [match.group(0).strip() for match in re.finditer(r"^\s*[\w.]*(?:Error|Exception)\b: .+$", text, re.M)
              if "WorkerGroupError" not in match.group(0) and "TrainingFailedError" not in match.group(0)]
    first_line = causes[-1] if causes else (text.strip().splitlines()[0] if text.strip() else type(err).__name__)
    return first_line[:500]


def terminate_run(tracking_uri: str, run_id: str, status: str, trial_status: str) -> None:
    """End a trial's MLflow run with ``status`` and tag how the trial ended (``trial_status``)."""
    client = MlflowClient(tracking_uri=tracking_uri)
    client.set_tag(run_id, "raylm.trial_status", trial_status)
    client.set_terminated(run_id, status=status)


# --------------------------------------------------------------------------- placement groups

PLACEMENT_GROUPS_FILE = "placement_groups.txt"


def placement_group_recorder(trial_dir: str):
    """A Ray Train callback that writes the id of each worker placement group of a trial to its folder.

    Ray Train V2 creates the workers' placement group from its controller, and
    the group lives as long as the driver's job. When Tune stops a trial (ASHA),
    the trial's actor and its controller die without removing it; Ray Train's own
    cleaner needs the state API (the dashboard), which a local Ray without it
    lacks. The sweep removes the recorded groups itself (:func:`release_placement_groups`).
    """
    def record(group_id: str) -> None:
        with open(Path(trial_dir) / PLACEMENT_GROUPS_FILE, "a") as handle:
            handle.write(group_id + "\n")

    return on_worker_group_start(record)


def release_placement_groups(trial_dir: Path) -> int:
    """Remove the worker placement groups a trial recorded that still exist; returns how many were removed."""
    path = Path(trial_dir) / PLACEMENT_GROUPS_FILE
    if not path.is_file():
        return 0
    removed = 0
    for line in path.read_text().split():
        group = placement_group_from_hex(line)
        try:
            if placement_group_table(group).get("state") not in (None, "REMOVED"):
                remove_placement_group(group)
                removed += 1
        except Exception:  # already gone
            continue
    return removed
