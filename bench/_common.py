"""Helpers shared by the training benchmarks (imported from the scripts beside it)."""

from __future__ import annotations

from typing import Any, Sequence


class SizedTokenizer:
    """What ``run_training`` needs of a tokenizer when the data is already token ids: a size and special ids."""

    def __init__(self, size: int, eos_token_id: int = 0, pad_token_id: int = 0):
        self.size = size
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id

    def __len__(self) -> int:
        return self.size


def overall_rate(history: Sequence[dict[str, Any]], key: str = "tokens_per_s", after_step: int = 0) -> float:
    """The rate over the logged intervals after ``after_step``.

    Every interval holds the same number of tokens, so the overall rate is the
    harmonic mean of the per-interval rates (not their arithmetic mean).
    """
    values = [row[key] for row in history if row["step"] > after_step and row.get(key)]
    if not values:
        raise ValueError(f"no logged {key} after step {after_step}")
    return len(values) / sum(1.0 / value for value in values)
