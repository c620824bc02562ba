"""SIGTERM as an exception: a stopped run records that it was killed before the process exits.

Python ends a process on SIGTERM without running ``except`` or ``finally``
blocks, and ``ray.init`` replaces that with handlers that exit at once: a
training run stopped by ``kill``, ``ray job stop`` or a scheduler would stay
"running" in its record and in MLflow. Inside :func:`sigterm_raises`, SIGTERM
raises :class:`Terminated` (a ``KeyboardInterrupt``, like Ctrl-C) in the main
thread instead, so the run's cleanup marks it killed; the CLI then exits 143.
Ray turns a ``KeyboardInterrupt`` raised while it waits (``ray.get``) into a
plain one, so :func:`was_terminated` also remembers that SIGTERM came.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Callable, Iterator

EXIT_CODE = 128 + signal.SIGTERM


MESSAGE = "stopped by SIGTERM"
_received = threading.Event()


class Terminated(KeyboardInterrupt):
    """The process received SIGTERM (raised by the handler :func:`sigterm_raises` installs)."""


def _raise_terminated(signum, frame) -> None:
    _received.set()
    # A second SIGTERM while the run records its end should not cut that short: ignore it from here on.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated(MESSAGE)


def was_terminated(error: BaseException) -> bool:
    """Whether ``error`` is SIGTERM's interrupt, also when Ray re-raised it as a plain ``KeyboardInterrupt``."""
    return isinstance(error, Terminated) or (isinstance(error, KeyboardInterrupt) and _received.is_set())


@contextmanager
def sigterm_raises() -> Iterator[Callable[[], None]]:
    """Within the block, SIGTERM raises :class:`Terminated` in the main thread; the handler it displaced comes
    back after it. Off the main thread (where Python cannot set handlers) it changes nothing.

    Yields ``renew``: call it after ``ray.init``, which installs SIGTERM handlers of its own (the one it
    installed is then the one restored at the end, so Ray still cleans up when the process is stopped later).
    """
    if threading.current_thread() is not threading.main_thread():
        yield lambda: None
        return
    displaced = [signal.signal(signal.SIGTERM, _raise_terminated)]

    def renew() -> None:
        handler = signal.signal(signal.SIGTERM, _raise_terminated)
        if handler not in (_raise_terminated, signal.SIG_IGN):
            displaced[0] = handler

    try:
        yield renew
    finally:
        signal.signal(signal.SIGTERM, displaced[0])


def ended_status(error: BaseException) -> tuple[str, str]:
    """``(run record status, MLflow run status)`` for a run that ended with ``error``: killed for SIGTERM and
    Ctrl-C, failed for anything else."""
    if isinstance(error, KeyboardInterrupt):
        return "killed", "KILLED"
    return "failed", "FAILED"
