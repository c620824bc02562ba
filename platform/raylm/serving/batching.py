"""Batching across callers: one loaded model, its ``@serve.batch`` queues, and the thread that runs it.

Every request handler of a replica is async. A handler puts its input on the
model's queue for that kind of work and awaits its own result; ``@serve.batch``
gathers the inputs of concurrent callers (up to ``serve.max_batch_size``,
waiting at most ``serve.batch_wait_timeout_s``) into one call of the model's
batch method. Model calls run on worker threads (one for scoring, one per
concurrent generation batch), so the event loop keeps accepting, validating and
answering requests while a batch runs. There is no lock: nothing waits for
another request, only for its batch.

``@serve.batch`` forms the next batch while the model still runs the last one
(it waits ``batch_wait_timeout_s`` after the batch's first input, then hands the
batch on), so under load several small batches would queue for the model one
behind the other. :class:`ModelCalls` joins them instead: whatever batches wait
when the model becomes free run as one model call (up to ``max_batch_size``
inputs). At concurrency 32 on the benchmark this took sentiment's mean model
batch from ~9 to ~30 inputs; a lone request is not delayed.

Generation (completions, chat, and on decoder models translation and QA too)
has two queues per model. Requests that want their whole answer (the task
routes, completions and chat without ``stream``) share one batch method that
decodes the batch on its thread and hands back the results once: no event-loop
work per decoded token. Streamed requests share an async-generator batch
method: the batch decodes on its thread without pausing, and every step it
makes is handed to the event loop, which passes each row's new text to its
caller (steps that pile up while the loop is busy go out together). Both run
on the same generation threads.
"""

from __future__ import annotations

import asyncio
import threading
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterator, Optional

from ray import serve

from raylm.inference.task_model import GenerationRequest, GenerationResult, StreamDelta, TaskModel


class BatchStats:
    """Counts of batches and inputs per kind of work, and the largest batch: the batching made observable."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.batches: dict[str, int] = defaultdict(int)
        self.inputs: dict[str, int] = defaultdict(int)
        self.largest: dict[str, int] = defaultdict(int)

    def record(self, kind: str, size: int) -> None:
        with self._lock:
            self.batches[kind] += 1
            self.inputs[kind] += size
            self.largest[kind] = max(self.largest[kind], size)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {kind: {"batches": self.batches[kind], "inputs": self.inputs[kind],
                           "largest_batch": self.largest[kind],
                           "mean_batch": round(self.inputs[kind] / self.batches[kind], 2)}
                    for kind in self.batches}


_END = object()


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


def _merge_steps(steps: list[list[Optional[StreamDelta]]], size: int) -> Optional[list[Optional[StreamDelta]]]:
    """Several decoding steps as one: per row, the text and log-probabilities joined, the last finish kept."""
    if not steps:
        return None
    if len(steps) == 1:
        return steps[0]
    merged: list[Optional[StreamDelta]] = []
    for row in range(size):
        deltas = [step[row] for step in steps if step[row] is not None]
        if not deltas:
            merged.append(None)
            continue
        last = deltas[-1]
        merged.append(StreamDelta(text="".join(delta.text for delta in deltas),
                                  logprobs=[entry for delta in deltas for entry in delta.logprobs],
                                  finish_reason=last.finish_reason, prompt_tokens=last.prompt_tokens,
                                  completion_tokens=last.completion_tokens))
    return merged


class ModelCalls:
    """One kind of model call, at most ``concurrency`` at a time, fed by ``@serve.batch`` batches.

    ``await calls(inputs)`` returns ``(outputs, size)``: the outputs for ``inputs``
    and the number of inputs of the model call they ran in. Batches that arrive
    while ``concurrency`` calls run wait, and the next free call takes all of them
    that fit in ``max_batch_size`` (at least one whole batch). ``function(inputs)``
    runs on ``executor`` and returns one output per input; its exception reaches
    every caller of that call.
    """

    def __init__(self, kind: str, function, executor: ThreadPoolExecutor, stats: BatchStats, *,
                 max_batch_size: int, concurrency: int = 1):
        self.kind = kind
        self.function = function
        self.executor = executor
        self.stats = stats
        self.max_batch_size = max_batch_size
        self.concurrency = concurrency
        self._waiting: list[tuple[list, asyncio.Future]] = []
        self._running = 0
        self._tasks: set[asyncio.Task] = set()  # the loop holds tasks weakly

    async def __call__(self, inputs: list) -> tuple[list, int]:
        future = asyncio.get_running_loop().create_future()
        self._waiting.append((list(inputs), future))
        if self._running < self.concurrency:
            self._running += 1
            task = asyncio.create_task(self._run())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return await future

    def _take(self) -> list[tuple[list, asyncio.Future]]:
        taken, size = [], 0
        while self._waiting and (not taken or size + len(self._waiting[0][0]) <= self.max_batch_size):
            inputs, future = self._waiting.pop(0)
            if future.done():  # its caller went away
                continue
            taken.append((inputs, future))
            size += len(inputs)
        return taken

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._waiting:
                taken = self._take()
                if not taken:
                    continue
                joined = [item for inputs, _ in taken for item in inputs]
                self.stats.record(self.kind, len(joined))
                try:
                    outputs = await loop.run_in_executor(self.executor, self.function, joined)
                except BaseException as error:  # noqa: BLE001 (handed to the callers)
                    for _, future in taken:
                        if not future.done():
                            future.set_exception(error)
                    continue
                start = 0
                for inputs, future in taken:
                    if not future.done():
                        future.set_result((outputs[start:start + len(inputs)], len(joined)))
                    start += len(inputs)
        finally:
            self._running -= 1


class ModelWorker:
    """A :class:`TaskModel` behind ``@serve.batch`` queues.

    Scoring calls (sentiment, and the task methods of non-decoder models) run
    on ``executor``; generation on ``generation_executor`` (one thread per
    concurrent batch), so a long generation never holds up a sentiment batch.
    Whole-answer work goes through :class:`ModelCalls` (waiting batches joined);
    streams decode in Serve's own batches.
    """

    def __init__(self, model: TaskModel, executor: ThreadPoolExecutor, generation_executor: ThreadPoolExecutor,
                 stats: BatchStats, *, max_batch_size: int, batch_wait_timeout_s: float,
                 max_concurrent_batches: int = 1, max_ongoing: int = 64):
        self.model = model
        self.executor = executor
        self.generation_executor = generation_executor
        self.stats = stats
        # Decoder models answer translate and QA by generation, in the same batches as completions.
        self.generates_tasks = hasattr(model, "task_request") and model.supports("completions")

        def batched(function, max_concurrent=max_ongoing):
            return serve.batch(max_batch_size=max_batch_size, batch_wait_timeout_s=batch_wait_timeout_s,
                               max_concurrent_batches=max_concurrent)(function)

        def calls(kind, function, executor, concurrency=1):
            return ModelCalls(kind, function, executor, stats, max_batch_size=max_batch_size,
                              concurrency=concurrency)

        def translate_all(items: list[tuple[str, Optional[int]]]) -> list[str]:
            out: list[Optional[str]] = [None] * len(items)
            for budget in {budget for _, budget in items}:  # the model's method takes one budget
                indices = [index for index, (_, b) in enumerate(items) if b == budget]
                for index, text in zip(indices, model.translate([items[index][0] for index in indices], budget)):
                    out[index] = text
            return out

        sentiment_calls = calls("sentiment", model.classify_sentiment, executor)
        qa_calls = calls("qa", lambda pairs: model.answer_questions([p[0] for p in pairs], [p[1] for p in pairs]),
                         executor)
        translate_calls = calls("translate", translate_all, executor)
        generation_calls = calls("generation", model.generate, generation_executor, max_concurrent_batches)

        def through(model_calls):
            async def batch(inputs: list) -> list[tuple[Any, int]]:
                outputs, size = await model_calls(inputs)
                return [(output, size) for output in outputs]
            return batch

        async def generation_batch(requests: list[GenerationRequest]):
            size = len(requests)
            self.stats.record("generation", size)
            loop = asyncio.get_running_loop()
            steps: asyncio.Queue = asyncio.Queue()
            stop = threading.Event()

            def decode() -> None:
                # The whole batch decodes on the generation thread without waiting for the event loop;
                # each step is handed over as it is made.
                try:
                    for step in model.stream(list(requests)):
                        loop.call_soon_threadsafe(steps.put_nowait, step)
                        if stop.is_set():
                            break
                    loop.call_soon_threadsafe(steps.put_nowait, _END)
                except BaseException as error:  # reaches every caller of the batch
                    loop.call_soon_threadsafe(steps.put_nowait, _Failure(error))

            running = loop.run_in_executor(self.generation_executor, decode)
            try:
                ended = False
                while not ended:
                    items = [await steps.get()]
                    while not steps.empty():  # steps made while the loop was busy go out together
                        items.append(steps.get_nowait())
                    if isinstance(items[-1], _Failure):
                        raise items[-1].error
                    ended = items[-1] is _END
                    merged = _merge_steps([item for item in items if item is not _END], size)
                    if merged is not None:
                        # A row that has ended gets StopIteration: Serve ends that caller's stream.
                        yield [StopIteration if delta is None else (delta, size) for delta in merged]
            finally:
                stop.set()
                await running

        self._sentiment = batched(through(sentiment_calls))
        self._whole_generation = batched(through(generation_calls))
        self._qa = batched(through(qa_calls))
        self._translate = batched(through(translate_calls))
        # Streams keep Serve's own batches: each decodes step by step for its callers.
        self._generation = batched(generation_batch, max_concurrent_batches)

    # ----------------------------------------------------------------- one input each; batched underneath

    async def sentiment(self, text: str) -> tuple[dict, int]:
        """(``{"label", "score"}``, size of the batch it ran in)."""
        return await self._sentiment(text)

    async def answer(self, context: str, question: str) -> tuple[str, int]:
        if self.generates_tasks:
            result, size = await self.generate(self.model.task_request("qa", context=context, question=question))
            return result.text.strip(), size
        return await self._qa((context, question))

    async def translate(self, text: str, budget: Optional[int]) -> tuple[str, int]:
        if self.generates_tasks:
            result, size = await self.generate(self.model.task_request("translate", budget, text=text))
            return result.text.strip(), size
        return await self._translate((text, budget))

    def stream(self, request: GenerationRequest) -> AsyncIterator[tuple[StreamDelta, int]]:
        """The request's deltas as they are decoded, each with the size of the batch it runs in."""
        return self._generation(request)

    async def generate(self, request: GenerationRequest) -> tuple[GenerationResult, int]:
        """The whole generation and the size of the batch it ran in."""
        return await self._whole_generation(request)
