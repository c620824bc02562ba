"""The HTTP routes of a replica: task endpoints and the OpenAI-compatible API.

Task routes (``{"error": "..."}`` errors):
  POST /v1/sentiment, /v1/qa, /v1/translate (one input, or ``{"inputs": [...]}``)
  GET  /healthz (no API key; model ids, kinds and tasks, batch statistics; no file paths)
  GET  /playground (no API key; with ``serve.playground``): a page that calls the routes here
OpenAI routes (``{"error": {"message", "type", "param", "code"}}`` errors):
  POST /v1/completions, /v1/chat/completions (``stream: true`` as server-sent events), GET /v1/models

Every response computed by a model carries ``X-Raylm-Batch-Size``: the number
of inputs in the model call that computed it. A request that may generate more
than ``serve.max_request_tokens`` is refused (400) before any of it is queued.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from typing import Any, AsyncIterator, Optional, Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from raylm.config import ServeConfig
from raylm.inference.task_model import GenerationRequest, InputError, SamplingParams, UnsupportedTaskError
from raylm.serving.adapters import AdapterLeases
from raylm.serving.batching import ModelWorker
from raylm.serving.guard import (
    OPEN_PATHS,
    APIError,
    GuardMiddleware,
    check_request_tokens,
    error_body,
    is_openai_path,
    route_path,
)
from raylm.serving.playground import PLAYGROUND_PATHS, add_playground
from raylm.serving.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    QARequest,
    QAResponse,
    SentimentRequest,
    SentimentResponse,
    TranslateRequest,
    TranslateResponse,
)

logger = logging.getLogger("ray.serve")

BATCH_HEADER = "X-Raylm-Batch-Size"
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


def _error(request: Request, status: int, message: str, param: Optional[str] = None,
           code: Optional[str] = None, headers: Optional[dict] = None) -> JSONResponse:
    return JSONResponse(status_code=status, content=error_body(route_path(request.scope), status, message, param, code),
                        headers=headers)


def _validation_message(exc: RequestValidationError) -> tuple[str, Optional[str]]:
    first = exc.errors()[0]
    parts = [str(part) for part in first.get("loc", ()) if part != "body"]
    # Union members add their type names to the location; they mean nothing to a client.
    location = ".".join(part for part in parts if not part.startswith(("str", "list[", "int", "function-")))
    message = first.get("msg", "invalid")
    if message.startswith("Value error, "):
        message = message[len("Value error, "):]
    if first.get("type") == "json_invalid":
        return f"invalid JSON: {first.get('ctx', {}).get('error', message)}", None
    if first.get("type") == "extra_forbidden":
        message = "unknown field"
    return f"invalid request: {location or 'body'}: {message}", location or None


class ModelServer(Protocol):
    """What the routes need of a replica (:class:`raylm.serving.app.RaylmServer`)."""

    config: ServeConfig
    started: float

    async def worker_for(self, task: str, requested_model: Optional[str] = None) -> ModelWorker: ...

    def distinct_workers(self) -> list[ModelWorker]: ...

    def adapter_names(self) -> list[str]: ...

    def adapter_models(self) -> list[dict[str, Any]]: ...

    def health(self) -> dict[str, Any]: ...


def build_api(server: ModelServer) -> FastAPI:
    """The FastAPI app of one replica, wrapped in its API-key and body-size guard."""
    config = server.config
    api = FastAPI(title="raylm", version="0.2.0",
                  description="Task endpoints and an OpenAI-compatible API over raylm models.")

    # ------------------------------------------------------------- errors

    @api.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return _error(request, exc.status, exc.message, exc.param, exc.code)

    @api.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        # OpenAI answers bad parameters with 400; the task routes keep their 422.
        status = 400 if is_openai_path(route_path(request.scope)) else 422
        return _error(request, status, message, param)

    @api.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        message = str(exc.detail)
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"method {request.method} not allowed on {request.url.path}"
        elif exc.status_code == 400:
            message = f"unreadable request body: {message}"
        return _error(request, exc.status_code, message, headers=getattr(exc, "headers", None))

    @api.exception_handler(UnsupportedTaskError)
    async def _unsupported(request: Request, exc: UnsupportedTaskError):
        return _error(request, 400, str(exc), "model", "unsupported_task")

    @api.exception_handler(InputError)
    async def _input_error(request: Request, exc: InputError):
        return _error(request, 400, str(exc), exc.param, exc.code)

    @api.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        logger.exception("raylm: unexpected error on %s", request.url.path)
        return _error(request, 500, "internal error (see the replica's log)", code="internal_error")

    # ------------------------------------------------------------- helpers

    def check_chars(**fields: str) -> None:
        for name, value in fields.items():
            if len(value) > config.max_input_chars:
                raise APIError(413, f"field {name!r} has {len(value)} characters; the limit is "
                                    f"{config.max_input_chars}", name, "string_above_max_length")

    def task_inputs(body) -> list:
        items = body.items()
        if len(items) > config.max_inputs_per_request:
            raise APIError(422, f"invalid request: inputs: {len(items)} inputs; the limit is "
                                f"{config.max_inputs_per_request} per request", "inputs")
        return items

    def check_tokens(worker: ModelWorker, max_tokens: list[int], copies: int, unit: Optional[str],
                     budget_name: str) -> None:
        """Refuse a request that may generate more than ``serve.max_request_tokens`` before it is queued."""
        context = worker.model.max_positions
        source = "serve.max_request_tokens"
        if config.max_request_tokens is None:
            source += (f"; by default serve.max_batch_size {config.max_batch_size} x the model's context "
                       f"of {context}")
        check_request_tokens(max_tokens, copies, config.request_token_budget(context), unit=unit,
                             budget_name=budget_name, limit_source=source)

    def task_response(body, results: list[dict], sizes: list[int]) -> JSONResponse:
        payload = results[0] if body.inputs is None else {"results": results}
        return JSONResponse(payload, headers={BATCH_HEADER: str(max(sizes))})

    # ------------------------------------------------------------- task routes

    @api.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return server.health()

    @api.post("/v1/sentiment", response_model=SentimentResponse)
    async def sentiment(body: SentimentRequest):
        worker = await server.worker_for("sentiment")
        items = task_inputs(body)
        for index, item in enumerate(items):
            check_chars(text=item.text)
        answers = await asyncio.gather(*(worker.sentiment(item.text) for item in items))
        return task_response(body, [result for result, _ in answers], [size for _, size in answers])

    @api.post("/v1/qa", response_model=QAResponse)
    async def qa(body: QARequest):
        worker = await server.worker_for("qa")
        items = task_inputs(body)
        for item in items:
            check_chars(context=item.context, question=item.question)
        answers = await asyncio.gather(*(worker.answer(item.context, item.question) for item in items))
        return task_response(body, [{"answer": answer} for answer, _ in answers], [size for _, size in answers])

    @api.post("/v1/translate", response_model=TranslateResponse)
    async def translate(body: TranslateRequest):
        worker = await server.worker_for("translate")
        items = task_inputs(body)
        for item in items:
            check_chars(text=item.text)
        budgets = [min(item.max_new_tokens or config.max_new_tokens, config.max_new_tokens) for item in items]
        check_tokens(worker, budgets, 1, "input", "max_new_tokens")
        answers = await asyncio.gather(*(worker.translate(item.text, budget) for item, budget in zip(items, budgets)))
        return task_response(body, [{"translation": text} for text, _ in answers], [size for _, size in answers])

    # ------------------------------------------------------------- OpenAI routes

    @api.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        models = [{"id": worker.model.name, "object": "model", "created": int(server.started), "owned_by": "raylm",
                   "tasks": sorted(worker.model.supported_tasks)} for worker in server.distinct_workers()]
        # serve.adapters, loaded or not, with their base as "parent" (as vLLM lists LoRA adapters).
        models += [{"object": "model", "created": int(server.started), "owned_by": "raylm", **adapter}
                   for adapter in server.adapter_models()]
        return {"object": "list", "data": models}

    def sampling(worker: ModelWorker, body, max_tokens: int, stops: tuple[str, ...], logprobs: Optional[int],
                 seed_offset: int):
        """The request's sampling settings; those it leaves out come from the model's generation_config."""
        seed = body.seed + seed_offset if body.seed is not None else None
        defaults = worker.model.sampling_defaults
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=defaults.get("temperature", 1.0) if body.temperature is None else body.temperature,
            top_p=defaults.get("top_p", 1.0) if body.top_p is None else body.top_p,
            top_k=max(0, defaults.get("top_k", 0) if body.top_k is None else body.top_k),
            seed=seed, stop=stops, logprobs=logprobs)

    def budget_for(worker: ModelWorker, prompt, requested: Optional[int], default: int) -> int:
        """``max_tokens``: as asked (checked against the context later), or the default cut to the room left."""
        if requested is not None:
            return requested
        room = worker.model.max_positions - worker.model.check_generation(
            GenerationRequest(prompt, SamplingParams(max_tokens=0), truncate_prompt=False))
        if room < 1:
            raise InputError(f"the prompt fills the model's context of {worker.model.max_positions} tokens",
                             param="prompt", code="context_length_exceeded")
        return min(default, room)

    @api.post("/v1/completions")
    async def completions(body: CompletionRequest):
        worker = await server.worker_for("completions", body.model)
        prompts = body.prompts()
        for prompt in prompts:
            if isinstance(prompt, str):
                check_chars(prompt=prompt)
        budgets = [budget_for(worker, prompt, body.max_tokens, COMPLETIONS_DEFAULT_MAX_TOKENS) for prompt in prompts]
        check_tokens(worker, budgets, body.n, "prompt", "max_tokens")
        requests, choice_of = [], []
        for prompt_index, (prompt, budget) in enumerate(zip(prompts, budgets)):
            for copy in range(body.n):
                request = GenerationRequest(prompt, sampling(worker, body, budget, body.stop_sequences(), body.logprobs,
                                                             copy), echo=body.echo)
                worker.model.check_generation(request)
                requests.append(request)
                choice_of.append(prompt_index * body.n + copy)
        reply = _Reply("cmpl", "text_completion", worker.model.name)
        if body.stream:
            return await _stream_response(worker, requests, reply, body.include_usage(), chat=False, copies=body.n)
        results = await asyncio.gather(*(worker.generate(request) for request in requests))
        choices = [{"index": index, "text": result.text, "finish_reason": result.finish_reason,
                    "logprobs": _completion_logprobs(result.logprobs, len(request.prompt) if request.echo
                                                     and isinstance(request.prompt, str) else 0)
                    if result.logprobs is not None else None}
                   for index, (request, (result, _)) in zip(choice_of, zip(requests, results))]
        return JSONResponse(reply.body(choices, _usage([r for r, _ in results], body.n)),
                            headers={BATCH_HEADER: str(max(size for _, size in results))})

    @api.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest):
        worker = await server.worker_for("chat", body.model)
        messages = [{"role": message.role, "content": message.text()} for message in body.messages]
        for index, message in enumerate(messages):
            check_chars(**{f"messages[{index}].content": message["content"]})
        prompt = worker.model.render_chat(messages)
        stops = (*body.stop_sequences(), *getattr(worker.model, "chat_stop_sequences", ()))
        budget = budget_for(worker, prompt, body.token_budget(), config.max_new_tokens)
        check_tokens(worker, [budget], body.n, None, "max_completion_tokens" if body.max_completion_tokens
                     else "max_tokens")
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        requests = []
        for copy in range(body.n):
            request = GenerationRequest(prompt, sampling(worker, body, budget, stops, logprobs, copy))
            worker.model.check_generation(request)
            requests.append(request)
        reply = _Reply("chatcmpl", "chat.completion", worker.model.name)
        if body.stream:
            return await _stream_response(worker, requests, reply, body.include_usage(), chat=True, copies=body.n)
        results = await asyncio.gather(*(worker.generate(request) for request in requests))
        choices = [{"index": index, "message": {"role": "assistant", "content": result.text.strip()},
                    "logprobs": {"content": _chat_logprobs(result.logprobs)} if result.logprobs is not None else None,
                    "finish_reason": result.finish_reason}
                   for index, (result, _) in enumerate(results)]
        return JSONResponse(reply.body(choices, _usage([r for r, _ in results], body.n)),
                            headers={BATCH_HEADER: str(max(size for _, size in results))})

    if config.playground:
        add_playground(api)
    # With a key set, the guard asks for it on every path but /healthz (and the playground's files, which hold
    # no data): /docs and /openapi.json included.
    if config.adapters:
        api.add_middleware(AdapterLeases)  # inside the guard: a refused request takes no lease
    api.add_middleware(GuardMiddleware, api_key=config.api_key_value(), max_body_bytes=config.max_body_bytes,
                       open_paths=OPEN_PATHS + (PLAYGROUND_PATHS if config.playground else ()))
    return api


class _Reply:
    """Id, object type, creation time and model of one OpenAI response (and its stream chunks)."""

    def __init__(self, prefix: str, kind: str, model: str):
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.kind = kind
        self.created = int(time.time())
        self.model = model

    def body(self, choices: list[dict], usage: Optional[dict], chunk: bool = False) -> dict[str, Any]:
        kind = self.kind + ".chunk" if chunk and self.kind == "chat.completion" else self.kind
        payload = {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}
        if usage is not None or not chunk:
            payload["usage"] = usage
        return payload


def _usage(results, copies: int) -> dict[str, int]:
    # The n copies of one prompt share its prompt tokens: count them once per prompt, as OpenAI does.
    prompt_tokens = sum(result.prompt_tokens for index, result in enumerate(results) if index % copies == 0)
    completion_tokens = sum(result.completion_tokens for result in results)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _completion_logprobs(entries, offset: int) -> dict[str, Any]:
    tokens, offsets, position = [], [], offset
    for entry in entries:
        tokens.append(entry.token)
        offsets.append(position)
        position += len(entry.token)
    return {"tokens": tokens, "token_logprobs": [entry.logprob for entry in entries],
            "top_logprobs": [dict(entry.top) for entry in entries], "text_offset": offsets}


def _chat_logprobs(entries) -> list[dict[str, Any]]:
    return [{"token": entry.token, "logprob": entry.logprob, "bytes": list(entry.token.encode()),
             "top_logprobs": [{"token": token, "logprob": value, "bytes": list(token.encode())}
                              for token, value in entry.top]} for entry in entries]


async def _stream_response(worker: ModelWorker, requests: list[GenerationRequest], reply: _Reply,
                           include_usage: bool, chat: bool, copies: int) -> StreamingResponse:
    """Server-sent events: one chunk per decoded piece of each choice, usage last if asked, then [DONE]."""
    streams = [worker.stream(request) for request in requests]
    # The first step of every choice arrives before the response starts: errors are still plain JSON
    # errors, and the batch size is known for the header.
    firsts = await asyncio.gather(*(anext(stream) for stream in streams))
    batch_size = max(size for _, size in firsts)

    async def events() -> AsyncIterator[bytes]:
        queue: asyncio.Queue = asyncio.Queue()
        finals: dict[int, Any] = {}
        started = [False] * len(streams)

        async def pump(index: int, first, stream) -> None:
            try:
                await queue.put((index, first))
                async for item in stream:
                    await queue.put((index, item[0]))
            finally:
                await queue.put((index, None))

        tasks = [asyncio.create_task(pump(index, first[0], stream))
                 for index, (first, stream) in enumerate(zip(firsts, streams))]
        try:
            if chat:
                roles = [{"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None} for index in range(len(streams))]
                yield _sse(reply.body(roles, None, chunk=True))
            open_streams = len(streams)
            while open_streams:
                index, delta = await queue.get()
                if delta is None:
                    open_streams -= 1
                    continue
                text = delta.text
                if chat and not started[index]:
                    text = text.lstrip()  # the reply follows "Assistant:"; its leading space is not content
                    started[index] = bool(text)
                if delta.finished:
                    finals[index] = delta
                if not text and not delta.finished and not delta.logprobs:
                    continue
                if chat:
                    choice = {"index": index, "delta": {"content": text} if text or not delta.finished else {},
                              "logprobs": {"content": _chat_logprobs(delta.logprobs)} if delta.logprobs else None,
                              "finish_reason": delta.finish_reason}
                else:
                    choice = {"index": index, "text": text, "finish_reason": delta.finish_reason,
                              "logprobs": _completion_logprobs(delta.logprobs, 0) if delta.logprobs else None}
                yield _sse(reply.body([choice], None, chunk=True))
            if include_usage:
                ordered = [finals[index] for index in sorted(finals)]
                yield _sse(reply.body([], _usage(ordered, copies), chunk=True))
            yield b"data: [DONE]\n\n"
        finally:
            for task in tasks:
                task.cancel()

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={BATCH_HEADER: str(batch_size), "Cache-Control": "no-cache"})


def _sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False).encode() + b"\n\n"
