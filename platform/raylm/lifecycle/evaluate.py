"""Evaluation of exported models, registry versions and trivial baselines, on the dev or test split.

:func:`evaluate_exported` scores a freshly exported model folder on the dev
split through the serving loader, with bootstrap intervals, and writes
``eval_report.json`` (per-example scores, for the promotion gate) beside the
weights, completing the card's lineage. :func:`evaluate_reference` evaluates
any model folder or registry URI (``raylm eval``), or a trivial baseline, and
counts evaluations on the test split per model.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Optional

from raylm.common.ray_session import ensure_ray
from raylm.common.tracking import get_model_version, mlflow_client, resolve_model_path
from raylm.config import ConfigError, JobConfig
from raylm.data.encoder_rows import read_split_rows
from raylm.data.plan import check_sources
from raylm.eval.baselines import build_baseline
from raylm.eval.runner import evaluate_model, format_report, select_rows
from raylm.inference.task_model import InferenceOptions, load_task_model
from raylm.lifecycle.export import write_card
from raylm.lifecycle.lineage import build_lineage

logger = logging.getLogger(__name__)

EVAL_REPORT_FILE = "eval_report.json"
TEST_LOG_FILE = "test_evaluations.jsonl"
TEST_COUNT_TAG = "raylm.test_evaluations"


def load_for_eval(model_dir: Path, job: JobConfig):
    """The task model the Serve deployment would load from ``model_dir``, for evaluation."""
    return load_task_model(model_dir, InferenceOptions(max_new_tokens=job.eval.max_new_tokens))


def log_report(report) -> None:
    """One line per metric of ``report``, with its interval."""
    for line in format_report(report):
        logger.info(line)


def evaluate_exported(job: JobConfig, model_dir: Path, rows: list[dict], card: dict[str, Any], split: str = "dev"):
    """Evaluate the exported model folder on ``rows``; writes ``eval_report.json`` and the card's eval section."""
    task_model = load_for_eval(model_dir, job)
    report = evaluate_model(task_model, rows, job.eval, model_ref=str(model_dir), split=split)
    log_report(report)
    (Path(model_dir) / EVAL_REPORT_FILE).write_text(report.to_json())
    card["eval_metrics"] = report.flat_metrics()
    card["eval"] = report.summary()
    lineage = card.setdefault("lineage", {})
    lineage.update(build_lineage(**{key: lineage.get(key) for key in (
        "run_id", "config_hash", "data_fingerprint", "mlflow_run_id", "parent_run_id", "exported_step", "base_model",
        "base_fingerprint")},
        eval_summary=report.summary()))
    write_card(model_dir, card)
    return report


def eval_rows(job: JobConfig, split: str) -> list[dict]:
    """Labelled rows of ``split`` (dev | test), at most ``eval.max_examples_per_task`` per task."""
    rows = read_split_rows(job, split)
    return [row for task_rows in select_rows(rows, job.eval.max_examples_per_task).values() for row in task_rows]


def note_test_use(job: JobConfig, model_path: str, folder: Path, report) -> None:
    """Count evaluations on the test split per model; warn from the second one on.

    A test split is for one final figure: looking at it again and acting on it
    turns it into a dev split. The count lives on the registered version (tag)
    or in the model folder (``test_evaluations.jsonl``).
    """
    entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "fingerprint": report.fingerprint,
             "metrics": report.metrics}
    if model_path.startswith("models:/"):
        tracking_uri = job.resolved_tracking_uri()
        version = get_model_version(tracking_uri, model_path)
        previous = int(version.tags.get(TEST_COUNT_TAG, "0"))
        client = mlflow_client(tracking_uri)
        client.set_model_version_tag(version.name, version.version, TEST_COUNT_TAG, str(previous + 1))
        client.set_model_version_tag(version.name, version.version, "raylm.test_metrics",
                                     json.dumps(entry, default=str)[:4900])
    else:
        path = Path(folder) / TEST_LOG_FILE
        previous = len(path.read_text().splitlines()) if path.is_file() else 0
        try:
            with path.open("a") as handle:
                handle.write(json.dumps(entry, default=str) + "\n")
        except OSError:
            logger.warning(f"could not record this test evaluation in {path}")
    if previous:
        logger.warning(f"this model was evaluated on the test split {previous} time(s) before; a test figure "
                       "is only unbiased the first time (select models on dev)")


def evaluate_reference(job: JobConfig, model_path: Optional[str], split: str = "dev",
                       output: Optional[Path] = None, baseline: Optional[str] = None):
    """Evaluate a model folder or registry URI on ``split`` of the configured corpus; returns the report.

    ``split=test`` reads ``data.test_sources`` (never used in training or
    selection) and records the evaluation on the model, warning when it is not
    the first. ``output`` receives the full report (per-example scores).
    ``baseline`` (instead of a model: majority, first-sentence, copy-source)
    scores a trivial baseline (:mod:`raylm.eval.baselines`) the same way.
    """
    if baseline is not None:
        return evaluate_baseline(job, baseline, split, output)
    if split not in ("dev", "test"):
        raise ConfigError(f"config error: --split must be dev or test, not {split!r}")
    check_sources(job)
    tracking_uri = job.resolved_tracking_uri()
    folder = resolve_model_path(model_path, tracking_uri)
    task_model = load_for_eval(folder, job)
    if job.data.corpus == "sources":
        ensure_ray(job)
    rows = eval_rows(job, split)
    if split == "test":
        logger.info("evaluating on the test split (use it once, for the final figure)")
    if len(rows) >= job.eval.distributed_min_examples:
        ensure_ray(job)
    logger.info(f"evaluating {model_path} on {len(rows)} {split} rows")
    # Model actors resolve a registry URI themselves (on a cluster the local copy is only on this node).
    model_ref = model_path if model_path.startswith("models:/") else str(folder)
    report = evaluate_model(task_model, rows, job.eval, model_ref=model_ref, tracking_uri=tracking_uri, split=split)
    log_report(report)
    if split == "test":
        note_test_use(job, model_path, folder, report)
    if output is not None:
        Path(output).write_text(report.to_json())
    return report


def evaluate_baseline(job: JobConfig, name: str, split: str, output: Optional[Path] = None):
    """Score the trivial baseline ``name`` on ``split`` like a model; returns the report."""
    check_sources(job)
    if job.data.corpus == "sources":
        ensure_ray(job)
    train_rows = read_split_rows(job, "train", "sentiment") if name == "majority" else None
    model = build_baseline(name, train_rows)
    rows = eval_rows(job, split)
    logger.info(f"evaluating the {model.name} baseline on {len(rows)} {split} rows")
    report = evaluate_model(model, rows, job.eval, split=split)
    log_report(report)
    if output is not None:
        Path(output).write_text(report.to_json())
    return report
