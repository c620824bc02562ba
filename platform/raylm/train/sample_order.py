"""One sample order for a whole run, whatever the number of workers.

Every worker reads the whole training split, in the same order: the prepared
rows as the dataset yields them with ``preserve_order`` (its file order is
seeded once per run), shuffled in windows of ``window`` rows by a generator
seeded with (seed, epoch, window), a function of the row count only, never
of Ray Data's block boundaries. Step ``j`` of an epoch trains on rows
``[j * G, (j + 1) * G)`` of that order (``G``: the global batch), cut into
``G / micro_batch_size`` micro-batches; micro-batch ``k * world + rank`` is
this worker's ``k``-th. So the rows of every step, and how they are cut into
micro-batches, are the same on 1, 2 or 4 workers; only which worker computes
which micro-batch changes. With the loss normalised by the step's global
target count, a step's gradient is the same up to the order of the sums.

The data position is therefore one number, the rows of the epoch already
trained on (a multiple of ``G``), and a run resumed on another worker count
continues with the very next row: nothing is skipped or repeated. The rows
after the epoch's last whole global batch are dropped, on every worker alike,
so every worker runs the same number of steps.

Each worker reads every row but converts only its own to tensors: packed
token blocks are a few bytes per token, small against what a training step
does with them.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import torch

WINDOW_MIN_ROWS = 1024


def shuffle_window_rows(global_batch: int) -> int:
    """Rows shuffled together: at least four global batches and WINDOW_MIN_ROWS."""
    return max(4 * global_batch, WINDOW_MIN_ROWS)


def _window_order(size: int, seed: int, epoch: int, window: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch, window]).permutation(size)


def _concat(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    if len(parts) == 1:
        return parts[0]
    return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}


def ordered_rows(batches: Iterator[dict[str, np.ndarray]], seed: int, epoch: int,
                 window: int) -> Iterator[dict[str, np.ndarray]]:
    """The epoch's rows as column chunks in the run's order: windows of ``window`` rows, each permuted."""
    pending: list[dict[str, np.ndarray]] = []
    held = 0
    index = 0
    for batch in batches:
        rows = len(next(iter(batch.values()))) if batch else 0
        if rows == 0:
            continue
        pending.append(batch)
        held += rows
        while held >= window:
            merged = _concat(pending)
            order = _window_order(window, seed, epoch, index)
            yield {key: column[:window][order] for key, column in merged.items()}
            index += 1
            rest = {key: column[window:] for key, column in merged.items()}
            held -= window
            pending = [rest] if held else []
    if held:
        merged = _concat(pending)
        order = _window_order(held, seed, epoch, index)
        yield {key: column[order] for key, column in merged.items()}


def _tensors(chunk: dict[str, np.ndarray], start: int, stop: int, pin_memory: bool) -> dict[str, torch.Tensor]:
    out = {}
    for key, column in chunk.items():
        tensor = torch.from_numpy(np.ascontiguousarray(column[start:stop]))
        out[key] = tensor.pin_memory() if pin_memory else tensor
    return out


def global_steps(read_epoch, *, rank: int, world: int, micro_batch_size: int, grad_accum_steps: int, seed: int,
                 start_epoch: int = 0, start_row: int = 0,
                 pin_memory: bool = False) -> Iterator[tuple[int, int, list[dict[str, torch.Tensor]]]]:
    """Endless steps for this worker: (epoch, rows of the epoch trained on after this step, its micro-batches).

    ``read_epoch()`` returns an iterator over the split's rows as dicts of
    numpy columns, in the same order on every call and every worker.
    ``start_row`` resumes inside ``start_epoch`` (a multiple of the global batch
    unless the global batch was changed between the runs: steps then start at that row).
    """
    global_batch = micro_batch_size * grad_accum_steps * world
    window = shuffle_window_rows(global_batch)
    mine = [(k * world + rank) * micro_batch_size for k in range(grad_accum_steps)]  # offsets in a step
    epoch, skip = start_epoch, start_row
    while True:
        step_rows: list[dict[str, np.ndarray]] = []  # this step's rows gathered so far (whole chunks or parts)
        held, position, steps = 0, 0, 0
        for chunk in ordered_rows(read_epoch(), seed, epoch, window):
            rows = len(next(iter(chunk.values())))
            if position + rows <= skip:  # already trained on before the restart: no tensors for these
                position += rows
                continue
            if position < skip:  # the restart falls inside this chunk
                chunk = {key: column[skip - position:] for key, column in chunk.items()}
            position += rows
            rows = len(next(iter(chunk.values())))
            step_rows.append(chunk)
            held += rows
            while held >= global_batch:
                merged = _concat(step_rows)
                micro = [_tensors(merged, offset, offset + micro_batch_size, pin_memory) for offset in mine]
                rest = {key: column[global_batch:] for key, column in merged.items()}
                held -= global_batch
                step_rows = [rest] if held else []
                steps += 1
                yield epoch, skip + steps * global_batch, micro
        if steps == 0 and skip == 0:
            raise RuntimeError(f"the training split holds fewer rows than one global batch ({global_batch}): "
                               "use more data or a smaller train.global_batch_size")
        epoch, skip = epoch + 1, 0


def rows_position(state: dict[str, Any]) -> tuple[int, int]:
    """(epoch, rows of it trained on) saved in a checkpoint's state.

    Checkpoints written before the run-wide order saved per-worker batches;
    their rows count is the same fraction of the epoch (its order differs, so
    that resume is approximate)."""
    epoch = int(state.get("epoch", 0))
    if "rows_in_epoch" in state:
        return epoch, int(state["rows_in_epoch"])
    batches = int(state.get("batches_in_epoch", 0))
    return epoch, batches * int(state.get("world_size", 1)) * int(state.get("micro_batch_size", 1))
