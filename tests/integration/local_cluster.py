"""Real processes for cluster tests: Ray nodes started with `ray start`, an MLflow server, an S3 API (moto).

Every process is started in its own session (process group) and torn down by
signalling that group, so nothing another engineer started on this machine is
touched, and `ray stop` is never used. The Ray temp dir is our own, so `ray
start` does not write ``/tmp/ray/ray_current_cluster`` (which a plain
``ray.init()`` elsewhere on the machine would pick up). Token authentication is
on, with a token file of our own (never ``~/.ray/auth_token``).
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

BIN = Path(sys.executable).parent


def _wait_for(check, what: str, timeout_s: float, process: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if process is not None and process.poll() is not None:
            tail = log.read_text()[-3000:] if log and log.exists() else ""
            raise RuntimeError(f"{what}: the process exited with {process.returncode}\n{tail}")
        try:
            if check():
                return
        except (requests.RequestException, OSError):
            pass
        time.sleep(0.5)
    tail = log.read_text()[-3000:] if log and log.exists() else ""
    raise TimeoutError(f"{what}: not ready after {timeout_s:.0f} s\n{tail}")


def start_group(command: list[str], env: dict[str, str], log: Path, cwd: Path | None = None) -> subprocess.Popen:
    """Start ``command`` in a new session (its own process group), output to ``log``."""
    handle = log.open("ab")
    return subprocess.Popen(command, env=env, stdout=handle, stderr=subprocess.STDOUT, cwd=cwd,
                            start_new_session=True)


def kill_group(process: subprocess.Popen, grace_s: float = 20.0, sig: int = signal.SIGTERM) -> None:
    """Signal the process group of ``process`` (ours alone), then SIGKILL whatever is left after ``grace_s``."""
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        return
    if sig != signal.SIGKILL:
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass


def kill_groups(processes: list[subprocess.Popen], grace_s: float) -> None:
    """:func:`kill_group` for several processes at once: all are signalled first, then each gets what is left of
    one shared ``grace_s`` before SIGKILL (they stop side by side, not one after the other)."""
    for process in processes:
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.time() + grace_s
    for process in processes:
        kill_group(process, grace_s=max(0.0, deadline - time.time()))


def group_members(pgid: int) -> list[int]:
    """PIDs still alive in a process group."""
    import psutil

    members = []
    for process in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(process.pid) == pgid and process.status() != psutil.STATUS_ZOMBIE:
                members.append(process.pid)
        except (ProcessLookupError, psutil.NoSuchProcess, PermissionError):
            continue
    return members


@dataclass
class NodePorts:
    """The ports one Ray node binds (all inside this engineer's range)."""

    node_manager: int
    object_manager: int
    metrics: int
    agent_listen: int
    agent_grpc: int
    runtime_env_agent: int
    min_worker: int
    max_worker: int

    def flags(self) -> list[str]:
        return [f"--node-manager-port={self.node_manager}", f"--object-manager-port={self.object_manager}",
                f"--metrics-export-port={self.metrics}", f"--dashboard-agent-listen-port={self.agent_listen}",
                f"--dashboard-agent-grpc-port={self.agent_grpc}",
                f"--runtime-env-agent-port={self.runtime_env_agent}",
                f"--min-worker-port={self.min_worker}", f"--max-worker-port={self.max_worker}"]


@dataclass
class LocalRayCluster:
    """A head and worker nodes on this machine, each a `ray start --block` process group."""

    root: Path
    gcs_port: int
    dashboard_port: int
    client_port: int
    head_ports: NodePorts
    extra_env: dict[str, str] = field(default_factory=dict)
    head: subprocess.Popen | None = None
    nodes: list[subprocess.Popen] = field(default_factory=list)
    node_temp_dirs: list[Path] = field(default_factory=list)
    _node_logs: dict[int, Path] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.token_path = self.root / "auth_token"
        self.token_path.write_text(secrets.token_hex(32))
        # Short socket paths: Unix sockets have a ~107 character limit.
        self.temp_dir = Path(f"/tmp/raylm-h3-{os.getpid()}-{self.gcs_port}")

    @property
    def token(self) -> str:
        return self.token_path.read_text().strip()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def env(self) -> dict[str, str]:
        """The environment of the cluster's processes and of clients that talk to it with the token."""
        env = {key: value for key, value in os.environ.items()
               if not key.startswith(("RAY_JOB_", "RAY_RAYLET_", "RAY_NODE_")) and key not in ("RAY_ADDRESS",)}
        env.update({
            "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token_path), "RAY_USAGE_STATS_ENABLED": "0",
            "TOKENIZERS_PARALLELISM": "false", "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
            # Processes of this cluster that use the state API find it, not another engineer's Ray.
            "RAY_ADDRESS": self.address,
            # Notice a killed node within seconds rather than the default ~30 s.
            "RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "5",
            **self.extra_env,
        })
        env.pop("RAY_AUTH_TOKEN", None)
        return env

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def start_head(self, num_cpus: int) -> None:
        command = [str(BIN / "ray"), "start", "--head", "--block", f"--port={self.gcs_port}",
                   "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
                   f"--ray-client-server-port={self.client_port}", f"--num-cpus={num_cpus}",
                   f"--temp-dir={self.temp_dir}", "--disable-usage-stats", *self.head_ports.flags()]
        self._start_head(command)

    def _start_head(self, command: list[str]) -> None:
        log = self.root / "head.log"
        self._head_log_offset = log.stat().st_size if log.exists() else 0  # this attempt's lines start here
        self.head = start_group(command, self.env(), log)

    def _head_started(self) -> bool:
        """`ray start` said "Ray runtime started." in this attempt: the node registered. The dashboard answers
        before that, and a start that then times out takes it down again."""
        with (self.root / "head.log").open("rb") as log:
            log.seek(self._head_log_offset)
            return b"Ray runtime started." in log.read()

    def wait_for_head(self, timeout_s: float = 300, attempts: int = 3) -> None:
        """Wait until the Jobs API answers. `ray start` gives a node 30 s (fixed) to register with the GCS,
        which a machine busy with other work can miss: such a start is tried again."""
        for attempt in range(attempts):
            try:
                _wait_for(lambda: self._head_started() and requests.get(
                    f"{self.dashboard_url}/api/version", headers=self.headers(), timeout=5).status_code == 200,
                          "Ray head", timeout_s, self.head, self.root / "head.log")
                return
            except RuntimeError as err:
                if "timed out during startup" not in str(err) or attempt == attempts - 1:
                    raise
                kill_group(self.head, grace_s=5)
                self._start_head(self.head.args)

    def add_node(self, ports: NodePorts, num_cpus: int, name: str) -> subprocess.Popen:
        """Start a worker node. It gets a temp dir of its own, as a machine of its own would: nodes sharing
        one would unpack jobs' working dirs into the same folder, each deleting the other's copy."""
        temp_dir = Path(f"{self.temp_dir}-{name}")
        self.node_temp_dirs.append(temp_dir)
        command = [str(BIN / "ray"), "start", f"--address={self.address}", "--block", f"--num-cpus={num_cpus}",
                   f"--temp-dir={temp_dir}", "--disable-usage-stats", *ports.flags()]
        process = start_group(command, self.env(), self.root / f"{name}.log")
        self.nodes.append(process)
        self._node_logs[process.pid] = self.root / f"{name}.log"
        return process

    def alive_nodes(self) -> list[dict]:
        response = requests.get(f"{self.dashboard_url}/api/v0/nodes", params={"limit": 100},
                                headers=self.headers(), timeout=10)
        response.raise_for_status()
        return [node for node in response.json()["data"]["result"]["result"] if node["state"] == "ALIVE"]

    def wait_for_nodes(self, count: int, timeout_s: float = 300, process: subprocess.Popen | None = None,
                       attempts: int = 3, exclude: tuple[str, ...] = ()) -> subprocess.Popen | None:
        """Wait for ``count`` alive nodes, not counting the node ids in ``exclude`` (a dead node stays
        "alive" for a few seconds); a node ``process`` whose start timed out is started again.
        Returns the node's (possibly new) process."""
        def ready() -> bool:
            return len([node for node in self.alive_nodes() if node["node_id"] not in exclude]) >= count

        for attempt in range(attempts):
            try:
                _wait_for(ready, f"{count} alive Ray nodes", timeout_s, process,
                          self._node_logs.get(process.pid) if process is not None else None)
                return process
            except RuntimeError:
                if process is None or attempt == attempts - 1:
                    raise
                kill_group(process, grace_s=5)
                replacement = start_group(process.args, self.env(), self._node_logs[process.pid])
                self.nodes[self.nodes.index(process)] = replacement
                self._node_logs[replacement.pid] = self._node_logs[process.pid]
                process = replacement
        return process

    def actors(self, class_name: str) -> list[dict]:
        """Alive actors of ``class_name``, with their node ids (Ray's state API, over HTTP with the token)."""
        response = requests.get(
            f"{self.dashboard_url}/api/v0/actors",
            params={"filter_keys": ["class_name", "state"], "filter_predicates": ["=", "="],
                    "filter_values": [class_name, "ALIVE"], "limit": 1000, "detail": "1"},
            headers=self.headers(), timeout=10)
        response.raise_for_status()
        return response.json()["data"]["result"]["result"]

    def kill_node(self, process: subprocess.Popen) -> list[int]:
        """SIGKILL every process of one node at once, as a machine dying would; returns their PIDs.

        That is the `ray start` process group (raylet, agents) and every descendant:
        Ray puts each worker process in a process group of its own.
        """
        import psutil

        members = set(group_members(process.pid))
        for pid in list(members):
            try:
                members.update(child.pid for child in psutil.Process(pid).children(recursive=True))
            except psutil.NoSuchProcess:
                continue
        for pid in members:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        kill_group(process, sig=signal.SIGKILL)
        return sorted(members)

    def stop(self, grace_s: float = 20.0) -> None:
        """SIGTERM every node's process group, SIGKILL what is left after ``grace_s``; remove the temp dirs."""
        kill_groups([*self.nodes, *([self.head] if self.head is not None else [])], grace_s=grace_s)
        import shutil

        for folder in [self.temp_dir, *self.node_temp_dirs]:
            shutil.rmtree(folder, ignore_errors=True)


def start_server(command: list[str], env: dict[str, str], log: Path, health_url: str, what: str,
                 timeout_s: float) -> subprocess.Popen:
    """Start ``command`` in its own process group and wait until ``health_url`` answers 200 (killed if not)."""
    process = start_group(command, env, log)
    try:
        _wait_for(lambda: requests.get(health_url, timeout=5).status_code == 200, what, timeout_s, process, log)
    except BaseException:
        kill_group(process, grace_s=5)
        raise
    return process


def start_moto(port: int, log: Path) -> subprocess.Popen:
    """A local S3 API (moto's server) on 127.0.0.1:``port``."""
    return start_server([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], dict(os.environ), log,
                        f"http://127.0.0.1:{port}/", "moto S3 server", 120)


def s3_env(port: int) -> dict[str, str]:
    """What a process needs to use the moto server as S3 (pyarrow, boto3 and MLflow all read these)."""
    return {"AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
            "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true"}


def start_mlflow_server(port: int, root: Path, artifacts: str, env: dict[str, str],
                        timeout_s: float = 300) -> subprocess.Popen:
    """An MLflow tracking server (SQLite backend) that proxies artifacts to ``artifacts``."""
    root.mkdir(parents=True, exist_ok=True)
    log = root / "mlflow-server.log"
    command = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
               "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", artifacts,
               # One process: uvicorn's multi-worker supervisor kills workers that start slowly on a busy machine.
               "--workers", "1"]
    # MLflow 3 also starts two huey job consumers (15 worker threads) for its GenAI jobs; raylm runs none, and
    # on 2 cores they only take CPU from the tests.
    env = {**env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    return start_server(command, env, log, f"http://127.0.0.1:{port}/health", "MLflow server", timeout_s)
