"""serve.ingress: the environment that makes a Ray that raylm starts serve through HAProxy or Serve's proxy."""

import os
import stat

import pytest

from raylm.config import ConfigError, ServeConfig, load_config
from raylm.serving.ingress import HAPROXY_FLAG, ingress_env, set_ingress_env


def test_haproxy_env_keeps_its_files_private_and_its_ports_apart():
    env = ingress_env("haproxy")
    assert env[HAPROXY_FLAG] == "1"
    folder = env["RAY_SERVE_HAPROXY_SERVER_STATE_BASE"]
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
    for key in ("RAY_SERVE_HAPROXY_SOCKET_PATH", "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC",
                "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH", "RAY_SERVE_HAPROXY_SERVER_STATE_FILE"):
        assert os.path.dirname(env[key]) == folder
    # Ray puts the socket under a per-node folder (56 hex digits); a Unix socket path holds at most 107 bytes.
    assert len(env["RAY_SERVE_HAPROXY_SOCKET_PATH"]) + 57 <= 107
    ports = {int(env["RAY_SERVE_HAPROXY_STATS_PORT"]), int(env["RAY_SERVE_HAPROXY_METRICS_PORT"])}
    assert len(ports) == 2 and not ports & {8404, 9101}
    assert ingress_env("haproxy")["RAY_SERVE_HAPROXY_SERVER_STATE_BASE"] != folder  # each Ray its own folder


def test_proxy_env_turns_haproxy_off_and_the_config_decides_the_flag(monkeypatch):
    assert ingress_env("proxy") == {HAPROXY_FLAG: "0"}
    for key in ingress_env("haproxy"):  # restored after the test
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv(HAPROXY_FLAG, "1")
    monkeypatch.setenv("RAY_SERVE_HAPROXY_STATS_PORT", "18404")
    set_ingress_env("proxy")
    assert os.environ[HAPROXY_FLAG] == "0"
    set_ingress_env("haproxy")
    assert os.environ[HAPROXY_FLAG] == "1" and os.environ["RAY_SERVE_HAPROXY_STATS_PORT"] == "18404"


def test_ingress_is_a_checked_serve_key(tmp_path):
    assert ServeConfig().ingress == "haproxy"
    path = tmp_path / "job.yaml"
    path.write_text("serve:\n  ingress: nginx\n")
    with pytest.raises(ConfigError, match="ingress"):
        load_config(path)
