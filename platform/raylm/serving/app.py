"""The Ray Serve application: one deployment whose replicas hold the served models.

``build_app`` turns a :class:`~raylm.config.ServeConfig` into a bound
deployment with the replica, autoscaling, queue and resource options of that
config, so ``raylm serve``, ``serve run`` and ``serve deploy`` (through
:func:`app_builder`) deploy the same thing. Routes: see
:mod:`raylm.serving.routes`; batching: :mod:`raylm.serving.batching`.

Fail closed: ``build_app`` refuses an app that Serve's HTTP proxies would expose
on a non-loopback address without an API key (``serve.api_key_file``,
``$RAYLM_API_KEY``) unless ``serve.allow_unauthenticated`` is set. For
``serve deploy`` the host is in the Serve config's ``http_options``, which reach
the controller, not the builder's args: the builder asks the running Serve.
"""

from __future__ import annotations

import logging
import shutil
import signal
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

from ray import serve
from ray.serve.config import HTTPOptions
from ray.serve.exceptions import RayServeException

from raylm.common.tracking import get_model_version, resolve_model_path
from raylm.compat.ray import running_serve_http_host
from raylm.config import ConfigError, ServeConfig, validate_config
from raylm.inference.task_model import InferenceOptions, load_task_model, model_kind, public_model_name
from raylm.inference.adapters import SharedBase
from raylm.models.lora import AdapterError, base_identities, check_adapter_base, is_adapter_folder
from raylm.serving.adapters import AdapterPool
from raylm.serving.batching import BatchStats, ModelWorker
from raylm.serving.guard import APIError
from raylm.serving.routes import build_api
from raylm.serving.vllm_app import build_vllm_app

logger = logging.getLogger(__name__)

APP_NAME = "raylm"
DEPLOYMENT_NAME = "RaylmModel"


class AppConfigError(ConfigError, RayServeException):
    """A config error of an app built by Serve (``serve run`` / ``serve deploy``): Serve shows a
    ``RayServeException`` from a builder as its message alone, so the app's status reads one line, not a
    traceback; raylm's CLI still treats it as a ConfigError."""


def serve_http_host() -> Optional[str]:
    """The host Serve's HTTP proxies listen on: the running Serve instance's; when none runs (or this process
    has no Ray), the host a Serve started now would get (``HTTPOptions``' default)."""
    running, host = running_serve_http_host()
    return host if running else HTTPOptions().host


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress()
class RaylmServer:
    """One replica: loads each distinct model of ``task_models`` once and batches requests to it."""

    def __init__(self, task_models: dict[str, str], serve_config: dict, tracking_uri: Optional[str] = None):
        import torch

        self.config = ServeConfig.model_validate(serve_config)
        torch.set_num_threads(max(1, int(self.config.num_cpus_per_replica)))
        options = InferenceOptions(device=self.config.resolved_device(), dtype=self.config.dtype,
                                   max_new_tokens=self.config.max_new_tokens)
        # Model calls run off the event loop, which keeps accepting and answering requests meanwhile:
        # one thread for scoring batches, one per concurrent generation batch.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="raylm-score")
        self.generation_executor = ThreadPoolExecutor(max_workers=self.config.max_concurrent_batches,
                                                      thread_name_prefix="raylm-generate")
        self.stats = BatchStats()
        self.adapters: Optional[AdapterPool] = None
        by_reference: dict[str, ModelWorker] = {}
        base = [self.config.model_path] if self.config.adapters else []  # even when no task uses the base alone
        for reference in dict.fromkeys([*task_models.values(), *base]):
            folder = resolve_model_path(reference, tracking_uri)
            name = reference if reference.startswith("models:/") else public_model_name(folder)
            model = load_task_model(folder, options, name=name)
            if self.config.adapters and reference == self.config.model_path:
                # The adapters' base: in memory once, each forward pass with one adapter (or none) active.
                shared = SharedBase(model, folder)
                model = shared.view(None, name)
                self.adapters = AdapterPool(shared, name, self.config, tracking_uri, self._worker)
            by_reference[reference] = self._worker(model)
        self.workers = {task: by_reference[reference] for task, reference in task_models.items()}
        self.base_worker = by_reference.get(self.config.model_path) if base else None
        self.started = time.time()

    def _worker(self, model) -> ModelWorker:
        return ModelWorker(model, self.executor, self.generation_executor, self.stats,
                           max_batch_size=self.config.max_batch_size,
                           batch_wait_timeout_s=self.config.batch_wait_timeout_s,
                           max_concurrent_batches=self.config.max_concurrent_batches,
                           max_ongoing=self.config.max_ongoing_requests)

    def __serve_build_asgi_app__(self):
        return build_api(self)

    # ----------------------------------------------------------------- used by the routes

    def distinct_workers(self) -> list:
        workers = [*self.workers.values(), *([self.base_worker] if self.base_worker is not None else [])]
        return list({id(worker): worker for worker in workers}.values())

    def adapter_names(self) -> list[str]:
        return self.adapters.names if self.adapters is not None else []

    def adapter_models(self) -> list[dict[str, Any]]:
        """``/v1/models`` entries of the adapters: id, parent (the base's id) and tasks."""
        if self.base_worker is None:
            return []
        base = self.base_worker.model
        return [{"id": name, "parent": base.name, "tasks": sorted(base.supported_tasks)}
                for name in self.adapter_names()]

    async def worker_for(self, task: str, requested_model: Optional[str] = None):
        """The worker that answers ``task``: the model or adapter named by ``requested_model``, else the task's."""
        if requested_model:
            for worker in self.distinct_workers():
                if worker.model.name == requested_model:
                    worker.model.require(task)
                    return worker
            if requested_model in self.adapter_names():
                worker = await self.adapters.worker(requested_model)
                worker.model.require(task)
                return worker
            known = ", ".join([worker.model.name for worker in self.distinct_workers()] + self.adapter_names())
            raise APIError(404, f"model {requested_model!r} is not served here (served: {known})", "model",
                           "model_not_found")
        adapter = self.config.task_adapters().get(task)
        if adapter is not None:
            worker = await self.adapters.worker(adapter)
            worker.model.require(task)
            return worker
        worker = self.workers.get(task)
        if worker is None:
            raise APIError(404, f"no model is configured for task {task!r}", None, "model_not_found")
        worker.model.require(task)
        return worker

    def health(self) -> dict[str, Any]:
        """Public state of this replica: model ids, kinds and tasks, batching statistics; no file paths."""
        return {"status": "ok", "uptime_s": round(time.time() - self.started, 1),
                "models": [worker.model.describe() for worker in self.distinct_workers()],
                "tasks": {**{task: worker.model.name for task, worker in self.workers.items()},
                          **self.config.task_adapters()},
                **({"adapters": {"configured": self.adapter_names(), "loaded": self.adapters.loaded(),
                                 "max_per_replica": self.config.max_adapters_per_replica}}
                   if self.adapters is not None else {}),
                "batching": self.stats.snapshot()}


def deployment_options(config: ServeConfig) -> dict[str, Any]:
    """The Serve deployment options a :class:`ServeConfig` asks for (replicas or autoscaling, queue, resources)."""
    from ray.serve.config import BackpressureConfig

    options: dict[str, Any] = {
        "max_ongoing_requests": config.max_ongoing_requests,
        "max_queued_requests": config.max_queued_requests,
        "backpressure_config": BackpressureConfig(status_code=503, retry_after_s=config.retry_after_s),
        "graceful_shutdown_timeout_s": config.graceful_shutdown_timeout_s,
        "ray_actor_options": {"num_cpus": config.num_cpus_per_replica, "num_gpus": config.num_gpus_per_replica},
    }
    return {**options, **config.replica_scaling()}


def build_app(model_path: Optional[str], serve_config: ServeConfig, tracking_uri: Optional[str] = None,
              host: Optional[str] = None, local_server: bool = False):
    """The Serve application for ``model_path`` (folder or registry URI) and ``serve_config.models``.

    ``host``: where Serve's HTTP proxies listen (default: :func:`serve_http_host`). A ConfigError when that is
    not a loopback address and there is no key (:meth:`ServeConfig.check_exposure`), or when
    ``serve.api_key_file`` cannot be read here; each replica reads that file again on its own node.
    ``local_server``: the app is ``raylm serve``'s own, which serves ``/playground`` by default on loopback
    (:meth:`ServeConfig.playground_enabled`); the replicas get the resolved value.
    """
    config = serve_config
    if model_path and model_path != config.model_path:
        config = config.model_copy(update={"model_path": model_path})
    if config.adapters and not config.model_path:
        raise ConfigError("config error: serve.adapters need their base model: give --model or serve.model_path")
    task_models = config.task_models()
    if not task_models:
        raise ValueError("nothing to serve: give a model (model_path) or serve.models")
    host = host if host is not None else serve_http_host()
    config.check_exposure(host)
    if config.engine == "vllm":
        return build_vllm_app(config.model_path, config, tracking_uri)
    config = config.model_copy(update={"playground": config.playground_enabled(host, local_server)})
    # Python mode keeps the API key a SecretStr (JSON mode would replace it by its mask).
    return RaylmServer.options(**deployment_options(config)).bind(task_models, config.model_dump(), tracking_uri)


def app_builder(args: dict[str, Any]):
    """Entry for ``serve run`` / ``serve deploy``: ``import_path: raylm.serving.app:app_builder``.

    ``args`` are ServeConfig keys (``model_path``, ``autoscaling``, ``max_batch_size``, ``api_key_file``, ...)
    plus an optional ``tracking_uri``; without ``api_key_file`` the key comes from ``$RAYLM_API_KEY_FILE`` or
    ``$RAYLM_API_KEY`` in the environment of the process that builds the app (on a cluster: Serve's, not the
    shell that ran ``serve deploy``). The HTTP host is the running Serve's (``http_options`` of the Serve
    config file); errors are :class:`AppConfigError`, one line in ``serve status``.
    """
    args = dict(args or {})
    tracking_uri = args.pop("tracking_uri", None)
    try:
        # Validated as the serve section of a job config: the same checks and messages as `raylm serve`.
        config = validate_config({"serve": args}).serve
        if not config.task_models():
            raise ConfigError("config error: serve args need model_path (a model folder or models:/name/version) "
                              "or models")
        return build_app(config.model_path, config, tracking_uri)
    except ConfigError as err:
        raise AppConfigError(str(err).replace("config error: serve.", "config error: serve args: ", 1)) from None


def check_model_references(config: ServeConfig, tracking_uri: Optional[str] = None) -> None:
    """Fail before deploying when a served model does not exist: a folder that is missing or holds no model
    raylm can load (FileNotFoundError, ModelLoadError), a registry URI that does not resolve (RegistryError);
    an adapter that is no LoRA adapter folder or was trained on another base than model_path (AdapterError)."""
    for reference in dict.fromkeys(config.task_models().values()):
        if reference.startswith("models:/"):
            get_model_version(tracking_uri, reference)
        elif not Path(reference).is_dir():
            raise FileNotFoundError(f"model folder not found: {reference}")
        else:
            model_kind(reference)
    if not config.adapters:
        return
    local_base = not config.model_path.startswith("models:/") and Path(config.model_path).is_dir()
    if local_base and model_kind(config.model_path) != "causal_lm":
        raise AdapterError(f"serve.adapters: the base model_path is a {model_kind(config.model_path)} model; "
                           "adapters are served on a causal language model")
    identities = base_identities(config.model_path) if local_base else None
    for name, reference in config.adapters.items():
        if reference.startswith("models:/"):
            get_model_version(tracking_uri, reference)  # its base is checked when a replica loads it
        elif not Path(reference).is_dir():
            raise FileNotFoundError(f"serve.adapters.{name}: adapter folder not found: {reference}")
        elif not is_adapter_folder(reference):
            raise AdapterError(f"serve.adapters.{name}: {reference} is not a LoRA adapter folder "
                               "(no adapter_config.json)")
        elif identities is not None:
            check_adapter_base(reference, identities, repr(name))


def verify_registered_models(config: ServeConfig, tracking_uri: Optional[str] = None) -> None:
    """Download each registry model ``config`` serves and check it against its recorded content hash.

    Called before Ray starts (``raylm serve``, ``raylm deploy``), so that weights changed after
    registration end the command with one line (:class:`~raylm.common.tracking.ModelIntegrityError`)
    instead of a replica that fails to start; every replica checks what it loads again.
    """
    for reference in dict.fromkeys(config.task_models().values()):
        if not reference.startswith("models:/"):
            continue
        scratch = tempfile.mkdtemp(prefix="raylm-verify-")
        try:
            model_kind(resolve_model_path(reference, tracking_uri, scratch))
        finally:
            shutil.rmtree(scratch, ignore_errors=True)


def start_serving(model_path: Optional[str], serve_config: ServeConfig, tracking_uri: Optional[str] = None,
                  blocking: bool = False, local_server: bool = False) -> str:
    """Start Serve on ``serve_config.host:port`` and deploy the app; returns the base URL. ``local_server``:
    see :func:`build_app` (``raylm serve``)."""
    config = serve_config.model_copy(update={"model_path": model_path}) if model_path else serve_config
    check_model_references(config, tracking_uri)
    serve.start(http_options={"host": serve_config.host, "port": serve_config.port})
    serve.run(build_app(model_path, serve_config, tracking_uri, local_server=local_server), name=APP_NAME,
              route_prefix=serve_config.route_prefix, blocking=blocking)
    return f"http://{serve_config.host}:{serve_config.port}{serve_config.route_prefix.rstrip('/')}"


def stop_serving(timeout_s: Optional[float] = None) -> None:
    """Drain and stop: delete the app (each replica finishes its in-flight requests first), then Serve."""
    try:
        if APP_NAME in serve.status().applications:
            serve.delete(APP_NAME)
    finally:
        serve.shutdown()


def serve_until_stopped(model_path: Optional[str], serve_config: ServeConfig,
                        tracking_uri: Optional[str] = None) -> str:
    """Deploy, then serve until SIGTERM or SIGINT; drain in-flight requests, stop Serve, return the signal's name.

    Ray's own SIGTERM handling in a driver dumps native stacks and exits non-zero;
    the handlers installed here replace it for the time the app is served.
    """
    stop = threading.Event()
    received: list[int] = []

    def request_stop(signum, _frame) -> None:
        received.append(signum)
        stop.set()

    serve_config.check_exposure(serve_config.host)  # before Serve starts; build_app checks the running Serve's
    previous = {signum: signal.signal(signum, request_stop) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        url = start_serving(model_path, serve_config, tracking_uri, local_server=True)
        if not stop.is_set():
            logger.info("serving %s at %s (Ctrl-C or SIGTERM to stop)", model_path or "serve.models", url)
            if serve_config.playground_enabled(serve_config.host, local_server=True):
                logger.info("playground: %s/playground", url)
        while not stop.wait(0.5):
            pass
        name = signal.Signals(received[0]).name
        logger.info("%s: draining in-flight requests, then stopping Serve", name)
        stop_serving()
        logger.info("stopped")
        return name
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
