"""A real MLflow tracking server: train, register, promote and serve by alias against it.

``mlflow server`` runs as its own process (SQLite backend, local artifact store
served over HTTP, 127.0.0.1). Two tiny GPT-2 runs train through
``workflow.train`` with ``tracking.promote_alias`` (once per test run, shared
with test_train_pipeline.py: tests/server_runs.py): the first becomes the
holder of ``@production`` (there was none); the second, trained five times as
long on two workers, must beat it on dev perplexity by the paired bootstrap
and takes the alias. ``raylm promote`` then refuses to move the alias back to
the weaker version and moves it only with ``--force --reason``. Ray Serve loads
``models:/<name>@production`` and answers over HTTP with that version. Lineage
tags are on every version, and neither the API key given to the runs nor the
token in their tracking URI (``http://user:token@host``, which the server
ignores) appears anywhere: not in run parameters, run tags, version tags, the
model card, the run's files or the driver's log lines.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import requests
from typer.testing import CliRunner

from raylm.common.fingerprints import content_hash
from tests.conftest import SERVE_PORT
from tests.server_runs import MODEL, SECRET, URI_TOKEN


@pytest.fixture(scope="module")
def server(mlflow_server):
    """The run's one MLflow server (conftest): this module's experiments and model name are its own."""
    return mlflow_server


@pytest.fixture(scope="module")
def runs(server_runs):
    """The short and the long run (conftest ``server_runs``: tests/server_runs.py), trained against ``server``."""
    return server_runs.summaries, server_runs.parent_run_id, server_runs.workdir, server_runs.log_lines


def _client(server):
    import mlflow

    return mlflow.tracking.MlflowClient(tracking_uri=server, registry_uri=server)


def _holder(server) -> str:
    return str(_client(server).get_model_version_by_alias(MODEL, "production").version)


def test_train_registers_and_the_gate_promotes_the_better_run(server, runs):
    (short, long), _, _, _ = runs
    assert short["registry_uri"] == f"models:/{MODEL}/1" and long["registry_uri"] == f"models:/{MODEL}/2"
    assert short["promotion"]["outcome"] == "promoted" and short["promotion"]["holder"] is None
    decision = long["promotion"]
    assert decision["outcome"] == "promoted" and decision["holder"] == f"models:/{MODEL}/1"
    (comparison,) = decision["comparisons"]
    assert comparison["metric"] == "lm_perplexity" and comparison["significant"]
    assert comparison["candidate"] < comparison["baseline"]  # lower perplexity
    assert _holder(server) == "2"


def test_lineage_on_every_registered_version(server, runs):
    summaries, parent, _, _ = runs
    for number, summary in enumerate(summaries, start=1):
        version = _client(server).get_model_version(MODEL, str(number))
        tags = version.tags
        assert tags["raylm.run_id"] == summary["run_id"]
        assert tags["raylm.mlflow_run_id"] == summary["mlflow_run_id"] == version.run_id
        assert tags["raylm.parent_run_id"] == parent
        assert len(tags["raylm.config_hash"]) == 16 and tags["raylm.data_fingerprint"]
        assert tags["raylm.code_version"].startswith(("git:", "raylm-"))
        assert tags["raylm.eval_fingerprint"] == summary["eval"]["fingerprint"]
        assert tags["raylm.eval_fingerprint.lm"] == summary["eval"]["task_fingerprints"]["lm"]
        low, high = summary["eval"]["intervals"]["lm_perplexity"]
        assert low < summary["metrics"]["lm_perplexity"] < high
        assert tags["raylm.metric.lm_perplexity"].endswith("(95% CI)")
        assert int(tags["raylm.exported_step"]) == summary["export"]["step"]
        # The content hash of the model folder as registered: on the version, its run and in run.json.
        assert tags["raylm.content_hash"] == content_hash(summary["model_dir"])
        assert _client(server).get_run(version.run_id).data.tags["raylm.content_hash"] == tags["raylm.content_hash"]
        record = json.loads((Path(summary["run_dir"]) / "run.json").read_text())
        assert [entry["content_hash"] for entry in record["registered"]] == [tags["raylm.content_hash"]]
    # Both runs scored the same dev rows: the precondition of a fair comparison.
    assert summaries[0]["eval"]["fingerprint"] == summaries[1]["eval"]["fingerprint"]


def test_no_secret_in_params_tags_cards_config_copies_or_log_lines(server, runs, tmp_path):
    import mlflow

    summaries, _, workdir, log_lines = runs
    client = _client(server)
    masked_uri = server.replace("http://", "http://raylm:***@")
    for number, summary in enumerate(summaries, start=1):
        run = client.get_run(summary["mlflow_run_id"])
        assert run.data.params and "serve.port" in run.data.params
        # The key file's path (unset here) may be recorded; the key never is.
        assert not any(key.startswith("serve.api_key") and key != "serve.api_key_file" for key in run.data.params)
        assert run.data.params["tracking.tracking_uri"] == masked_uri
        for mapping in (run.data.params, run.data.tags, client.get_model_version(MODEL, str(number)).tags):
            assert SECRET not in json.dumps(mapping) and URI_TOKEN not in json.dumps(mapping)
        folder = mlflow.artifacts.download_artifacts(artifact_uri=client.get_model_version(MODEL, str(number)).source,
                                                     dst_path=str(tmp_path / str(number)), tracking_uri=server)
        for path in Path(folder).rglob("*"):
            if path.is_file():
                content = path.read_bytes()
                assert SECRET.encode() not in content and URI_TOKEN.encode() not in content, path
        card = json.loads((Path(folder) / "raylm.json").read_text())
        assert "api_key" not in card["config"]["serve"]
        assert card["config"]["tracking"]["tracking_uri"] == masked_uri
    # Every file of the runs (config.yaml, run.json, model folders, Ray Train's results and checkpoints).
    for path in Path(workdir).rglob("*"):
        if path.is_file():
            content = path.read_bytes()
            assert SECRET.encode() not in content and URI_TOKEN.encode() not in content, path
    assert f"MLflow run {summaries[0]['mlflow_run_id']} at {masked_uri}" in log_lines
    assert not [line for line in log_lines if URI_TOKEN in line or SECRET in line]


def test_promote_refuses_the_weaker_version_and_force_records_why(server, runs):
    from raylm.cli import app

    runner = CliRunner()
    base = ["promote", f"models:/{MODEL}/1", "--alias", "production", f"tracking.tracking_uri={server}",
            "eval.promotion_metrics=[lm_perplexity]"]
    refused = runner.invoke(app, base)
    assert refused.exit_code == 1, refused.output
    assert "lm_perplexity" in refused.output and f"refused: @production stays on models:/{MODEL}/2" in refused.output
    assert _holder(server) == "2"
    forced = runner.invoke(app, base + ["--force", "--reason", "canary of the short run"])
    assert forced.exit_code == 0, forced.output
    assert _holder(server) == "1"
    record = json.loads(_client(server).get_model_version(MODEL, "1").tags["raylm.promotion.production"])
    assert record["outcome"] == "forced" and record["force_reason"] == "canary of the short run"


def test_serve_resolves_the_alias_at_deploy_time(server, runs, tmp_path):
    """After the forced move, @production is version 1: Serve must load that one (the short run).

    The served translations are compared with each version's own, computed here
    with the same engine: they must be version 1's (and the versions must differ).
    """
    from ray import serve

    from raylm.config import ServeConfig
    from raylm.inference.task_model import InferenceOptions, load_task_model
    from raylm.serving.app import start_serving
    from raylm.common.tracking import resolve_model_path

    assert _holder(server) == "1"
    sentences = ["the dog sees the cat.", "today the big woman buys a red book.", "the child does not sleep."]
    expected = {}
    for number in ("1", "2"):
        folder = resolve_model_path(f"models:/{MODEL}/{number}", server, str(tmp_path / number))
        model = load_task_model(folder, InferenceOptions(max_new_tokens=8))
        # One sentence per call, as each HTTP request below arrives alone (no padding differences).
        expected[number] = [model.translate([sentence])[0] for sentence in sentences]
    assert expected["1"] != expected["2"]
    # The run's one Serve instance (conftest.SERVE_PORT): this deploys the `raylm` app and deletes it after.
    config = ServeConfig(port=SERVE_PORT, api_key=SECRET, max_new_tokens=8)
    url = start_serving(f"models:/{MODEL}@production", config, tracking_uri=server)
    try:
        headers = {"Authorization": f"Bearer {SECRET}"}
        served = []
        for sentence in sentences:
            answer = requests.post(f"{url}/v1/translate", json={"text": sentence}, headers=headers, timeout=120)
            assert answer.status_code == 200, answer.text
            served.append(answer.json()["translation"])
        assert served == expected["1"]
        models = requests.get(f"{url}/v1/models", headers=headers, timeout=60).json()
        assert [entry["id"] for entry in models["data"]] == [f"models:/{MODEL}@production"]
    finally:
        serve.delete("raylm")
