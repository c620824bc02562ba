"""Tokenize formatted examples and pack them into fixed-length training blocks.

Each example becomes ``<eos> prompt answer <eos>`` with labels -100 on the
leading separator and the prompt (a pretrained checkpoint's tokenizer: its own
BOS, if any, and its EOS or the chat template's end-of-turn token instead). Whole examples are packed first-fit into
blocks of ``seq_len`` tokens; position ids restart at every example so that
transformers' packed-sequence masking keeps examples from attending to each
other. An example longer than a block is split into block-sized chunks (plain
text) so no token is lost. The tail of a block that no example fits is padded
with labels -100.

Plain language-model text from real corpora is packed differently
(:func:`pack_documents`): documents are concatenated with EOS separators and
cut into blocks, so only the last block of a packing group has padding.

The label of the first token of every segment (a run of positions that restarts
at 0) is -100: the model would predict it from the previous segment's last
token, which it cannot see.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import numpy as np

from raylm.data.formatting import FormatError, format_example, instruct_example
from raylm.data.tokenizer import EncoderSpec, encode_texts, render_chat_prompts

IGNORE_INDEX = -100


def format_for(row: dict[str, Any], encoder: EncoderSpec) -> tuple[Any, str]:
    """``(prompt, answer)`` of a row as ``encoder``'s tokenizer takes it: raylm's task format, or for an
    instruct checkpoint the chat messages of the task (rendered by :func:`tokenize_rows`) and the reply.
    Plain text has no prompt but raylm's task token, and none at all with a checkpoint's tokenizer."""
    if encoder.chat_template is not None and row.get("task") != "lm":
        return instruct_example(row)
    prompt, answer = format_example(row)
    return (prompt if encoder.native or row.get("task") != "lm" else ""), answer


def tokenize_rows(rows: Iterable[dict[str, Any]], encoder: EncoderSpec) -> tuple[list[list[int]], list[list[int]], int]:
    """Return per-example input ids and labels, plus the number of rows skipped as malformed.

    The one place where a formatted example becomes tokens (the demo corpus and
    prepared sources alike): prompt and answer are encoded apart, as the engine
    encodes a prompt and then generates the answer's tokens after it.
    """
    prompts: list[Any] = []
    answers: list[str] = []
    ends: list[int] = []
    skipped = 0
    for row in rows:
        try:
            prompt, answer = format_for(row, encoder)
        except FormatError:
            skipped += 1
            continue
        prompts.append(prompt)
        answers.append(answer)
        # A chat reply ends its turn; plain text ends the document.
        ends.append(encoder.eos_id if row.get("task") == "lm" else encoder.end_id)
    if not prompts:
        return [], [], skipped
    if encoder.chat_template is not None:
        chats = [index for index, prompt in enumerate(prompts) if not isinstance(prompt, str)]
        for index, text in zip(chats, render_chat_prompts(encoder, [prompts[index] for index in chats])):
            prompts[index] = text
    prompt_ids = encode_texts(encoder, prompts)
    answer_ids = encode_texts(encoder, answers)
    all_ids, all_labels = example_sequences(prompt_ids, answer_ids, encoder.prefix, ends)
    return all_ids, all_labels, skipped


def example_sequences(prompt_ids: list[list[int]], answer_ids: list[list[int]], prefix: Sequence[int],
                      ends: int | Sequence[int]) -> tuple[list[list[int]], list[list[int]]]:
    """``prefix prompt answer end`` per example (``ends``: one id for all, or one per example), with labels
    -100 on the prefix and the prompt.

    raylm's tokenizer: ``<eos> prompt answer <eos>``; a checkpoint's: its BOS (if
    its tokenizer adds one), then the answer closed by its EOS, or by the chat
    template's end-of-turn token for an instruct checkpoint.
    """
    all_ids: list[list[int]] = []
    all_labels: list[list[int]] = []
    if isinstance(ends, int):
        ends = [ends] * len(prompt_ids)
    for prompt_tokens, answer_tokens, end in zip(prompt_ids, answer_ids, ends):
        all_ids.append([*prefix, *prompt_tokens, *answer_tokens, end])
        all_labels.append([IGNORE_INDEX] * (len(prefix) + len(prompt_tokens)) + [*answer_tokens, end])
    return all_ids, all_labels


def pack_sequences(ids: list[list[int]], labels: list[list[int]], seq_len: int, pad_id: int,
                   open_blocks: int = 8) -> dict[str, np.ndarray]:
    """Pack examples into ``[num_blocks, seq_len]`` arrays of input ids, labels and position ids.

    First-fit over a few open blocks: each example (or block-sized chunk of a
    longer one) goes into the first open block with room, so short examples
    fill the gaps that long ones leave. Deterministic for a given input order.
    """
    blocks: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    open_list: list[list] = []  # [fill, ids, labels, positions]

    def new_block() -> list:
        return [0, np.full(seq_len, pad_id, dtype=np.int32), np.full(seq_len, IGNORE_INDEX, dtype=np.int32),
                np.zeros(seq_len, dtype=np.int32)]

    def close(block: list) -> None:
        fill, block_ids, block_labels, block_positions = block
        # Pad positions form their own segment so they never look like part of an example.
        block_positions[fill:] = np.arange(seq_len - fill, dtype=np.int32)
        blocks.append((block_ids, block_labels, block_positions))

    for example_ids, example_labels in zip(ids, labels):
        for start in range(0, len(example_ids), seq_len):
            chunk_ids = example_ids[start : start + seq_len]
            chunk_labels = example_labels[start : start + seq_len]
            if start:
                chunk_labels = [IGNORE_INDEX, *chunk_labels[1:]]
            size = len(chunk_ids)
            target = next((block for block in open_list if block[0] + size <= seq_len), None)
            if target is None:
                if len(open_list) >= open_blocks:
                    close(open_list.pop(0))
                target = new_block()
                open_list.append(target)
            fill = target[0]
            target[1][fill : fill + size] = chunk_ids
            target[2][fill : fill + size] = chunk_labels
            target[3][fill : fill + size] = np.arange(size, dtype=np.int32)
            target[0] = fill + size
            if target[0] == seq_len:
                open_list.remove(target)
                close(target)
    for block in open_list:
        close(block)
    if not blocks:
        empty = np.zeros((0, seq_len), dtype=np.int32)
        return {"input_ids": empty, "labels": empty.copy(), "position_ids": empty.copy()}
    return {
        "input_ids": np.stack([b[0] for b in blocks]),
        "labels": np.stack([b[1] for b in blocks]),
        "position_ids": np.stack([b[2] for b in blocks]),
    }


def empty_blocks(seq_len: int) -> dict[str, np.ndarray]:
    empty = np.zeros((0, seq_len), dtype=np.int32)
    return {"input_ids": empty, "labels": empty.copy(), "position_ids": empty.copy()}


def pack_documents(ids: list[list[int]], labels: list[list[int]], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """Concatenate sequences in order and cut the stream into ``[num_blocks, seq_len]`` blocks.

    Each sequence is its own attention segment (position ids restart at its
    first token and at every block start), and a sequence that crosses a block
    boundary simply continues in the next block. Only the last block is padded
    (labels -100, positions forming their own segment), so a packing group
    wastes less than one block. Deterministic for a given input order.
    """
    kept = [(np.asarray(i, dtype=np.int32), np.asarray(l, dtype=np.int32)) for i, l in zip(ids, labels) if len(i)]
    if not kept:
        return empty_blocks(seq_len)
    lengths = np.array([len(i) for i, _ in kept], dtype=np.int64)
    total = int(lengths.sum())
    num_blocks = -(-total // seq_len)
    size = num_blocks * seq_len
    flat_ids = np.full(size, pad_id, dtype=np.int32)
    flat_labels = np.full(size, IGNORE_INDEX, dtype=np.int32)
    flat_ids[:total] = np.concatenate([i for i, _ in kept])
    flat_labels[:total] = np.concatenate([l for _, l in kept])
    segment_start = np.zeros(size, dtype=bool)
    segment_start[np.concatenate([[0], np.cumsum(lengths)[:-1]])] = True
    segment_start[::seq_len] = True
    if total < size:
        segment_start[total] = True  # the padding is a segment of its own
    # A segment's first label would be predicted from the previous segment: mask it.
    # (At a block start the trainer's label shift already drops it.)
    flat_labels[segment_start] = IGNORE_INDEX
    index = np.arange(size)
    positions = index - np.maximum.accumulate(np.where(segment_start, index, 0))
    return {
        "input_ids": flat_ids.reshape(num_blocks, seq_len),
        "labels": flat_labels.reshape(num_blocks, seq_len),
        "position_ids": positions.astype(np.int32).reshape(num_blocks, seq_len),
    }


def unpack_segments(packed: dict[str, np.ndarray], pad_id: int) -> list[tuple[list[int], list[int]]]:
    """Split packed blocks back into their (input ids, labels) segments; the inverse of packing."""
    segments = []
    for block_ids, block_labels, block_positions in zip(packed["input_ids"], packed["labels"], packed["position_ids"]):
        starts = [int(i) for i in np.flatnonzero(block_positions == 0)] + [len(block_ids)]
        for begin, end in zip(starts, starts[1:]):
            segment_ids = block_ids[begin:end].tolist()
            segment_labels = block_labels[begin:end].tolist()
            if all(t == pad_id for t in segment_ids) and all(l == IGNORE_INDEX for l in segment_labels):
                continue
            segments.append((segment_ids, segment_labels))
    return segments


def tokenize_and_pack(batch: dict[str, np.ndarray], encoder: EncoderSpec, seq_len: int) -> dict[str, np.ndarray]:
    """Ray Data ``map_batches`` function: a batch of rows in, packed blocks out."""
    columns = list(batch)
    num_rows = len(batch[columns[0]]) if columns else 0
    rows = [{column: _to_python(batch[column][i]) for column in columns} for i in range(num_rows)]
    ids, labels, _ = tokenize_rows(rows, encoder)
    return pack_sequences(ids, labels, seq_len, encoder.pad_id)


def _to_python(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value
