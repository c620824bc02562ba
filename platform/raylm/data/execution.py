"""Running Ray Data executions for raylm: one-line data errors, no progress bars, and scoped context changes.

Ray Data's :class:`~ray.data.DataContext` is process-wide; a Dataset copies it when
it is created. raylm changes it only inside :func:`ordered_execution`,
:func:`quiet_progress` and :func:`run_ray`, which restore what they changed, so
nothing leaks into a user's own Ray Data code in the same process.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

from raylm.data.errors import DataError, find_data_error


@contextlib.contextmanager
def ordered_execution() -> Iterator[None]:
    """Datasets created inside keep their rows in order (``preserve_order``): splits, samples and packed
    blocks are then the same on every run and cluster. Restores the previous setting on exit."""
    import ray.data

    options = ray.data.DataContext.get_current().execution_options
    previous, options.preserve_order = options.preserve_order, True
    try:
        yield
    finally:
        options.preserve_order = previous


@contextlib.contextmanager
def quiet_progress() -> Iterator[None]:
    """No Ray Data progress bars for executions inside, nor for Datasets created inside (they keep a copy of
    the context, so the training loop's streaming split stays quiet too): raylm prints its own progress lines,
    and per-operator bars would drown them. Restores the previous setting on exit."""
    import ray.data

    context = ray.data.DataContext.get_current()
    previous, context.enable_progress_bars = context.enable_progress_bars, False
    try:
        yield
    finally:
        context.enable_progress_bars = previous


def run_ray(action: Callable[[], Any]) -> Any:
    """Run a Ray Data execution (without Ray Data's progress bars: raylm reports
    its own progress, as ``raylm prepare`` does), turning a DataError raised inside a task into a plain
    one-line DataError."""
    try:
        with quiet_progress():
            return action()
    except DataError:
        raise
    except Exception as err:
        found = find_data_error(err)
        if found is not None:
            raise DataError(str(found)) from None
        raise
