"""Locations as plain strings: an absolute local path, or a URI with a scheme (``file://`` URIs are local).

The pure string rules, kept in ``config`` because the job config needs its run's
location and imports no other raylm package; :mod:`raylm.common.storage` builds
reading and writing on these same three functions.
"""

from __future__ import annotations

import os
import posixpath
from pathlib import Path


def is_remote(location: str | os.PathLike) -> bool:
    """True for a URI with a scheme other than ``file://`` (s3://, gs://, hdfs://, ...)."""
    text = str(location)
    return "://" in text and not text.startswith("file://")


def normalize(location: str | os.PathLike) -> str:
    """A URI without a trailing slash, or an absolute local path (``file://`` stripped, relative resolved)."""
    text = str(location)
    if is_remote(text):
        scheme, rest = text.split("://", 1)
        return f"{scheme}://{rest.rstrip('/')}" if rest.strip("/") else f"{scheme}://{rest}"
    if text.startswith("file://"):
        text = text[len("file://"):]
    return str(Path(text).expanduser().resolve())


def join(location: str | os.PathLike, *parts: str) -> str:
    """``location/part/...`` for URIs and local paths alike."""
    base = normalize(location)
    if is_remote(base):
        return posixpath.join(base, *parts) if parts else base
    return str(Path(base).joinpath(*parts))
