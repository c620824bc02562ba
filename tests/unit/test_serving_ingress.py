"""serve.ingress: the environment that makes a Ray that raylm starts serve through HAProxy or Serve's proxy."""

import os
import stat

import pytest

from raylm.config import ConfigError, ServeConfig, load_config
from raylm.serving.ingress import HAPROXY_FLAG, OWN_KEYS, haproxy_available, stop_haproxy, stop_stale_haproxy, ingress_env, set_ingress_env


def test_haproxy_env_keeps_its_files_private_and_its_ports_apart():
    env = ingress_env("haproxy")
    assert env[HAPROXY_FLAG] == "1"
    folder = env["RAY_SERVE_HAPROXY_SERVER_STATE_BASE"]
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
    for key in ("RAY_SERVE_HAPROXY_SOCKET_PATH", "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC",
                "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH", "RAY_SERVE_HAPROXY_SERVER_STATE_FILE"):
        assert os.path.dirname(env[key]) == folder
    # Ray puts the sockets under a per-node folder (56 hex digits); HAProxy takes socket paths of <= 97 bytes,
    # also for the largest process id (7 digits; the folder is named after it).
    longest = max(len(env[key]) for key in ("RAY_SERVE_HAPROXY_SOCKET_PATH", "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH"))
    assert longest + 57 + (7 - len(str(os.getpid()))) <= 97
    ports = {int(env[key]) for key in ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT",
                                       "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT", "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT")}
    assert len(ports) == 4 and not ports & {8404, 9101, 8500, 9500}
    assert ingress_env("haproxy")["RAY_SERVE_HAPROXY_SERVER_STATE_BASE"] != folder  # each Ray its own folder


def _clean_env(monkeypatch):
    for key in [*ingress_env("haproxy"), OWN_KEYS]:  # restored after the test
        monkeypatch.delenv(key, raising=False)


def test_proxy_env_turns_haproxy_off_and_the_config_decides_the_flag(monkeypatch):
    assert ingress_env("proxy") == {HAPROXY_FLAG: "0"}
    _clean_env(monkeypatch)
    monkeypatch.setenv(HAPROXY_FLAG, "1")
    monkeypatch.setenv("RAY_SERVE_HAPROXY_STATS_PORT", "18404")  # the user's
    set_ingress_env("proxy")
    assert os.environ[HAPROXY_FLAG] == "0"
    set_ingress_env("haproxy")
    assert os.environ[HAPROXY_FLAG] == "1" and os.environ["RAY_SERVE_HAPROXY_STATS_PORT"] == "18404"


def test_a_child_that_starts_its_own_ray_gets_its_own_folder_and_ports(monkeypatch):
    """A `raylm serve` launched by a process that already set up (and runs) HAProxy must not reuse its
    stats port or folder: the second HAProxy could not bind the port."""
    _clean_env(monkeypatch)
    set_ingress_env("haproxy")
    parent = {key: os.environ[key] for key in ingress_env("haproxy")}
    set_ingress_env("haproxy")  # what the child process does with the inherited environment
    child = {key: os.environ[key] for key in parent}
    assert child["RAY_SERVE_HAPROXY_SOCKET_PATH"] != parent["RAY_SERVE_HAPROXY_SOCKET_PATH"]
    assert child["RAY_SERVE_HAPROXY_STATS_PORT"] != parent["RAY_SERVE_HAPROXY_STATS_PORT"]


def test_ingress_is_a_checked_serve_key(tmp_path):
    assert ServeConfig().ingress == "haproxy"
    path = tmp_path / "job.yaml"
    path.write_text("serve:\n  ingress: nginx\n")
    with pytest.raises(ConfigError, match="ingress"):
        load_config(path)


def test_without_an_haproxy_binary_the_proxy_serves(monkeypatch, tmp_path):
    _clean_env(monkeypatch)
    missing = tmp_path / "no-haproxy"
    monkeypatch.setenv("RAY_SERVE_HAPROXY_BINARY_PATH", str(missing))
    assert not haproxy_available()
    assert set_ingress_env("haproxy") == "proxy" and os.environ[HAPROXY_FLAG] == "0"
    missing.write_text("#!/bin/sh\n")
    missing.chmod(0o755)
    assert haproxy_available() and set_ingress_env("haproxy") == "haproxy" and os.environ[HAPROXY_FLAG] == "1"


def test_stop_haproxy_stops_only_the_haproxy_of_its_own_folder(tmp_path):
    """An HAProxy that outlived its Ray would keep serve.port: raylm stops the one started from its folder."""
    import shutil
    import subprocess

    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    processes = {}
    for folder in (ours, theirs):
        folder.mkdir()
        binary = folder / "haproxy"
        shutil.copy("/bin/sleep", binary)
        processes[folder] = subprocess.Popen([str(binary), "60"])
    try:
        assert stop_haproxy(str(ours)) == 1
        assert processes[ours].wait(timeout=10) != 0
        assert processes[theirs].poll() is None
        assert stop_haproxy(str(ours)) == 0
    finally:
        for process in processes.values():
            process.kill()
            process.wait()


def test_an_haproxy_whose_raylm_is_gone_is_stopped_and_a_live_ones_is_not(tmp_path):
    import shutil
    import subprocess
    import sys

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid that no longer runs
    processes = {}
    for owner in (gone.pid, os.getpid()):
        folder = tmp_path / f"raylm{owner}-abc"
        folder.mkdir()
        shutil.copy("/bin/sleep", folder / "haproxy")
        processes[owner] = subprocess.Popen([str(folder / "haproxy"), "60"])
    try:
        assert stop_stale_haproxy() == 1
        assert processes[gone.pid].wait(timeout=10) != 0
        assert processes[os.getpid()].poll() is None
    finally:
        for process in processes.values():
            process.kill()
            process.wait()
