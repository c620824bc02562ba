"""Concatenate-and-chunk packing of plain text (pack_documents): the invariants the trainer relies on."""

import random

import numpy as np
import pytest

from raylm.data.packing import IGNORE_INDEX, pack_documents

PAD = 0


def _documents(seed: int, count: int, max_len: int):
    rng = random.Random(seed)
    ids, labels = [], []
    for _ in range(count):
        sequence = [rng.randint(1, 999) for _ in range(rng.randint(1, max_len))]
        ids.append(sequence)
        # a "prompt" token with label -100 first, like <|lm|>, then targets
        labels.append([IGNORE_INDEX, *sequence[1:]])
    return ids, labels


def _segments(packed):
    """Split the non-padding stream back into segments, using the position ids only."""
    flat_ids = packed["input_ids"].reshape(-1)
    flat_positions = packed["position_ids"].reshape(-1)
    starts = list(np.flatnonzero(flat_positions == 0)) + [len(flat_ids)]
    return [flat_ids[a:b].tolist() for a, b in zip(starts, starts[1:])]


@pytest.mark.parametrize("seed, seq_len", [(0, 16), (1, 64), (2, 7), (3, 128)])
def test_no_token_lost_or_duplicated_and_exact_blocks(seed, seq_len):
    ids, labels = _documents(seed, count=40, max_len=3 * seq_len)
    packed = pack_documents(ids, labels, seq_len, PAD)
    total = sum(len(sequence) for sequence in ids)
    assert packed["input_ids"].shape == packed["labels"].shape == packed["position_ids"].shape
    assert packed["input_ids"].shape == (-(-total // seq_len), seq_len)
    assert packed["input_ids"].dtype == np.int32
    flat_ids = packed["input_ids"].reshape(-1)
    # the stream is exactly the documents, in order; only the tail of the last block is padding
    assert flat_ids[:total].tolist() == [token for sequence in ids for token in sequence]
    assert np.all(flat_ids[total:] == PAD)
    assert len(flat_ids) - total < seq_len


@pytest.mark.parametrize("seed, seq_len", [(0, 16), (5, 50)])
def test_labels_aligned_and_positions_restart_per_document_and_block(seed, seq_len):
    ids, labels = _documents(seed, count=30, max_len=2 * seq_len)
    packed = pack_documents(ids, labels, seq_len, PAD)
    flat_ids = packed["input_ids"].reshape(-1)
    flat_labels = packed["labels"].reshape(-1)
    total = sum(len(sequence) for sequence in ids)
    # a label is either ignored or the token at its position; padding is never a target
    assert np.all((flat_labels == IGNORE_INDEX) | (flat_labels == flat_ids))
    assert np.all(flat_labels[total:] == IGNORE_INDEX)
    # every block starts a segment; every document starts a segment; positions count up inside one
    assert np.all(packed["position_ids"][:, 0] == 0)
    boundaries = np.cumsum([0] + [len(sequence) for sequence in ids])[:-1]
    assert np.all(packed["position_ids"].reshape(-1)[boundaries] == 0)
    positions = packed["position_ids"].reshape(-1)
    steps = np.diff(positions)
    assert np.all((steps == 1) | (positions[1:] == 0))
    # the first label of every segment is masked (it would be predicted across segments)
    assert np.all(flat_labels[positions == 0] == IGNORE_INDEX)
    # all other labels survive: targets = labels of the documents minus their segment-start positions
    expected = sum(sum(1 for label in sequence[1:] if label != IGNORE_INDEX) for sequence in labels)
    block_start_inside = sum(1 for b in range(0, total, seq_len) if b not in set(boundaries.tolist()))
    assert int((flat_labels != IGNORE_INDEX).sum()) == expected - block_start_inside


def test_documents_split_across_blocks_are_recoverable_in_order():
    ids, labels = _documents(7, count=12, max_len=40)
    packed = pack_documents(ids, labels, 16, PAD)
    total = sum(len(sequence) for sequence in ids)
    segments = _segments({key: value for key, value in packed.items()})
    rebuilt = [token for segment in segments for token in segment][:total]
    assert rebuilt == [token for sequence in ids for token in sequence]


def test_deterministic_and_empty_input():
    ids, labels = _documents(3, count=20, max_len=30)
    first = pack_documents(ids, labels, 32, PAD)
    second = pack_documents(ids, labels, 32, PAD)
    assert all(np.array_equal(first[key], second[key]) for key in first)
    empty = pack_documents([], [], 32, PAD)
    assert empty["input_ids"].shape == (0, 32)
    exact = pack_documents([[1] * 32], [[1] * 32], 32, PAD)
    assert exact["input_ids"].shape == (1, 32) and not (exact["input_ids"] == PAD).any()
