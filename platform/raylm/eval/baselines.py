"""Trivial baselines as task models, scored by the same evaluator as real models.

A figure means little without the floor it should clear. Each baseline
implements :class:`raylm.inference.task_model.TaskModel`, so ``raylm eval
--baseline NAME`` runs it through the same rows, metrics and bootstrap
intervals as a trained model:

- ``majority``: every sentence gets the most frequent label of the training split;
- ``first-sentence``: the answer to every question is the first sentence of its context;
- ``copy-source``: the "translation" is the source sentence itself.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any, Optional, Sequence

from raylm.data.formatting import normalize_label
from raylm.inference.task_model import InferenceOptions, ModelLoadError, TaskModel

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def first_sentence(text: str) -> str:
    """The text up to the first sentence end (., ! or ? followed by whitespace)."""
    return _SENTENCE_END.split(text.strip(), maxsplit=1)[0]


class MajorityClassBaseline(TaskModel):
    """Predicts one label, the most frequent one in the training rows, for every sentence."""

    kind = "baseline"
    supported_tasks = frozenset({"sentiment"})

    def __init__(self, label: str, share: float):
        self.label = label
        self.share = share
        self.name = f"majority-class ({label})"

    @classmethod
    def from_rows(cls, rows: Sequence[dict]) -> "MajorityClassBaseline":
        counts = Counter(normalize_label(row["label"]) for row in rows if row.get("task") == "sentiment")
        if not counts:
            raise ValueError("the majority-class baseline needs sentiment rows in the training split")
        # Ties go to the label that sorts first, so the choice does not depend on row order.
        label, count = min(counts.items(), key=lambda item: (-item[1], item[0]))
        return cls(label, count / sum(counts.values()))

    @classmethod
    def from_directory(cls, folder: str | Path, options: InferenceOptions = InferenceOptions()):
        raise ModelLoadError("the majority-class baseline is built from training rows (from_rows), not a folder")

    def classify_sentiment(self, texts: Sequence[str]) -> list[dict[str, Any]]:
        return [{"label": self.label, "score": round(self.share, 6)} for _ in texts]


class FirstSentenceBaseline(TaskModel):
    """Answers every question with the first sentence of its context."""

    kind = "baseline"
    supported_tasks = frozenset({"qa"})
    name = "first-sentence"

    @classmethod
    def from_directory(cls, folder: str | Path, options: InferenceOptions = InferenceOptions()):
        return cls()  # nothing to load

    def answer_questions(self, contexts: Sequence[str], questions: Sequence[str]) -> list[str]:
        return [first_sentence(context) for context in contexts]


class CopySourceBaseline(TaskModel):
    """Returns the source sentence as its own translation."""

    kind = "baseline"
    supported_tasks = frozenset({"translate"})
    name = "copy-source"

    @classmethod
    def from_directory(cls, folder: str | Path, options: InferenceOptions = InferenceOptions()):
        return cls()  # nothing to load

    def translate(self, sources: Sequence[str], max_new_tokens: Optional[int] = None) -> list[str]:
        return [source.strip() for source in sources]


BASELINES: tuple[str, ...] = ("majority", "first-sentence", "copy-source")


def build_baseline(name: str, train_rows: Optional[Sequence[dict]] = None) -> TaskModel:
    """The baseline ``name``; ``majority`` needs the training rows it counts labels in."""
    if name == "majority":
        return MajorityClassBaseline.from_rows(train_rows or [])
    if name == "first-sentence":
        return FirstSentenceBaseline()
    if name == "copy-source":
        return CopySourceBaseline()
    raise ValueError(f"unknown baseline {name!r}; known: {', '.join(BASELINES)}")
