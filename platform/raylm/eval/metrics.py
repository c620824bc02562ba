"""Evaluation metrics: accuracy, macro-F1, SQuAD exact match and F1, sacrebleu BLEU and chrF, perplexity."""

from __future__ import annotations

import collections
import math
import re
import string
from typing import Any, Callable, Sequence

import numpy as np

from raylm.compat.sacrebleu import corpus_statistics, score_from_statistics
from raylm.data.formatting import SENTIMENT_LABELS, normalize_label


def accuracy(predictions: Sequence[str], references: Sequence[str]) -> float:
    if len(predictions) != len(references):
        raise ValueError("predictions and references differ in length")
    if not references:
        return 0.0
    return sum(p == r for p, r in zip(predictions, references)) / len(references)


def normalize_answer(text: str) -> str:
    """SQuAD v1.1 normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    return float(any(normalize_answer(prediction) == normalize_answer(answer) for answer in answers))


def token_f1(prediction: str, answers: Sequence[str]) -> float:
    best = 0.0
    predicted_tokens = normalize_answer(prediction).split()
    for answer in answers:
        answer_tokens = normalize_answer(answer).split()
        common = collections.Counter(predicted_tokens) & collections.Counter(answer_tokens)
        overlap = sum(common.values())
        if overlap == 0:
            continue
        precision = overlap / len(predicted_tokens)
        recall = overlap / len(answer_tokens)
        best = max(best, 2 * precision * recall / (precision + recall))
    return best


def squad_scores(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> tuple[float, float]:
    """Mean exact match and F1 over a set of questions."""
    if not answers:
        return 0.0, 0.0
    em = sum(exact_match(p, a) for p, a in zip(predictions, answers)) / len(answers)
    f1 = sum(token_f1(p, a) for p, a in zip(predictions, answers)) / len(answers)
    return em, f1


def bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU (sacrebleu, default 13a tokenisation), 0-100."""
    import sacrebleu

    return float(sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score)


def perplexity(mean_loss: float) -> float:
    return float(math.exp(min(mean_loss, 50.0)))


def macro_f1(predictions: Sequence[str], references: Sequence[str], labels: Sequence[str]) -> float:
    """Mean over ``labels`` of each class's F1 = 2TP / (2TP + FP + FN); a class with no TP, FP or FN scores 0.

    The same definition as ``sklearn.metrics.f1_score(average="macro", labels=labels, zero_division=0)``.
    """
    return float(METRICS["sentiment_macro_f1"].value(classification_stats(predictions, references, labels).sum(0),
                                                     len(references)))


def chrf(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus chrF (sacrebleu's defaults: character 6-grams, beta 2), 0-100."""
    import sacrebleu

    return float(sacrebleu.corpus_chrf(list(hypotheses), [list(references)]).score)


# --------------------------------------------------------------------------- per-example statistics
#
# Every metric is a function of the column sums of a per-example statistics matrix (one row per
# example): accuracy and EM are means of 0/1 columns, macro-F1 is a function of per-class TP/FP/FN
# counts, corpus BLEU and chrF are functions of summed n-gram counts (sacrebleu's own sufficient
# statistics), perplexity is exp(summed loss / summed tokens). Resampling examples is then resampling
# rows, which is what the bootstrap in raylm.eval.bootstrap does, for every metric alike.


class MetricSpec:
    """A metric computed from summed per-example statistics; ``higher_is_better`` orients comparisons."""

    def __init__(self, name: str, task: str, higher_is_better: bool,
                 value_fn: Callable[[np.ndarray, int], float], description: str,
                 rows_fn: Callable[[np.ndarray, int], np.ndarray] | None = None):
        self.name = name
        self.task = task
        self.higher_is_better = higher_is_better
        self._value_fn = value_fn
        self._rows_fn = rows_fn  # the same function on a (samples, K) matrix, when numpy can do it at once
        self.description = description

    def value(self, column_sums: np.ndarray, num_examples: int) -> float:
        """The metric for one set of summed statistics (``num_examples`` rows were summed)."""
        return float(self._value_fn(np.asarray(column_sums, dtype=np.float64), num_examples))

    def values(self, column_sums: np.ndarray, num_examples: int) -> np.ndarray:
        """The metric for each row of a ``(samples, K)`` matrix of summed statistics."""
        if self._rows_fn is not None:
            return np.asarray(self._rows_fn(np.asarray(column_sums, dtype=np.float64), num_examples), dtype=np.float64)
        return np.array([self.value(row, num_examples) for row in np.asarray(column_sums, dtype=np.float64)])


def _mean(sums: np.ndarray, count: int) -> float:
    return float(sums[0]) / count if count else 0.0


def _means(sums: np.ndarray, count: int) -> np.ndarray:
    return sums[:, 0] / count if count else np.zeros(len(sums))


def _perplexities(sums: np.ndarray, count: int) -> np.ndarray:
    del count
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(sums[:, 1] > 0, np.exp(np.minimum(sums[:, 0] / sums[:, 1], 50.0)), np.inf)


def _macro_f1_from_counts(sums: np.ndarray, count: int) -> float:
    del count
    tp, fp, fn = sums.reshape(-1, 3).T
    denominators = 2 * tp + fp + fn
    scores = np.divide(2 * tp, denominators, out=np.zeros_like(tp), where=denominators > 0)
    return float(scores.mean())


def _sacrebleu_value(kind: str) -> Callable[[np.ndarray, int], float]:
    def value(sums: np.ndarray, count: int) -> float:
        del count
        return score_from_statistics(_sacrebleu_metric(kind), [int(round(x)) if kind == "bleu" else float(x)
                                                               for x in sums])

    return value


def _perplexity_from_sums(sums: np.ndarray, count: int) -> float:
    del count
    return perplexity(float(sums[0]) / float(sums[1])) if sums[1] > 0 else float("inf")


METRICS: dict[str, MetricSpec] = {spec.name: spec for spec in (
    MetricSpec("sentiment_accuracy", "sentiment", True, _mean, "share of labels predicted exactly", _means),
    MetricSpec("sentiment_macro_f1", "sentiment", True, _macro_f1_from_counts, "mean per-class F1"),
    MetricSpec("qa_exact_match", "qa", True, _mean, "SQuAD v1.1 exact match (normalised answers)", _means),
    MetricSpec("qa_f1", "qa", True, _mean, "SQuAD v1.1 token F1 (best over gold answers)", _means),
    MetricSpec("translation_bleu", "translate", True, _sacrebleu_value("bleu"), "sacrebleu corpus BLEU, 13a"),
    MetricSpec("translation_chrf", "translate", True, _sacrebleu_value("chrf"), "sacrebleu corpus chrF2"),
    MetricSpec("lm_perplexity", "lm", False, _perplexity_from_sums, "exp(mean next-token loss) on text rows",
               _perplexities),
)}


_SACREBLEU: dict[str, Any] = {}


def _sacrebleu_metric(kind: str):
    if kind not in _SACREBLEU:
        from sacrebleu.metrics import BLEU, CHRF

        _SACREBLEU[kind] = BLEU() if kind == "bleu" else CHRF()
    return _SACREBLEU[kind]


def classification_stats(predictions: Sequence[str], references: Sequence[str],
                         labels: Sequence[str]) -> np.ndarray:
    """Per-example ``[TP, FP, FN]`` for each label in ``labels`` (shape ``(N, 3 * len(labels))``)."""
    if len(predictions) != len(references):
        raise ValueError("predictions and references differ in length")
    stats = np.zeros((len(references), 3 * len(labels)), dtype=np.float64)
    index = {label: position for position, label in enumerate(labels)}
    for row, (predicted, reference) in enumerate(zip(predictions, references)):
        if predicted == reference:
            stats[row, 3 * index[reference]] = 1
            continue
        if predicted in index:
            stats[row, 3 * index[predicted] + 1] = 1
        if reference in index:
            stats[row, 3 * index[reference] + 2] = 1
    return stats


def sacrebleu_stats(kind: str, hypotheses: Sequence[str], references: Sequence[str]) -> np.ndarray:
    """sacrebleu's per-sentence sufficient statistics (``kind``: bleu or chrf), one row per sentence."""
    if len(hypotheses) != len(references):
        raise ValueError("hypotheses and references differ in length")
    rows = corpus_statistics(_sacrebleu_metric(kind), hypotheses, [references])
    return np.asarray(rows, dtype=np.float64)


def task_statistics(task: str, predictions: Sequence[Any], rows: Sequence[dict]) -> dict[str, np.ndarray]:
    """Per-example statistics of every metric of ``task`` for ``predictions`` on labelled ``rows``.

    Predictions are what the task model returns: a label word (sentiment), an answer
    string (qa), a translation (translate), or ``[summed token loss, tokens]`` (lm).
    """
    if len(predictions) != len(rows):
        raise ValueError(f"{task}: {len(predictions)} predictions for {len(rows)} rows")
    if task == "sentiment":
        references = [normalize_label(row["label"]) for row in rows]
        correct = np.array([[float(p == r)] for p, r in zip(predictions, references)]).reshape(-1, 1)
        return {"sentiment_accuracy": correct,
                "sentiment_macro_f1": classification_stats(predictions, references, SENTIMENT_LABELS)}
    if task == "qa":
        answers = [row["answers"]["text"] if isinstance(row["answers"], dict) else row["answers"] for row in rows]
        return {"qa_exact_match": np.array([[exact_match(p, a)] for p, a in zip(predictions, answers)]).reshape(-1, 1),
                "qa_f1": np.array([[token_f1(p, a)] for p, a in zip(predictions, answers)]).reshape(-1, 1)}
    if task == "translate":
        references = [row["target"] for row in rows]
        return {"translation_bleu": sacrebleu_stats("bleu", predictions, references),
                "translation_chrf": sacrebleu_stats("chrf", predictions, references)}
    if task == "lm":
        return {"lm_perplexity": np.asarray(predictions, dtype=np.float64).reshape(-1, 2)}
    raise ValueError(f"no metrics for task {task!r}")


def metric_value(name: str, stats: np.ndarray) -> float:
    """The metric ``name`` over all examples of its statistics matrix."""
    stats = np.asarray(stats, dtype=np.float64)
    return METRICS[name].value(stats.sum(0), len(stats))
