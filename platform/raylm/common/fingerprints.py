"""One way to fingerprint things: SHA-256 over a canonical encoding, cut to a fixed number of hex digits.

Data, tokenizers, configs, eval sets, checkpoints and code are fingerprinted so that a
cache, a resume or a comparison can tell "the same" from "different". Every such hash in
raylm goes through these functions, so the encoding (JSON with sorted keys, ``str`` for
anything JSON does not know) is the same everywhere.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable

DEFAULT_LENGTH = 16


def canonical_json(payload: Any) -> str:
    """``payload`` as JSON with sorted keys (``str`` for values JSON does not know)."""
    return json.dumps(payload, sort_keys=True, default=str, ensure_ascii=False)


def fingerprint_text(text: str, length: int = DEFAULT_LENGTH) -> str:
    """The first ``length`` hex digits of the SHA-256 of ``text`` (UTF-8)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:length]


def fingerprint(payload: Any, length: int = DEFAULT_LENGTH) -> str:
    """The fingerprint of a JSON-able value (:func:`canonical_json`, then :func:`fingerprint_text`)."""
    return fingerprint_text(canonical_json(payload), length)


def fingerprint_records(header: str, records: Iterable[Any], length: int = DEFAULT_LENGTH) -> str:
    """The fingerprint of ``header`` followed by each record's canonical JSON on its own line, in order.

    Streams: the records are never held together, so an eval set or a corpus of any size can be hashed.
    """
    digest = hashlib.sha256(header.encode("utf-8"))
    for record in records:
        digest.update(canonical_json(record).encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()[:length]


def file_digest(path: str | os.PathLike) -> str:
    """The full SHA-256 hex digest of a file's bytes (read in 1 MiB chunks)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _folder_digest(root: Path, pattern: str):
    """SHA-256 over each matching file's relative path and bytes, in sorted path order, streamed."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob(pattern)):
        if "__pycache__" in path.parts or not path.is_file():
            continue
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        digest.update(b"\0")
    return digest


def fingerprint_folder(root: str | os.PathLike, pattern: str = "*.py", length: int = DEFAULT_LENGTH) -> str:
    """The fingerprint of the relative paths and contents of the files under ``root`` matching ``pattern``."""
    return _folder_digest(Path(root), pattern).hexdigest()[:length]


def content_hash(root: str | os.PathLike) -> str:
    """``sha256:<64 hex digits>`` over every file of a folder (relative path and bytes, sorted by path).

    The integrity check of a registered model: recorded when a model folder is
    registered, recomputed when a registry reference is loaded. Full length, not
    a fingerprint's prefix: this one has to resist someone choosing the bytes.
    """
    return "sha256:" + _folder_digest(Path(root), "*").hexdigest()


def unit_interval(*parts: Any) -> float:
    """A deterministic pseudo-random number in [0, 1) for ``parts`` (same on every machine and run): the
    hash behind sampling and hold-out decisions that must not depend on the order rows are read in."""
    digest = hashlib.blake2b("\x1f".join(str(part) for part in parts).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0 ** 64
