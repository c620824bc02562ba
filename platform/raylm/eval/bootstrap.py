"""Bootstrap confidence intervals and the paired bootstrap test over evaluation examples.

Every metric in :mod:`raylm.eval.metrics` is a function of the column sums of a
per-example statistics matrix, so one bootstrap serves them all: a resample of
the examples is a vector of multinomial counts ``w`` (how often each example
was drawn), and the resampled metric is the metric of ``w @ stats``. Corpus
BLEU and chrF are resampled as sacrebleu's own significance test does, by
resampling sentences and recomputing the corpus score from the summed n-gram
statistics.

The paired test (Koehn 2004) draws the same resamples for two systems scored
on the same examples and counts how often one beats the other: a candidate's
gain is called real at confidence ``c`` when, in at least a share ``c`` of the
resamples, it beats the baseline by more than the required margin. Intervals
are percentile intervals.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterator

import numpy as np

from raylm.eval.metrics import METRICS, MetricSpec

DEFAULT_SAMPLES = 1000
DEFAULT_CONFIDENCE = 0.95
# Resamples are drawn in chunks so that the (chunk x examples) count matrix stays small.
_CHUNK = 100


def _resample_counts(num_examples: int, num_samples: int, seed: int) -> Iterator[np.ndarray]:
    """Chunks of multinomial count vectors: row ``i`` says how often each example is in resample ``i``."""
    rng = np.random.default_rng(seed)
    uniform = np.full(num_examples, 1.0 / num_examples)
    for start in range(0, num_samples, _CHUNK):
        yield rng.multinomial(num_examples, uniform, size=min(_CHUNK, num_samples - start)).astype(np.float64)


def _spec(metric: str | MetricSpec) -> MetricSpec:
    return metric if isinstance(metric, MetricSpec) else METRICS[metric]


def bootstrap_samples(stats: np.ndarray, metric: str | MetricSpec, num_samples: int = DEFAULT_SAMPLES,
                      seed: int = 0) -> np.ndarray:
    """The metric on ``num_samples`` resamples (with replacement) of the rows of ``stats``."""
    spec = _spec(metric)
    stats = np.asarray(stats, dtype=np.float64)
    if stats.ndim != 2 or len(stats) == 0:
        raise ValueError(f"{spec.name}: need a non-empty (examples x statistics) matrix")
    values = [spec.values(counts @ stats, len(stats)) for counts in _resample_counts(len(stats), num_samples, seed)]
    return np.concatenate(values)


def percentile_interval(samples: np.ndarray, confidence: float = DEFAULT_CONFIDENCE) -> tuple[float, float]:
    """The central ``confidence`` interval of ``samples``."""
    if not 0 < confidence < 1:
        raise ValueError("confidence must be between 0 and 1")
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(samples, [tail, 100 - tail])
    return float(low), float(high)


def confidence_interval(stats: np.ndarray, metric: str | MetricSpec, confidence: float = DEFAULT_CONFIDENCE,
                        num_samples: int = DEFAULT_SAMPLES, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of ``metric`` over the examples whose statistics are ``stats``."""
    return percentile_interval(bootstrap_samples(stats, metric, num_samples, seed), confidence)


@dataclass
class PairedComparison:
    """The paired bootstrap of one metric: candidate vs baseline on the same examples.

    ``delta`` is oriented so that positive means the candidate is better (for a
    lower-is-better metric such as perplexity it is baseline minus candidate).
    ``win_rate`` is the share of resamples in which the oriented delta exceeds
    ``min_delta``; the gain is significant when ``win_rate >= confidence``.
    """

    metric: str
    candidate: float
    baseline: float
    delta: float
    delta_low: float
    delta_high: float
    win_rate: float
    min_delta: float
    confidence: float
    num_examples: int
    num_samples: int

    @property
    def significant(self) -> bool:
        return self.win_rate >= self.confidence

    def as_dict(self) -> dict:
        return {**asdict(self), "significant": self.significant}


def paired_bootstrap(candidate_stats: np.ndarray, baseline_stats: np.ndarray, metric: str | MetricSpec,
                     min_delta: float = 0.0, confidence: float = DEFAULT_CONFIDENCE,
                     num_samples: int = DEFAULT_SAMPLES, seed: int = 0) -> PairedComparison:
    """Paired bootstrap of ``metric`` between two systems scored on the same examples (same row order)."""
    spec = _spec(metric)
    candidate_stats = np.asarray(candidate_stats, dtype=np.float64)
    baseline_stats = np.asarray(baseline_stats, dtype=np.float64)
    if candidate_stats.shape != baseline_stats.shape or len(candidate_stats) == 0:
        raise ValueError(f"{spec.name}: the two systems were not scored on the same examples "
                         f"({candidate_stats.shape} vs {baseline_stats.shape})")
    count = len(candidate_stats)
    sign = 1.0 if spec.higher_is_better else -1.0
    deltas = []
    for counts in _resample_counts(count, num_samples, seed):
        deltas.append(sign * (spec.values(counts @ candidate_stats, count) - spec.values(counts @ baseline_stats,
                                                                                           count)))
    deltas = np.concatenate(deltas)
    low, high = percentile_interval(deltas, confidence)
    candidate = spec.value(candidate_stats.sum(0), count)
    baseline = spec.value(baseline_stats.sum(0), count)
    return PairedComparison(
        metric=spec.name, candidate=candidate, baseline=baseline, delta=sign * (candidate - baseline),
        delta_low=low, delta_high=high, win_rate=float(np.mean(deltas > min_delta)), min_delta=min_delta,
        confidence=confidence, num_examples=count, num_samples=num_samples,
    )
