"""Ids for runs and sweeps: ``<name>-<UTC time>-<random>``, sortable by start time and unique."""

from __future__ import annotations

import secrets
import time


def new_run_id(run_name: str) -> str:
    """A fresh id for a run (or sweep) named ``run_name``."""
    return f"{run_name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(3)}"
