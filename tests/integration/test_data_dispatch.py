"""raylm.data.dispatch on a real local Ray: every CPU starts at once, and a finished task's CPU is handed on
promptly; Ray's own functions are back after the block."""

from __future__ import annotations

import os
import statistics
import time

from raylm.data.dispatch import prompt_task_dispatch

TASK_S = 0.6


def _timed_task(batch):
    started = time.time()
    time.sleep(TASK_S)
    return {"index": batch["id"], "start": [started], "end": [time.time()], "pid": [os.getpid()]}


def _run(tasks: int) -> list[dict]:
    import ray.data

    # One operator, as raylm's packing (items in memory -> one task per item)
    items = [{"id": index} for index in range(tasks)]
    dataset = ray.data.from_items(items, override_num_blocks=tasks).map_batches(_timed_task, batch_size=1)
    return sorted(dataset.take_all(), key=lambda row: row["start"])


def test_every_cpu_starts_at_once_and_finished_tasks_hand_on_promptly(ray_session):
    cpus = int(ray_session.available_resources().get("CPU", 0))  # what earlier tests' actors left free
    assert cpus >= 2
    with prompt_task_dispatch():
        _run(cpus)  # a worker process per CPU started, and Ray Data's actors, as in any later execution
        rows = _run(3 * cpus)
    first_end = min(row["end"] for row in rows)
    # Ray 2.60 alone runs one task for the first ~1 s of an execution (its resource limits are not known
    # yet), so the first task ends before the others start.
    assert sum(row["start"] < first_end for row in rows) == cpus, rows
    # Each later task starts when one before it ends: Ray alone notices a finished task by a 0.1 s poll
    # (plus a 0.1 s metadata wait); here the executor wakes on the task's output.
    ends = sorted(row["end"] for row in rows)
    hand_on = []
    for row in rows[cpus:]:
        before = [end for end in ends if end <= row["start"]]
        assert before, rows
        hand_on.append(row["start"] - before[-1])
    assert statistics.median(hand_on) < 0.08, hand_on  # Ray alone: 0.13-0.14 s here


def test_ray_functions_are_back_after_the_block_and_nested_blocks_wrap_once():
    from ray.data._internal.execution import resource_manager, streaming_executor, streaming_executor_state

    def current():
        return (streaming_executor.process_completed_tasks, resource_manager.ResourceManager.get_global_limits,
                streaming_executor_state.WAIT_FOR_TASK_COMPLETION_TIMEOUT_S, streaming_executor_state.time)

    ray_own = current()
    with prompt_task_dispatch():
        inside = current()
        assert inside[0] is not ray_own[0] and inside[0].raylm_wrapped is ray_own[0]
        assert inside[1].raylm_wrapped is ray_own[1]
        assert inside[2] == 0 and inside[3] is not time
        with prompt_task_dispatch():
            assert current() == inside
        assert current() == inside
    assert current() == ray_own
