"""``raylm tune``: a Ray Tune sweep whose trials are ``raylm train`` runs on Ray Train V2.

The sweep:

1. checks the space before Ray starts (:mod:`raylm.tune.space`);
2. gives the sweep an id and a folder ``<workdir>/<sweep id>`` (``sweep.json``
   records the config, the data fingerprint and the MLflow parent run);
3. prepares the data once on the driver (the demo corpus, or the prepared
   Parquet cache) and hands the same datasets and tokenizer to every trial
   through ``tune.with_parameters``: no trial tokenizes anything;
4. runs a Tune function trainable per trial that builds the same
   ``TorchTrainer`` as ``raylm train`` (:func:`raylm.train.driver.build_trainer`)
   with Tune's ``TuneReportCallback``: every evaluation of the workers reaches
   Tune, and ASHA stops the trials that fall behind at its rungs;
5. collects every trial's outcome, fits the scaling law on the finished
   trials, draws the plots, prints the ranked table and logs it all to the
   MLflow parent run (one child run per trial).

Each trial's run folder is ``<sweep>/trials/<trial id>``; a restored sweep
(``raylm tune --resume <sweep folder>``, ``Tuner.restore``) gives a resumed
trial the same id and so the same folder, whose checkpoints Ray Train resumes from.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable

from raylm.checks import validate_job
from raylm.compat.ray import on_worker_group_start, placement_group_from_hex, result_grid_trials
from raylm.config import ConfigError, JobConfig

Log = Callable[[str], None]

SWEEP_RECORD = "sweep.json"
TRIAL_RECORD = "trial.json"
RESULTS_FILE = "results.json"
TABLE_FILE = "results.csv"
TUNE_EXPERIMENT = "tune"
TRIAL_CPU = 0.01  # the trainable only waits on its Train controller; the Train workers hold the CPUs
# Ray Train V2's controller takes one worker report per health-check poll (2 s by default): with
# tiny trials evaluating every few seconds that poll, not training, would set the pace.
SWEEP_HEALTH_CHECK_INTERVAL_S = "0.5"


def _print(message: str) -> None:
    print(f"[raylm] {message}", flush=True)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(data, indent=2, default=str))
    temporary.replace(path)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}


# --------------------------------------------------------------------------- the trial


def trial_job(sweep: dict[str, Any], params: dict[str, Any], trial_id: str) -> JobConfig:
    """The job config of trial ``trial_id``: the sweep's base config with ``params``, in the sweep's folder."""
    from raylm.tune.space import validate_trial

    job = validate_trial(sweep["base"], params)
    if sweep.get("tracking_uri"):
        # The default store lives in the workdir, which a trial moves: keep the sweep's store.
        job.tracking.tracking_uri = sweep["tracking_uri"]
    job.workdir = str(Path(sweep["sweep_dir"]) / "trials")
    job.run_name = "trial"
    job.run_id = trial_id
    return job


def _start_child_run(sweep: dict[str, Any], job: JobConfig, trial_id: str, params: dict[str, Any]) -> str | None:
    from raylm.common import tracking

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
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from raylm.common import tracking
    from raylm.models.registry import non_embedding_parameters
    from raylm.train.driver import build_trainer, fit_trainer

    trial_id = tune.get_context().get_trial_id()
    params = dict(config)
    job = trial_job(sweep, params, trial_id)
    job.run_dir.mkdir(parents=True, exist_ok=True)
    record_path = job.run_dir / TRIAL_RECORD
    record = _read_json(record_path) or {"trial_id": trial_id, "params": params, "starts": 0,
                                         "non_embedding_parameters": non_embedding_parameters(job.model),
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
        record["mlflow_run_id"] = _start_child_run(sweep, job, trial_id, params)
    _write_json(record_path, record)

    # Read by Ray Train when it starts the controller, and propagated to it and its workers.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", SWEEP_HEALTH_CHECK_INTERVAL_S)
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = str(sweep["trial_start_timeout_s"])
    trainer = build_trainer(job, data["train"], data["dev"], data["tokenizer"],
                            mlflow_run_id=record["mlflow_run_id"],
                            callbacks=[TuneReportCallback(), _placement_group_recorder(str(job.run_dir))])
    # A worker group that cannot be placed is a controller failure, which Ray Train retries
    # forever by default: fail the trial after one start timeout instead.
    trainer.run_config.failure_config.controller_failure_limit = 0
    try:
        result = fit_trainer(job, trainer)
    except Exception as err:
        message = _describe_trial_error(err, job, sweep["trial_start_timeout_s"])
        record.update(status="error", error=message, ended=time.time())
        _write_json(record_path, record)
        if record["mlflow_run_id"]:
            tracking.fail_run(sweep["tracking_uri"], record["mlflow_run_id"])
        raise RuntimeError(message) from None
    metrics = {key: value for key, value in result.metrics.items() if isinstance(value, (int, float))}
    record.update(status="finished", ended=time.time(), metrics=metrics, checkpoint_dir=str(result.checkpoint_dir),
                  best_checkpoint_dir=str(result.best_checkpoint_dir) if result.best_checkpoint_dir else None)
    _write_json(record_path, record)
    if record["mlflow_run_id"]:
        final = {"final_eval_loss": metrics.get("eval_loss"), "non_embedding_parameters":
                 record["non_embedding_parameters"], "tokens_seen": metrics.get("tokens_seen")}
        tracking.log_metrics(sweep["tracking_uri"], record["mlflow_run_id"],
                             {key: value for key, value in final.items() if value is not None})
        _terminate_run(sweep["tracking_uri"], record["mlflow_run_id"], "FINISHED", "finished")


def _describe_trial_error(err: Exception, job: JobConfig, timeout_s: float) -> str:
    text = f"{type(err).__name__}: {err}"
    if "WorkerGroupStartupTimeoutError" in text or "worker group startup timed out" in text:
        train = job.train
        needs = f"{train.num_workers} x {train.cpus_per_worker} CPU" + (f" + {train.num_workers} GPU"
                                                                        if train.use_gpu else "")
        return (f"the trial's {train.num_workers} workers ({needs}) could not be placed within "
                f"{timeout_s:g} s (tune.trial_start_timeout_s): the cluster lacks the resources")
    # Ray wraps the worker's exception in a WorkerGroupError whose first line says only that:
    # name the innermost exception instead.
    import re

    causes = [match.group(0).strip() for match in re.finditer(r"^\s*[\w.]*(?:Error|Exception)\b: .+$", text, re.M)
              if "WorkerGroupError" not in match.group(0) and "TrainingFailedError" not in match.group(0)]
    first_line = causes[-1] if causes else (text.strip().splitlines()[0] if text.strip() else type(err).__name__)
    return first_line[:500]


def _terminate_run(tracking_uri: str, run_id: str, status: str, trial_status: str) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    client.set_tag(run_id, "raylm.trial_status", trial_status)
    client.set_terminated(run_id, status=status)


# --------------------------------------------------------------------------- placement groups

PLACEMENT_GROUPS_FILE = "placement_groups.txt"


def _placement_group_recorder(trial_dir: str):
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
    from ray.util.placement_group import placement_group_table, remove_placement_group

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


# --------------------------------------------------------------------------- progress


def _progress_callback(log: Log, expected: int, trials_dir: Path):
    from ray.tune import Callback

    class SweepProgress(Callback):
        """One line per trial event and per evaluation, so a sweep's progress reads like a training log."""

        def __init__(self):
            self.completed: set[str] = set()
            self.errored: set[str] = set()

        def on_trial_start(self, iteration, trials, trial, **info):
            params = ", ".join(f"{key}={value}" for key, value in trial.config.items())
            log(f"trial {trial.trial_id} started: {params}")

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if "eval_loss" in result:
                log(f"trial {trial.trial_id}: step {result.get('step')}, eval loss {result['eval_loss']:.4f} "
                    f"(evaluation {result.get('evaluations')}, {len(self.completed)}/{expected} trials done)")

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.completed.add(trial.trial_id)
            release_placement_groups(trials_dir / trial.trial_id)
            result = trial.last_result or {}
            log(f"trial {trial.trial_id} ended at step {result.get('step')} "
                f"({len(self.completed)}/{expected} trials done)")

        def on_trial_error(self, iteration, trials, trial, **info):
            self.errored.add(trial.trial_id)
            release_placement_groups(trials_dir / trial.trial_id)
            log(f"trial {trial.trial_id} failed ({len(self.completed) + len(self.errored)}/{expected})")

    return SweepProgress()


# --------------------------------------------------------------------------- the sweep


def locate_sweep(reference: str) -> Path:
    """The sweep folder ``reference`` names (a folder with ``sweep.json``); ConfigError otherwise."""
    folder = Path(reference)
    if not (folder / SWEEP_RECORD).is_file():
        raise ConfigError(f"resume: {reference} is not a sweep folder (no {SWEEP_RECORD})")
    return folder.resolve()


def _check_cluster(job: JobConfig) -> None:
    """Fail before any trial starts when one trial's workers cannot fit the Ray cluster at all."""
    import ray

    if os.environ.get("RAY_ADDRESS"):
        return  # a cluster may autoscale: trials that cannot be placed fail after trial_start_timeout_s
    train = job.train
    total = ray.cluster_resources()
    cpus = train.num_workers * train.cpus_per_worker
    if cpus + TRIAL_CPU > total.get("CPU", 0):
        raise ConfigError(f"tune: a trial needs {cpus:g} CPUs (train.num_workers x train.cpus_per_worker) but the "
                          f"Ray cluster has {total.get('CPU', 0):g}")
    if train.use_gpu and train.num_workers > total.get("GPU", 0):
        raise ConfigError(f"tune: a trial needs {train.num_workers} GPUs (train.num_workers, train.use_gpu) but the "
                          f"Ray cluster has {total.get('GPU', 0):g}")


def default_concurrency(job: JobConfig) -> int:
    """Trials that fit side by side: the cluster's CPUs (GPUs) over one trial's, one CPU kept for Ray Data."""
    import ray

    if job.tune.max_concurrent_trials:
        return job.tune.max_concurrent_trials
    train = job.train
    total = ray.cluster_resources()
    by_cpu = int((total.get("CPU", 0) - 1) // (train.num_workers * train.cpus_per_worker))
    by_gpu = int(total.get("GPU", 0) // train.num_workers) if train.use_gpu else by_cpu
    return max(1, min(by_cpu, by_gpu))


def _build_tuner(job: JobConfig, sweep: dict[str, Any], data: dict[str, Any], summary: dict[str, Any],
                 callback, restore_from: Path | None):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from raylm.tune.space import tune_param_space

    trainable = tune.with_resources(tune.with_parameters(run_trial, sweep=sweep, data=data), {"CPU": TRIAL_CPU})
    if restore_from is not None:
        return tune.Tuner.restore(str(restore_from), trainable=trainable, resume_unfinished=True,
                                  resume_errored=False, restart_errored=False)
    settings = job.tune
    if settings.scheduler == "asha":
        # max_t one past the last evaluation: ASHA stops any trial that reaches max_t, which would kill a
        # trial's actor on its final report, before it could close its run.
        scheduler = ASHAScheduler(time_attr="evaluations", max_t=summary["max_evaluations"] + 1,
                                  grace_period=min(settings.grace_period, summary["max_evaluations"]),
                                  reduction_factor=settings.reduction_factor)
    else:
        scheduler = FIFOScheduler()
    concurrency = sweep["max_concurrent_trials"]
    if settings.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search = OptunaSearch(seed=settings.seed)  # TuneConfig wraps it in a ConcurrencyLimiter
    else:
        # The variant generator limits concurrency itself (TuneConfig's limit would be ignored for it).
        search, concurrency = BasicVariantGenerator(random_state=settings.seed, max_concurrent=concurrency), None
    return tune.Tuner(
        trainable,
        param_space=tune_param_space(job),
        tune_config=tune.TuneConfig(metric=settings.metric, mode="min", search_alg=search, scheduler=scheduler,
                                    num_samples=settings.num_samples, max_concurrent_trials=concurrency),
        run_config=tune.RunConfig(name=TUNE_EXPERIMENT, storage_path=sweep["sweep_dir"], callbacks=[callback],
                                  verbose=0),
    )


def run_sweep(job: JobConfig, log: Log = _print, resume: str | None = None) -> dict[str, Any]:
    """Run (or with ``resume``, a sweep folder, continue) the sweep ``job.tune`` describes; returns its summary.

    The summary holds the ranked trials, the scaling-law fit (when enough trials
    finished), the paths of the table and plots, and the MLflow parent run.
    """
    from raylm.lifecycle import runs
    from raylm.common import tracking
    from raylm.data.pipeline import prepare_data
    from raylm.tune.space import validate_sweep
    from raylm.lifecycle.workflow import check_inputs, ensure_ray

    if resume is not None:
        sweep_dir = locate_sweep(resume)
        record = _read_json(sweep_dir / SWEEP_RECORD)
        job = validate_job(record["config"])
    summary = validate_sweep(job)
    check_inputs(job)
    if resume is None:
        sweep_id = runs.new_run_id(job.run_name)
        sweep_dir = Path(job.workdir).resolve() / sweep_id
        if (sweep_dir / SWEEP_RECORD).exists():
            raise ConfigError(f"sweep {sweep_id} already exists; continue it with --resume {sweep_dir}")
        sweep_dir.mkdir(parents=True)
        record = {"sweep_id": sweep_id, "config": job.public_dict(), "status": "running", "created": time.time(),
                  "num_trials": summary["num_trials"], "attempts": 1, "parent_run_id": None}
        (sweep_dir / "config.yaml").write_text(job.to_yaml())
    else:
        if record.get("status") == "finished":
            raise ConfigError(f"resume: sweep {record['sweep_id']} already finished; its results are in {sweep_dir}")
        record.update(status="running", attempts=int(record.get("attempts", 1)) + 1)
    _write_json(sweep_dir / SWEEP_RECORD, record)
    log(("resuming sweep " if resume else "sweep ") + f"{record['sweep_id']} in {sweep_dir}: "
        f"{summary['num_trials']} trials ({job.tune.search} search, scheduler {job.tune.scheduler})")

    ensure_ray(job, log)
    _check_cluster(job)
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    log("preparing data with Ray Data (once, for every trial)")
    data = prepare_data(job, log)
    if record.get("data_fingerprint") not in (None, data.fingerprint):
        raise ConfigError(f"resume: sweep {record['sweep_id']} trained on data {record['data_fingerprint']}, "
                          f"but the configured data is now {data.fingerprint}")
    record["data_fingerprint"] = data.fingerprint
    log(f"data ready: {data.stats['num_train_rows']} train rows, vocab {data.stats['vocab_size']}, "
        f"fingerprint {data.fingerprint}")

    tracking_uri = job.resolved_tracking_uri()
    if job.tracking.enabled and tracking_uri:
        if record.get("parent_run_id"):
            tracking.reopen_run(tracking_uri, record["parent_run_id"])
        else:
            record["parent_run_id"] = tracking.start_run(
                tracking_uri, job.tracking.experiment, record["sweep_id"], job.public_dict(),
                tags={"raylm.sweep_id": record["sweep_id"], "raylm.kind": "sweep"})
        log(f"MLflow parent run {record['parent_run_id']} at {tracking_uri}")
    _write_json(sweep_dir / SWEEP_RECORD, record)
    concurrency = default_concurrency(job)
    sweep = {"sweep_id": record["sweep_id"], "sweep_dir": str(sweep_dir), "base": job.public_dict(),
             "parent_run_id": record.get("parent_run_id"), "tracking_uri": tracking_uri,
             "experiment": job.tracking.experiment, "trial_start_timeout_s": job.tune.trial_start_timeout_s,
             "max_concurrent_trials": concurrency}
    callback = _progress_callback(log, summary["num_trials"], sweep_dir / "trials")
    restore_from = sweep_dir / TUNE_EXPERIMENT if resume is not None else None
    if restore_from is not None and not restore_from.is_dir():
        restore_from = None  # interrupted before Tune wrote its state: start the trials afresh
    tuner = _build_tuner(job, sweep, {"train": data.train, "dev": data.dev, "tokenizer": data.tokenizer},
                         summary, callback, restore_from)
    log(f"running up to {concurrency} trials at once")
    started = time.time()
    try:
        result_grid = tuner.fit()
    except BaseException:
        record["status"] = "interrupted"
        _write_json(sweep_dir / SWEEP_RECORD, record)
        raise
    outcomes = collect_outcomes(sweep_dir, result_grid)
    for row in outcomes:  # a trial stopped between the callbacks' turns
        if row["status"] in ("stopped", "error"):
            release_placement_groups(Path(row["run_dir"]))
    done = sum(1 for outcome in outcomes if outcome["status"] in ("finished", "stopped", "error"))
    interrupted = done < summary["num_trials"]
    report = finish_sweep(job, sweep_dir, record, outcomes, data.tokenizer, log, interrupted)
    report["sweep_seconds"] = round(time.time() - started, 1)
    if interrupted:
        log(f"sweep interrupted with {done}/{summary['num_trials']} trials done; continue it with "
            f"raylm tune --resume {sweep_dir}")
    return report


def collect_outcomes(sweep_dir: Path, result_grid) -> list[dict[str, Any]]:
    """One row per trial: its params, status (finished / stopped / error / unfinished), N, D, losses, curve.

    A trial is *finished* when it reached its ``train.max_steps``; *stopped*
    when Tune ended it before that (ASHA); *error* when it failed;
    *unfinished* when the sweep was interrupted before it ended.
    """
    outcomes = []
    # ResultGrid keeps its trials in this order; their Tune status tells stopped from interrupted.
    trials = result_grid_trials(result_grid)
    for index, trial in enumerate(trials):
        result = result_grid[index]
        metrics = dict(result.metrics or {})
        trial_id = trial.trial_id
        record = _read_json(sweep_dir / "trials" / str(trial_id) / TRIAL_RECORD)
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
        elif trial.status == "TERMINATED":
            status = "finished" if max_steps and step >= max_steps else "stopped"
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
    from raylm.tune.scaling import ScalingPoint

    return [ScalingPoint(N=float(row["N"]), D=row["D"], L=row["eval_loss"], label=row["trial_id"])
            for row in outcomes if row["status"] == "finished" and row["eval_loss"] is not None and row["N"]]


def finish_sweep(job: JobConfig, sweep_dir: Path, record: dict[str, Any], outcomes: list[dict[str, Any]],
                 tokenizer, log: Log, interrupted: bool = False) -> dict[str, Any]:
    """Fit, plot, tabulate, export the best model and log everything to the parent run."""
    from raylm.tune import report
    from raylm.tune.scaling import FitError, fit_scaling_law

    tracking_uri = job.resolved_tracking_uri()
    for row in outcomes:  # a trial Tune stopped ends with its actor, before it could close its run
        if row["mlflow_run_id"] and tracking_uri and row["status"] in ("stopped", "finished"):
            if row["status"] == "stopped":
                _terminate_run(tracking_uri, row["mlflow_run_id"], "KILLED", "stopped_early")
            else:
                _terminate_run(tracking_uri, row["mlflow_run_id"], "FINISHED", "finished")
    points = scaling_points(outcomes)
    fit, fit_problem = None, None
    if len(points) >= job.tune.min_fit_trials:
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
    _write_json(sweep_dir / RESULTS_FILE, results)
    artifacts.append(sweep_dir / RESULTS_FILE)
    for line in report.format_table(outcomes):
        log(line)
    if fit:
        log("scaling-law fit L(N, D) = E + A/N^alpha + B/D^beta on the finished trials:")
        for line in fit.describe():
            log(line)
    elif fit_problem:
        log(f"no scaling-law fit: {fit_problem}")
    model_dir = None
    if best and job.tune.export_best and not interrupted:
        model_dir = export_best_model(best, job, sweep_dir, tokenizer, record)
        results["best_model_dir"] = str(model_dir)
        log(f"best trial {best['trial_id']} ({best['model']}, eval loss {best['eval_loss']:.4f}) -> {model_dir}")
    if record.get("parent_run_id") and tracking_uri:
        results["registry_uri"] = log_sweep_to_parent(job, record["parent_run_id"], tracking_uri, results,
                                                      artifacts, model_dir, interrupted)
        _write_json(sweep_dir / RESULTS_FILE, results)
    record["status"] = results["status"]
    _write_json(sweep_dir / SWEEP_RECORD, record)
    return results


def export_best_model(best: dict[str, Any], job: JobConfig, sweep_dir: Path, tokenizer,
                      record: dict[str, Any]) -> Path:
    """The best finished trial's final checkpoint as a model folder (``<sweep>/best_model``)."""
    from raylm.train.checkpoint import find_valid_checkpoint
    from raylm.train.driver import export_model

    checkpoint, problems = find_valid_checkpoint(best["checkpoint_dir"])
    if checkpoint is None:
        raise RuntimeError(f"the best trial {best['trial_id']} left no valid checkpoint: {'; '.join(problems)}")
    card = {"sweep_id": record["sweep_id"], "trial_id": best["trial_id"], "params": best["params"],
            "config": trial_job({"base": job.public_dict(), "sweep_dir": str(sweep_dir)}, best["params"],
                                best["trial_id"]).public_dict(),
            "data_fingerprint": record.get("data_fingerprint"), "train_metrics": {"eval_loss": best["eval_loss"]}}
    return export_model(Path(checkpoint), tokenizer, sweep_dir / "best_model", card)


def log_sweep_to_parent(job: JobConfig, parent_run_id: str, tracking_uri: str, results: dict[str, Any],
                        artifacts: list[Path], model_dir: Path | None, interrupted: bool) -> str | None:
    """Summary metrics, the table, plots and fit on the parent run; the best model registered if asked."""
    from mlflow.tracking import MlflowClient

    from raylm.common import tracking

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
