"""The run-wide sample order: the same rows per step on any worker count, exact resume after a resize."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from raylm.train.sample_order import global_steps, ordered_rows, rows_position, shuffle_window_rows

ROWS, MBS = 3000, 4


def reader(rows: int = ROWS, block_sizes=(7, 100, 1, 33)):
    """A split of ``rows`` numbered rows, cut into blocks of varying sizes (as Ray Data's blocks vary)."""
    def read():
        start, sizes = 0, itertools.cycle(block_sizes)
        while start < rows:
            stop = min(rows, start + next(sizes))
            ids = np.arange(start, stop, dtype=np.int64)
            yield {"input_ids": np.stack([ids, ids + 1], axis=1), "labels": np.stack([ids, -ids], axis=1)}
            start = stop
    return read


def run(world: int, accum: int, steps: int, start_epoch: int = 0, start_row: int = 0, read=None, seed: int = 7):
    """Per step: the micro-batches of all workers, by micro-batch index (k * world + rank), as row ids."""
    streams = [global_steps(read or reader(), rank=rank, world=world, micro_batch_size=MBS, grad_accum_steps=accum,
                            seed=seed, start_epoch=start_epoch, start_row=start_row) for rank in range(world)]
    out = []
    for _ in range(steps):
        per_rank = [next(stream) for stream in streams]
        positions = {(epoch, position) for epoch, position, _ in per_rank}
        assert len(positions) == 1  # every worker agrees on where the run is
        micro = {}
        for rank, (_, _, batches) in enumerate(per_rank):
            assert len(batches) == accum
            for k, batch in enumerate(batches):
                assert batch["input_ids"].shape == (MBS, 2)
                micro[k * world + rank] = batch["input_ids"][:, 0].tolist()
        out.append((positions.pop(), [micro[index] for index in range(world * accum)]))
    return out


def test_every_worker_count_trains_on_the_same_micro_batches_per_step():
    one = run(world=1, accum=8, steps=200)
    two = run(world=2, accum=4, steps=200)
    four = run(world=4, accum=2, steps=200)
    assert one == two == four
    # 3000 rows, 32 per step: 93 steps per epoch, the last 24 rows dropped, then epoch 1 in a new order.
    assert one[92][0] == (0, 93 * 32) and one[93][0] == (1, 32)
    epoch0 = [row for _, micro in one[:93] for batch in micro for row in batch]
    epoch1 = [row for _, micro in one[93:186] for batch in micro for row in batch]
    assert len(set(epoch0)) == len(epoch0) == 93 * 32  # no row twice in an epoch
    assert epoch0 != epoch1 and epoch0[:64] != sorted(epoch0[:64])  # shuffled, anew each epoch


def test_a_resumed_run_continues_with_the_next_rows_on_any_worker_count():
    reference = run(world=2, accum=4, steps=120)
    (epoch, position), _ = reference[49]  # saved after step 50
    for world, accum in ((1, 8), (2, 4), (4, 2)):
        resumed = run(world=world, accum=accum, steps=70, start_epoch=epoch, start_row=position)
        assert resumed == reference[50:120], world
    # Into the next epoch too: the position is (epoch, rows) and epochs end alike.
    (epoch, position), _ = reference[99]
    assert epoch == 1
    assert run(world=4, accum=2, steps=20, start_epoch=epoch, start_row=position) == reference[100:120]


def test_the_order_depends_on_rows_not_on_block_boundaries_and_on_the_seed():
    tiny_blocks = run(world=2, accum=2, steps=60, read=reader(block_sizes=(1, 2, 3)))
    whole = run(world=2, accum=2, steps=60, read=reader(block_sizes=(ROWS,)))
    assert tiny_blocks == whole
    assert run(world=2, accum=2, steps=60, seed=8) != whole


def test_windows_shuffle_within_themselves():
    window = shuffle_window_rows(16)
    assert window == 1024 and shuffle_window_rows(512) == 2048
    chunks = list(ordered_rows(reader()(), seed=0, epoch=0, window=window))
    assert [len(chunk["input_ids"]) for chunk in chunks] == [1024, 1024, 952]
    for index, chunk in enumerate(chunks):  # a permutation of its own window of rows, columns kept together
        ids = chunk["input_ids"][:, 0]
        assert sorted(ids.tolist()) == list(range(index * 1024, index * 1024 + len(ids)))
        assert (chunk["input_ids"][:, 1] == ids + 1).all() and (chunk["labels"][:, 1] == -ids).all()


def test_a_split_smaller_than_one_global_batch_is_refused():
    stream = global_steps(reader(rows=20), rank=0, world=2, micro_batch_size=MBS, grad_accum_steps=4, seed=0)
    with pytest.raises(RuntimeError, match="fewer rows than one global batch"):
        next(stream)


def test_positions_saved_before_the_run_wide_order_count_rows():
    assert rows_position({"epoch": 2, "rows_in_epoch": 96}) == (2, 96)
    # The former per-worker count: 3 micro-batches of 4 on each of 2 workers.
    assert rows_position({"epoch": 1, "batches_in_epoch": 3, "world_size": 2, "micro_batch_size": 4}) == (1, 24)
    assert rows_position({}) == (0, 0)
