"""raylm's Ray Data context changes are scoped: restored on exit, also after an error. No Ray starts here
(creating a Dataset would start one; that a Dataset carries the context it was created under is checked in
tests/integration/test_data_pipeline.py)."""

from __future__ import annotations

import pytest
import ray.data

from raylm.data.errors import DataError
from raylm.data.execution import ordered_execution, quiet_progress, run_ray


@pytest.fixture
def context():
    current = ray.data.DataContext.get_current()
    saved = (current.enable_progress_bars, current.execution_options.preserve_order)
    current.enable_progress_bars, current.execution_options.preserve_order = True, False
    yield current
    current.enable_progress_bars, current.execution_options.preserve_order = saved


def test_changes_hold_inside_and_are_restored_after_an_error(context):
    with pytest.raises(RuntimeError):
        with ordered_execution(), quiet_progress():
            assert context.execution_options.preserve_order is True
            assert context.enable_progress_bars is False
            raise RuntimeError("boom")
    assert context.execution_options.preserve_order is False
    assert context.enable_progress_bars is True


def test_run_ray_restores_the_bars_and_passes_data_errors_on(context):
    def fail():
        assert context.enable_progress_bars is False
        raise DataError("bad row 3 in x.jsonl")

    with pytest.raises(DataError, match="bad row 3"):
        run_ray(fail)
    assert context.enable_progress_bars is True
