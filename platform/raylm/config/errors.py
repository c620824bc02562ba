"""The one error type a user's configuration raises, and its one-line message."""

from __future__ import annotations

from pydantic import ValidationError


class ConfigError(ValueError):
    """A user-caused configuration problem; its message is one line."""


def format_validation_error(err: ValidationError) -> str:
    """One line for a pydantic error: ``config error: <dotted field>: <message>`` (and how many more).

    Only the first error is spelled out, so that the line stays readable; an
    unknown key reads ``unknown key`` and pydantic's ``Value error, `` prefix is
    dropped from messages our own validators raise.
    """
    first = err.errors()[0]
    location = ".".join(str(part) for part in first["loc"]) or "<root>"
    message = first["msg"]
    if first["type"] == "extra_forbidden":
        message = "unknown key"
    elif message.startswith("Value error, "):
        message = message[len("Value error, "):]
    extra = f" (and {len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"config error: {location}: {message}{extra}"
