"""Task evaluation of a model on labelled rows, through the same task model that serves it.

Predictions come from :func:`raylm.inference.task_model.load_task_model`, the
loader the Serve deployment uses, so what is measured is what is served. A
small eval set is predicted in this process; a large one (at least
``eval.distributed_min_examples`` rows) runs as Ray Data batch inference over a
pool of model actors, each loading the model once. Either way the scores are
computed here from the predictions, per example, so that every metric gets a
bootstrap confidence interval and two models scored on the same eval set can
be compared with a paired test (:mod:`raylm.eval.bootstrap`).

The result, :class:`EvalReport`, holds the metrics, their intervals, the eval
set's fingerprint (a hash of the rows scored, per task and overall) and the
per-example statistics and predictions; ``summary()`` is what goes into model
cards and MLflow, ``to_json()`` the full record the promotion gate reads back.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from raylm.common.fingerprints import fingerprint, fingerprint_records
from raylm.common.tracking import resolve_model_path
from raylm.config import EvalConfig
from raylm.data.formatting import format_example, normalize_label
from raylm.eval.bootstrap import confidence_interval
from raylm.eval.metrics import METRICS, task_statistics
from raylm.inference.task_model import InferenceOptions, load_task_model

logger = logging.getLogger(__name__)

# The tasks scored, in report order, and the main metric of each (the promotion gate's default).
EVAL_TASKS: tuple[str, ...] = ("sentiment", "qa", "translate", "lm")
PRIMARY_METRICS: dict[str, str] = {"sentiment": "sentiment_accuracy", "qa": "qa_f1",
                                   "translate": "translation_bleu", "lm": "lm_perplexity"}
REPORT_VERSION = 1


def row_key(task: str, row: dict) -> dict:
    """What identifies a labelled example: its inputs and references (not incidental fields)."""
    if task == "sentiment":
        return {"text": row["text"], "label": normalize_label(row["label"])}
    if task == "qa":
        answers = row["answers"]["text"] if isinstance(row["answers"], dict) else row["answers"]
        return {"context": row["context"], "question": row["question"], "answers": list(answers)}
    if task == "translate":
        return {"source": row["source"], "target": row["target"]}
    return {"text": row["text"]}


def fingerprint_rows(task: str, rows: Sequence[dict]) -> str:
    """SHA-256 (16 hex digits) of the task's examples, in order."""
    return fingerprint_records(task, (row_key(task, row) for row in rows), length=16)


def select_rows(rows: Sequence[dict], max_examples_per_task: int) -> dict[str, list[dict]]:
    """The rows scored per task: the first ``max_examples_per_task`` of each task, in order."""
    by_task: dict[str, list[dict]] = {}
    for row in rows:
        task = row.get("task")
        if task in EVAL_TASKS and len(by_task.setdefault(task, [])) < max_examples_per_task:
            by_task[task].append(row)
    return {task: by_task[task] for task in EVAL_TASKS if by_task.get(task)}


# --------------------------------------------------------------------------- predictions


def _supports(task_model, task: str) -> bool:
    if task == "lm":
        # Perplexity needs next-token probabilities: a causal LM and its tokenizer.
        return getattr(task_model, "kind", "causal_lm") == "causal_lm" and hasattr(task_model, "model") \
            and hasattr(task_model, "tokenizer")
    supports = getattr(task_model, "supports", None)
    return supports(task) if callable(supports) else True


def text_losses(task_model, rows: Sequence[dict], batch_size: int = 16) -> list[list[float]]:
    """``[summed next-token loss, tokens]`` of each plain-text row's text under a causal LM.

    The text is scored after its task prompt (as the model was trained on it), one
    window of the model's context length; tokens past it are not scored.
    """
    import torch

    model, tokenizer = task_model.model, task_model.tokenizer
    limit = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", 1024)
    device = next(model.parameters()).device
    results: list[list[float]] = []
    for start in range(0, len(rows), batch_size):
        sequences, prompt_lengths = [], []
        for row in rows[start:start + batch_size]:
            prompt, answer = format_example({**row, "task": "lm"})
            prompt_ids = [tokenizer.eos_token_id, *tokenizer(prompt, add_special_tokens=False)["input_ids"]]
            answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
            # As in training: <eos> prompt text <eos>, the loss on the text and the closing <eos>.
            sequences.append((prompt_ids + answer_ids + [tokenizer.eos_token_id])[:limit])
            prompt_lengths.append(len(prompt_ids))
        width = max(len(seq) for seq in sequences)
        ids = torch.full((len(sequences), width), tokenizer.pad_token_id or 0, dtype=torch.long)
        mask = torch.zeros_like(ids)
        targets = torch.full_like(ids, -100)
        for index, (seq, prompt_length) in enumerate(zip(sequences, prompt_lengths)):
            ids[index, :len(seq)] = torch.tensor(seq)
            mask[index, :len(seq)] = 1
            targets[index, prompt_length:len(seq)] = torch.tensor(seq[prompt_length:], dtype=torch.long)
        with torch.inference_mode():
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        losses = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)),
                                                   targets[:, 1:].reshape(-1).to(device), ignore_index=-100,
                                                   reduction="none").view(len(sequences), -1)
        counted = (targets[:, 1:] != -100).sum(-1)
        results.extend([float(loss), int(count)] for loss, count in zip(losses.sum(-1).cpu(), counted))
    return results


def predict_task(task_model, task: str, rows: Sequence[dict], batch_size: int = 32,
                 max_new_tokens: Optional[int] = None) -> list:
    """The task model's predictions for ``rows`` of ``task``, in order, batch by batch."""
    out: list = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        if task == "sentiment":
            out.extend(result["label"] for result in task_model.classify_sentiment([row["text"] for row in chunk]))
        elif task == "qa":
            out.extend(task_model.answer_questions([row["context"] for row in chunk],
                                                   [row["question"] for row in chunk]))
        elif task == "translate":
            out.extend(task_model.translate([row["source"] for row in chunk], max_new_tokens=max_new_tokens))
        elif task == "lm":
            out.extend(text_losses(task_model, chunk))
        else:
            raise ValueError(f"cannot evaluate task {task!r}")
    return out


class BatchPredictor:
    """A Ray Data actor: loads the model once, then predicts batches of JSON-encoded rows of any task."""

    def __init__(self, model_ref: str, tracking_uri: Optional[str], max_new_tokens: int, batch_size: int):
        import torch

        torch.set_num_threads(1)
        folder = resolve_model_path(model_ref, tracking_uri)
        self.model = load_task_model(folder, InferenceOptions(max_new_tokens=max_new_tokens, num_threads=1))
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = [json.loads(text) for text in batch["row"]]
        predictions: list[Any] = [None] * len(rows)
        for task in EVAL_TASKS:
            positions = [i for i, row in enumerate(rows) if row["task"] == task]
            if positions:
                found = predict_task(self.model, task, [rows[i] for i in positions], self.batch_size,
                                     self.max_new_tokens)
                for position, prediction in zip(positions, found):
                    predictions[position] = prediction
        return {"index": batch["index"], "prediction": np.array([json.dumps(p) for p in predictions], dtype=object)}


def predict_distributed(model_ref: str, rows_by_task: dict[str, list[dict]], eval_config,
                        tracking_uri: Optional[str] = None) -> dict[str, list]:
    """Ray Data batch inference over ``eval.num_actors`` model actors; predictions per task, in row order.

    ``model_ref`` is a model folder every node can read, or a registry URI that each
    actor resolves (downloads) itself.
    """
    import ray.data

    items = [{"index": index, "row": json.dumps({**row, "task": task}, ensure_ascii=False)}
             for index, (task, row) in enumerate((task, row) for task, rows in rows_by_task.items() for row in rows)]
    dataset = ray.data.from_items(items, override_num_blocks=max(1, min(len(items) // eval_config.batch_size,
                                                                        4 * eval_config.num_actors)))
    predicted = dataset.map_batches(
        BatchPredictor, fn_constructor_kwargs={"model_ref": model_ref, "tracking_uri": tracking_uri,
                                               "max_new_tokens": eval_config.max_new_tokens,
                                               "batch_size": eval_config.batch_size},
        batch_size=eval_config.batch_size, batch_format="numpy", concurrency=eval_config.num_actors,
        num_cpus=eval_config.cpus_per_actor,
    ).take_all()
    by_index = {int(item["index"]): json.loads(item["prediction"]) for item in predicted}
    if len(by_index) != len(items):
        raise RuntimeError(f"distributed evaluation returned {len(by_index)} predictions for {len(items)} rows")
    out: dict[str, list] = {}
    index = 0
    for task, rows in rows_by_task.items():
        out[task] = [by_index[index + offset] for offset in range(len(rows))]
        index += len(rows)
    return out


# --------------------------------------------------------------------------- the report


@dataclass
class EvalReport:
    """Metrics with bootstrap intervals on a fingerprinted eval set, and the per-example record behind them."""

    metrics: dict[str, float]
    intervals: dict[str, list[float]]
    examples: dict[str, int]
    task_fingerprints: dict[str, str]
    confidence: float
    mode: str = "in_process"
    split: str = "dev"
    stats: dict[str, list] = field(default_factory=dict)
    predictions: dict[str, list] = field(default_factory=dict)
    skipped_tasks: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def fingerprint(self) -> str:
        """The whole eval set's fingerprint: the tasks' fingerprints together."""
        return fingerprint(sorted(self.task_fingerprints.items()), length=16)

    def summary(self) -> dict[str, Any]:
        """Everything but the per-example record: for model cards, MLflow and the terminal."""
        return {"split": self.split, "metrics": self.metrics, "intervals": self.intervals,
                "confidence": self.confidence, "examples": self.examples, "fingerprint": self.fingerprint,
                "task_fingerprints": self.task_fingerprints, "mode": self.mode, "skipped_tasks": self.skipped_tasks,
                "seconds": round(self.seconds, 1)}

    def flat_metrics(self) -> dict[str, float]:
        """``metric``, ``metric_ci_low``, ``metric_ci_high`` and ``<task>_examples`` as one flat mapping."""
        flat: dict[str, float] = dict(self.metrics)
        for name, (low, high) in self.intervals.items():
            flat[f"{name}_ci_low"], flat[f"{name}_ci_high"] = low, high
        for task, count in self.examples.items():
            flat[f"{task}_examples"] = count
        return flat

    def to_json(self) -> str:
        payload = {"version": REPORT_VERSION, **self.summary(), "stats": self.stats, "predictions": self.predictions}
        return json.dumps(payload, ensure_ascii=False, default=_json_number)

    @classmethod
    def from_json(cls, text: str) -> "EvalReport":
        payload = json.loads(text)
        if payload.get("version") != REPORT_VERSION:
            raise ValueError(f"eval report version {payload.get('version')} is not {REPORT_VERSION}")
        return cls(metrics=payload["metrics"], intervals=payload["intervals"], examples=payload["examples"],
                   task_fingerprints=payload["task_fingerprints"], confidence=payload["confidence"],
                   mode=payload.get("mode", "in_process"), split=payload.get("split", "dev"),
                   stats=payload.get("stats", {}), predictions=payload.get("predictions", {}),
                   skipped_tasks=payload.get("skipped_tasks", {}), seconds=payload.get("seconds", 0.0))

    def metric_stats(self, name: str) -> np.ndarray:
        return np.asarray(self.stats[name], dtype=np.float64)


def _json_number(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value)}")


def score(predictions: dict[str, list], rows_by_task: dict[str, list[dict]], confidence: float = 0.95,
          num_samples: int = 1000, seed: int = 0) -> tuple[dict, dict, dict]:
    """``(metrics, intervals, stats)`` of predictions on their rows: each metric with its bootstrap interval."""
    metrics: dict[str, float] = {}
    intervals: dict[str, list[float]] = {}
    stats: dict[str, list] = {}
    for task, rows in rows_by_task.items():
        for name, matrix in task_statistics(task, predictions[task], rows).items():
            value = METRICS[name].value(matrix.sum(0), len(matrix))
            low, high = confidence_interval(matrix, name, confidence, num_samples, seed)
            metrics[name] = value
            intervals[name] = [low, high]
            # Integer-valued statistics stay integers in JSON; losses keep full precision.
            stats[name] = [[int(x) if float(x).is_integer() else float(x) for x in row] for row in matrix]
    return metrics, intervals, stats


def evaluate_model(task_model, rows: Sequence[dict], eval_config, model_ref: Optional[str] = None,
                   tracking_uri: Optional[str] = None, split: str = "dev") -> EvalReport:
    """Score a task model on labelled ``rows`` (all tasks it supports) with bootstrap intervals.

    ``task_model`` is a loaded :class:`~raylm.inference.task_model.TaskModel` (used
    for small eval sets and to tell which tasks it answers); with ``model_ref`` (its
    folder or registry URI) an eval set of at least ``eval.distributed_min_examples``
    rows is predicted by Ray Data batch inference over a pool of model actors.
    """
    started = time.time()
    selected = select_rows(rows, eval_config.max_examples_per_task)
    skipped = {task: "not supported by this model" for task in selected if not _supports(task_model, task)}
    rows_by_task = {task: task_rows for task, task_rows in selected.items() if task not in skipped}
    total = sum(len(task_rows) for task_rows in rows_by_task.values())
    distributed = model_ref is not None and total >= eval_config.distributed_min_examples
    if distributed:
        logger.info("evaluating %d rows with Ray Data over %d model actors", total, eval_config.num_actors)
        predictions = predict_distributed(model_ref, rows_by_task, eval_config, tracking_uri)
    else:
        predictions = {task: predict_task(task_model, task, task_rows, eval_config.batch_size,
                                          eval_config.max_new_tokens) for task, task_rows in rows_by_task.items()}
    metrics, intervals, stats = score(predictions, rows_by_task, eval_config.confidence,
                                      eval_config.bootstrap_samples, eval_config.bootstrap_seed)
    return EvalReport(
        metrics=metrics, intervals=intervals, examples={t: len(r) for t, r in rows_by_task.items()},
        task_fingerprints={t: fingerprint_rows(t, r) for t, r in rows_by_task.items()},
        confidence=eval_config.confidence, mode="ray_data" if distributed else "in_process", split=split,
        stats=stats, predictions={t: p for t, p in predictions.items() if t != "lm"}, skipped_tasks=skipped,
        seconds=time.time() - started,
    )


def format_report(report: EvalReport) -> list[str]:
    """One line per metric: value, interval, examples."""
    lines = []
    for name, value in report.metrics.items():
        low, high = report.intervals[name]
        count = report.examples.get(METRICS[name].task, 0)
        shown = f"{value:.4f}" if math.isfinite(value) else str(value)
        lines.append(f"{name} = {shown} [{low:.4f}, {high:.4f}] ({report.confidence:.0%} CI, {count} examples)")
    for task, reason in report.skipped_tasks.items():
        lines.append(f"{task}: not scored ({reason})")
    return lines


def evaluate_tasks(engine, rows: Sequence[dict], max_examples_per_task: int = 300,
                   batch_size: int = 32, max_new_tokens: int = 48) -> dict[str, float]:
    """Metrics only (no intervals) of ``engine`` on ``rows``: the older entry point, kept for callers."""
    config = EvalConfig(max_examples_per_task=max_examples_per_task, batch_size=batch_size,
                        max_new_tokens=max_new_tokens, bootstrap_samples=100)
    report = evaluate_model(engine, rows, config)
    return {**report.metrics, **{f"{task}_examples": count for task, count in report.examples.items()}}


def load_report(path: str | Path) -> EvalReport:
    return EvalReport.from_json(Path(path).read_text(encoding="utf-8"))
