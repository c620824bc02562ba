"""Run storage as a location: a local folder, a shared file system path, or an ``s3://`` / ``gs://`` URI.

Everything a run keeps (its record, the config copy, Ray Train's checkpoints,
the exported model folder, summaries) is written under ``<workdir>/<run id>``
through pyarrow file systems, so the same code writes to a laptop's disk, to
NFS on a cluster, or to an object store. A *location* is a plain string: an
absolute local path, or a URI with a scheme (``file://`` URIs become local
paths). Credentials and endpoints come from the environment as for any AWS or
GCS client (``AWS_PROFILE``, instance roles, ``AWS_ENDPOINT_URL_S3`` for an
S3-compatible store, ``GOOGLE_APPLICATION_CREDENTIALS``).
"""

from __future__ import annotations

import atexit
import os
import posixpath
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Iterator

from raylm.config.locations import is_remote, join, normalize  # noqa: F401  (part of this module's API)


def parent(location: str | os.PathLike) -> str:
    base = normalize(location)
    if is_remote(base):
        scheme, rest = base.split("://", 1)
        return f"{scheme}://{posixpath.dirname(rest)}"
    return str(Path(base).parent)


def basename(location: str | os.PathLike) -> str:
    return posixpath.basename(normalize(location).rstrip("/"))


def filesystem(location: str | os.PathLike):
    """``(pyarrow filesystem, path within it)`` for a location."""
    import pyarrow.fs

    base = normalize(location)
    if is_remote(base):
        return pyarrow.fs.FileSystem.from_uri(base)
    return pyarrow.fs.LocalFileSystem(), base


def exists(location: str | os.PathLike) -> bool:
    import pyarrow.fs

    fs, path = filesystem(location)
    return fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound


def is_file(location: str | os.PathLike) -> bool:
    import pyarrow.fs

    fs, path = filesystem(location)
    return fs.get_file_info(path).type == pyarrow.fs.FileType.File


def read_bytes(location: str | os.PathLike) -> bytes:
    """The file's content; :class:`FileNotFoundError` when there is none."""
    fs, path = filesystem(location)
    if not is_file(location):
        raise FileNotFoundError(normalize(location))
    with fs.open_input_stream(path) as stream:
        return stream.read()


def read_text(location: str | os.PathLike) -> str:
    return read_bytes(location).decode("utf-8")


def write_bytes(location: str | os.PathLike, data: bytes) -> None:
    """Write a whole file. Readers never see a partial file: a local write goes to a temporary
    name first and is renamed into place; an object store publishes an object only once it is whole."""
    base = normalize(location)
    if not is_remote(base):
        target = Path(base)
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
        temporary.write_bytes(data)
        temporary.replace(target)
        return
    fs, path = filesystem(base)
    with fs.open_output_stream(path) as stream:
        stream.write(data)


def write_text(location: str | os.PathLike, text: str) -> None:
    write_bytes(location, text.encode("utf-8"))


def make_dirs(location: str | os.PathLike) -> None:
    """Create a folder and its parents (object stores have no folders: nothing to do there)."""
    fs, path = filesystem(location)
    fs.create_dir(path, recursive=True)


def _walk_files(folder: Path) -> Iterator[Path]:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            yield path


def upload_folder(local_folder: str | os.PathLike, location: str | os.PathLike) -> str:
    """Replace the folder at ``location`` with a copy of ``local_folder``; returns the location.

    A local destination that is the source itself is left alone.
    """
    import pyarrow.fs

    source = Path(local_folder).resolve()
    destination = normalize(location)
    if not is_remote(destination) and Path(destination) == source:
        return destination
    fs, path = filesystem(destination)
    if fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound:
        fs.delete_dir(path)
    fs.create_dir(path, recursive=True)
    for file in _walk_files(source):
        target = posixpath.join(path, file.relative_to(source).as_posix())
        fs.create_dir(posixpath.dirname(target), recursive=True)
        with file.open("rb") as reader, fs.open_output_stream(target) as writer:
            while chunk := reader.read(1 << 22):
                writer.write(chunk)
    return destination


def download_folder(location: str | os.PathLike, local_folder: str | os.PathLike) -> Path:
    """Copy the folder at ``location`` into ``local_folder`` (created); returns the local folder."""
    import pyarrow.fs

    fs, path = filesystem(location)
    if fs.get_file_info(path).type != pyarrow.fs.FileType.Directory:
        raise FileNotFoundError(f"folder not found: {normalize(location)}")
    destination = Path(local_folder)
    destination.mkdir(parents=True, exist_ok=True)
    pyarrow.fs.copy_files(path, str(destination.resolve()), source_filesystem=fs,
                          destination_filesystem=pyarrow.fs.LocalFileSystem())
    return destination


def local_scratch(prefix: str = "raylm-") -> Path:
    """A new local folder for files that are assembled here and then uploaded (removed at exit)."""
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder
