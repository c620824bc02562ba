"""The promotion gate against a real MLflow store (SQLite): versions with eval reports of known quality.

Each registered version's model folder holds an ``eval_report.json`` scored by
the evaluator's own scoring code on fixed predictions (no model needed): the
holder is 70% right on 400 sentiment examples; a better candidate is right
wherever the holder is and on more; a worse one is right on a subset; another
candidate was scored on different rows.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from raylm.common import tracking
from raylm.config import EvalConfig
from raylm.eval.runner import EvalReport, fingerprint_rows, score
from raylm.lifecycle.promotion import PromotionRefused, promote

NUM_EXAMPLES = 400


def _rows(offset: int = 0) -> list[dict]:
    return [{"task": "sentiment", "text": f"review number {i + offset}", "label": (i * 7 + offset) % 2}
            for i in range(NUM_EXAMPLES)]


def _report(correct: np.ndarray, rows: list[dict]) -> EvalReport:
    labels = ["negative", "positive"]
    predictions = [labels[row["label"]] if right else labels[1 - row["label"]] for row, right in zip(rows, correct)]
    metrics, intervals, stats = score({"sentiment": predictions}, {"sentiment": rows}, num_samples=200)
    return EvalReport(metrics=metrics, intervals=intervals, examples={"sentiment": len(rows)},
                      task_fingerprints={"sentiment": fingerprint_rows("sentiment", rows)}, confidence=0.95,
                      stats=stats, predictions={"sentiment": predictions})


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """Versions 1 (holder, 70%), 2 (better, 85%), 3 (worse, 60%), 4 (other eval set), 5 (no report)."""
    root = tmp_path_factory.mktemp("promotion")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    truth = np.random.default_rng(0).random(NUM_EXAMPLES)
    reports = [_report(truth < 0.70, _rows()), _report(truth < 0.85, _rows()), _report(truth < 0.60, _rows()),
               _report(truth < 0.95, _rows(offset=1)), None]
    versions = []
    for index, report in enumerate(reports, start=1):
        folder = root / f"model{index}"
        folder.mkdir()
        (folder / "raylm.json").write_text(json.dumps({"run_id": f"run{index}"}))
        if report is not None:
            (folder / "eval_report.json").write_text(report.to_json())
        run_id = tracking.start_run(uri, "promotion", f"run{index}", {"index": index})
        versions.append(tracking.finish_run(uri, run_id, folder, {}, "sentiment-model"))
    assert versions == [f"models:/sentiment-model/{i}" for i in range(1, 6)]
    promote(uri, versions[0], "production", EvalConfig())  # no holder yet: moves
    return uri


def _holder(uri: str, alias: str = "production") -> str:
    return str(tracking.mlflow_client(uri).get_model_version_by_alias("sentiment-model", alias).version)


def _decision_tag(uri: str, version: str, alias: str = "production") -> dict:
    tags = tracking.mlflow_client(uri).get_model_version("sentiment-model", version).tags
    return json.loads(tags[f"raylm.promotion.{alias}"])


def test_first_holder_needs_no_comparison(registry):
    assert _holder(registry) == "1"
    assert _decision_tag(registry, "1")["outcome"] == "promoted"


def test_worse_candidate_is_refused_with_its_table(registry):
    with pytest.raises(PromotionRefused) as refused:
        promote(registry, "models:/sentiment-model/3", "production", EvalConfig())
    decision = refused.value.decision
    assert _holder(registry) == "1"
    (comparison,) = decision.comparisons
    assert comparison.metric == "sentiment_accuracy" and comparison.delta < 0 and not comparison.significant
    table = decision.table()
    assert "sentiment_accuracy" in table and "refused: @production stays on models:/sentiment-model/1" in table
    assert _decision_tag(registry, "3")["outcome"] == "refused"


def test_candidate_scored_on_another_eval_set_is_refused(registry):
    # Version 4 is right 95% of the time, but on other rows: not comparable.
    with pytest.raises(PromotionRefused) as refused:
        promote(registry, "models:/sentiment-model/4", "production", EvalConfig())
    assert any("different eval sets" in reason for reason in refused.value.decision.reasons)
    assert not refused.value.decision.comparisons and _holder(registry) == "1"


def test_candidate_without_an_eval_report_is_refused(registry):
    with pytest.raises(PromotionRefused, match="no eval_report.json"):
        promote(registry, "models:/sentiment-model/5", "production", EvalConfig())


def test_a_required_margin_larger_than_the_gain_refuses(registry):
    # Version 2 is 15 points better than the holder: real, but not the 25 points this config asks for.
    config = EvalConfig(promotion_metrics=["sentiment_accuracy"], promotion_min_delta={"sentiment_accuracy": 0.25})
    with pytest.raises(PromotionRefused) as refused:
        promote(registry, "models:/sentiment-model/2", "production", config)
    (comparison,) = refused.value.decision.comparisons
    assert comparison.delta == pytest.approx(0.15, abs=0.05) and comparison.delta_low > 0
    assert _holder(registry) == "1"


def test_cli_refuses_then_forces_with_a_recorded_reason(registry, monkeypatch):
    from raylm.cli import app

    runner = CliRunner()
    base = ["promote", "models:/sentiment-model/3", "--alias", "production", f"tracking.tracking_uri={registry}"]
    refused = runner.invoke(app, base)
    assert refused.exit_code == 1, refused.output
    assert "not shown better" in refused.output and "refused:" in refused.output
    no_reason = runner.invoke(app, base + ["--force"])
    assert no_reason.exit_code == 2 and "--reason" in no_reason.output
    forced = runner.invoke(app, base + ["--force", "--reason", "rollback drill"])
    assert forced.exit_code == 0, forced.output
    assert _holder(registry) == "3"
    tag = _decision_tag(registry, "3")
    assert tag["outcome"] == "forced" and tag["force_reason"] == "rollback drill"
    assert tag["holder"] == "models:/sentiment-model/1" and tag["comparisons"][0]["significant"] is False


def test_better_candidate_is_promoted_over_the_holder(registry):
    # Runs after the forced rollback: version 3 (60%) holds @production; version 2 (85%) beats it.
    assert _holder(registry) == "3"
    decision = promote(registry, "models:/sentiment-model/2", "production", EvalConfig())
    assert decision.outcome == "promoted" and _holder(registry) == "2"
    (comparison,) = decision.comparisons
    assert comparison.significant and comparison.delta == pytest.approx(0.25, abs=0.05)
    assert comparison.delta_low > 0
    again = promote(registry, "models:/sentiment-model/2", "production", EvalConfig())
    assert again.outcome == "unchanged"
