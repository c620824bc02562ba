"""serve.ingress: the environment that makes a Ray that raylm starts serve through HAProxy or Serve's proxy."""

import os
import stat
import time

import pytest

from raylm.config import ConfigError, ServeConfig, load_config
from raylm.serving.ingress import (
    BINARY_KEY,
    HAPROXY_FLAG,
    OWN_KEYS,
    USER_BINARY,
    haproxy_available,
    ingress_env,
    recorded_pids,
    set_ingress_env,
    stop_haproxy,
    stop_stale_haproxy,
    write_recording_launcher,
)


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
    for key in [*ingress_env("haproxy"), BINARY_KEY, OWN_KEYS, USER_BINARY]:  # restored after the test
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)


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


def _fake_haproxy(folder) -> str:
    """A stand-in for HAProxy that takes HAProxy's arguments and sleeps."""
    import sys

    path = folder / "fake-haproxy"
    if not path.exists():  # never rewritten: a process starting meanwhile could read it empty
        path.write_text(f"#!{sys.executable}\nimport time\ntime.sleep(60)\n")
        path.chmod(0o755)
    return str(path)


def _start(command: list[str]):
    import subprocess

    return subprocess.Popen(command)


def _stop(processes) -> None:
    for process in processes:
        process.kill()
        process.wait()


def _wait_for_record(folder, count: int) -> list[int]:
    import time

    deadline = time.time() + 10
    while len(recorded_pids(str(folder))) < count and time.time() < deadline:
        time.sleep(0.05)
    return recorded_pids(str(folder))


def test_the_launcher_records_the_pid_of_the_binary_it_runs(tmp_path):
    """Serve starts HAProxy through raylm's launcher, which records the id the real binary then runs under."""
    binary = _fake_haproxy(tmp_path)
    process = _start([write_recording_launcher(str(tmp_path), binary), "-f", str(tmp_path / "haproxy.cfg")])
    try:
        assert _wait_for_record(tmp_path, 1) == [process.pid]
        time.sleep(0.5)
        with open(f"/proc/{process.pid}/cmdline", "rb") as handle:
            assert binary.encode() in handle.read().split(b"\0")  # exec'd: the same process, now the binary
    finally:
        _stop([process])


def test_stop_haproxy_stops_only_the_processes_raylm_started(tmp_path):
    """An HAProxy that outlived its Ray would keep serve.port: raylm stops the ones its launcher recorded,
    and leaves alone a process it did not start, even one that runs from the same folder."""
    ours = tmp_path / "ours"
    ours.mkdir()
    config = str(ours / "haproxy.cfg")
    binary = _fake_haproxy(tmp_path)
    started = _start([write_recording_launcher(str(ours), binary), "-f", config])
    stranger = _start([binary, "-f", config])  # same arguments, not started by raylm's launcher
    try:
        assert _wait_for_record(ours, 1) == [started.pid]
        assert stop_haproxy(str(ours)) == 1
        assert started.wait(timeout=10) != 0
        assert stranger.poll() is None
        assert stop_haproxy(str(ours)) == 0
    finally:
        _stop([started, stranger])


def test_a_recorded_pid_now_used_by_another_process_is_left_alone(tmp_path):
    """A recorded id whose process no longer runs from raylm's folder (the id was reused) is not signalled."""
    other = _start(["/bin/sleep", "60"])
    try:
        (tmp_path / "haproxy.pids").write_text(f"{other.pid}\n")
        assert stop_haproxy(str(tmp_path)) == 0
        assert other.poll() is None
    finally:
        _stop([other])


def test_an_haproxy_whose_raylm_is_gone_is_stopped_and_a_live_ones_is_not(tmp_path):
    import subprocess
    import sys

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid that no longer runs
    processes, folders = {}, {}
    binary = _fake_haproxy(tmp_path)
    for owner in (gone.pid, os.getpid()):
        folder = folders[owner] = tmp_path / f"raylm{owner}-abc"
        folder.mkdir()
        launcher = write_recording_launcher(str(folder), binary)
        processes[owner] = _start([launcher, "-f", str(folder / "haproxy.cfg")])
        _wait_for_record(folder, 1)
    unrecorded = _start([binary, "-f", str(folders[gone.pid] / "haproxy.cfg")])
    try:
        assert stop_stale_haproxy(str(tmp_path)) == 1
        assert processes[gone.pid].wait(timeout=10) != 0
        assert processes[os.getpid()].poll() is None
        assert unrecorded.poll() is None  # raylm did not start it: left alone
        assert not folders[gone.pid].exists() and folders[os.getpid()].exists()
    finally:
        _stop([*processes.values(), unrecorded])


def test_set_ingress_env_puts_the_launcher_in_front_of_the_users_binary(monkeypatch, tmp_path):
    _clean_env(monkeypatch)
    binary = tmp_path / "my-haproxy"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    monkeypatch.setenv(BINARY_KEY, str(binary))
    assert set_ingress_env("haproxy") == "haproxy"
    launcher = os.environ[BINARY_KEY]
    assert launcher != str(binary) and os.environ[USER_BINARY] == str(binary)
    assert str(binary) in open(launcher).read()
    set_ingress_env("haproxy")  # a child raylm: its own launcher, still in front of the user's binary
    assert os.environ[BINARY_KEY] != launcher and str(binary) in open(os.environ[BINARY_KEY]).read()
