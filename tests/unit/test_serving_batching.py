"""ModelCalls: batches that wait while the model runs are joined into its next call, in order, within
max_batch_size; failures reach exactly the callers of the failed call."""

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from raylm.serving.batching import BatchStats, ModelCalls


class GatedModel:
    """Doubles its inputs; the first call blocks until released, so that batches pile up behind it."""

    def __init__(self, fail_on=None):
        self.calls: list[list[int]] = []
        self.started = threading.Event()
        self.release = threading.Event()
        self.fail_on = fail_on

    def __call__(self, inputs):
        self.calls.append(list(inputs))
        if len(self.calls) == 1:
            self.started.set()
            assert self.release.wait(10)
        if self.fail_on is not None and self.fail_on in inputs:
            raise ValueError(f"bad input {self.fail_on}")
        return [2 * value for value in inputs]


async def _wait_started(model):
    while not model.started.is_set():
        await asyncio.sleep(0.001)


def _run(coroutine):
    return asyncio.run(coroutine)


def test_batches_waiting_behind_a_running_call_run_as_one_call_in_order():
    model, stats = GatedModel(), BatchStats()

    async def scenario():
        calls = ModelCalls("sentiment", model, ThreadPoolExecutor(1), stats, max_batch_size=8)
        first = asyncio.ensure_future(calls([1]))
        await _wait_started(model)
        waiting = [asyncio.ensure_future(calls(batch)) for batch in ([2, 3], [4], [5, 6, 7])]
        await asyncio.sleep(0.01)
        model.release.set()
        return await first, await asyncio.gather(*waiting)

    first, waiting = _run(scenario())
    assert first == ([2], 1)
    assert waiting == [([4, 6], 6), ([8], 6), ([10, 12, 14], 6)]
    assert model.calls == [[1], [2, 3, 4, 5, 6, 7]]
    assert stats.snapshot()["sentiment"] == {"batches": 2, "inputs": 7, "largest_batch": 6, "mean_batch": 3.5}


def test_joining_stops_at_max_batch_size_but_never_splits_a_batch():
    model = GatedModel()

    async def scenario():
        calls = ModelCalls("qa", model, ThreadPoolExecutor(1), BatchStats(), max_batch_size=4)
        first = asyncio.ensure_future(calls([0]))
        await _wait_started(model)
        waiting = [asyncio.ensure_future(calls(batch)) for batch in ([1, 2, 3], [4, 5], [6, 7, 8, 9, 10])]
        await asyncio.sleep(0.01)
        model.release.set()
        await first
        return await asyncio.gather(*waiting)

    results = _run(scenario())
    assert model.calls == [[0], [1, 2, 3], [4, 5], [6, 7, 8, 9, 10]]
    assert [size for _, size in results] == [3, 2, 5]


def test_a_failed_call_fails_its_callers_only():
    model = GatedModel(fail_on=5)

    async def scenario():
        calls = ModelCalls("sentiment", model, ThreadPoolExecutor(1), BatchStats(), max_batch_size=3)
        first = asyncio.ensure_future(calls([1]))
        await _wait_started(model)
        failing = [asyncio.ensure_future(calls(batch)) for batch in ([4], [5])]  # joined: [4, 5]
        later = asyncio.ensure_future(calls([6, 7]))  # does not fit: the next call
        await asyncio.sleep(0.01)
        model.release.set()
        outcomes = await asyncio.gather(first, *failing, later, return_exceptions=True)
        return outcomes, await calls([8])

    (first, fail_a, fail_b, later), after = _run(scenario())
    assert first == ([2], 1)
    assert isinstance(fail_a, ValueError) and isinstance(fail_b, ValueError)
    assert later == ([12, 14], 2) and after == ([16], 1)


@pytest.mark.parametrize("concurrency", [1, 2])
def test_concurrency_bounds_the_calls_in_flight(concurrency):
    lock, state = threading.Lock(), {"now": 0, "most": 0}

    def model(inputs):
        with lock:
            state["now"] += 1
            state["most"] = max(state["most"], state["now"])
        threading.Event().wait(0.02)
        with lock:
            state["now"] -= 1
        return list(inputs)

    async def scenario():
        calls = ModelCalls("generation", model, ThreadPoolExecutor(4), BatchStats(), max_batch_size=1,
                           concurrency=concurrency)
        return await asyncio.gather(*(calls([index]) for index in range(6)))

    results = _run(scenario())
    assert [outputs for outputs, _ in results] == [[index] for index in range(6)]
    assert state["most"] == concurrency
