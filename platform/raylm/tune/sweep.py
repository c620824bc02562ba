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

import logging
import os
import time
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.tune.schedulers import FIFOScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator

from raylm.common import cluster, tracking
from raylm.common.ray_session import ensure_ray
from raylm.common.run_ids import new_run_id
from raylm.checks import validate_job
from raylm.config import ConfigError, JobConfig
from raylm.config.redaction import redact_uri
from raylm.data.execution import quiet_progress
from raylm.data.pipeline import prepare_data
from raylm.data.plan import check_sources
from raylm.tune.outcomes import collect_outcomes, finish_sweep, scaling_points
from raylm.tune.records import RESULTS_FILE, SWEEP_RECORD, locate_sweep, read_json, write_json
from raylm.tune.scheduler import STATE_FILE, ResumableASHA, stopped_trials
from raylm.tune.space import tune_param_space, validate_sweep
from raylm.tune.trial import release_placement_groups, run_trial

logger = logging.getLogger(__name__)

__all__ = ["RESULTS_FILE", "collect_outcomes", "default_concurrency", "locate_sweep", "run_sweep", "scaling_points"]

TUNE_EXPERIMENT = "tune"
TRIAL_CPU = 0.01  # the trainable only waits on its Train controller; the Train workers hold the CPUs


# --------------------------------------------------------------------------- progress


def progress_callback(expected: int, trials_dir: Path):
    """A Tune callback that logs one line per trial event and per evaluation."""

    class SweepProgress(tune.Callback):
        """One line per trial event and per evaluation, so a sweep's progress reads like a training log."""

        def __init__(self):
            self.completed: set[str] = set()
            self.errored: set[str] = set()

        def on_trial_start(self, iteration, trials, trial, **info):
            params = ", ".join(f"{key}={value}" for key, value in trial.config.items())
            logger.info(f"trial {trial.trial_id} started: {params}")

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if "eval_loss" in result:
                logger.info(f"trial {trial.trial_id}: step {result.get('step')}, eval loss {result['eval_loss']:.4f} "
                            f"(evaluation {result.get('evaluations')}, {len(self.completed)}/{expected} trials done)")

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.completed.add(trial.trial_id)
            release_placement_groups(trials_dir / trial.trial_id)
            result = trial.last_result or {}
            logger.info(f"trial {trial.trial_id} ended at step {result.get('step')} "
                        f"({len(self.completed)}/{expected} trials done)")

        def on_trial_error(self, iteration, trials, trial, **info):
            self.errored.add(trial.trial_id)
            release_placement_groups(trials_dir / trial.trial_id)
            logger.info(f"trial {trial.trial_id} failed ({len(self.completed) + len(self.errored)}/{expected})")

    return SweepProgress()


# --------------------------------------------------------------------------- the sweep


def _check_cluster(job: JobConfig) -> None:
    """Fail before any trial starts when one trial's workers cannot fit the Ray cluster at all."""
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
    if job.tune.max_concurrent_trials:
        return job.tune.max_concurrent_trials
    train = job.train
    total = ray.cluster_resources()
    by_cpu = int((total.get("CPU", 0) - 1) // (train.num_workers * train.cpus_per_worker))
    by_gpu = int(total.get("GPU", 0) // train.num_workers) if train.use_gpu else by_cpu
    return max(1, min(by_cpu, by_gpu))


def _build_tuner(job: JobConfig, sweep: dict[str, Any], data: dict[str, Any], summary: dict[str, Any],
                 callback, restore_from: Path | None):
    trainable = tune.with_resources(tune.with_parameters(run_trial, sweep=sweep, data=data), {"CPU": TRIAL_CPU})
    if restore_from is not None:
        return tune.Tuner.restore(str(restore_from), trainable=trainable, resume_unfinished=True,
                                  resume_errored=False, restart_errored=False)
    settings = job.tune
    if settings.scheduler == "asha":
        # max_t one past the last evaluation: ASHA stops any trial that reaches max_t, which would kill a
        # trial's actor on its final report, before it could close its run. Its rungs are kept in the sweep
        # folder: Tuner.restore would start them empty (raylm.tune.scheduler).
        scheduler = ResumableASHA(Path(sweep["sweep_dir"]) / STATE_FILE, time_attr="evaluations",
                                  max_t=summary["max_evaluations"] + 1,
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


def run_sweep(job: JobConfig | None, resume: str | None = None) -> dict[str, Any]:
    """Run (or with ``resume``, a sweep folder, continue) the sweep ``job.tune`` describes; returns its summary.

    The summary holds the ranked trials, the scaling-law fit (when enough trials
    finished), the paths of the table and plots, and the MLflow parent run.
    """
    if resume is not None:
        sweep_dir = locate_sweep(resume)
        record = read_json(sweep_dir / SWEEP_RECORD)
        job = validate_job(record["config"])
    summary = validate_sweep(job)
    cluster.check_local_inputs(job)
    check_sources(job)
    if resume is None:
        sweep_id = new_run_id(job.run_name)
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
    write_json(sweep_dir / SWEEP_RECORD, record)
    logger.info(("resuming sweep " if resume else "sweep ") + f"{record['sweep_id']} in {sweep_dir}: "
                f"{summary['num_trials']} trials ({job.tune.search} search, scheduler {job.tune.scheduler})")

    ensure_ray(job)
    _check_cluster(job)
    logger.info("preparing data with Ray Data (once, for every trial)")
    with quiet_progress():
        data = prepare_data(job)
    if record.get("data_fingerprint") not in (None, data.fingerprint):
        raise ConfigError(f"resume: sweep {record['sweep_id']} trained on data {record['data_fingerprint']}, "
                          f"but the configured data is now {data.fingerprint}")
    record["data_fingerprint"] = data.fingerprint
    logger.info(f"data ready: {data.stats['num_train_rows']} train rows, vocab {data.stats['vocab_size']}, "
                f"fingerprint {data.fingerprint}")

    tracking_uri = job.resolved_tracking_uri()
    if job.tracking.enabled and tracking_uri:
        if record.get("parent_run_id"):
            tracking.reopen_run(tracking_uri, record["parent_run_id"])
        else:
            record["parent_run_id"] = tracking.start_run(
                tracking_uri, job.tracking.experiment, record["sweep_id"], job.public_dict(),
                tags={"raylm.sweep_id": record["sweep_id"], "raylm.kind": "sweep"})
        logger.info(f"MLflow parent run {record['parent_run_id']} at {redact_uri(tracking_uri)}")
    write_json(sweep_dir / SWEEP_RECORD, record)
    concurrency = default_concurrency(job)
    sweep = {"sweep_id": record["sweep_id"], "sweep_dir": str(sweep_dir), "base": job.public_dict(),
             "parent_run_id": record.get("parent_run_id"), "tracking_uri": tracking_uri,
             "experiment": job.tracking.experiment, "trial_start_timeout_s": job.tune.trial_start_timeout_s,
             "max_concurrent_trials": concurrency}
    callback = progress_callback(summary["num_trials"], sweep_dir / "trials")
    restore_from = sweep_dir / TUNE_EXPERIMENT if resume is not None else None
    if restore_from is not None and not restore_from.is_dir():
        restore_from = None  # interrupted before Tune wrote its state: start the trials afresh
    tuner = _build_tuner(job, sweep, {"train": data.train, "dev": data.dev, "tokenizer": data.tokenizer},
                         summary, callback, restore_from)
    logger.info(f"running up to {concurrency} trials at once")
    started = time.time()
    try:
        result_grid = tuner.fit()
    except BaseException:
        record["status"] = "interrupted"
        write_json(sweep_dir / SWEEP_RECORD, record)
        raise
    outcomes = collect_outcomes(sweep_dir, result_grid, stopped_trials(sweep_dir / STATE_FILE))
    for row in outcomes:  # a trial stopped between the callbacks' turns
        if row["status"] in ("stopped", "error", "unfinished"):  # nothing runs once fit() returned
            release_placement_groups(Path(row["run_dir"]))
    done = sum(1 for outcome in outcomes if outcome["status"] in ("finished", "stopped", "error"))
    interrupted = done < summary["num_trials"]
    report = finish_sweep(job, sweep_dir, record, outcomes, data.tokenizer, interrupted)
    report["sweep_seconds"] = round(time.time() - started, 1)
    if interrupted:
        logger.info(f"sweep interrupted with {done}/{summary['num_trials']} trials done; continue it with "
                    f"raylm tune --resume {sweep_dir}")
    return report
