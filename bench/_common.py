"""Helpers shared by the benchmarks (imported from the scripts beside it).

- :class:`SizedTokenizer` and :func:`overall_rate`: what the training benchmarks
  need to run ``run_training`` on token ids and to turn its logged intervals
  into one rate.
- :func:`rotated`: the interleaving order of contenders (each repeat starts
  with a different one, so that none always runs first or last).
- :func:`spawn_json`: run one contender in a fresh Python process (process-wide
  settings such as glibc's malloc parameters cannot leak from one contender into
  the next) and read the JSON it writes.
- :class:`TreeMemorySampler`: the peak memory of a process and all its
  descendants (Ray's raylet, GCS, workers and object store; a multiprocessing
  pool), counted as PSS so that shared pages are not counted twice.
- :func:`machine_state`: load average, niceness and CPU count, recorded with
  every figure.
- :func:`json_stdout`: a script's stdout holds only its one JSON object, even
  when Ray, its raylet or a C library writes to file descriptor 1.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence


class SizedTokenizer:
    """What ``run_training`` needs of a tokenizer when the data is already token ids: a size and special ids."""

    def __init__(self, size: int, eos_token_id: int = 0, pad_token_id: int = 0):
        self.size = size
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id

    def __len__(self) -> int:
        return self.size


def overall_rate(history: Sequence[dict[str, Any]], key: str = "tokens_per_s", after_step: int = 0) -> float:
    """The rate over the logged intervals after ``after_step``.

    Every interval holds the same number of tokens, so the overall rate is the
    harmonic mean of the per-interval rates (not their arithmetic mean).
    """
    values = [row[key] for row in history if row["step"] > after_step and row.get(key)]
    if not values:
        raise ValueError(f"no logged {key} after step {after_step}")
    return len(values) / sum(1.0 / value for value in values)


def rotated(names: Sequence[str], repeat: int) -> list[str]:
    """``names`` rotated by ``repeat`` places: the order of the contenders in that repeat."""
    if not names:
        return []
    shift = repeat % len(names)
    return [*names[shift:], *names[:shift]]


def machine_state() -> dict[str, Any]:
    """Load averages (1, 5, 15 min), this process's niceness and the CPU count."""
    return {"load_average": [round(value, 2) for value in os.getloadavg()], "niceness": os.nice(0),
            "cpu_count": os.cpu_count()}


def _busy_fraction(interval_s: float) -> float:
    """The machine's non-idle CPU share over the next ``interval_s`` (from /proc/stat; 0.0 where it is missing)."""
    def read():
        with open("/proc/stat") as handle:
            values = [int(v) for v in handle.readline().split()[1:]]
        return sum(values), values[3] + (values[4] if len(values) > 4 else 0)  # total, idle + iowait

    try:
        total0, idle0 = read()
        time.sleep(interval_s)
        total1, idle1 = read()
    except (OSError, ValueError, IndexError):
        return 0.0
    return 1.0 - (idle1 - idle0) / max(1, total1 - total0)


def settle(max_busy: float = 0.15, interval_s: float = 1.0, timeout_s: float = 30.0,
           busy_fraction: Callable[[float], float] | None = None) -> float:
    """Wait until the last run's after-effects are gone; returns the seconds waited.

    A run's written files may still be being flushed (dirty pages) and its
    processes torn down when it returns, at the cost of whichever run comes next.
    This flushes the page cache's dirty pages and waits until the machine's CPU
    was at most ``max_busy`` busy over ``interval_s`` (at most ``timeout_s``).
    ``busy_fraction`` measures one interval (the machine's CPU by default).
    """
    measure = busy_fraction or _busy_fraction
    started = time.perf_counter()
    os.sync()
    while time.perf_counter() - started < timeout_s and measure(interval_s) > max_busy:
        pass
    return time.perf_counter() - started


def spawn_json(script: str | Path, arguments: Sequence[str], env: dict[str, str] | None = None,
               timeout: float | None = None) -> dict[str, Any]:
    """Run ``script`` in a fresh interpreter with ``arguments --out FILE``; return the JSON it wrote to FILE.

    The child's stdout is discarded (libraries print there) and the tail of its
    stderr is raised with the arguments when it fails.
    """
    handle, out = tempfile.mkstemp(suffix=".json", prefix="bench-")
    os.close(handle)
    child_env = {**os.environ, **(env or {})}
    child_env.pop("RAY_ADDRESS", None)  # a contender never joins someone else's cluster
    try:
        process = subprocess.run([sys.executable, str(script), *arguments, "--out", out], env=child_env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=timeout)
        if process.returncode != 0:
            raise RuntimeError(f"benchmark worker failed ({' '.join(arguments)}):\n{process.stderr[-3000:]}")
        return json.loads(Path(out).read_text())
    finally:
        os.unlink(out)


def _descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (children of children too), from /proc."""
    found, frontier = [pid], [pid]
    while frontier:
        parent = frontier.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                children = Path(f"/proc/{parent}/task/{task}/children").read_text().split()
            except OSError:
                continue
            for child in map(int, children):
                if child not in found:
                    found.append(child)
                    frontier.append(child)
    return found


def process_memory(pid: int) -> tuple[int, int]:
    """(PSS, RSS) of one process in bytes; (0, 0) when it is gone.

    PSS divides each shared page by the number of processes that map it, so
    the sum over a process tree counts Ray's shared-memory object store (and
    shared libraries) once.
    """
    pss = rss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as handle:
            for line in handle:
                if line.startswith("Pss:"):
                    pss = int(line.split()[1]) * 1024
                elif line.startswith("Rss:"):
                    rss = int(line.split()[1]) * 1024
    except OSError:
        return 0, 0
    return pss, rss


class TreeMemorySampler:
    """Samples the summed PSS of a process tree in a background thread and keeps the peak.

    Use as a context manager around the work to measure. ``peak_pss`` and
    ``peak_rss`` are the largest sums seen (RSS double-counts shared pages and is
    kept for comparison), ``peak_processes`` the process count at the PSS peak.
    Linux only (``/proc``); elsewhere ``available`` is False and the peaks stay 0.
    A sample costs about 1.5 ms of CPU per process (the kernel walks the page
    tables), so the default interval is a second; ``cpu_seconds`` is what the
    sampling cost.
    """

    def __init__(self, pid: int | None = None, interval_s: float = 1.0):
        self.pid = pid or os.getpid()
        self.interval_s = interval_s
        self.available = os.path.exists(f"/proc/{self.pid}/smaps_rollup")
        self.peak_pss = self.peak_rss = self.peak_processes = self.samples = 0
        self.cpu_seconds = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> int:
        """Take one sample now; returns the tree's summed PSS."""
        started = time.thread_time()
        pids = _descendants(self.pid)
        memory = [process_memory(pid) for pid in pids]
        pss, rss = sum(m[0] for m in memory), sum(m[1] for m in memory)
        self.samples += 1
        if pss > self.peak_pss:
            self.peak_pss, self.peak_processes = pss, sum(1 for m in memory if m[0])
        self.peak_rss = max(self.peak_rss, rss)
        self.cpu_seconds += time.thread_time() - started
        return pss

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def __enter__(self) -> "TreeMemorySampler":
        if self.available:
            self.sample()
            self._thread = threading.Thread(target=self._run, name="tree-memory-sampler", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self.sample()

    def figures(self) -> dict[str, Any]:
        return {"peak_tree_pss_bytes": self.peak_pss, "peak_tree_rss_bytes": self.peak_rss,
                "peak_tree_processes": self.peak_processes, "memory_samples": self.samples,
                "memory_sampling_cpu_s": round(self.cpu_seconds, 3)}


class json_stdout:
    """Within ``with json_stdout() as emit:``, anything written to stdout (file descriptor 1, which child
    processes inherit too) goes to stderr; ``emit(obj)`` prints ``obj`` as one JSON line on the real stdout."""

    def __enter__(self):
        sys.stdout.flush()
        self._saved = os.dup(1)
        os.dup2(2, 1)
        return self.emit

    def emit(self, obj: Any) -> None:
        sys.stdout.flush()
        os.write(self._saved, (json.dumps(obj) + "\n").encode())

    def __exit__(self, *exc) -> None:
        sys.stdout.flush()
        os.dup2(self._saved, 1)
        os.close(self._saved)
