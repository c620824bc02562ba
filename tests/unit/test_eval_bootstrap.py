"""Bootstrap intervals cover known values on synthetic data; the paired test separates real from noise."""

from __future__ import annotations

import math

import numpy as np
import pytest

from raylm.eval.bootstrap import confidence_interval, paired_bootstrap


def _coverage(make_stats, metric, true_value, replications=200, num_samples=400):
    covered = 0
    for seed in range(replications):
        low, high = confidence_interval(make_stats(np.random.default_rng(seed)), metric, 0.95, num_samples, seed)
        covered += low <= true_value <= high
    return covered / replications


def test_accuracy_interval_covers_the_true_rate_about_95_percent_of_the_time():
    coverage = _coverage(lambda rng: (rng.random((300, 1)) < 0.7).astype(float), "sentiment_accuracy", 0.7)
    assert 0.90 <= coverage <= 0.99, coverage


def test_perplexity_interval_covers_the_true_perplexity():
    # Documents of 1-20 tokens whose per-token losses are exponential with mean ln(5): true perplexity 5.
    def documents(rng):
        lengths = rng.integers(1, 21, 250)
        return np.array([[rng.exponential(math.log(5), n).sum(), n] for n in lengths])

    coverage = _coverage(documents, "lm_perplexity", 5.0, replications=120)
    assert 0.88 <= coverage <= 0.99, coverage


def test_interval_narrows_with_more_examples_and_contains_the_point_estimate():
    rng = np.random.default_rng(0)
    small = (rng.random((100, 1)) < 0.5).astype(float)
    large = (rng.random((2500, 1)) < 0.5).astype(float)
    small_low, small_high = confidence_interval(small, "sentiment_accuracy")
    large_low, large_high = confidence_interval(large, "sentiment_accuracy")
    assert small_low <= small.mean() <= small_high and large_low <= large.mean() <= large_high
    assert (large_high - large_low) < (small_high - small_low) / 3
    # Binomial standard error at n=2500: 0.01, so the 95% interval is about 0.04 wide.
    assert 0.03 < large_high - large_low < 0.05


def test_bleu_interval_brackets_the_corpus_score():
    from raylm.eval.metrics import metric_value, task_statistics

    references = [f"ein mann sieht den hund nummer {i} im park" for i in range(60)]
    hypotheses = [r if i % 3 else "eine frau sieht die katze" for i, r in enumerate(references)]
    stats = task_statistics("translate", hypotheses, [{"target": r} for r in references])["translation_bleu"]
    score = metric_value("translation_bleu", stats)
    low, high = confidence_interval(stats, "translation_bleu", num_samples=300)
    assert low < score < high and 0 <= low and high <= 100 and high - low > 1


def test_paired_bootstrap_finds_a_real_gain_and_rejects_noise():
    rng = np.random.default_rng(1)
    truth = rng.random(600)
    better = (truth < 0.80).astype(float).reshape(-1, 1)
    worse = (truth < 0.70).astype(float).reshape(-1, 1)  # strictly nested: a real 10-point gap
    result = paired_bootstrap(better, worse, "sentiment_accuracy")
    assert result.significant and result.delta == pytest.approx(better.mean() - worse.mean())
    assert result.delta_low > 0
    reverse = paired_bootstrap(worse, better, "sentiment_accuracy")
    assert not reverse.significant and reverse.win_rate == 0.0
    same = paired_bootstrap(better, better, "sentiment_accuracy")
    assert not same.significant and same.delta == 0.0
    # A required margin larger than the real gap is not met.
    assert not paired_bootstrap(better, worse, "sentiment_accuracy", min_delta=0.15).significant


def test_paired_bootstrap_false_positive_rate_is_near_five_percent():
    # Two systems of equal quality (independent 75% correct): the one-sided 95% test should fire ~5% of the time.
    fired = 0
    for seed in range(100):
        rng = np.random.default_rng(100 + seed)
        a = (rng.random((400, 1)) < 0.75).astype(float)
        b = (rng.random((400, 1)) < 0.75).astype(float)
        fired += paired_bootstrap(a, b, "sentiment_accuracy", num_samples=300, seed=seed).significant
    assert fired <= 12, fired


def test_lower_is_better_metrics_are_oriented():
    rng = np.random.default_rng(2)
    tokens = rng.integers(5, 15, 300)
    low_loss = np.stack([tokens * 1.0 + rng.normal(0, 0.1, 300), tokens], axis=1)
    high_loss = np.stack([tokens * 1.3 + rng.normal(0, 0.1, 300), tokens], axis=1)
    result = paired_bootstrap(low_loss, high_loss, "lm_perplexity")
    assert result.significant and result.delta > 0 and result.candidate < result.baseline


def test_unpaired_inputs_are_refused():
    with pytest.raises(ValueError, match="same examples"):
        paired_bootstrap(np.ones((10, 1)), np.ones((11, 1)), "sentiment_accuracy")
