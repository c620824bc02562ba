"""Rows for encoder heads: ``model.task`` sequence_classification or question_answering.

A causal LM trains on packed token blocks (:mod:`raylm.data.pipeline`). An
encoder head trains on one fixed-length row per example instead: a sentence
and its label, or a question+context window and its answer span. This module
reads the configured corpus's rows of the head's task (the demo corpus, or
``data.sources`` / ``data.dev_sources`` through the same Ray Data readers and
row checks as the LM pipeline), tokenizes them with the pretrained model's own
tokenizer (``model.init_from``; ``data.seq_len`` is the window) and returns the
same :class:`~raylm.data.pipeline.PreparedData` the driver takes, so training,
export, evaluation and tracking do not care which kind of model it is.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from raylm.common.fingerprints import fingerprint
from raylm.config import JobConfig
from raylm.data.errors import DataError
from raylm.data.execution import ordered_execution, run_ray
from raylm.data.formatting import SENTIMENT_LABELS, normalize_label
from raylm.data.pipeline import PreparedData, apply_mixture, load_corpus
from raylm.data.plan import ResolvedCorpus, resolve_corpus, source_plans
from raylm.data.segments import segment_rows
from raylm.data.sources import map_segments, resolve_source
from raylm.data.spans import tokenize_span_rows
from raylm.data.tokenizer import tokenizer_fingerprint

logger = logging.getLogger(__name__)

# The corpus task each encoder head learns.
HEAD_TASKS: dict[str, str] = {"sequence_classification": "sentiment", "question_answering": "qa"}



@ordered_execution()
def read_split_rows(job: JobConfig, split: str, task: str | None = None, limit: int | None = None) -> list[dict]:
    """The formatted rows of ``split`` (train | dev | test) of the configured corpus, optionally of one task.

    Real sources are read with Ray Data (the LM pipeline's readers, row checks,
    dev hold-out and sampling weights); ``test`` reads ``data.test_sources``,
    which nothing else reads. The demo corpus has train and dev only.
    """
    if split not in ("train", "dev", "test"):
        raise ValueError(f"unknown split {split!r}")
    if job.data.corpus == "demo":
        if split == "test":
            raise DataError("the demo corpus has no test split; give data.test_sources")

        corpus = load_corpus(job)
        rows = apply_mixture(corpus["train"], job.data.mixture, job.data.shuffle_seed) if split == "train" \
            else corpus["dev"]
        rows = [row for row in rows if task is None or row.get("task") == task]
        return rows[:limit] if limit is not None else rows
    if split == "test":
        if not job.data.test_sources:
            raise DataError("no test split: data.test_sources is empty")
        corpus = ResolvedCorpus(train=[], dev=[resolve_source(f"data.test_sources[{i}]", source)
                                               for i, source in enumerate(job.data.test_sources)])
        role = "dev"
    else:
        corpus, role = resolve_corpus(job), split
    rows: list[dict] = []
    for source, plan in source_plans(job, corpus, role):
        if task is not None and plan.task != task:
            continue
        dataset = map_segments([(source, plan)], job.data.segment_bytes, segment_rows)
        if limit is not None:
            dataset = dataset.limit(max(0, limit - len(rows)))
        rows.extend(json.loads(item["row"]) for item in run_ray(dataset.take_all))
        if limit is not None and len(rows) >= limit:
            break
    return rows


def load_encoder_tokenizer(job: JobConfig):
    """The pretrained model's own tokenizer (an encoder keeps its vocabulary; no raylm tokens are added)."""
    from transformers import AutoTokenizer

    folder = job.data.tokenizer_path or job.model.init_from
    if not folder:
        raise DataError(f"model.task={job.model.task} fine-tunes a pretrained encoder: set model.init_from")
    if not Path(folder).is_dir():
        raise FileNotFoundError(f"tokenizer folder not found: {folder}")
    return AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)


def _encode(rows: list[dict], head: str, tokenizer, max_length: int) -> dict:
    if head == "sequence_classification":

        labelled = [{"text": row["text"], "label": SENTIMENT_LABELS.index(normalize_label(row["label"]))}
                    for row in rows]
        return tokenize_classification_rows(labelled, tokenizer, max_length)

    return tokenize_span_rows(rows, tokenizer, max_length)


def _dataset(arrays: dict):
    import ray.data

    names = list(arrays)
    return ray.data.from_items([dict(zip(names, values)) for values in zip(*(arrays[name] for name in names))])


@ordered_execution()
def prepare_encoder_data(job: JobConfig) -> PreparedData:
    """Rows of the head's task -> tokenized train and dev Ray Datasets, dev rows for task metrics."""

    head = job.model.task
    task = HEAD_TASKS[head]
    tokenizer = load_encoder_tokenizer(job)
    train_rows = read_split_rows(job, "train", task)
    dev_rows = read_split_rows(job, "dev", task)
    if not train_rows:
        raise DataError(f"model.task={head} learns {task!r} rows, and the training corpus has none")
    if not dev_rows:
        raise DataError(f"model.task={head} needs {task!r} rows in the dev split for its dev loss")
    max_length = job.data.seq_len
    try:
        train_arrays = _encode(train_rows, head, tokenizer, max_length)
        dev_arrays = _encode(dev_rows, head, tokenizer, max_length)
    except ValueError as err:
        raise DataError(f"{task} rows: {err}") from None
    logger.info(f"{head}: {len(train_rows)} train / {len(dev_rows)} dev {task} rows -> {len(train_arrays['labels'])} / "
        f"{len(dev_arrays['labels'])} windows of {max_length} tokens")
    data_fingerprint = fingerprint({"head": head, "max_length": max_length,
                                    "tokenizer": tokenizer_fingerprint(tokenizer), "train": train_rows,
                                    "dev": dev_rows}, 20)
    return PreparedData(
        train=_dataset(train_arrays).materialize(), dev=_dataset(dev_arrays).materialize(),
        dev_examples=dev_rows[: job.eval.max_examples_per_task], tokenizer=tokenizer, fingerprint=data_fingerprint,
        stats={"num_train_rows": len(train_rows), "num_dev_rows": len(dev_rows),
               "num_train_windows": len(train_arrays["labels"]), "num_dev_windows": len(dev_arrays["labels"]),
               "vocab_size": len(tokenizer), "max_length": max_length},
    )


def tokenize_classification_rows(rows: Iterable[dict[str, Any]], tokenizer, max_length: int,
                                 text_field: str = "text", label_field: str = "label") -> dict[str, np.ndarray]:
    """Tokenize ``rows`` into fixed-length arrays; raises ValueError naming a bad row."""
    texts, labels = [], []
    for index, row in enumerate(rows):
        text, label = row.get(text_field), row.get(label_field)
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"row {index}: {text_field!r} must be a non-empty string")
        if isinstance(label, bool) or not isinstance(label, (int, np.integer)) or label < 0:
            raise ValueError(f"row {index}: {label_field!r} must be a class index >= 0, got {label!r}")
        texts.append(text)
        labels.append(int(label))
    if not texts:
        raise ValueError("no rows to tokenize")
    encoded = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length,
                        return_attention_mask=True)
    return {
        "input_ids": np.asarray(encoded["input_ids"], dtype=np.int64),
        "attention_mask": np.asarray(encoded["attention_mask"], dtype=np.int64),
        "labels": np.asarray(labels, dtype=np.int64),
    }


def classification_dataset(rows: list[dict[str, Any]], tokenizer, max_length: int, **fields):
    """A Ray Dataset of tokenized classification rows, ready for ``run_training``."""
    return _dataset(tokenize_classification_rows(rows, tokenizer, max_length, **fields))
