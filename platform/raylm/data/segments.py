"""Tokenize, pack and write: the per-segment functions that Ray Data maps over a source's segments.

A segment (:mod:`raylm.data.read`) is parsed into examples (:mod:`raylm.data.parse`);
here its examples are tokenized and packed into blocks, which the task that
packed them writes to storage, and a report of counts and problems goes back to
the driver. The tokenizer's sample and the dev rows for task metrics come from
the same segments.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

from raylm.common import storage
from raylm.data.formatting import example_text
from raylm.data.packing import IGNORE_INDEX, empty_blocks, pack_documents, pack_sequences, tokenize_rows
from raylm.common.fingerprints import unit_interval
from raylm.data.parse import MAX_PROBLEM_EXAMPLES, Example, SourcePlan, problem_order, segment_examples
from raylm.data.special_tokens import TASK_TOKENS
from raylm.data.tokenizer import EncoderSpec, encode_texts

# --------------------------------------------------------------------------- tokenize and pack


def tokenize_segment_examples(examples: list[Example], task: str, encoder: EncoderSpec) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids and labels of each example (:func:`tokenize_rows`); LM pieces get raylm's ``<|lm|>`` (a
    checkpoint's tokenizer: its BOS, if any) / EOS only where their document starts / ends."""
    if task != "lm":
        ids, labels, _ = tokenize_rows([example.row for example in examples], encoder)
        return ids, labels
    answer_ids = encode_texts(encoder, [example.row["text"] for example in examples])
    lm_prompt = (encode_texts(encoder, [TASK_TOKENS["lm"]])[0] if encoder.native else list(encoder.prefix)) \
        if examples else []
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
    ids, labels = tokenize_segment_examples(examples, task, encoder)
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
        ordered = sorted(problems, key=problem_order)[:MAX_PROBLEM_EXAMPLES]
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
