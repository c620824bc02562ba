"""From a finished training run to an exported, evaluated, registered (and maybe promoted) model.

:func:`export_run_model` writes the model folder from the checkpoint that
``train.export`` selects, with a model card that says which kind of model it
is, which step it came from and both dev losses. :func:`evaluate_exported`
scores it on the dev split through the serving loader, with bootstrap
intervals, and writes ``eval_report.json`` (per-example scores, for the
promotion gate) beside the weights. :func:`finish_lineage` completes the card's
lineage once the evaluation is known; ``lineage_tags`` of it go onto the MLflow
run and the registered version. :func:`promote_after_training` runs the gate of
``tracking.promote_alias``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Optional

from raylm.config import JobConfig
from raylm.lifecycle.lineage import build_lineage

EVAL_REPORT_FILE = "eval_report.json"
CARD_FILE = "raylm.json"

Log = Callable[[str], None]


def _quiet(message: str) -> None:
    del message


def write_card(model_dir: Path, card: dict[str, Any]) -> None:
    (Path(model_dir) / CARD_FILE).write_text(json.dumps(card, indent=2, default=str))


def _train_loss_at(history: list[dict[str, Any]], step: Any) -> Optional[float]:
    for row in reversed(history):
        if row.get("step") == step and "loss" in row:
            return row["loss"]
    return None


def export_run_model(job: JobConfig, result, data, record: dict[str, Any], model_dir: Path,
                     mlflow_run_id: Optional[str] = None, parent_run_id: Optional[str] = None,
                     log: Log = _quiet) -> tuple[Path, dict[str, Any]]:
    """Export the checkpoint ``train.export`` selects into ``model_dir``; returns the folder and its card.

    The card holds the run id, the secret-free config, the model's kind (which
    task model serves it), the export record (policy, step, dev loss of the
    exported and of the last checkpoint, train loss at both) and the lineage so far.
    """
    from raylm.train.driver import choose_export, export_model

    chosen, export = choose_export(job, result)
    export["train_loss"] = _train_loss_at(result.history, export.get("step"))
    export["last_train_loss"] = _train_loss_at(result.history, export.get("last_step"))
    if export.get("fallback"):
        log(f"exporting the last checkpoint: {export['fallback']}")
    elif export["step"] != export["last_step"]:
        log(f"exporting step {export['step']} (dev loss {export['eval_loss']:.4f}), not the last step "
            f"{export['last_step']} (dev loss {export['last_eval_loss']:.4f})")
    card: dict[str, Any] = {
        "run_id": job.run_id,
        "kind": job.model.task,
        "config": job.public_dict(),
        "config_hash": record["config_hash"],
        "data_fingerprint": data.fingerprint,
        "export": export,
        "train_metrics": {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))},
    }
    if job.model.task != "causal_lm":
        card["max_length"] = job.data.seq_len
    if job.model.task == "sequence_classification":
        from raylm.data.formatting import SENTIMENT_LABELS

        card["labels"] = list(SENTIMENT_LABELS[: job.model.num_labels])
    trained_steps = export["last_step"]
    model_dir = export_model(chosen, data.tokenizer, Path(model_dir), card, trained_steps=trained_steps)
    card["lineage"] = build_lineage(run_id=job.run_id, config_hash=record["config_hash"],
                                    data_fingerprint=data.fingerprint, mlflow_run_id=mlflow_run_id,
                                    parent_run_id=parent_run_id, exported_step=export["step"])
    write_card(model_dir, card)
    return model_dir, card


def load_for_eval(model_dir: Path, job: JobConfig):
    """The task model the Serve deployment would load from ``model_dir``, for evaluation."""
    from raylm.inference.task_model import InferenceOptions, load_task_model

    return load_task_model(model_dir, InferenceOptions(max_new_tokens=job.eval.max_new_tokens))


def evaluate_exported(job: JobConfig, model_dir: Path, rows: list[dict], card: dict[str, Any],
                      log: Log = _quiet, split: str = "dev"):
    """Evaluate the exported model folder on ``rows``; writes ``eval_report.json`` and the card's eval section."""
    from raylm.eval.runner import evaluate_model, format_report

    task_model = load_for_eval(model_dir, job)
    report = evaluate_model(task_model, rows, job.eval, model_ref=str(model_dir), split=split)
    for line in format_report(report):
        log(line)
    (Path(model_dir) / EVAL_REPORT_FILE).write_text(report.to_json())
    card["eval_metrics"] = report.flat_metrics()
    card["eval"] = report.summary()
    lineage = card.setdefault("lineage", {})
    lineage.update(build_lineage(**{key: lineage.get(key) for key in (
        "run_id", "config_hash", "data_fingerprint", "mlflow_run_id", "parent_run_id", "exported_step")},
        eval_summary=report.summary()))
    write_card(model_dir, card)
    return report


def parent_run_of(tracking_uri: str, mlflow_run_id: Optional[str]) -> Optional[str]:
    """The MLflow parent run (a sweep's run) of ``mlflow_run_id``, if it has one."""
    if not mlflow_run_id:
        return None
    from raylm.lifecycle.lineage import PARENT_RUN_TAG
    from raylm.common.tracking import _client

    return _client(tracking_uri).get_run(mlflow_run_id).data.tags.get(PARENT_RUN_TAG)


def promote_after_training(job: JobConfig, registry_uri: str, log: Log = _quiet) -> dict[str, Any]:
    """The gate of ``tracking.promote_alias`` for a version just registered; returns the decision.

    A refusal is not a failed run: the table is printed and the alias stays.
    """
    from raylm.lifecycle.promotion import PromotionRefused, promote

    alias = job.tracking.promote_alias
    try:
        decision = promote(job.resolved_tracking_uri(), registry_uri, alias, job.eval, log=log)
    except PromotionRefused as refused:
        decision = refused.decision
    for line in decision.table().splitlines():
        log(line)
    return decision.as_dict()


def eval_rows(job: JobConfig, split: str) -> list[dict]:
    """Labelled rows of ``split`` (dev | test), at most ``eval.max_examples_per_task`` per task."""
    from raylm.eval.runner import select_rows
    from raylm.train.task_data import read_split_rows

    rows = read_split_rows(job, split)
    return [row for task_rows in select_rows(rows, job.eval.max_examples_per_task).values() for row in task_rows]


TEST_LOG_FILE = "test_evaluations.jsonl"
TEST_COUNT_TAG = "raylm.test_evaluations"


def _note_test_use(job: JobConfig, model_path: str, folder: Path, report, log: Log) -> None:
    """Count evaluations on the test split per model; warn from the second one on.

    A test split is for one final figure: looking at it again and acting on it
    turns it into a dev split. The count lives on the registered version (tag)
    or in the model folder (``test_evaluations.jsonl``).
    """
    import time

    entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "fingerprint": report.fingerprint,
             "metrics": report.metrics}
    if model_path.startswith("models:/"):
        from raylm.common.tracking import _client, get_model_version

        tracking_uri = job.resolved_tracking_uri()
        version = get_model_version(tracking_uri, model_path)
        previous = int(version.tags.get(TEST_COUNT_TAG, "0"))
        client = _client(tracking_uri)
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
            log(f"warning: could not record this test evaluation in {path}")
    if previous:
        log(f"warning: this model was evaluated on the test split {previous} time(s) before; a test figure "
            "is only unbiased the first time (select models on dev)")


def evaluate_reference(job: JobConfig, model_path: Optional[str], split: str = "dev", log: Log = _quiet,
                       output: Optional[Path] = None, baseline: Optional[str] = None):
    """Evaluate a model folder or registry URI on ``split`` of the configured corpus; returns the report.

    ``split=test`` reads ``data.test_sources`` (never used in training or
    selection) and records the evaluation on the model, warning when it is not
    the first. ``output`` receives the full report (per-example scores).
    ``baseline`` (instead of a model: majority, first-sentence, copy-source)
    scores a trivial baseline (:mod:`raylm.eval.baselines`) the same way.
    """
    if baseline is not None:
        return _evaluate_baseline(job, baseline, split, log, output)
    from raylm.data.prepare import check_sources
    from raylm.eval.runner import evaluate_model, format_report
    from raylm.common.tracking import resolve_model_path
    from raylm.lifecycle.workflow import ensure_ray

    if split not in ("dev", "test"):
        from raylm.config import ConfigError

        raise ConfigError(f"config error: --split must be dev or test, not {split!r}")
    check_sources(job)
    tracking_uri = job.resolved_tracking_uri()
    folder = resolve_model_path(model_path, tracking_uri)
    task_model = load_for_eval(folder, job)
    if job.data.corpus == "sources":
        ensure_ray(job, log)
    rows = eval_rows(job, split)
    if split == "test":
        log("evaluating on the test split (use it once, for the final figure)")
    if len(rows) >= job.eval.distributed_min_examples:
        ensure_ray(job, log)
    log(f"evaluating {model_path} on {len(rows)} {split} rows")
    # Model actors resolve a registry URI themselves (on a cluster the local copy is only on this node).
    model_ref = model_path if model_path.startswith("models:/") else str(folder)
    report = evaluate_model(task_model, rows, job.eval, model_ref=model_ref, tracking_uri=tracking_uri,
                            split=split, log=log)
    for line in format_report(report):
        log(line)
    if split == "test":
        _note_test_use(job, model_path, folder, report, log)
    if output is not None:
        Path(output).write_text(report.to_json())
    return report


def _evaluate_baseline(job: JobConfig, name: str, split: str, log: Log, output: Optional[Path]):
    from raylm.data.prepare import check_sources
    from raylm.eval.baselines import build_baseline
    from raylm.eval.runner import evaluate_model, format_report
    from raylm.train.task_data import read_split_rows
    from raylm.lifecycle.workflow import ensure_ray

    check_sources(job)
    if job.data.corpus == "sources":
        ensure_ray(job, log)
    train_rows = read_split_rows(job, "train", "sentiment") if name == "majority" else None
    model = build_baseline(name, train_rows)
    rows = eval_rows(job, split)
    log(f"evaluating the {model.name} baseline on {len(rows)} {split} rows")
    report = evaluate_model(model, rows, job.eval, split=split)
    for line in format_report(report):
        log(line)
    if output is not None:
        Path(output).write_text(report.to_json())
    return report
