"""Rows for ``model.task=sequence_classification``: text and an integer label per row.

Fine-tuning an encoder (or a decoder with a classification head) goes through
the same driver, worker loop and trainer as language modelling; only the batch
differs: ``input_ids`` and ``attention_mask`` padded to ``max_length``, and one
``labels`` entry per row. Padding to one fixed length keeps the shapes static
(one compiled graph, same work on every worker).
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np


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
    import ray.data

    arrays = tokenize_classification_rows(rows, tokenizer, max_length, **fields)
    return ray.data.from_items([
        {"input_ids": ids, "attention_mask": mask, "labels": label}
        for ids, mask, label in zip(arrays["input_ids"], arrays["attention_mask"], arrays["labels"])
    ])
