"""The base class of every config section."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """A config section: unknown keys are errors, and assignments are validated like loading is."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())
