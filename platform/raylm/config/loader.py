"""Reading a job config: a YAML file, then dotted overrides, then the schema.

These functions check the schema only (types, ranges, rules inside one
section). The checks that need other components (model sizes, metric names,
task fields) live in :mod:`raylm.checks`, whose ``load_job`` is what entry
points call.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from raylm.config.errors import ConfigError, format_validation_error
from raylm.config.job import JobConfig
from raylm.config.overrides import apply_overrides


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML mapping, turning missing files and syntax errors into ConfigError."""
    config_path = Path(path)
    if not config_path.is_file():
        raise ConfigError(f"config error: file not found: {config_path}")
    try:
        loaded = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"config error: {config_path}{where}: invalid YAML") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"config error: {config_path}: top level must be a mapping")
    return loaded


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> JobConfig:
    """Load a :class:`JobConfig` from an optional YAML file plus dotted overrides (schema checks only)."""
    raw = read_yaml(path) if path is not None else {}
    raw = apply_overrides(raw, list(overrides or []))
    return validate_config(raw)


def validate_config(raw: dict[str, Any]) -> JobConfig:
    """Validate a raw mapping against the :class:`JobConfig` schema; a ConfigError (one line) if it does not fit."""
    try:
        return JobConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err)) from None
