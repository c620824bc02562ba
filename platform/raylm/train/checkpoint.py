"""Training checkpoints: sharded model and optimiser state, RNG state, and a checksum manifest.

A checkpoint folder holds the model and optimiser state as
``torch.distributed.checkpoint`` files (``dcp/``, one part per rank:
:mod:`raylm.train.dcp`; a LoRA run's only its trainable parameters, the
adapter matrices, and their optimiser state), the model's ``config.json``, ``trainer.pt`` with
scheduler/scaler state (plain tensors, loaded with ``weights_only=True``),
``rng.pt``, ``trainer_state.json`` (step, data position, eval loss),
``history.jsonl`` (the metrics logged so far) and a ``manifest.json`` with the
SHA-256 of every rank's files, written last. (Older checkpoints hold
safetensors weights and an ``optimizer.pt`` instead; they still load.) A folder whose
manifest is missing or does not match is treated as corrupt or partial and
skipped in favour of the newest older checkpoint that verifies.

Checkpoints may live on any pyarrow filesystem (local disk, NFS, S3, GCS): the
candidates are listed and, when remote, downloaded through it.
"""

from __future__ import annotations

import contextlib
import json
import posixpath
import random
import tempfile
from pathlib import Path
from typing import Any, Iterator

from raylm.common.fingerprints import file_digest

MANIFEST = "manifest.json"
STATE_FILE = "trainer_state.json"
HISTORY_FILE = "history.jsonl"
CHECKPOINT_PREFIX = "checkpoint_"
BEST_CHECKPOINT = "best_checkpoint"


class CorruptCheckpointError(RuntimeError):
    """A checkpoint folder failed its manifest check."""


def file_entries(folder: Path, pattern: str = "*") -> dict[str, dict[str, Any]]:
    """``{relative path: {"sha256", "bytes"}}`` for the files under ``folder`` matching ``pattern``."""
    return {
        str(path.relative_to(folder)): {"sha256": file_digest(path), "bytes": path.stat().st_size}
        for path in sorted(Path(folder).glob(pattern) if pattern != "*" else Path(folder).rglob("*"))
        if path.is_file() and path.name != MANIFEST
    }


def write_manifest(folder: Path, other_files: dict[str, dict[str, Any]] | None = None) -> None:
    """The manifest of ``folder``'s files plus ``other_files`` (entries other ranks wrote in their copies)."""
    files = {**(other_files or {}), **file_entries(folder)}
    (folder / MANIFEST).write_text(json.dumps({"files": dict(sorted(files.items()))}, indent=1))


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
        if path.stat().st_size != entry["bytes"] or file_digest(path) != entry["sha256"]:
            raise CorruptCheckpointError(f"checkpoint {root}: {name} does not match its checksum")


def read_state(folder: str | Path) -> dict[str, Any]:
    return json.loads((Path(folder) / STATE_FILE).read_text())


def read_history(folder: str | Path) -> list[dict[str, Any]]:
    path = Path(folder) / HISTORY_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _filesystem_and_path(path: str, filesystem=None):
    import pyarrow.fs

    if filesystem is not None:
        return filesystem, str(path)
    if "://" in str(path):
        return pyarrow.fs.FileSystem.from_uri(str(path))
    return pyarrow.fs.LocalFileSystem(), str(Path(path).resolve())


def _is_local(filesystem) -> bool:
    import pyarrow.fs

    return isinstance(filesystem, pyarrow.fs.LocalFileSystem)


def _read_step(filesystem, folder: str) -> float:
    try:
        with filesystem.open_input_stream(posixpath.join(folder, STATE_FILE)) as stream:
            return float(json.loads(stream.read())["step"])
    except Exception:  # unreadable state sorts last; verification rejects it anyway
        return -1.0


def list_checkpoints(parent: str | Path, filesystem=None) -> list[str]:
    """The ``checkpoint_*`` folders directly under ``parent``, newest recorded step first."""
    import pyarrow.fs

    filesystem, parent_path = _filesystem_and_path(str(parent), filesystem)
    try:
        infos = filesystem.get_file_info(pyarrow.fs.FileSelector(parent_path, allow_not_found=True))
    except OSError:
        infos = []
    folders = [
        info.path.rstrip("/") for info in infos
        if info.type == pyarrow.fs.FileType.Directory
        and posixpath.basename(info.path.rstrip("/")).startswith(CHECKPOINT_PREFIX)
    ]
    folders.sort(key=lambda folder: _read_step(filesystem, folder), reverse=True)
    return folders


def checkpoint_candidates(latest: str | Path, filesystem=None) -> list[str]:
    """The latest checkpoint folder first, then its ``checkpoint_*`` siblings, newest step first.

    Ray Train names checkpoint folders ``checkpoint_<...>`` under the run's
    storage folder; the order comes from the step each folder records.
    """
    filesystem, latest_path = _filesystem_and_path(str(latest), filesystem)
    latest_path = latest_path.rstrip("/")
    siblings = [folder for folder in list_checkpoints(posixpath.dirname(latest_path), filesystem)
                if folder != latest_path]
    return [latest_path, *siblings]


def _candidates(latest: str | Path | None, filesystem=None, search_dir: str | None = None):
    if latest is not None:
        filesystem, latest_path = _filesystem_and_path(str(latest), filesystem)
        return filesystem, checkpoint_candidates(latest_path, filesystem)
    if search_dir is not None:
        filesystem, search_path = _filesystem_and_path(str(search_dir), filesystem)
        return filesystem, list_checkpoints(search_path, filesystem)
    raise ValueError("a checkpoint or a folder to search is needed")


@contextlib.contextmanager
def open_checkpoint(path: str, filesystem=None) -> Iterator[Path]:
    """Yield a local, verified copy of the checkpoint at ``path`` (downloaded when remote).

    Raises :class:`CorruptCheckpointError` when it cannot be read or fails its manifest.
    """
    filesystem, path = _filesystem_and_path(str(path), filesystem)
    if _is_local(filesystem):
        verify_checkpoint(path)
        yield Path(path)
        return
    with tempfile.TemporaryDirectory(prefix="raylm-ckpt-") as local:
        fetch_checkpoint(path, filesystem, local)
        yield Path(local)


def fetch_checkpoint(path: str, filesystem, destination: str | Path) -> Path:
    """Download the checkpoint at ``path`` into ``destination`` through Ray Train's ``Checkpoint`` API, verified.

    Raises :class:`CorruptCheckpointError` when it cannot be read or fails its manifest.
    """
    from ray.train import Checkpoint

    try:
        Checkpoint(path, filesystem=filesystem).to_directory(str(destination))
    except (OSError, RuntimeError) as err:
        raise CorruptCheckpointError(f"checkpoint {path} could not be read: {err}") from None
    verify_checkpoint(destination)
    return Path(destination)


def local_valid_checkpoint(latest: str, filesystem=None, scratch: str | Path | None = None
                           ) -> tuple[Path | None, str | None, list[str]]:
    """``(local folder, path in storage, problems)`` for the newest checkpoint that verifies, from ``latest`` on.

    On a local file system the folder is the checkpoint itself. On a remote one
    (S3, GCS) each candidate is downloaded through Ray Train's ``Checkpoint`` API
    into a new folder under ``scratch`` that outlives the call, so the caller can
    export from it; candidates that fail are deleted again.
    """
    import shutil

    filesystem, candidates = _candidates(latest, filesystem)
    problems: list[str] = []
    for candidate in candidates:
        if _is_local(filesystem):
            try:
                verify_checkpoint(candidate)
            except CorruptCheckpointError as err:
                problems.append(str(err))
                continue
            return Path(candidate), candidate, problems
        local = Path(tempfile.mkdtemp(prefix="raylm-ckpt-", dir=scratch))
        try:
            return fetch_checkpoint(candidate, filesystem, local), candidate, problems
        except CorruptCheckpointError as err:
            problems.append(str(err))
            shutil.rmtree(local, ignore_errors=True)
    return None, None, problems


def choose_valid_checkpoint(latest: str | Path | None, filesystem=None,
                            search_dir: str | None = None) -> tuple[str | None, list[str]]:
    """The path of the newest checkpoint that verifies, starting at ``latest`` (else in ``search_dir``).

    Returns ``(path or None, problems)``; ``problems`` describes each candidate skipped. In a
    worker group only rank 0 chooses and the others open the path it chose, so that every rank
    restores the same step even if one of them could not read a newer checkpoint.
    """
    filesystem, candidates = _candidates(latest, filesystem, search_dir)
    problems: list[str] = []
    for candidate in candidates:
        try:
            with open_checkpoint(candidate, filesystem):
                return candidate, problems
        except CorruptCheckpointError as err:
            problems.append(str(err))
    return None, problems


@contextlib.contextmanager
def open_valid_checkpoint(latest: str | Path | None, filesystem=None,
                          search_dir: str | None = None) -> Iterator[tuple[Path | None, list[str]]]:
    """Yield ``(local folder, problems)`` for the newest checkpoint that verifies, starting at ``latest``.

    Without ``latest``, the ``checkpoint_*`` folders in ``search_dir`` are the
    candidates. Remote checkpoints are downloaded to a temporary folder that
    lives as long as the context. ``problems`` describes every candidate that
    was skipped; the folder is None when none verifies.
    """
    filesystem, candidates = _candidates(latest, filesystem, search_dir)
    problems: list[str] = []
    with contextlib.ExitStack() as stack:
        found: Path | None = None
        for candidate in candidates:
            try:
                found = stack.enter_context(open_checkpoint(candidate, filesystem))
                break
            except CorruptCheckpointError as err:
                problems.append(str(err))
        yield found, problems


def find_valid_checkpoint(latest: str | Path) -> tuple[Path | None, list[str]]:
    """Return the newest local checkpoint that verifies, and messages about any that did not."""
    problems: list[str] = []
    for candidate in checkpoint_candidates(latest):
        try:
            verify_checkpoint(candidate)
        except CorruptCheckpointError as err:
            problems.append(str(err))
            continue
        return Path(candidate), problems
    return None, problems


def publish_folder(local_folder: str | Path, destination: str, filesystem=None, replace: bool = True,
                   files: bool = True, manifest: bool = True) -> None:
    """Replace ``destination`` (on ``filesystem``) with a copy of ``local_folder``.

    Not atomic: a copy cut short has a missing or mismatched manifest and is
    rejected by :func:`verify_checkpoint`, as every checkpoint is. The flags let
    the ranks of a sharded checkpoint publish in turn into one folder: rank 0
    clears it (``replace``), every rank copies its ``files``, then rank 0 the
    ``manifest``.
    """
    import pyarrow.fs

    filesystem, destination = _filesystem_and_path(destination, filesystem)
    if replace:
        if filesystem.get_file_info(destination).type != pyarrow.fs.FileType.NotFound:
            filesystem.delete_dir(destination)
        filesystem.create_dir(destination, recursive=True)
    manifest_path = Path(local_folder) / MANIFEST
    # The manifest goes last so that a reader never sees a complete-looking partial copy.
    for path in sorted(Path(local_folder).rglob("*"), key=lambda p: p == manifest_path):
        if path.is_file() and (manifest if path == manifest_path else files):
            target = posixpath.join(destination, path.relative_to(local_folder).as_posix())
            filesystem.create_dir(posixpath.dirname(target), recursive=True)
            with path.open("rb") as source, filesystem.open_output_stream(target) as sink:
                while chunk := source.read(1 << 22):
                    sink.write(chunk)


def capture_rng_state() -> dict[str, Any]:
    """Python, numpy, torch (and CUDA) RNG state as plain tensors, loadable with ``weights_only=True``."""
    import numpy as np  # here, not at the top: the CLI reads checkpoints' state before torch may load
    import torch

    version, python_state, gauss = random.getstate()
    _, numpy_keys, numpy_pos, numpy_has_gauss, numpy_gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": torch.tensor(python_state, dtype=torch.int64),
        "python_meta": [version, gauss],
        "numpy_keys": torch.from_numpy(numpy_keys.astype(np.int64)),
        "numpy_meta": [int(numpy_pos), int(numpy_has_gauss), float(numpy_gauss)],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Set the RNG state :func:`capture_rng_state` captured."""
    import numpy as np
    import torch

    torch.set_rng_state(state["torch"])
    version, gauss = state["python_meta"]
    random.setstate((version, tuple(int(v) for v in state["python"].tolist()), gauss))
    pos, has_gauss, cached = state["numpy_meta"]
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
