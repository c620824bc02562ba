"""Segments: the unit in which raylm reads, checks, formats, tokenizes and packs a corpus.

A source's files are cut into segments of about ``data.segment_bytes``: text and
JSON Lines files at line boundaries (text files preferably where a document
ends), Parquet and Arrow files at row boundaries. A segment is one Ray Data row
(its raw bytes plus where it came from), and one task turns it into packed
blocks. Segments depend only on the bytes of the files, so the packed blocks
are the same on any cluster and with any parallelism.

Every input row is checked here, inside the Ray Data tasks: a non-UTF-8 line, a
malformed JSON line, a missing field or an empty document becomes a
:class:`Problem` (counted and reported with file and line) and is skipped, or,
under ``data.strict``, raises :class:`DataError`.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Iterable, Iterator

import numpy as np

from raylm.data.errors import DataError
from raylm.data.formatting import RowProblem, canonical_row, example_key, example_text, format_example
from raylm.data.packing import IGNORE_INDEX, empty_blocks, example_sequences, pack_documents, pack_sequences
from raylm.data.tokenizer import EncoderSpec, encode_texts
from raylm.common import storage

MAX_PROBLEM_EXAMPLES = 5
COLUMNAR_SLICE_ROWS = 256
_BLANK_RUN = re.compile(rb"\n(?:[ \t\r\f\v]*\n)+")
_BLANK_RUN_TEXT = re.compile(r"\n(?:[ \t\r\f\v]*\n)+")
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


# --------------------------------------------------------------------------- records


@dataclass
class Problem:
    """One unusable input row: where it is (file and line, or row), what kind of problem, a message."""

    path: str
    number: int
    kind: str
    message: str
    unit: str = "line"

    @property
    def location(self) -> str:
        return f"{self.path}:{self.number}" if self.unit == "line" else f"{self.path} row {self.number}"

    def __str__(self) -> str:
        return f"{self.location}: {self.message}"


@dataclass
class Example:
    """A usable row. ``starts``/``ends``: whether it begins/ends its document (text pieces)."""

    row: dict[str, Any]
    key: str
    location: str
    starts: bool = True
    ends: bool = True


@dataclass(frozen=True)
class SourcePlan:
    """Everything a Ray Data task needs to know about one pass over one source (picklable)."""

    index: int
    label: str  # the configured path, for reports
    format: str  # text | jsonl | parquet | arrow
    task: str
    fields: tuple[tuple[str, str], ...] = ()
    text_unit: str = "file"
    role: str = "train"  # which split this pass produces: train | dev
    holdout: float = 0.0  # share of documents that belong to dev when dev is carved from this source
    weight: float = 1.0  # copies per training row (source weight x task mixture weight)
    seed: int = 0
    strict: bool = False
    count_problems: bool = True  # a dev pass over a training source leaves the counting to the train pass

    @property
    def field_map(self) -> dict[str, str]:
        return dict(self.fields)


def unit_interval(*parts: Any) -> float:
    """A deterministic pseudo-random number in [0, 1) for ``parts`` (same on every machine and run)."""
    digest = hashlib.blake2b("\x1f".join(str(part) for part in parts).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0 ** 64


def _without_bom(payload: bytes, first_line: int) -> bytes:
    """Drop a UTF-8 byte-order mark at the start of a file (editors on Windows write one)."""
    return payload[3:] if first_line == 1 and payload.startswith(b"\xef\xbb\xbf") else payload


def _decode_lines(payload: bytes, path: str, first_line: int, problems: list[Problem]) -> list[tuple[int, str]]:
    """The payload's lines with their numbers; lines that are not UTF-8 become problems and are left out."""
    payload = _without_bom(payload, first_line)
    try:
        return list(enumerate(payload.decode("utf-8").split("\n"), start=first_line))
    except UnicodeDecodeError:
        pass
    lines: list[tuple[int, str]] = []
    for number, raw in enumerate(payload.split(b"\n"), start=first_line):
        try:
            lines.append((number, raw.decode("utf-8")))
        except UnicodeDecodeError as err:
            problems.append(Problem(path, number, "invalid_utf8",
                                    f"not UTF-8 (byte 0x{raw[err.start]:02x} at column {err.start + 1})"))
    return lines


def _decode_text(payload: bytes, path: str, first_line: int, problems: list[Problem]) -> str:
    """The payload as text, without the lines that are not UTF-8 (those become problems)."""
    try:
        return _without_bom(payload, first_line).decode("utf-8")
    except UnicodeDecodeError:
        return "\n".join(line for _, line in _decode_lines(payload, path, first_line, problems))


_LEADING_BLANK_LINES = re.compile(r"^(?:[ \t\r\f\v]*\n)+")


def _text_examples(segment: dict[str, Any], plan: SourcePlan, problems: list[Problem]) -> list[Example]:
    path, first_line = segment["path"], int(segment["first_line"])
    continues, continued = bool(segment["continues"]), bool(segment["continued"])
    examples: list[Example] = []
    if first_line == 1 and segment["ends_file"] and not segment["payload"].strip():
        problems.append(Problem(path, 1, "empty_document", "empty document (no text in the file)"))
        return examples
    if plan.text_unit == "line":
        for number, line in _decode_lines(segment["payload"], path, first_line, problems):
            line = line.rstrip("\r")
            if line.strip():
                row = {"task": "lm", "text": line}
                examples.append(Example(row, example_key(row), f"{path}:{number}"))
        return examples
    text = _decode_text(segment["payload"], path, first_line, problems)
    if plan.text_unit == "paragraph":
        parts = _BLANK_RUN_TEXT.split(text)
    else:
        parts = [text]
    for position, part in enumerate(parts):
        starts = not (position == 0 and continues)
        ends = not (position == len(parts) - 1 and continued)
        body = _LEADING_BLANK_LINES.sub("", part) if starts else part
        body = body.rstrip() if ends else body
        if not body.strip():
            continue
        row = {"task": "lm", "text": body}
        if plan.text_unit == "file":
            key = f"{path}:1"
        elif not starts:
            key = f"{path}:{int(segment['doc_start'])}"
        elif not ends:
            key = f"{path}:{int(segment['last_doc_start'])}"
        else:
            key = example_key(row)
        examples.append(Example(row, key, f"{path}:{first_line}", starts=starts, ends=ends))
    return examples


def _record_examples(records: Iterable[tuple[Problem, Any]], plan: SourcePlan,
                     problems: list[Problem]) -> list[Example]:
    """``records`` pairs a row's place (as an empty Problem) with the parsed record or a Problem."""
    examples: list[Example] = []
    fields = plan.field_map
    for place, record in records:
        if isinstance(record, Problem):
            problems.append(record)
            continue
        try:
            row = canonical_row(record, plan.task, fields)
        except RowProblem as problem:
            problems.append(Problem(place.path, place.number, problem.kind, str(problem), place.unit))
            continue
        examples.append(Example(row, example_key(row), place.location))
    return examples


def _jsonl_records(segment: dict[str, Any], problems: list[Problem]) -> Iterator[tuple[Problem, Any]]:
    path = segment["path"]
    for number, line in _decode_lines(segment["payload"], path, int(segment["first_line"]), problems):
        if not line.strip():
            continue
        place = Problem(path, number, "", "")
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            yield place, Problem(path, number, "malformed_json", f"malformed JSON ({err.msg} at column {err.colno})")
            continue
        if not isinstance(record, dict):
            yield place, Problem(path, number, "malformed_json", f"a JSON {type(record).__name__}, not an object")
            continue
        yield place, record


def _columnar_records(segment: dict[str, Any], plan: SourcePlan) -> Iterator[tuple[Problem, Any]]:
    import pyarrow as pa

    path, first_row = segment["path"], int(segment["first_line"])
    table = pa.ipc.open_stream(pa.py_buffer(segment["payload"])).read_all()
    where = f"{plan.label} ({path.rsplit('/', 1)[-1]})" if plan.format == "arrow" else path
    for offset, record in enumerate(table.to_pylist()):
        yield Problem(where, first_row + offset, "", "", unit="row"), record


def segment_examples(segment: dict[str, Any], plan: SourcePlan) -> tuple[list[Example], list[Problem], int]:
    """Parse, check and format one segment; returns ``(examples, problems, usable rows read)``.

    The examples are the ones this pass keeps (train or dev, by a hash of each
    document when dev is carved out of the source), each repeated by the
    source's sampling weight in training passes. Under ``strict`` the first
    problem raises :class:`DataError`.
    """
    problems: list[Problem] = []
    if plan.format == "text":
        examples = _text_examples(segment, plan, problems)
    elif plan.format == "jsonl":
        examples = _record_examples(_jsonl_records(segment, problems), plan, problems)
    else:
        examples = _record_examples(_columnar_records(segment, plan), plan, problems)
    if problems and plan.strict:
        first = min(problems, key=_problem_order)
        raise DataError(f"{first} (data.strict is true)")
    count = sum(1 for example in examples if example.starts)  # usable rows (a document split over segments once)
    if plan.holdout > 0:
        in_dev = plan.role == "dev"
        examples = [e for e in examples if (unit_interval(plan.seed, "dev", e.key) < plan.holdout) == in_dev]
    if plan.role == "train" and plan.weight != 1.0:
        examples = _resample(examples, plan.weight, plan.seed)
    return examples, problems, count


def _resample(examples: list[Example], weight: float, seed: int) -> list[Example]:
    whole, fraction = divmod(weight, 1.0)
    kept: list[Example] = []
    for example in examples:
        copies = int(whole) + (unit_interval(seed, "mix", example.key) < fraction)
        kept.extend([example] * copies)
    return kept


def _problem_order(problem: Problem) -> tuple:
    return (problem.path, problem.number)


# --------------------------------------------------------------------------- tokenize and pack


def tokenize_examples(examples: list[Example], task: str, encoder: EncoderSpec) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids and labels of each example; LM pieces get ``<|lm|>`` / EOS only where their document starts / ends."""
    prompts, answers = zip(*(format_example(example.row) for example in examples)) if examples else ((), ())
    answer_ids = encode_texts(encoder, list(answers))
    if task != "lm":
        prompt_ids = encode_texts(encoder, list(prompts))
        return example_sequences(prompt_ids, answer_ids, encoder.eos_id)
    lm_prompt = encode_texts(encoder, [prompts[0]])[0] if prompts else []
    ids: list[list[int]] = []
    labels: list[list[int]] = []
    for example, tokens in zip(examples, answer_ids):
        head = lm_prompt if example.starts else []
        tail = [encoder.eos_id] if example.ends else []
        ids.append([*head, *tokens, *tail])
        labels.append([IGNORE_INDEX] * len(head) + [*tokens, *tail])
    return ids, labels


def pack_examples(examples: list[Example], task: str, encoder: EncoderSpec, seq_len: int) -> tuple[dict[str, np.ndarray], int]:
    """Packed blocks of ``examples`` and their number of (non-padding) tokens.

    Plain text is concatenated and cut into blocks (:func:`pack_documents`); task
    examples are packed whole, first fit (:func:`pack_sequences`).
    """
    if not examples:
        return empty_blocks(seq_len), 0
    ids, labels = tokenize_examples(examples, task, encoder)
    tokens = sum(len(sequence) for sequence in ids)
    if task == "lm":
        return pack_documents(ids, labels, seq_len, encoder.pad_id), tokens
    return pack_sequences(ids, labels, seq_len, encoder.pad_id), tokens


def _segments_of(batch: dict[str, Any]) -> Iterator[dict[str, Any]]:
    columns = list(batch)
    for index in range(len(batch["payload"])):
        yield {column: batch[column][index] for column in columns}


@dataclass
class SegmentReport:
    """Counts for one segment of one pass, for the driver to sum (:func:`raylm.data.prepare.summarize_reports`)."""

    role: str
    source: int
    rows: int = 0
    examples: int = 0
    tokens: int = 0
    label_tokens: int = 0
    blocks: int = 0
    padding_tokens: int = 0
    problems: dict[str, int] = field(default_factory=dict)
    problem_examples: list[tuple[str, int, str, str, str]] = field(default_factory=list)


def pack_segment(segment: dict[str, Any], plan: SourcePlan, encoder: EncoderSpec,
                 seq_len: int) -> tuple[dict[str, np.ndarray], SegmentReport]:
    """One segment's packed blocks and its report."""
    examples, problems, rows = segment_examples(segment, plan)
    packed, tokens = pack_examples(examples, plan.task, encoder, seq_len)
    report = SegmentReport(plan.role, plan.index, rows=rows, examples=len(examples), tokens=tokens,
                           label_tokens=int((packed["labels"] != IGNORE_INDEX).sum()),
                           blocks=len(packed["input_ids"]), padding_tokens=packed["input_ids"].size - tokens)
    if plan.count_problems:
        for problem in problems:
            report.problems[problem.kind] = report.problems.get(problem.kind, 0) + 1
        ordered = sorted(problems, key=_problem_order)[:MAX_PROBLEM_EXAMPLES]
        report.problem_examples = [(p.path, p.number, p.location, p.kind, p.message) for p in ordered]
    return packed, report


def blocks_file_name(plan: SourcePlan, segment: dict[str, Any]) -> str:
    """``<source>-<file>-<first line>.parquet``: names sort in reading order, and a retried task rewrites its own."""
    return f"{plan.index:04d}-{int(segment.get('file_index', 0)):06d}-{int(segment['first_line']):012d}.parquet"


def write_blocks(location: str, packed: dict[str, np.ndarray]) -> None:
    """Write packed blocks to one Parquet file (a local path or a URI) as Ray Data's ``write_parquet`` does:
    one row per block, each column a fixed-shape tensor (Ray Data's Arrow tensor type), Snappy."""
    import pyarrow.parquet as pq
    from ray.data.block import BlockAccessor


    filesystem, path = storage.filesystem(location)
    if not storage.is_remote(location):
        filesystem.create_dir(storage.parent(path), recursive=True)
    pq.write_table(BlockAccessor.batch_to_block(packed), path, filesystem=filesystem)


def write_packed_segments(batch: dict[str, Any], plan: SourcePlan, encoder: EncoderSpec, seq_len: int,
                          folder: str) -> dict[str, np.ndarray]:
    """Ray Data ``map_batches`` function: segments in, their packed blocks written to
    ``<folder>/<split>/<blocks_file_name>``, one JSON report per segment out.

    The blocks go to storage from the task that packed them; only the reports (a
    few hundred bytes each) travel back to the driver, so one Ray Data execution
    packs both splits and no report files or collector actor are needed.
    """

    reports = []
    for segment in _segments_of(batch):
        packed, report = pack_segment(segment, plan, encoder, seq_len)
        if report.blocks:
            write_blocks(storage.join(folder, plan.role, blocks_file_name(plan, segment)), packed)
        reports.append(json.dumps(report.__dict__))
    return {"report": np.array(reports, dtype=object)}


def sample_texts(batch: dict[str, Any], plan: SourcePlan, fraction: float) -> dict[str, np.ndarray]:
    """Ray Data ``map_batches`` function: segments in, the model-visible text of a sample of examples out."""
    texts: list[str] = []
    for segment in _segments_of(batch):
        examples, _, _ = segment_examples(segment, plan)
        texts.extend(example_text(e.row) for e in examples
                     if fraction >= 1.0 or unit_interval(plan.seed, "tokenizer", e.key) < fraction)
    return {"text": np.array(texts, dtype=object)}


def segment_rows(batch: dict[str, Any], plan: SourcePlan) -> dict[str, np.ndarray]:
    """Ray Data ``map_batches`` function: segments in, formatted rows (as JSON) out."""
    rows: list[str] = []
    for segment in _segments_of(batch):
        examples, _, _ = segment_examples(segment, plan)
        rows.extend(json.dumps(e.row, ensure_ascii=False) for e in examples if e.starts and e.ends)
    return {"row": np.array(rows, dtype=object)}


def read_bytes_segments(data: bytes, path: str, segment_bytes: int, unit: str) -> list[dict[str, Any]]:
    """Segments of an in-memory file (for tests and the benchmark's baseline)."""
    return [{"path": path, **segment} for segment in iter_line_segments(io.BytesIO(data), segment_bytes, unit)]
