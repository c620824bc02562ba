"""Read: cut a source's files into segments, the unit in which raylm reads, checks and packs a corpus.

A source's files are cut into segments of about ``data.segment_bytes``: text and
JSON Lines files at line boundaries (text files preferably where a document
ends), Parquet and Arrow files at row boundaries. A segment is one Ray Data row
(its raw bytes plus where it came from), and one task turns it into packed
blocks (:mod:`raylm.data.parse`, then :mod:`raylm.data.segments`). Segments
depend only on the bytes of the files, so the packed blocks are the same on any
cluster and with any parallelism.
"""

from __future__ import annotations

import io
import re
from typing import Any, BinaryIO, Iterable, Iterator

COLUMNAR_SLICE_ROWS = 256
_BLANK_RUN = re.compile(rb"\n(?:[ \t\r\f\v]*\n)+")
# A paragraph longer than this many segments is cut mid-paragraph (and continued).
_PARAGRAPH_HARD_LIMIT = 4

def segment_schema():
    import pyarrow as pa

    return pa.schema([
        ("path", pa.string()),
        ("file_index", pa.int64()),  # the file's place in its source's sorted file list
        ("first_line", pa.int64()),  # 1-based line (text, jsonl) or row (parquet, arrow) of the first record
        ("continues", pa.bool_()),  # the first document started in an earlier segment
        ("doc_start", pa.int64()),  # ...on this line
        ("continued", pa.bool_()),  # the last document goes on in the next segment
        ("last_doc_start", pa.int64()),  # ...and started on this line
        ("ends_file", pa.bool_()),  # the last segment of its file
        ("payload", pa.large_binary()),
    ])


# --------------------------------------------------------------------------- reading


def _find_cut(buffer: bytes, target: int, unit: str) -> tuple[int, bool] | None:
    """Where to end the next segment in ``buffer`` (offset, cut inside a document), or None to read on."""
    if len(buffer) < target:
        return None
    if unit == "paragraph":
        match = _BLANK_RUN.search(buffer, target - 1)
        if match is not None:
            return match.end(), False
        if len(buffer) < _PARAGRAPH_HARD_LIMIT * target:
            return None
    newline = buffer.find(b"\n", target - 1)
    if newline < 0:
        return None
    cut = newline + 1
    inside_document = unit in ("paragraph", "file")
    if inside_document and cut == len(buffer):
        return None  # read on: if the file ends here, the document ends here too
    return cut, inside_document


def _last_document_start(segment: bytes, first_line: int, unit: str, continues: bool, doc_start: int) -> int:
    if unit == "file":
        return 1
    last = None
    for last in _BLANK_RUN.finditer(segment):
        pass
    if last is None:
        return doc_start if continues else first_line
    return first_line + segment.count(b"\n", 0, last.end())


def iter_line_segments(stream: BinaryIO, segment_bytes: int, unit: str = "line",
                       read_size: int = 1 << 20) -> Iterator[dict[str, Any]]:
    """Cut a text or JSON Lines byte stream into segments (dicts in :func:`segment_schema`, no path).

    ``unit`` says where a segment may end: after any line (``line``, and JSON
    Lines), after a blank line (``paragraph``; a paragraph longer than a few
    segments is cut after a line and flagged as continued), or after any line
    of a file that is one document (``file``, always flagged). The segments'
    payloads concatenate to the stream's bytes. An empty stream gives one empty
    segment, so that an empty file is reported.
    """
    buffer = b""
    first_line = 1
    continues, doc_start = False, 0
    eof = False
    emitted = False
    while True:
        if not eof:
            data = stream.read(read_size)
            if data:
                buffer += data
            else:
                eof = True
        while True:
            cut = _find_cut(buffer, segment_bytes, unit)
            if cut is None:
                break
            offset, inside = cut
            segment, buffer = buffer[:offset], buffer[offset:]
            last_start = _last_document_start(segment, first_line, unit, continues, doc_start) if inside else 0
            yield {"first_line": first_line, "continues": continues, "doc_start": doc_start,
                   "continued": inside, "last_doc_start": last_start, "ends_file": False, "payload": segment}
            emitted = True
            first_line += segment.count(b"\n")
            continues, doc_start = inside, last_start
        if eof:
            if buffer or not emitted:
                yield {"first_line": first_line, "continues": continues, "doc_start": doc_start,
                       "continued": False, "last_doc_start": 0, "ends_file": True, "payload": buffer}
            return


def iter_columnar_segments(batches: Iterable, segment_bytes: int) -> Iterator[dict[str, Any]]:
    """Group Arrow record batches into segments of about ``segment_bytes`` (payload: an Arrow IPC stream)."""
    import pyarrow as pa

    pending: list = []
    size = 0
    first_row = 1
    rows = 0

    def flush() -> dict[str, Any]:
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, pending[0].schema) as writer:
            for piece in pending:
                writer.write_batch(piece)
        return {"first_line": first_row, "continues": False, "doc_start": 0, "continued": False,
                "last_doc_start": 0, "ends_file": False, "payload": sink.getvalue().to_pybytes()}

    for batch in batches:
        for offset in range(0, batch.num_rows, COLUMNAR_SLICE_ROWS):
            piece = batch.slice(offset, COLUMNAR_SLICE_ROWS)
            pending.append(piece)
            size += piece.nbytes
            rows += piece.num_rows
            if size >= segment_bytes:
                yield flush()
                first_row += rows
                pending, size, rows = [], 0, 0
    if pending:
        yield flush()


def read_bytes_segments(data: bytes, path: str, segment_bytes: int, unit: str) -> list[dict[str, Any]]:
    """Segments of an in-memory file (for tests and the benchmark's baseline)."""
    return [{"path": path, **segment} for segment in iter_line_segments(io.BytesIO(data), segment_bytes, unit)]
