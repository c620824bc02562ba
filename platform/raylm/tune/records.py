"""The files a sweep keeps in its folder, written whole so that an interrupted sweep never leaves half a file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from raylm.config import ConfigError

SWEEP_RECORD = "sweep.json"
TRIAL_RECORD = "trial.json"
RESULTS_FILE = "results.json"
TABLE_FILE = "results.csv"


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as JSON to ``path`` through a temporary file (readers never see a partial one)."""
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(data, indent=2, default=str))
    temporary.replace(path)


def read_json(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``, or ``{}`` when there is no such file."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}


def locate_sweep(reference: str) -> Path:
    """The sweep folder ``reference`` names (a folder with ``sweep.json``); ConfigError otherwise."""
    folder = Path(reference)
    if not (folder / SWEEP_RECORD).is_file():
        raise ConfigError(f"resume: {reference} is not a sweep folder (no {SWEEP_RECORD})")
    return folder.resolve()
