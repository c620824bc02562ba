"""Errors of the model layer that the CLI maps to one line, importable without torch."""

from __future__ import annotations


class AdapterError(ValueError):
    """A LoRA config that does not apply to the model, or an adapter folder that cannot be loaded."""
