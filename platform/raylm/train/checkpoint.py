"""Training checkpoints: safetensors weights, optimiser and RNG state, and a checksum manifest.

A checkpoint folder holds the model (``save_pretrained``, safetensors), an
``optimizer.pt`` with optimiser/scheduler/scaler state (plain tensors, loaded
with ``weights_only=True``), ``rng.pt``, ``trainer_state.json`` and a
``manifest.json`` with the SHA-256 of every file. A folder whose manifest is
missing or does not match is treated as corrupt and skipped.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
STATE_FILE = "trainer_state.json"


class CorruptCheckpointError(RuntimeError):
    """A checkpoint folder failed its manifest check."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(folder: Path) -> None:
    files = {
        str(path.relative_to(folder)): {"sha256": _sha256(path), "bytes": path.stat().st_size}
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != MANIFEST
    }
    (folder / MANIFEST).write_text(json.dumps({"files": files}, indent=1))


def verify_checkpoint(folder: str | Path) -> None:
    """Raise :class:`CorruptCheckpointError` unless every file matches the manifest."""
    root = Path(folder)
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        raise CorruptCheckpointError(f"checkpoint {root} has no manifest (partial write?)")
    try:
        files = json.loads(manifest_path.read_text())["files"]
    except (ValueError, KeyError):
        raise CorruptCheckpointError(f"checkpoint {root} has an unreadable manifest") from None
    for name, entry in files.items():
        path = root / name
        if not path.is_file():
            raise CorruptCheckpointError(f"checkpoint {root} lacks {name}")
        if path.stat().st_size != entry["bytes"] or _sha256(path) != entry["sha256"]:
            raise CorruptCheckpointError(f"checkpoint {root}: {name} does not match its checksum")


def read_state(folder: str | Path) -> dict[str, Any]:
    return json.loads((Path(folder) / STATE_FILE).read_text())


_STEP_PATTERN = re.compile(r"checkpoint_(\d+)")


def checkpoint_candidates(latest: str | Path) -> list[Path]:
    """The latest checkpoint folder first, then its older siblings, newest first.

    Ray Train names checkpoint folders ``checkpoint_<timestamp>``; we order by the
    training step recorded in each folder, falling back to the folder name.
    """
    latest_path = Path(latest)
    siblings = [p for p in latest_path.parent.glob("checkpoint_*") if p.is_dir() and p != latest_path]

    def step_of(path: Path) -> float:
        try:
            return float(read_state(path)["step"])
        except Exception:  # unreadable state sorts last; verification rejects it anyway
            return -1.0

    siblings.sort(key=step_of, reverse=True)
    return [latest_path, *siblings]


def find_valid_checkpoint(latest: str | Path) -> tuple[Path | None, list[str]]:
    """Return the newest checkpoint that verifies, and messages about any that did not."""
    problems: list[str] = []
    for candidate in checkpoint_candidates(latest):
        try:
            verify_checkpoint(candidate)
        except CorruptCheckpointError as err:
            problems.append(str(err))
            continue
        return candidate, problems
    return None, problems
