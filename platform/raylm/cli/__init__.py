"""The ``raylm`` command (typer): ``app`` and ``main``, the console script's entry point.

base.py holds the apps and the error handling; commands.py the run-lifecycle
commands; cluster.py submit, jobs and tune. Heavy layers load inside the
commands, so ``raylm --help`` stays fast.
"""

from __future__ import annotations

# Importing these registers their commands on app, in this order (the order `raylm --help` lists them).
from raylm.cli import commands
from raylm.cli import cluster
from raylm.cli.base import app

__all__ = ["app", "main", "commands", "cluster"]


def main() -> None:
    app()
