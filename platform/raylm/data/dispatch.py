"""Prompt task dispatch for Ray Data executions made of tasks of about a second (raylm's packing tasks).

Ray 2.60's streaming executor leaves CPUs idle, or spends the driver's CPU, in
four places, each measured on the data benchmark's 50 MB corpus (2 CPUs, ~50
one-segment packing tasks of ~1 s):

1. It notices a finished task by polling: ``ray.wait`` on all running tasks with
   ``num_returns`` equal to their number and a 0.1 s timeout, so a task that
   finishes while the others run is seen only when the timeout ends: a worker sat
   idle 0.157 s between tasks (median). Polling every 30 ms cut that to 0.027 s,
   but the driver then used 3.1-3.6 CPU-s per ~30 s run (all its threads), on
   the same two cores as the work. Here the executor wakes as soon as a task has
   new output (or after at most ``IDLE_WAIT_S``) and then collects every ready
   task without waiting: 0.011 s between tasks, the driver 1.2-1.4 CPU-s (its
   executor thread ~0.5).
2. A task counts as done only after a metadata thread has fetched its block's
   metadata, with another 0.1 s wait; it is fetched inline instead.
3. At the start of each execution the resource limits come from the autoscaling
   coordinator actor, asked without blocking; its first answer (nothing reserved
   yet) is kept for ``GLOBAL_LIMITS_UPDATE_INTERVAL_S`` (1 s), so for the first
   ~1.1 s only one task runs (by the executor's liveness rule) and the other CPU
   idles. While the limits are all zero they are asked for again at every step
   (and the executor waits at most Ray's own 0.1 s between steps): both CPUs
   start within a few milliseconds of each other.
4. The consumer of the output (``take_all`` here) polls an empty output queue
   every 10 ms, ~0.3 CPU-s per run; at least every ``CONSUMER_POLL_S`` here.

These are module constants and functions of Ray 2.60's executor, looked up on
each use; :func:`prompt_task_dispatch` replaces them only within its block and
only where they exist, so a Ray version without them runs as it is.
"""

from __future__ import annotations

import importlib
import time
from contextlib import contextmanager
from typing import Any, Iterator

_STATE = "ray.data._internal.execution.streaming_executor_state"
_EXECUTOR = "ray.data._internal.execution.streaming_executor"
_METADATA = "ray.data._internal.execution.metadata_fetcher"
_RESOURCES = "ray.data._internal.execution.resource_manager"

IDLE_WAIT_S = 0.5  # the longest the executor waits for a task's output once the resource limits are known
CONSUMER_POLL_S = 0.05  # the consumer's poll of an empty output queue (Ray's: 0.01 s)


class _Dispatch:
    """The replacements for one ``prompt_task_dispatch`` block."""

    def __init__(self, ray_poll_s: float):
        self.ray_poll_s = ray_poll_s
        self.limits_known = False  # whether the last execution that asked had nonzero resource limits

    def wake_on_output(self, original):
        """``process_completed_tasks`` that first waits until a running task has output that the executor
        may read now, then lets the original collect what is ready without waiting.

        Without such output it waits at most ``IDLE_WAIT_S`` (Ray's own poll while the resource limits are
        still unknown, so that they are asked for again promptly). Output of an operator whose backpressure
        policies allow no bytes to be read now stays unread by the executor, so it does not end the wait,
        or the executor would spin: one more ready task does.
        """
        import ray

        def process_completed_tasks(topology, *args: Any, **kwargs: Any):
            policies = kwargs["backpressure_policies"] if "backpressure_policies" in kwargs else \
                (args[0] if args else None)
            tasks = [(op, task.get_waitable()) for op in topology for task in op.get_active_tasks()]
            waitables = [waitable for _, waitable in tasks]
            if waitables and policies is None:  # not the signature this was written for: wait as Ray does
                ray.wait(waitables, num_returns=len(waitables), timeout=self.ray_poll_s, fetch_local=False)
            elif waitables:
                ready = set(ray.wait(waitables, num_returns=len(waitables), timeout=0, fetch_local=False)[0])
                ops_ready = {op for op, waitable in tasks if waitable in ready}
                if len(ready) < len(waitables) and all(_output_blocked(op, policies) for op in ops_ready):
                    timeout = IDLE_WAIT_S if self.limits_known else self.ray_poll_s
                    ray.wait(waitables, num_returns=len(ready) + 1, timeout=timeout, fetch_local=False)
            return original(topology, *args, **kwargs)

        process_completed_tasks.raylm_wrapped = original
        return process_completed_tasks

    def limits_asked_again_until_known(self, original):
        """``ResourceManager.get_global_limits`` that does not keep an all-zero answer (nothing reserved
        yet) for the update interval: the next call asks again."""

        def get_global_limits(manager):
            limits = original(manager)
            self.limits_known = bool(limits.cpu or limits.gpu or limits.object_store_memory)
            if not self.limits_known:
                manager._global_limits_last_update_time = 0
            return limits

        get_global_limits.raylm_wrapped = original
        return get_global_limits


def _output_blocked(op, policies) -> bool:
    """Whether ``op``'s backpressure policies let the executor read none of its tasks' output now."""
    return any(policy.max_task_output_bytes_to_read(op) == 0 for policy in policies)


class _PatientClock:
    """Stands in for the ``time`` module in Ray Data's executor state module, whose only sleep is the
    consumer's poll of an empty output queue: every 10 ms, ~0.3 CPU-s of the driver's per 30 s run. Polls
    at least every ``CONSUMER_POLL_S`` instead (the consumer sees an output at most that much later; the
    executor dispatches tasks on its own thread regardless)."""

    def __init__(self, clock):
        self._clock = clock

    def sleep(self, seconds: float) -> None:
        self._clock.sleep(max(seconds, CONSUMER_POLL_S))

    def __getattr__(self, name: str):
        return getattr(self._clock, name)


def _module(name: str):
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


@contextmanager
def prompt_task_dispatch() -> Iterator[None]:
    """Within this block, Ray Data executions started by this process start every CPU's first task at once
    and hand a finished task's CPU on within a few milliseconds (see the module note)."""
    state, executor, metadata, resources = (_module(name) for name in (_STATE, _EXECUTOR, _METADATA, _RESOURCES))
    saved: list[tuple[Any, str, Any]] = []

    def replace(owner, name: str, value) -> None:
        saved.append((owner, name, getattr(owner, name)))
        setattr(owner, name, value)

    try:
        if (state is not None and executor is not None and hasattr(state, "WAIT_FOR_TASK_COMPLETION_TIMEOUT_S")
                and callable(getattr(executor, "process_completed_tasks", None))
                and not hasattr(executor.process_completed_tasks, "raylm_wrapped")):
            dispatch = _Dispatch(state.WAIT_FOR_TASK_COMPLETION_TIMEOUT_S)
            replace(executor, "process_completed_tasks", dispatch.wake_on_output(executor.process_completed_tasks))
            replace(state, "WAIT_FOR_TASK_COMPLETION_TIMEOUT_S", 0)
            manager = getattr(resources, "ResourceManager", None)
            if manager is not None and callable(getattr(manager, "get_global_limits", None)):
                replace(manager, "get_global_limits",
                        dispatch.limits_asked_again_until_known(manager.get_global_limits))
            else:
                dispatch.limits_known = True
        if state is not None and getattr(state, "time", None) is time:
            replace(state, "time", _PatientClock(time))
        if metadata is not None and hasattr(metadata, "_PREFETCH_ON_THREAD"):
            replace(metadata, "_PREFETCH_ON_THREAD", False)
        yield
    finally:
        for owner, name, value in reversed(saved):
            setattr(owner, name, value)
