"""Task evaluation of a model on labelled rows, through the same engine that serves it."""

from __future__ import annotations

from typing import Callable, Sequence

from raylm.eval.metrics import accuracy, bleu, squad_scores
from raylm.inference.engine import Engine


def _in_batches(rows: Sequence[dict], batch_size: int, fn: Callable[[Sequence[dict]], list]) -> list:
    out: list = []
    for start in range(0, len(rows), batch_size):
        out.extend(fn(rows[start : start + batch_size]))
    return out


def evaluate_tasks(engine: Engine, rows: Sequence[dict], max_examples_per_task: int = 300,
                   batch_size: int = 32, max_new_tokens: int = 48) -> dict[str, float]:
    """Sentiment accuracy, QA exact match / F1 and translation BLEU on ``rows``.

    Only the tasks present in ``rows`` are scored; each task uses at most
    ``max_examples_per_task`` rows, taken in order.
    """
    by_task: dict[str, list[dict]] = {}
    for row in rows:
        by_task.setdefault(row.get("task"), []).append(row)
    metrics: dict[str, float] = {}

    sentiment = by_task.get("sentiment", [])[:max_examples_per_task]
    if sentiment:
        predicted = _in_batches(sentiment, batch_size,
                                lambda chunk: [r["label"] for r in engine.classify_sentiment([x["text"] for x in chunk])])
        from raylm.data.formatting import normalize_label

        metrics["sentiment_accuracy"] = accuracy(predicted, [normalize_label(r["label"]) for r in sentiment])
        metrics["sentiment_examples"] = len(sentiment)

    qa = by_task.get("qa", [])[:max_examples_per_task]
    if qa:
        predicted = _in_batches(qa, batch_size, lambda chunk: engine.answer_questions(
            [x["context"] for x in chunk], [x["question"] for x in chunk]))
        em, f1 = squad_scores(predicted, [r["answers"]["text"] for r in qa])
        metrics["qa_exact_match"] = em
        metrics["qa_f1"] = f1
        metrics["qa_examples"] = len(qa)

    translation = by_task.get("translate", [])[:max_examples_per_task]
    if translation:
        predicted = _in_batches(translation, batch_size, lambda chunk: engine.translate(
            [x["source"] for x in chunk], max_new_tokens=max_new_tokens))
        metrics["translation_bleu"] = bleu(predicted, [r["target"] for r in translation])
        metrics["translation_examples"] = len(translation)
    return metrics
