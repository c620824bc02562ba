"""The default `make demo` configuration reaches its dev-split targets (runs the full demo: minutes)."""

import json
from pathlib import Path

import pytest

from tests.integration.test_cli import _raylm


@pytest.mark.slow
def test_default_demo_reaches_targets(tmp_path):
    result = _raylm("demo", "--config", "jobs/configs/demo.yaml", f"workdir={tmp_path}", "serve.port=8125",
                    timeout=1500)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads(Path(result.stdout.strip().splitlines()[-1]).read_text())
    metrics = summary["metrics"]
    assert metrics["sentiment_examples"] == metrics["qa_examples"] == metrics["translate_examples"] == 300
    assert metrics["sentiment_accuracy"] >= 0.90, metrics
    assert metrics["qa_exact_match"] >= 0.60, metrics
    assert metrics["translation_bleu"] >= 40, metrics
    answers = summary["answers"]
    assert answers["qa"]["response"]["answer"] in answers["qa"]["request"]["context"]
