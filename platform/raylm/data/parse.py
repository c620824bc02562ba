"""Parse: one segment's bytes -> checked, formatted examples and the problems of the rows left out.

Every input row is checked here, inside the Ray Data tasks: a non-UTF-8 line, a
malformed JSON line, a missing field or an empty document becomes a
:class:`Problem` (counted and reported with file and line) and is skipped, or,
under ``data.strict``, raises :class:`DataError`. Training rows are resampled by
their source's weight here too.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

from raylm.common.fingerprints import unit_interval
from raylm.data.errors import DataError
from raylm.data.formatting import RowProblem, canonical_row, example_key

MAX_PROBLEM_EXAMPLES = 5
_BLANK_RUN_TEXT = re.compile(r"\n(?:[ \t\r\f\v]*\n)+")



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
        first = min(problems, key=problem_order)
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


def problem_order(problem: Problem) -> tuple:
    return (problem.path, problem.number)
