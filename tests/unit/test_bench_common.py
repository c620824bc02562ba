"""The benchmarks' shared arithmetic: overall rate over equal-work logging intervals."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from _common import SizedTokenizer, overall_rate  # noqa: E402


def test_overall_rate_is_the_harmonic_mean_over_intervals_after_the_warmup():
    history = [{"step": 10, "tokens_per_s": 10.0}, {"step": 20, "tokens_per_s": 100.0},
               {"step": 30, "tokens_per_s": 300.0}, {"step": 40, "mfu": 0.5}]
    # 1000 tokens at 100/s (10 s) + 1000 tokens at 300/s (3.3 s) = 2000 tokens in 13.3 s
    assert overall_rate(history, after_step=10) == pytest.approx(150.0)
    assert overall_rate(history, "mfu") == pytest.approx(0.5)
    with pytest.raises(ValueError, match="no logged tokens_per_s after step 30"):
        overall_rate(history, after_step=30)


def test_sized_tokenizer_reports_its_size_and_special_ids():
    tokenizer = SizedTokenizer(512, eos_token_id=0, pad_token_id=1)
    assert len(tokenizer) == 512 and (tokenizer.eos_token_id, tokenizer.pad_token_id) == (0, 1)
