"""`serve deploy` the documented way, to a Ray whose processes do not have the API key in their environment.

One `ray start --head` for the module (token authentication, Serve's own proxy,
ports 7100-7199), its processes started without ``$RAYLM_API_KEY`` and with a
home folder of their own holding ``~/.raylm/api_key``, where cluster.yaml's
``file_mounts`` put the key on every node. The Serve config is
``serve/config_gpu.yaml`` (host 0.0.0.0, ``api_key_file: ~/.raylm/api_key``)
with CPU settings and the tiny model, deployed with the real ``serve deploy``
from a shell that has ``$RAYLM_API_KEY`` (which never reaches the cluster):

- the app runs; a task route answers 401 without the key or with a wrong one
  and 200 with it, ``/healthz`` stays open, and Serve's record of the app holds
  the key file's path, never the key;
- a second app on the same 0.0.0.0 proxies without a key file does not start:
  its status is DEPLOY_FAILED with raylm's one-line reason, shown by
  ``serve status``, and nothing answers for it without the key.
"""

from __future__ import annotations

import copy
import json
import os
import secrets
import subprocess
import time
from pathlib import Path

import pytest
import requests
import yaml

from raylm.config import API_KEY_ENV, API_KEY_FILE_ENV
from raylm.serving.ingress import ingress_env
from tests.conftest import REPO_ROOT
from tests.integration.local_cluster import BIN, LocalRayCluster, NodePorts

# This module's port range (7100-7199): GCS, dashboard, client server, node ports, workers, Serve's HTTP.
GCS_PORT, DASHBOARD_PORT, CLIENT_PORT = 7100, 7101, 7104
HEAD_PORTS = NodePorts(7102, 7103, 7105, 7106, 7107, 7108, 7150, 7189)
HTTP_PORT = 7190
NO_KEY_LINE = ("config error: Serve listens on 0.0.0.0, not a loopback address, and serve has no API key: name a "
               "file that holds one in serve.api_key_file (or set $RAYLM_API_KEY where the app is built), or set "
               "serve.allow_unauthenticated: true to serve without one")
BASE = f"http://127.0.0.1:{HTTP_PORT}"


class Cluster:
    def __init__(self, ray: LocalRayCluster, root: Path, key: str):
        self.ray, self.root, self.key = ray, root, key

    def client_env(self) -> dict[str, str]:
        """The deploying shell as docs/serving.md has it: the cluster's token in ~/.ray/auth_token,
        RAY_AUTH_MODE=token, and the key in $RAYLM_API_KEY (which the cluster never sees)."""
        home = self.root / "client-home"
        if not (home / ".ray" / "auth_token").exists():
            (home / ".ray").mkdir(parents=True)
            (home / ".ray" / "auth_token").write_text(self.ray.token)
        env = {key: value for key, value in os.environ.items()
               if not key.startswith(("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_JOB_")) and key != API_KEY_FILE_ENV}
        env.update({"HOME": str(home), "RAY_AUTH_MODE": "token", API_KEY_ENV: self.key, "RAY_USAGE_STATS_ENABLED": "0",
                    "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"})
        return env

    def serve_cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "serve"), *args], capture_output=True, text=True, cwd=self.root,
                              env=self.client_env(), timeout=300)

    def deploy(self, config: dict) -> None:
        path = self.root / f"serve-{secrets.token_hex(4)}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        for attempt in range(3):
            self.wait_for_serve_api()
            result = self.serve_cli("deploy", "--address", self.ray.dashboard_url, str(path))
            # A dashboard that has just started (under a loaded suite: after a `ray start` that timed out and
            # was tried again) may drop the connection without a response; the request is sent again.
            if result.returncode == 0 or "RemoteDisconnected" not in result.stderr or attempt == 2:
                break
            time.sleep(5)
        assert result.returncode == 0, result.stderr[-3000:]

    def wait_for_serve_api(self, timeout_s: float = 120) -> None:
        """Until the dashboard's Serve REST API (what `serve deploy` calls) answers."""
        deadline = time.time() + timeout_s
        while True:
            try:
                self.applications()
                return
            except requests.RequestException:
                if time.time() > deadline:
                    raise
                time.sleep(2)

    def applications(self) -> dict:
        response = requests.get(f"{self.ray.dashboard_url}/api/serve/applications/", headers=self.ray.headers(),
                                timeout=30)
        response.raise_for_status()
        return response.json()

    def wait_for(self, name: str, statuses: tuple[str, ...], timeout_s: float = 600,
                 fail_on: tuple[str, ...] = ("DEPLOY_FAILED", "UNHEALTHY")) -> dict:
        deadline = time.time() + timeout_s
        app: dict = {}
        while time.time() < deadline:
            app = self.applications().get("applications", {}).get(name) or {}
            if app.get("status") in statuses:
                return app
            if app.get("status") in fail_on:
                pytest.fail(f"{name}: {app['status']}: {app.get('message')}")
            time.sleep(2)
        pytest.fail(f"{name}: not {'/'.join(statuses)} after {timeout_s:.0f} s: {app}")


def _documented_config(model_dir: Path) -> dict:
    """serve/config_gpu.yaml with this machine's port, CPU settings and the tiny model; key settings untouched."""
    documented = yaml.safe_load((REPO_ROOT / "serve" / "config_gpu.yaml").read_text())
    assert documented["http_options"]["host"] == "0.0.0.0"
    assert documented["applications"][0]["args"]["api_key_file"] == "~/.raylm/api_key"
    config = copy.deepcopy(documented)
    config["http_options"]["port"] = HTTP_PORT
    application = config["applications"][0]
    application["runtime_env"]["env_vars"]["PYTHONPATH"] = str(REPO_ROOT / "platform")
    application["args"].pop("tracking_uri", None)
    application["args"].update(
        model_path=str(model_dir), num_cpus_per_replica=1, num_gpus_per_replica=0, device="cpu", dtype="float32",
        max_batch_size=8, max_ongoing_requests=16, max_queued_requests=64, max_new_tokens=8,
        autoscaling={"min_replicas": 1, "max_replicas": 1, "target_ongoing_requests": 8, "upscale_delay_s": 10,
                     "downscale_delay_s": 300})
    return config


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-deploy-auth")
    node_home = root / "node-home"
    (node_home / ".raylm").mkdir(parents=True)
    key = secrets.token_hex(16)
    key_file = node_home / ".raylm" / "api_key"
    key_file.write_text(key + "\n")
    key_file.chmod(0o600)
    # Serve's own proxy (as a `ray start` without raylm's HAProxy settings gets), a home with the mounted key.
    ray = LocalRayCluster(root, GCS_PORT, DASHBOARD_PORT, CLIENT_PORT, HEAD_PORTS,
                          extra_env={"HOME": str(node_home), **ingress_env("proxy")})
    with pytest.MonkeyPatch.context() as patch:
        for name in (API_KEY_ENV, API_KEY_FILE_ENV):
            patch.delenv(name, raising=False)
        ray.start_head(num_cpus=2)
    try:
        ray.wait_for_head()
        yield Cluster(ray, root, key)
    finally:
        ray.stop(grace_s=5)  # one node, nothing to drain: its Serve processes exit with their raylet


@pytest.fixture(scope="module")
def deployed(cluster, tiny_model_dir):
    config = _documented_config(tiny_model_dir)
    cluster.deploy(config)
    cluster.wait_for("raylm", ("RUNNING",))
    return config


def test_the_cluster_has_no_key_in_its_environment(cluster):
    environ = Path(f"/proc/{cluster.ray.head.pid}/environ").read_bytes().split(b"\0")
    names = {entry.split(b"=", 1)[0].decode() for entry in environ if b"=" in entry}
    assert "RAY_AUTH_MODE" in names and API_KEY_ENV not in names and API_KEY_FILE_ENV not in names


def test_the_documented_deploy_needs_the_key(cluster, deployed):
    route = f"{BASE}/v1/translate"
    body = {"text": "the dog sees the cat."}
    missing = requests.post(route, json=body, timeout=60)
    assert missing.status_code == 401 and "API key" in missing.json()["error"]
    assert requests.post(route, json=body, headers={"Authorization": "Bearer wrong"}, timeout=60).status_code == 401
    answered = requests.post(route, json=body, headers={"Authorization": f"Bearer {cluster.key}"}, timeout=120)
    assert answered.status_code == 200, answered.text
    assert isinstance(answered.json(), dict) and answered.json()
    assert requests.get(f"{BASE}/healthz", timeout=60).status_code == 200
    # What Serve keeps and shows of the app (its config, status) names the file, never the key.
    record = json.dumps(cluster.applications())
    assert "~/.raylm/api_key" in record and cluster.key not in record


def test_an_app_without_a_key_on_every_interface_does_not_start(cluster, deployed):
    keyless = copy.deepcopy(deployed["applications"][0])
    keyless.update(name="raylm-nokey", route_prefix="/nokey")
    del keyless["args"]["api_key_file"]
    cluster.deploy({**deployed, "applications": [*deployed["applications"], keyless]})
    failed = cluster.wait_for("raylm-nokey", ("DEPLOY_FAILED", "RUNNING"), timeout_s=300, fail_on=())
    assert failed["status"] == "DEPLOY_FAILED", failed
    assert NO_KEY_LINE in failed["message"] and "Traceback" not in failed["message"]
    assert cluster.key not in failed["message"]
    status = cluster.serve_cli("status", "--address", cluster.ray.dashboard_url)
    assert status.returncode == 0 and NO_KEY_LINE in " ".join(status.stdout.split()), status.stdout[-3000:]
    # Nothing answers for it without the key; the keyed app keeps running and keeps asking for it.
    assert requests.post(f"{BASE}/nokey/v1/translate", json={"text": "a cat."}, timeout=60).status_code != 200
    assert cluster.applications()["applications"]["raylm"]["status"] == "RUNNING"
    assert requests.post(f"{BASE}/v1/translate", json={"text": "a cat."}, timeout=60).status_code == 401
