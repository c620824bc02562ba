"""sacrebleu's private sufficient-statistics API, written for sacrebleu 2.6 (see tests/unit/test_compat.py).

Corpus BLEU and chrF are functions of summed per-sentence n-gram counts;
sacrebleu computes those counts and the score from them in two private
methods of its metric objects, which its own significance tests (paired
bootstrap) use. raylm's bootstrap resamples the same rows.
"""

from __future__ import annotations

from typing import Any, Sequence

WRITTEN_FOR = "2.6"


class CompatError(RuntimeError):
    """A private API raylm relies on is missing from the installed sacrebleu."""


def _method(metric: Any, name: str):
    method = getattr(metric, name, None)
    if method is None:
        import sacrebleu

        raise CompatError(f"raylm.compat: sacrebleu.metrics.{type(metric).__name__}.{name} is gone in sacrebleu "
                          f"{getattr(sacrebleu, '__version__', 'unknown')} (written for {WRITTEN_FOR})")
    return method


def corpus_statistics(metric: Any, hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> list:
    """Per-sentence sufficient statistics of ``metric`` (a ``sacrebleu.metrics.BLEU`` or ``CHRF``): one row
    per hypothesis; ``references`` is a list of reference streams, as for ``corpus_score``."""
    return _method(metric, "_extract_corpus_statistics")(list(hypotheses), [list(stream) for stream in references])


def score_from_statistics(metric: Any, column_sums: Sequence[float]) -> float:
    """``metric``'s corpus score (0-100) from the column sums of :func:`corpus_statistics` rows."""
    return float(_method(metric, "_compute_score_from_stats")(list(column_sums)).score)
