"""What every request passes before any route sees it: the API key, then the body-size limit.

A plain ASGI middleware (no body parsing, no FastAPI): an unauthenticated
request gets 401 before its body is even read, so it can never learn the
request schema from a 422; an oversized body gets 413 before it is parsed.
Errors come in the shape of the route family: OpenAI's
``{"error": {"message", "type", "param", "code"}}`` under the OpenAI routes,
``{"error": "..."}`` elsewhere.
"""

from __future__ import annotations

import hmac
import json
from typing import Any, Awaitable, Callable, Optional, Sequence

OPENAI_PREFIXES = ("/v1/completions", "/v1/chat/", "/v1/models")
OPEN_PATHS = ("/healthz",)  # answered without the API key (load balancers, Serve's own checks)

_OPENAI_TYPES = {
    400: "invalid_request_error", 401: "invalid_request_error", 403: "invalid_request_error",
    404: "invalid_request_error", 405: "invalid_request_error", 413: "invalid_request_error",
    422: "invalid_request_error", 429: "rate_limit_exceeded", 503: "server_error", 500: "server_error",
}


class APIError(Exception):
    """A request raylm refuses: HTTP ``status`` with a message (and, on OpenAI routes, param and code)."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code


def is_openai_path(path: str) -> bool:
    """Whether ``path`` (relative to the app's route prefix) is one of the OpenAI routes."""
    return path.startswith(OPENAI_PREFIXES)


def route_path(scope) -> str:
    """The request path without the application's route prefix (Serve passes the prefix as ``root_path``)."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return path[len(root):] or "/" if root and path.startswith(root) else path


def error_body(path: str, status: int, message: str, param: Optional[str] = None,
               code: Optional[str] = None, error_type: Optional[str] = None) -> dict[str, Any]:
    """The JSON error for ``path``: OpenAI's shape on the OpenAI routes, ``{"error": message}`` elsewhere."""
    if is_openai_path(path):
        return {"error": {"message": message, "type": error_type or _OPENAI_TYPES.get(status, "invalid_request_error"),
                          "param": param, "code": code}}
    return {"error": message}


def check_request_tokens(max_tokens: Sequence[int], copies: int, limit: int, *, unit: Optional[str],
                         budget_name: str, limit_source: str) -> int:
    """The tokens a request may generate (``copies`` x the sum of its inputs' ``max_tokens``); an
    :class:`APIError` (400) when that is over ``limit``, with the limit and what was asked.

    ``unit`` names the inputs (``prompt``, ``input``; None for chat, which has one conversation),
    ``budget_name`` the request field that set the per-input budget (``max_tokens``, ``max_new_tokens``).
    Called before anything is queued to the model, so a refused request costs the replica no model time.
    """
    requested = copies * sum(max_tokens)
    if requested <= limit:
        return requested
    factors = []
    if unit is not None:
        factors.append(f"{len(max_tokens)} {unit}{'' if len(max_tokens) == 1 else 's'}")
    if copies != 1 or unit is None:
        factors.append(f"n={copies}")
    if len(set(max_tokens)) == 1:
        factors.append(f"{budget_name}={max_tokens[0]}")
    else:
        factors.append(f"{budget_name} up to {max(max_tokens)} each")
    raise APIError(400, f"this request may generate up to {requested} tokens ({' x '.join(factors)}); the limit "
                        f"is {limit} per request ({limit_source})", budget_name, "max_request_tokens_exceeded")


async def send_json(send: Callable[[dict], Awaitable[None]], status: int, body: dict[str, Any],
                    headers: Optional[list[tuple[bytes, bytes]]] = None) -> None:
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": payload})


class GuardMiddleware:
    """ASGI middleware: API key check (all paths but ``open_paths``: /healthz, and the playground's page when
    it is served), then the request-body size limit.

    Each replica builds its app with its own key and limit; no key means no check.
    """

    def __init__(self, app, api_key: Optional[str], max_body_bytes: int, open_paths: Sequence[str] = OPEN_PATHS):
        self.app = app
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes
        self.open_paths = tuple(open_paths)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = route_path(scope)
        if self.api_key and path not in self.open_paths and not self._authorized(scope):
            return await send_json(send, 401, error_body(
                path, 401, "missing or wrong API key (send 'Authorization: Bearer <key>')", code="invalid_api_key"),
                headers=[(b"www-authenticate", b"Bearer")])
        declared = _header(scope, b"content-length")
        if declared is not None:
            try:
                too_large = int(declared) > self.max_body_bytes
            except ValueError:
                return await send_json(send, 400, error_body(path, 400, "invalid Content-Length header"))
            if too_large:
                return await self._too_large(path, send)
        if scope.get("method") not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        # Read the body here, counting, so that a body without (or lying about) Content-Length is
        # cut off at the limit too; the route then reads the buffered copy.
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return await self._too_large(path, send)
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    def _authorized(self, scope) -> bool:
        header = (_header(scope, b"authorization") or "").strip()
        scheme, _, supplied = header.partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(supplied.strip().encode(), self.api_key.encode())

    async def _too_large(self, path: str, send) -> None:
        await send_json(send, 413, error_body(path, 413, f"request body is larger than {self.max_body_bytes} bytes",
                                              code="request_too_large"))


def _header(scope, name: bytes) -> Optional[str]:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None
