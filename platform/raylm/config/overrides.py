"""Dotted ``key.sub=value`` overrides on top of a YAML mapping.

A secret is never taken as an override: a command line ends up in shell
history, process lists and, through ``raylm submit``, in the job's stored
entrypoint that ``raylm jobs list`` prints.
"""

from __future__ import annotations

import copy
import re
from typing import Any

import yaml

from raylm.config.errors import ConfigError
from raylm.config.serve import API_KEY_ENV

# Secret keys -> where the secret comes from instead.
SECRET_KEYS = {"serve.api_key": f"set ${API_KEY_ENV} in the environment, or name a file that holds the key "
                                "in serve.api_key_file"}
_SECRET_OVERRIDE = re.compile(r"(?<![\w.])(" + "|".join(re.escape(key) for key in SECRET_KEYS) + r")\s*=")


def refuse_secret_overrides(words: list[str]) -> None:
    """A ConfigError (one line, with the hint) when any of ``words`` (an override list, or a job's command
    line) gives a secret key such as ``serve.api_key=...``; the secret itself is never repeated."""
    for word in words:
        match = _SECRET_OVERRIDE.search(word)
        if match:
            key = match.group(1)
            raise ConfigError(f"config error: {key} is not taken on the command line (shell history, process "
                              f"lists and job records keep it): {SECRET_KEYS[key]}")


def parse_override(override: str) -> tuple[list[str], Any]:
    """Split ``a.b=value`` into a key path and a YAML-parsed value."""
    if "=" not in override:
        raise ConfigError(f"config error: override {override!r} must look like key.sub=value")
    key, raw = override.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"config error: override {override!r} has an empty key")
    refuse_secret_overrides([f"{key}="])
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``raw`` with each dotted override applied."""
    merged = copy.deepcopy(raw)
    for override in overrides:
        path, value = parse_override(override)
        node = merged
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"config error: {'.'.join(path)}: {part} is not a section")
            node = child
        node[path[-1]] = value
    return merged
