"""The Ray Serve application: task endpoints over one model deployment.

Routes: POST /v1/translate, /v1/qa, /v1/sentiment; GET /healthz. Errors are
JSON ``{"error": "..."}`` with a 4xx status; when ``serve.api_key`` is set every
route but /healthz needs ``Authorization: Bearer <key>``.
"""


import hmac
import time
from typing import Any, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from raylm.serving.schemas import (
    QARequest,
    QAResponse,
    SentimentRequest,
    SentimentResponse,
    TranslateRequest,
    TranslateResponse,
)

APP_NAME = "raylm"


class APIError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def _describe_validation_error(exc: RequestValidationError) -> str:
    first = exc.errors()[0]
    location = ".".join(str(part) for part in first.get("loc", ()) if part != "body") or "body"
    return f"invalid request: {location}: {first.get('msg', 'invalid')}"


def create_api() -> FastAPI:
    api = FastAPI(title="raylm", version="0.1.0")

    @api.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError):
        return JSONResponse(status_code=exc.status, content={"error": exc.message})

    @api.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError):
        return JSONResponse(status_code=422, content={"error": _describe_validation_error(exc)})

    @api.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException):
        return JSONResponse(status_code=exc.status_code, content={"error": str(exc.detail)})

    return api


api = create_api()


@serve.deployment(name="RaylmModel", ray_actor_options={"num_cpus": 1})
@serve.ingress(api)
class RaylmModel:
    """One replica: loads a model folder (or registry URI) into an :class:`Engine`."""

    def __init__(self, model_path: str, serve_config: dict, tracking_uri: Optional[str] = None):
        import torch

        from raylm.config import ServeConfig
        from raylm.inference.engine import Engine, read_model_card
        from raylm.tracking import resolve_model_path

        torch.set_num_threads(1)
        self.config = ServeConfig.model_validate(serve_config)
        folder = resolve_model_path(model_path, tracking_uri)
        self.engine = Engine.from_directory(folder, max_new_tokens=self.config.max_new_tokens)
        self.card = read_model_card(folder)
        self.model_path = model_path
        self.started = time.time()

    # --------------------------------------------------------------- checks

    def _authorize(self, request: Request) -> None:
        key = self.config.api_key_value()
        if not key:
            return
        header = request.headers.get("authorization", "")
        supplied = header[len("Bearer ") :] if header.startswith("Bearer ") else ""
        if not hmac.compare_digest(supplied.encode(), key.encode()):
            raise APIError(401, "missing or wrong API key (send 'Authorization: Bearer <key>')")

    def _check_length(self, **fields: str) -> None:
        for name, value in fields.items():
            if len(value) > self.config.max_input_chars:
                raise APIError(413, f"field {name!r} has {len(value)} characters; "
                                    f"the limit is {self.config.max_input_chars}")

    # --------------------------------------------------------------- routes

    @api.get("/healthz")
    def healthz(self) -> dict[str, Any]:
        return {"status": "ok", "model": self.model_path, "uptime_s": round(time.time() - self.started, 1)}

    @api.post("/v1/translate", response_model=TranslateResponse)
    def translate(self, body: TranslateRequest, request: Request) -> TranslateResponse:
        self._authorize(request)
        self._check_length(text=body.text)
        budget = min(body.max_new_tokens or self.config.max_new_tokens, self.config.max_new_tokens)
        return TranslateResponse(translation=self.engine.translate([body.text], max_new_tokens=budget)[0])

    @api.post("/v1/qa", response_model=QAResponse)
    def qa(self, body: QARequest, request: Request) -> QAResponse:
        self._authorize(request)
        self._check_length(context=body.context, question=body.question)
        return QAResponse(answer=self.engine.answer_questions([body.context], [body.question])[0])

    @api.post("/v1/sentiment", response_model=SentimentResponse)
    def sentiment(self, body: SentimentRequest, request: Request) -> SentimentResponse:
        self._authorize(request)
        self._check_length(text=body.text)
        result = self.engine.classify_sentiment([body.text])[0]
        return SentimentResponse(label=result["label"], score=result["score"])


def build_app(model_path: str, serve_config, tracking_uri: str | None = None):
    """The Serve application for ``model_path`` (a folder or ``models:/name/version``)."""
    deployment = RaylmModel.options(
        num_replicas=serve_config.num_replicas,
        ray_actor_options={"num_cpus": serve_config.num_cpus_per_replica},
    )
    # Python mode keeps the API key a SecretStr (JSON mode would replace it by its mask).
    return deployment.bind(model_path, serve_config.model_dump(), tracking_uri)


def app_builder(args: dict[str, Any]):
    """Entry for ``serve run``/``serve deploy``: ``import_path: raylm.serving.app:app_builder``."""
    from raylm.config import ServeConfig

    args = dict(args or {})
    model_path = args.pop("model_path", None)
    tracking_uri = args.pop("tracking_uri", None)
    if not model_path:
        raise ValueError("serve args need model_path (a model folder or models:/name/version)")
    return build_app(model_path, ServeConfig.model_validate({"model_path": model_path, **args}), tracking_uri)


def start_serving(model_path: str, serve_config, tracking_uri: str | None = None, blocking: bool = False):
    """Start Serve on ``serve_config.host:port`` and deploy the app; returns the base URL."""
    serve.start(http_options={"host": serve_config.host, "port": serve_config.port})
    serve.run(build_app(model_path, serve_config, tracking_uri), name=APP_NAME,
              route_prefix=serve_config.route_prefix, blocking=blocking)
    return f"http://{serve_config.host}:{serve_config.port}{serve_config.route_prefix.rstrip('/')}"
