"""Corpus sources: resolving paths, fingerprinting them, and reading them as segments with Ray Data.

Local paths may be files, folders (read recursively) or globs. Remote URIs that
Ray Data and pyarrow understand (``s3://``, ``gs://``, ...) are handed to them
as they are. A Hugging Face dataset (``format: hf``) is a hub name resolved by
the ``datasets`` library, or a local dataset folder; raylm reads the Arrow files
that back it, so the rows never pass through the driver.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

from raylm.common import storage
from raylm.common.fingerprints import fingerprint
from raylm.config import DataSourceConfig
from raylm.data.errors import DataError
from raylm.data.formatting import TASK_FIELDS
from raylm.data.read import iter_columnar_segments, iter_line_segments, segment_schema

# What a folder of each format is searched for (compressed variants are read transparently).
FORMAT_EXTENSIONS = {
    "text": (".txt", ".text", ".md"),
    "jsonl": (".jsonl", ".ndjson", ".json"),
    "parquet": (".parquet",),
}
COMPRESSION_EXTENSIONS = ("", ".gz", ".bz2", ".zst", ".lz4")
_GLOB_CHARACTERS = set("*?[")


@dataclass(frozen=True)
class ResolvedSource:
    """A configured source turned into concrete files, with a fingerprint of their current state."""

    name: str  # where it was configured, e.g. "data.sources[0]"
    config: DataSourceConfig
    files: tuple[str, ...]
    read_format: str  # text | jsonl | parquet | arrow (the files behind a Hugging Face dataset)
    num_bytes: int
    fingerprint: str

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "path": self.config.path, "format": self.config.format, "task": self.config.task,
                "files": len(self.files), "bytes": self.num_bytes, "fingerprint": self.fingerprint}


def _is_remote(path: str) -> bool:
    return "://" in path


def _matches_format(name: str, file_format: str) -> bool:
    lowered = name.lower()
    return any(lowered.endswith(ext + compression) for ext in FORMAT_EXTENSIONS[file_format]
               for compression in COMPRESSION_EXTENSIONS)


def _hidden(name: str) -> bool:
    return name.startswith(".") or name.startswith("_")


def _local_files(name: str, config: DataSourceConfig) -> list[str]:
    raw = os.path.expanduser(config.path)
    if any(character in raw for character in _GLOB_CHARACTERS):
        matches = sorted(path for path in glob.glob(raw, recursive=True) if os.path.isfile(path))
        if not matches:
            raise DataError(f"{name}.path: no files match {config.path!r}")
        return [os.path.abspath(path) for path in matches]
    path = Path(raw)
    if path.is_file():
        return [str(path.resolve())]
    if path.is_dir():
        found = []
        for root, folders, files in os.walk(path):
            folders[:] = sorted(folder for folder in folders if not _hidden(folder))
            found.extend(os.path.join(root, file) for file in sorted(files)
                         if not _hidden(file) and _matches_format(file, config.format))
        if not found:
            wanted = ", ".join(FORMAT_EXTENSIONS[config.format])
            raise DataError(f"{name}.path: no {config.format} files ({wanted}) in folder {config.path!r}")
        return [str(Path(file).resolve()) for file in sorted(found)]
    raise DataError(f"{name}.path: no such file or folder: {config.path!r}")


def _remote_files(name: str, config: DataSourceConfig) -> tuple[list[str], list[tuple[str, int, int]]]:
    import pyarrow.fs as pafs

    try:
        filesystem, root = pafs.FileSystem.from_uri(config.path)
        info = filesystem.get_file_info(root)
        if info.type == pafs.FileType.NotFound:
            raise DataError(f"{name}.path: not found: {config.path!r}")
        if info.type == pafs.FileType.File:
            infos = [info]
        else:
            infos = [entry for entry in filesystem.get_file_info(pafs.FileSelector(root, recursive=True))
                     if entry.type == pafs.FileType.File and not _hidden(entry.base_name)
                     and _matches_format(entry.base_name, config.format)]
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001 - any filesystem error is the user's URI or credentials
        raise DataError(f"{name}.path: cannot list {config.path!r}: {str(err).splitlines()[0]}") from None
    if not infos:
        raise DataError(f"{name}.path: no {config.format} files under {config.path!r}")
    scheme = config.path.split("://", 1)[0]
    infos = sorted(infos, key=lambda entry: entry.path)
    files = [f"{scheme}://{entry.path}" for entry in infos]
    states = [(file, int(entry.size or 0), int(entry.mtime_ns or 0)) for file, entry in zip(files, infos)]
    return files, states


def load_hf_dataset(name: str, config: DataSourceConfig):
    """The ``datasets.Dataset`` a source names (a local dataset folder, or a hub name via ``load_dataset``)."""
    import datasets

    split = config.split or "train"
    folder = Path(os.path.expanduser(config.path))
    try:
        if folder.is_dir() and ((folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()):
            loaded = datasets.load_from_disk(str(folder))
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise DataError(f"{name}.split: {split!r} is not a split of {config.path!r} "
                                    f"(it has {', '.join(loaded)})")
                loaded = loaded[split]
        else:
            path = str(folder) if folder.is_dir() else config.path
            loaded = datasets.load_dataset(path, config.subset, split=split)
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001 - the datasets library raises many types for a bad name/split
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"{name}: cannot load Hugging Face dataset {config.path!r}: {message}") from None
    if getattr(loaded, "_indices", None) is not None:
        loaded = loaded.flatten_indices()
    return loaded


def resolve_source(name: str, config: DataSourceConfig) -> ResolvedSource:
    """Find a source's files and fingerprint them (paths, sizes, modification times; HF: its fingerprint)."""
    if config.format == "hf":
        dataset = load_hf_dataset(name, config)
        files = [entry["filename"] for entry in dataset.cache_files]
        if not files:
            raise DataError(f"{name}: Hugging Face dataset {config.path!r} is not backed by Arrow files")
        missing = [column for column in _needed_columns(config) if column not in dataset.column_names]
        if missing:
            raise DataError(f"{name}: column {missing[0]!r} not in {config.path!r} "
                            f"(columns: {', '.join(dataset.column_names)}); map it with fields")
        states = [(file, os.path.getsize(file), os.stat(file).st_mtime_ns) for file in files]
        identity: Any = {"hf_fingerprint": dataset._fingerprint, "num_rows": dataset.num_rows, "files": states}
        read_format = "arrow"
    elif _is_remote(config.path):
        files, states = _remote_files(name, config)
        identity = {"files": states}
        read_format = config.format
    else:
        files = _local_files(name, config)
        states = [(file, os.path.getsize(file), os.stat(file).st_mtime_ns) for file in files]
        identity = {"files": states}
        read_format = config.format
    if read_format == "parquet":
        _check_parquet_columns(name, config, files[0])
    return ResolvedSource(name=name, config=config, files=tuple(files), read_format=read_format,
                          num_bytes=sum(state[1] for state in states),
                          fingerprint=fingerprint({"config": config.model_dump(mode="json"), **identity}))


def _needed_columns(config: DataSourceConfig) -> list[str]:
    return [config.column(field) for field in TASK_FIELDS[config.task]]


def _check_parquet_columns(name: str, config: DataSourceConfig, path: str) -> None:
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path) if not _is_remote(path) else None
    except Exception as err:  # noqa: BLE001 - a corrupt or non-Parquet file
        raise DataError(f"{name}: {path} is not a readable Parquet file: {str(err).splitlines()[0]}") from None
    if schema is not None:
        missing = [column for column in _needed_columns(config) if column not in schema.names]
        if missing:
            raise DataError(f"{name}: column {missing[0]!r} not in {path} (columns: {', '.join(schema.names)}); "
                            "map it with fields")


def check_local_paths(sources: list[tuple[str, DataSourceConfig]]) -> None:
    """Fail fast, before Ray starts, on local source paths that do not exist."""
    for name, config in sources:
        if config.format == "hf" or _is_remote(config.path):
            continue
        _local_files(name, config)


# --------------------------------------------------------------------------- Ray Data reading


def _segment_datasource_class():
    """Defined lazily so that importing raylm.data does not import Ray."""
    from ray.data.datasource import FileBasedDatasource

    class SegmentDatasource(FileBasedDatasource):
        """Reads files as segments (one row each): see :mod:`raylm.data.read`."""

        def __init__(self, paths: list[str], *, read_format: str, segment_bytes: int, text_unit: str,
                     columns: Optional[list[str]] = None):
            super().__init__(paths)
            self._read_format = read_format
            self._segment_bytes = segment_bytes
            self._text_unit = text_unit
            self._columns = columns
            # Ray Data hands _read_stream the path within the file system (no scheme for s3:// and gs://).
            self._file_index = {}
            for index, file in enumerate(paths):
                self._file_index[file] = self._file_index[file.split("://", 1)[-1]] = index

        def _open_input_source(self, filesystem, path: str, **open_args):
            if self._read_format in ("parquet", "arrow"):
                return filesystem.open_input_file(path)
            return super()._open_input_source(filesystem, path, **open_args)

        def _read_stream(self, f, path: str) -> Iterator:
            import pyarrow as pa

            schema = segment_schema()
            for segment in _iter_file_segments(f, self._read_format, self._segment_bytes, self._text_unit,
                                               self._columns):
                yield pa.Table.from_pylist([{"path": path, "file_index": self._file_index.get(path, -1), **segment}],
                                           schema=schema)

    return SegmentDatasource


def _iter_file_segments(f, read_format: str, segment_bytes: int, text_unit: str,
                        columns: Optional[list[str]]) -> Iterator[dict[str, Any]]:
    import pyarrow as pa

    if read_format == "text":
        yield from iter_line_segments(f, segment_bytes, text_unit)
    elif read_format == "jsonl":
        yield from iter_line_segments(f, segment_bytes, "line")
    elif read_format == "parquet":
        import pyarrow.parquet as pq

        yield from iter_columnar_segments(pq.ParquetFile(f).iter_batches(batch_size=1024, columns=columns),
                                          segment_bytes)
    elif read_format == "arrow":
        try:
            reader = pa.ipc.open_stream(f)
        except pa.ArrowInvalid:
            f.seek(0)
            file_reader = pa.ipc.open_file(f)
            batches = (file_reader.get_batch(i) for i in range(file_reader.num_record_batches))
        else:
            batches = iter(reader)
        if columns:
            batches = (batch.select(columns) for batch in batches)
        yield from iter_columnar_segments(batches, segment_bytes)
    else:
        raise ValueError(f"unknown read format {read_format!r}")


def read_segments(source: ResolvedSource, segment_bytes: int):
    """A lazy Ray Dataset with one row per segment of ``source``'s files, one segment per block."""
    import ray.data

    columns = _needed_columns(source.config) if source.read_format in ("parquet", "arrow") else None
    datasource = _segment_datasource_class()(list(source.files), read_format=source.read_format,
                                             segment_bytes=segment_bytes, text_unit=source.config.text_unit,
                                             columns=columns)
    # One segment per block, so that the segments of one big file are tokenized in parallel.
    return ray.data.read_datasource(datasource).repartition(target_num_rows_per_block=1)


# --------------------------------------------------------------------------- planned segments

_COMPRESSED = tuple(extension for extension in COMPRESSION_EXTENSIONS if extension)
_PLAN_CHUNK_FILES = 16  # files planned by one task


def plannable(source: ResolvedSource) -> bool:
    """Whether ``source``'s segments can be planned as byte ranges (uncompressed text and JSON Lines)."""
    return source.read_format in ("text", "jsonl") and not any(
        file.lower().endswith(_COMPRESSED) for file in source.files)


def plan_file_segments(files: list[str], read_format: str, segment_bytes: int, text_unit: str,
                       first_index: int = 0) -> list[dict]:
    """The segments of ``files`` as byte ranges: :func:`iter_line_segments`'s fields without the payload,
    plus ``uri``, ``file_index`` (counted from ``first_index``), ``offset`` and ``length``. ``path`` is the
    path within the file system, as Ray Data's file readers give it, so that reports and document keys are
    the same on both reading paths."""

    unit = text_unit if read_format == "text" else "line"
    planned = []
    for file_index, uri in enumerate(files, start=first_index):
        filesystem, path = storage.filesystem(uri)
        offset = 0
        with filesystem.open_input_stream(path) as stream:
            for segment in iter_line_segments(stream, segment_bytes, unit):
                length = len(segment.pop("payload"))
                planned.append({"path": path, "uri": uri, "file_index": file_index, **segment, "offset": offset,
                                "length": length})
                offset += length
    return planned


def _read_planned(batch: dict[str, Any], fn, plans: list, **fn_kwargs) -> dict[str, Any]:
    """Ray Data ``map_batches`` function over planned segments: read each segment's bytes, then ``fn``."""
    import numpy as np


    outputs = []
    for index in range(len(batch["offset"])):
        filesystem, path = storage.filesystem(str(batch["uri"][index]))
        with filesystem.open_input_file(path) as handle:
            payload = handle.read_at(int(batch["length"][index]), int(batch["offset"][index]))
        segment = {column: batch[column][index:index + 1] for column in SEGMENT_FIELDS}
        segment["payload"] = np.array([payload], dtype=object)
        outputs.append(fn(segment, plan=plans[int(batch["plan"][index])], **fn_kwargs))
    if len(outputs) == 1:
        return outputs[0]
    return {column: np.concatenate([output[column] for output in outputs]) for column in outputs[0]}


SEGMENT_FIELDS = ("path", "file_index", "first_line", "continues", "doc_start", "continued", "last_doc_start", "ends_file")


def map_segments(pairs: list[tuple[ResolvedSource, Any]], segment_bytes: int, fn, longest_first: bool = False,
                 **fn_kwargs):
    """A lazy Ray Dataset: ``fn(segment batch, plan=plan, **fn_kwargs)`` over every segment of every
    ``(source, plan)`` pair: the planned sources' segments first, in the pairs' order (or longest first with
    ``longest_first``, for work whose output order does not matter: the short ones then fill the last CPUs
    to free up), then the other sources', in the pairs' order.

    Uncompressed text and JSON Lines sources are planned first: small Ray tasks
    cut their files into segments and return only where each segment lies (no
    text reaches the driver). The plan becomes a dataset of one segment per
    block, and one fused operator reads each segment's bytes, runs ``fn`` and
    hands its rows on, so every CPU packs: with a
    separate read operator Ray Data keeps a CPU reserved for reading while the
    packing operator waits for it (measured: packing ran ~1.45 tasks at a time
    on 2 CPUs). Other sources (Parquet, Arrow, compressed files) are read by
    Ray Data's file reader and repartitioned to one segment per block.
    """
    import ray
    import ray.data

    planned_pairs = [(index, pair) for index, pair in enumerate(pairs) if plannable(pair[0])]
    datasets = []
    if planned_pairs:
        plan_task = ray.remote(plan_file_segments)
        refs = []
        by_source: dict[str, list] = {}  # a source in two passes (train, and dev carved from it) is planned once
        for plan_index, (source, _) in planned_pairs:
            if source.fingerprint not in by_source:
                files = list(source.files)
                by_source[source.fingerprint] = [
                    plan_task.remote(files[start:start + _PLAN_CHUNK_FILES], source.read_format, segment_bytes,
                                     source.config.text_unit, start)
                    for start in range(0, len(files), _PLAN_CHUNK_FILES)]
            refs.extend((plan_index, ref) for ref in by_source[source.fingerprint])
        items = [{**segment, "plan": plan_index}
                 for plan_index, ref in refs for segment in ray.get(ref)]
        if longest_first:
            items.sort(key=lambda item: -item["length"])  # stable: ties keep reading order
        plans = [plan for _, plan in pairs]
        datasets.append(ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            _read_planned, fn_kwargs={"fn": fn, "plans": plans, **fn_kwargs}, batch_size=1,
            batch_format="numpy"))
    for source, plan in pairs:
        if not plannable(source):
            datasets.append(read_segments(source, segment_bytes).map_batches(
                fn, fn_kwargs={"plan": plan, **fn_kwargs}, batch_size=1, batch_format="numpy"))
    return datasets[0].union(*datasets[1:]) if len(datasets) > 1 else datasets[0]
