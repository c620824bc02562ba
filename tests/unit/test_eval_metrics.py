"""Each evaluation metric against values computed by hand (and against the reference libraries)."""

from __future__ import annotations

import math

import pytest

from raylm.eval import metrics
from raylm.eval.metrics import METRICS, chrf, macro_f1, metric_value, task_statistics


def test_accuracy_and_macro_f1_by_hand():
    predicted = ["positive", "negative", "positive", "positive", "negative"]
    gold = ["positive", "positive", "negative", "positive", "negative"]
    # positive: TP 2, FP 1, FN 1 -> F1 4/6; negative: TP 1, FP 1, FN 1 -> F1 2/4
    assert macro_f1(predicted, gold, ["negative", "positive"]) == pytest.approx((4 / 6 + 2 / 4) / 2)
    stats = task_statistics("sentiment", predicted, [{"label": 1}, {"label": 1}, {"label": 0}, {"label": "positive"},
                                                     {"label": "0"}])
    assert metric_value("sentiment_accuracy", stats["sentiment_accuracy"]) == pytest.approx(3 / 5)
    assert metric_value("sentiment_macro_f1", stats["sentiment_macro_f1"]) == pytest.approx(7 / 12)


def test_macro_f1_counts_a_class_never_predicted_as_zero():
    # Always "positive": positive F1 = 2*2/(2*2+2+0) = 2/3, negative has no TP -> 0; macro = 1/3, accuracy 1/2.
    assert macro_f1(["positive"] * 4, ["positive", "positive", "negative", "negative"],
                    ["negative", "positive"]) == pytest.approx(1 / 3)


def test_macro_f1_with_three_labels_by_hand():
    # a: TP 1, FP 1, FN 1 -> 1/2; b: TP 1, FP 0, FN 1 -> 2/3; c: TP 0, FP 1, FN 0 -> 0.
    predicted, gold = ["a", "b", "a", "c"], ["a", "b", "b", "a"]
    assert macro_f1(predicted, gold, ["a", "b", "c"]) == pytest.approx((1 / 2 + 2 / 3 + 0) / 3)


def test_squad_exact_match_and_f1_by_hand():
    rows = [{"answers": {"text": ["Denver Broncos", "Broncos"]}}, {"answers": {"text": ["in 1990"]}},
            {"answers": {"text": ["the red dog"]}}]
    predicted = ["the Broncos!", "1990 or 1991", "cat"]
    stats = task_statistics("qa", predicted, rows)
    # row 1: EM against "Broncos" after normalisation; row 2: overlap {1990}: P 1/3, R 1/2 -> F1 0.4; row 3: 0.
    assert stats["qa_exact_match"].ravel().tolist() == [1.0, 0.0, 0.0]
    assert stats["qa_f1"].ravel().tolist() == pytest.approx([1.0, 0.4, 0.0])
    assert metric_value("qa_f1", stats["qa_f1"]) == pytest.approx(1.4 / 3)


def test_bleu_from_summed_statistics_by_hand():
    hypotheses = ["the cat sat on the mat", "a dog"]
    references = ["the cat sat on a mat", "the dog"]
    # Matches: 1-grams 5+1 of 6+2, 2-grams 3 of 5+1, 3-grams 2 of 4, 4-grams 1 of 3; lengths 8 vs 8 (BP 1).
    expected = 100 * math.exp((math.log(6 / 8) + math.log(3 / 6) + math.log(2 / 4) + math.log(1 / 3)) / 4)
    stats = task_statistics("translate", hypotheses, [{"target": r} for r in references])
    assert metric_value("translation_bleu", stats["translation_bleu"]) == pytest.approx(expected)
    assert metric_value("translation_bleu", stats["translation_bleu"]) == pytest.approx(metrics.bleu(hypotheses,
                                                                                                    references))


def test_chrf_by_hand_and_against_sacrebleu():
    # "ab" vs "ab": every character n-gram (n <= 2 exists) matches -> 100; unrelated strings -> 0.
    assert chrf(["ab"], ["ab"]) == pytest.approx(100.0)
    assert chrf(["xyz"], ["abc"]) == pytest.approx(0.0)
    hypotheses, references = ["Der Hund sieht die Katze.", "ein Mann"], ["Der Hund sah die Katze.", "Ein Mann."]
    stats = task_statistics("translate", hypotheses, [{"target": r} for r in references])
    assert metric_value("translation_chrf", stats["translation_chrf"]) == pytest.approx(chrf(hypotheses, references))
    assert 40 < chrf(hypotheses, references) < 100


def test_perplexity_from_token_losses():
    # Two documents: 3 tokens with summed loss 3 ln 2, 1 token with loss ln 16 -> mean ln(2^3 * 16) / 4 = ln 2^(7/4).
    stats = task_statistics("lm", [[3 * math.log(2), 3], [math.log(16), 1]], [{}, {}])
    assert metric_value("lm_perplexity", stats["lm_perplexity"]) == pytest.approx(2 ** (7 / 4))
    assert METRICS["lm_perplexity"].higher_is_better is False


def test_statistics_need_one_prediction_per_row():
    with pytest.raises(ValueError, match="2 predictions for 1 rows"):
        task_statistics("qa", ["a", "b"], [{"answers": {"text": ["a"]}}])
