"""Credentials in tracking URIs never reach what raylm writes or prints (config copies, MLflow parameters, model
cards, log lines, job listings), while the real URI is still the one raylm connects with.

The places that need a real MLflow server (the run's parameters, the registered model's card, the driver's log
lines) are checked end to end in tests/integration/test_registry_server.py with a credentialed server URI."""

from __future__ import annotations

import json

import pytest

from raylm.config import ConfigError, load_config
from raylm.config.redaction import has_credentials, is_redacted, is_secret_name, redact_text, redact_uri
from raylm.lifecycle.runs import config_hash, flat_config

PASSWORD = "pg-pass-w0rd"
TOKEN = "tok3n-value"
POSTGRES = f"postgresql://mlflow:{PASSWORD}@db.internal:5432/mlflow"
HTTPS = f"https://raylm:{TOKEN}@mlflow.internal:5000"


@pytest.mark.parametrize("uri, redacted", [
    (POSTGRES, "postgresql://mlflow:***@db.internal:5432/mlflow"),
    (HTTPS, "https://raylm:***@mlflow.internal:5000"),
    (f"https://{TOKEN}@mlflow.internal/path", "https://***@mlflow.internal/path"),
    (f"https://h/api?token={TOKEN}&experiment=a&Password={PASSWORD}#top",
     "https://h/api?token=***&experiment=a&Password=***#top"),
    (f"mysql://u:{PASSWORD}@h/db?charset=utf8", "mysql://u:***@h/db?charset=utf8"),
    # A password holding '@' (not escaped, as people write them): the host is after the last one.
    (f"postgresql://u:p@ss{PASSWORD}@h/db", "postgresql://u:***@h/db"),
])
def test_credentials_in_uris_are_masked_and_the_rest_kept(uri, redacted):
    assert redact_uri(uri) == redacted
    assert has_credentials(uri) and is_redacted(redacted) and not has_credentials(redacted)


@pytest.mark.parametrize("uri", ["sqlite:////tmp/runs/mlflow.db", "http://127.0.0.1:5000", "s3://bucket/runs?x=1",
                                 "/abs/path", "runs", "databricks", "file:///tmp/mlruns",
                                 "https://h/api?max_tokens=5&token_path=/x"])
def test_uris_without_credentials_are_unchanged(uri):
    assert redact_uri(uri) == uri and not has_credentials(uri) and not is_redacted(uri)


def test_secret_names_and_free_text():
    assert all(is_secret_name(name) for name in ("serve.api_key", "HF_TOKEN", "--api-key", "password",
                                                 "AWS_SECRET_ACCESS_KEY", "db.Password"))
    assert not any(is_secret_name(name) for name in ("TOKENIZERS_PARALLELISM", "eval.max_new_tokens",
                                                     "RAY_AUTH_TOKEN_PATH", "serve.api_key_file",
                                                     "data.tokenizer_path", "AWS_ACCESS_KEY_ID", "train.lr"))
    command = (f"python jobs/train.py tracking.tracking_uri={POSTGRES} serve.api_key={TOKEN} train.lr=1e-3 "
               "TOKENIZERS_PARALLELISM=false")
    shown = redact_text(command)
    assert PASSWORD not in shown and TOKEN not in shown
    assert shown == ("python jobs/train.py tracking.tracking_uri=postgresql://mlflow:***@db.internal:5432/mlflow "
                     "serve.api_key=*** train.lr=1e-3 TOKENIZERS_PARALLELISM=false")
    assert redact_text(shown) == shown


def test_config_copy_params_and_card_config_hold_no_credentials_but_the_job_connects_with_them(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    source = [f"data.sources=[{{path: '{HTTPS}/corpus.jsonl', format: jsonl}}]", "data.dev_fraction=0.1"]
    job = load_config(None, ["workdir=/shared/runs", f"tracking.tracking_uri={POSTGRES}", *source])
    assert job.resolved_tracking_uri() == POSTGRES  # what MLflow clients are built with
    public = job.public_dict()  # the model card's "config", MLflow's params, the train loop's job
    assert public["tracking"]["tracking_uri"] == "postgresql://mlflow:***@db.internal:5432/mlflow"
    assert public["data"]["sources"][0]["path"] == "https://raylm:***@mlflow.internal:5000/corpus.jsonl"
    written = job.to_yaml()  # the run's config.yaml, `raylm config show`
    params = flat_config(job)  # what start_run logs, flattened the same way
    for text in (written, json.dumps(public), json.dumps(params)):
        assert PASSWORD not in text and TOKEN not in text
    assert params["tracking.tracking_uri"] == public["tracking"]["tracking_uri"]
    # A new password for the same server is not a different run.
    other = load_config(None, ["workdir=/shared/runs", f"tracking.tracking_uri={POSTGRES.replace(PASSWORD, 'new')}",
                               *source])
    assert config_hash(other) == config_hash(job)


def test_a_recorded_masked_uri_takes_its_credentials_from_the_environment(monkeypatch):
    """A sweep resumes from its recorded (masked) config: the credentials come back from $MLFLOW_TRACKING_URI."""
    recorded = load_config(None, [f"tracking.tracking_uri={POSTGRES}"]).public_dict()
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    from raylm.config import validate_config

    masked = validate_config(recorded)  # a worker rebuilds its job like this and connects with the driver's URI
    with pytest.raises(ConfigError, match=r"tracking.tracking_uri: postgresql://mlflow:\*\*\*@db.internal:5432/"
                                          r"mlflow has its credentials masked .* set \$MLFLOW_TRACKING_URI"):
        masked.resolved_tracking_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"postgresql://mlflow:{PASSWORD}@another-host/mlflow")
    with pytest.raises(ConfigError, match="credentials masked"):
        validate_config(recorded).resolved_tracking_uri()  # another server's credentials are not taken
    monkeypatch.setenv("MLFLOW_TRACKING_URI", POSTGRES)
    assert validate_config(recorded).resolved_tracking_uri() == POSTGRES
