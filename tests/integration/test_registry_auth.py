"""The cluster's MLflow server as cluster.yaml starts it (deploy/mlflow/server.sh: MLflow's basic-auth app,
credentials derived from the Ray token by deploy/mlflow/credentials.sh), tried as an attacker and as raylm.

Without the credentials (or with a wrong password) nothing can be read or written:
no run, no registered model, no alias move, no artifact. With them, raylm
registers a model and resolves its alias through the server's artifact proxy.
Someone who can write the artifact store directly (not through MLflow) and
changes a weight file gets the version refused by its content hash.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import requests
from safetensors.numpy import save_file

from raylm.common import tracking
from raylm.common.fingerprints import content_hash
from tests.conftest import REPO_ROOT
from tests.integration.local_cluster import BIN, kill_group, start_server

PORT = 8462
DEPLOY = REPO_ROOT / "deploy" / "mlflow"


def _credentials(home: Path) -> dict[str, str]:
    """What credentials.sh exports for the Ray token under ``home``."""
    shown = subprocess.run(["bash", "-c", f'. "{DEPLOY / "credentials.sh"}" && env'], capture_output=True,
                           text=True, env={"HOME": str(home), "PATH": os.environ["PATH"]}, check=True).stdout
    return dict(line.split("=", 1) for line in shown.splitlines()
                if line.startswith(("MLFLOW_TRACKING_USERNAME=", "MLFLOW_TRACKING_PASSWORD=")))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """deploy/mlflow/server.sh on 127.0.0.1 with its own HOME (Ray token, ~/mlflow) and a local artifact store."""
    home = tmp_path_factory.mktemp("head")
    (home / ".ray").mkdir()
    (home / ".ray" / "auth_token").write_text(os.urandom(24).hex() + "\n")
    artifacts = home / "artifact-store"
    env = {key: value for key, value in os.environ.items() if not key.startswith("MLFLOW_")}
    env.update(HOME=str(home), PATH=f"{BIN}:{env['PATH']}", MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    process = start_server(["bash", str(DEPLOY / "server.sh"), str(artifacts), "--host", "127.0.0.1",
                            "--port", str(PORT), "--workers", "1"], env, home / "server.log",
                           f"http://127.0.0.1:{PORT}/health", "MLflow server (basic-auth)", timeout_s=300)
    try:
        yield f"http://127.0.0.1:{PORT}", home, artifacts
    finally:
        kill_group(process, grace_s=5)


@pytest.fixture(scope="module")
def registered(server, tmp_path_factory):
    """Model ``guarded`` v1 (@production) and v2, registered by raylm with the cluster's credentials."""
    uri, home, _ = server
    folder = tmp_path_factory.mktemp("guarded") / "model"
    folder.mkdir()
    save_file({"weight": np.arange(32, dtype=np.float32)}, str(folder / "model.safetensors"))
    (folder / "raylm.json").write_text(json.dumps({"run_id": "guarded"}))
    with pytest.MonkeyPatch.context() as patch:
        for key, value in _credentials(home).items():
            patch.setenv(key, value)
        for index in (1, 2):
            run_id = tracking.start_run(uri, "auth-test", f"guarded{index}", {})
            tracking.finish_run(uri, run_id, folder, {}, "guarded")
        tracking.mlflow_client(uri).set_registered_model_alias("guarded", "production", "1")
        run_id = tracking.get_model_version(uri, "models:/guarded/1").run_id
    return folder, run_id


def test_credentials_are_derived_from_the_ray_token(server):
    _, home, _ = server
    token = (home / ".ray" / "auth_token").read_text().strip()
    assert _credentials(home) == {"MLFLOW_TRACKING_USERNAME": "raylm", "MLFLOW_TRACKING_PASSWORD":
                                  hashlib.sha256(f"raylm-mlflow:{token}".encode()).hexdigest()}
    empty = home.parent / "no-token"
    empty.mkdir(exist_ok=True)
    missing = subprocess.run(["bash", "-c", f'. "{DEPLOY / "credentials.sh"}"'], capture_output=True, text=True,
                             env={"HOME": str(empty), "PATH": os.environ["PATH"]})
    assert missing.returncode == 1 and missing.stderr.count("\n") == 1
    assert "no Ray cluster token" in missing.stderr and "ray get-auth-token --generate" in missing.stderr


@pytest.mark.parametrize("auth", [None, ("raylm", "not-the-password"), ("admin", "password")])
def test_nothing_can_be_read_or_written_without_the_credentials(server, registered, auth):
    uri, _, _ = server
    _, run_id = registered
    api = f"{uri}/api/2.0/mlflow"
    attempts = [
        requests.get(f"{api}/registered-models/search", auth=auth, timeout=30),
        requests.get(f"{api}/runs/get", params={"run_id": run_id}, auth=auth, timeout=30),
        requests.post(f"{api}/registered-models/alias", auth=auth, timeout=30,
                      json={"name": "guarded", "alias": "production", "version": "2"}),
        requests.post(f"{api}/model-versions/create", auth=auth, timeout=30,
                      json={"name": "guarded", "source": "file:///tmp/their-weights"}),
        requests.get(f"{uri}/api/2.0/mlflow-artifacts/artifacts", auth=auth, timeout=30),
    ]
    assert [answer.status_code for answer in attempts] == [401] * len(attempts)


def test_raylm_without_credentials_gets_one_clear_refusal(server, registered, monkeypatch):
    uri, _, _ = server
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException, match="401|not authenticated|Unauthorized"):
        tracking.mlflow_client(uri).get_model_version_by_alias("guarded", "production")


def test_with_the_credentials_the_alias_resolves_and_moves_only_through_them(server, registered, tmp_path,
                                                                            monkeypatch):
    uri, home, _ = server
    folder, _ = registered
    for key, value in _credentials(home).items():
        monkeypatch.setenv(key, value)
    assert str(tracking.get_model_version(uri, "models:/guarded@production").version) == "1"  # the 401s moved nothing
    local = tracking.resolve_model_path("models:/guarded@production", uri, str(tmp_path))
    assert content_hash(local) == content_hash(folder)


def test_weights_changed_in_the_artifact_store_are_refused(server, registered, tmp_path, monkeypatch):
    uri, home, artifacts = server
    folder, _ = registered
    for key, value in _credentials(home).items():
        monkeypatch.setenv(key, value)
    # Version 2's weights, changed where the server keeps them (as an S3 writer could), not through MLflow.
    (stored,) = [path for path in artifacts.rglob("model.safetensors")
                 if tracking.get_model_version(uri, "models:/guarded/2").run_id in path.parts]
    data = bytearray(stored.read_bytes())
    data[-1] ^= 0x01
    stored.write_bytes(bytes(data))
    with pytest.raises(tracking.ModelIntegrityError, match=r"^models:/guarded/2: refusing to load version 2 "
                                                           r".*\(the weights changed after registration\)$"):
        tracking.resolve_model_path("models:/guarded/2", uri, str(tmp_path))
