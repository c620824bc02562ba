"""The ``raylm`` typer apps, their shared options and the error handling every command uses.

User errors (bad config, missing files, bad data) print one line to stderr and
exit non-zero without a traceback; config errors exit with code 2, before Ray
starts.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional

import typer

from raylm.common import interrupts
from raylm.common.logging import configure_logging
from raylm.config import ConfigError, JobConfig
from raylm.config.redaction import redact_text

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Train, tune and serve language models on Ray.")
config_app = typer.Typer(no_args_is_help=True, help="Inspect configuration.")
app.add_typer(config_app, name="config")
prepare_app = typer.Typer(no_args_is_help=True, help="Train the corpus tokenizer; tokenize and pack the corpus.")
app.add_typer(prepare_app, name="prepare")
jobs_app = typer.Typer(no_args_is_help=True, help="Ray jobs on a cluster: list, logs, stop.")
app.add_typer(jobs_app, name="jobs")


class _RunByDefault(typer.core.TyperGroup):
    """``raylm tune ARGS`` means ``raylm tune run ARGS`` unless ARGS starts with a subcommand."""

    def parse_args(self, ctx, args):
        if not args or (args[0] not in self.commands and args[0] not in ("--help", "-h")):
            args = ["run", *args]
        return super().parse_args(ctx, args)


tune_app = typer.Typer(cls=_RunByDefault, help="Scaling sweeps with Ray Tune (raylm tune --config FILE), "
                                                "and compute-optimal recommendations from them.")
app.add_typer(tune_app, name="tune")

ConfigOption = typer.Option(None, "--config", "-c", help="YAML config file")


@app.callback()
def main_options(verbose: bool = typer.Option(
        False, "--verbose", "-v", help="also show other libraries' INFO lines (Ray, MLflow), and raylm's DEBUG")) -> None:
    """Train, tune and serve language models on Ray."""
    global _verbose
    _verbose = verbose
    configure_logging(verbose)


_verbose = False

OverridesArgument = typer.Argument(None, help="dotted overrides, e.g. train.lr=1e-3")


def fail(message: str, code: int = 1) -> None:
    typer.echo(f"error: {redact_text(message)}", err=True)
    raise typer.Exit(code)


def load(config: Optional[Path], overrides: Optional[List[str]]) -> JobConfig:
    from raylm.checks import load_job  # the checks import eval (numpy): deferred for a fast --help

    try:
        return load_job(config, overrides or [])
    except ConfigError as err:
        fail(str(err), 2)
        raise  # unreachable; keeps type checkers quiet


def user_errors():
    """Map the error types users can cause to one-line messages."""
    from raylm.data.errors import DataError
    from raylm.inference.task_model import ModelLoadError
    from raylm.common.tracking import RegistryError
    from raylm.models.errors import AdapterError
    from raylm.train.checkpoint import CorruptCheckpointError

    return (ConfigError, DataError, FileNotFoundError, CorruptCheckpointError, RegistryError, ModelLoadError,
            AdapterError)


def check_model_reference(job: JobConfig, model: Optional[str]) -> None:
    """One line for a model that cannot resolve, before the heavy layers load (and MLflow opens a store)."""
    from raylm.common import tracking

    if model is not None:
        call(lambda: tracking.check_model_reference(model, job.resolved_tracking_uri()))


def check_inputs(job: JobConfig, resume: Optional[str] = None) -> None:
    """Config, local inputs and ``--resume`` checked before Ray and torch are imported: a mistake costs a second."""
    from raylm import checks
    from raylm.lifecycle.runs import check_resume

    call(checks.check_inputs, job)
    if resume is not None:
        call(check_resume, job, resume)


def call(fn, *args):
    """``fn(*args)``, with the errors users can cause (and Ctrl-C, SIGTERM) turned into one line and an exit code."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Again, now that the command's layers are imported: Ray Data sets its loggers' levels on import.
    configure_logging(_verbose)
    try:
        return fn(*args)
    except ConfigError as err:
        fail(str(err), 2)
    except user_errors() as err:
        fail(str(err))
    except KeyboardInterrupt as err:
        if interrupts.was_terminated(err):
            fail(interrupts.MESSAGE, interrupts.EXIT_CODE)
        fail("interrupted", 130)
