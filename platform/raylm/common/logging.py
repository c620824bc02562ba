"""Logging setup: raylm's own lines, every library's warnings, and other libraries' INFO chatter at DEBUG.

Every raylm module logs to ``logging.getLogger(__name__)``, under the one
``raylm`` logger. Library code never configures handlers; the CLI calls
:func:`configure_logging` once, and Ray runs :func:`configure_worker_logging`
(:data:`WORKER_SETUP_HOOK`) in every worker process of the job, so a line
logged by a training worker reads as one logged by the driver.

What a user sees: raylm's lines on stdout (``[raylm] ...``), and WARNING or
worse from any library on stderr. Other libraries' INFO lines (Ray Train's
per-checkpoint and per-report lines, Ray Data's execution plans, MLflow's
database migrations) are shown only with ``--verbose``.
"""

from __future__ import annotations

import logging
import os
import sys

ROOT_LOGGER = "raylm"
# Set by configure_logging(verbose=True); a job's runtime env carries it to the worker processes.
VERBOSE_ENV_VAR = "RAYLM_VERBOSE"
WORKER_SETUP_HOOK = "raylm.common.logging.configure_worker_logging"

# Library loggers whose INFO lines are chatter. Ray and MLflow give their top-level logger its own
# handler and level when imported (after this setup runs), so the levels are set on their children.
CHATTY_LOGGERS = (
    "ray._private", "ray._common", "ray.air", "ray.autoscaler", "ray.dashboard", "ray.data", "ray.serve",
    "ray.train", "ray.tune", "ray.util", "ray.runtime_env",
    "mlflow.store", "mlflow.tracking", "mlflow.models", "mlflow.utils", "mlflow.artifacts",
    "urllib3", "filelock", "fsspec", "asyncio", "httpx", "httpcore",
)


def ray_train_chatty_loggers() -> tuple[str, ...]:
    """The Ray Train loggers (Ray 2.60) that log one long INFO line per checkpoint or per report.

    Ray Train configures ``ray.train`` again (``logging.config.dictConfig``) when a
    controller or worker starts, which resets the levels of its children, so these
    get a filter (:class:`DropBelow`), which that reset keeps. The per-report line
    comes from a logger named by its module's file path, not by its dotted name.
    """
    import importlib.util

    names = ["ray.train.v2._internal.execution.storage", "ray.train._internal.storage",
             "ray.train.v2._internal.execution.controller.controller",
             "ray.train.v2._internal.execution.worker_group.worker_group"]
    ray_spec = importlib.util.find_spec("ray")
    if ray_spec is not None and ray_spec.origin:
        ray_root = os.path.dirname(ray_spec.origin)
        names.append(os.path.join(ray_root, "train", "v2", "_internal", "execution", "context.py"))
    return tuple(names)


# Ray Train's PlacementGroupCleaner polls the state API every second, which a local Ray started
# without the dashboard does not serve: it would warn once a second for the whole run. Its errors show.
ERRORS_ONLY_LOGGERS = ("ray.train.v2._internal.execution.controller.placement_group_cleaner",)


class DropBelow(logging.Filter):
    """A logger filter that drops records below ``level``."""

    def __init__(self, level: int):
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= self.level


class RaylmFormatter(logging.Formatter):
    """``[raylm] message`` for INFO, ``[raylm] warning: message`` (error, ...) above it."""

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        if record.levelno >= logging.WARNING:
            return f"[raylm] {record.levelname.lower()}: {message}"
        return f"[raylm] {message}"


class StdoutHandler(logging.StreamHandler):
    """A stream handler that writes to whatever ``sys.stdout`` is at the time of each record."""

    def __init__(self):
        super().__init__(sys.stdout)

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:
        pass  # always the current sys.stdout


def is_verbose() -> bool:
    """Whether ``--verbose`` was given to this process, or to the driver of this Ray worker."""
    return os.environ.get(VERBOSE_ENV_VAR, "") == "1"


def configure_logging(verbose: bool = False) -> None:
    """Set up raylm's logging for this process (the CLI calls it once; calling it again replaces it).

    raylm's lines go to stdout at INFO (DEBUG with ``verbose``); every library's
    warnings and errors go to stderr; other libraries' INFO lines only with
    ``verbose``. ``verbose`` is recorded in the environment so that a Ray started
    from here passes it to its workers.
    """
    if verbose:
        os.environ[VERBOSE_ENV_VAR] = "1"
    else:
        os.environ.pop(VERBOSE_ENV_VAR, None)
    raylm_logger = logging.getLogger(ROOT_LOGGER)
    for handler in list(raylm_logger.handlers):
        if isinstance(handler, StdoutHandler):
            raylm_logger.removeHandler(handler)
    handler = StdoutHandler()
    handler.setFormatter(RaylmFormatter())
    raylm_logger.addHandler(handler)
    raylm_logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    raylm_logger.propagate = False

    root = logging.getLogger()
    if not any(getattr(handler, "raylm_root", False) for handler in root.handlers):
        library_handler = logging.StreamHandler()  # stderr
        library_handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        library_handler.raylm_root = True
        root.addHandler(library_handler)
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    library_level = logging.NOTSET if verbose else logging.WARNING
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(library_level)
    for name in ray_train_chatty_loggers():
        drop_below(name, None if verbose else logging.WARNING)
    for name in ERRORS_ONLY_LOGGERS:
        drop_below(name, logging.ERROR)


def drop_below(name: str, level: int | None) -> None:
    """Give logger ``name`` one :class:`DropBelow` filter at ``level`` (none when ``level`` is None)."""
    logger = logging.getLogger(name)
    for old in [f for f in logger.filters if isinstance(f, DropBelow)]:
        logger.removeFilter(old)
    if level is not None:
        logger.addFilter(DropBelow(level))


def configure_worker_logging() -> None:
    """Ray's ``worker_process_setup_hook`` (:data:`WORKER_SETUP_HOOK`): :func:`configure_logging` in a worker.

    A training worker's ``raylm.*`` lines then read as the driver's (Ray prefixes
    them with the worker's name and pid), and Ray Train's per-checkpoint and
    per-report INFO lines stay out of the output unless the driver is verbose.
    """
    configure_logging(is_verbose())
