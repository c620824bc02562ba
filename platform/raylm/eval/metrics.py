"""Evaluation metrics: accuracy, SQuAD exact match and F1, sacrebleu BLEU, perplexity."""

from __future__ import annotations

import collections
import math
import re
import string
from typing import Sequence


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
