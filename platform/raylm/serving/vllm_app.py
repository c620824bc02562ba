"""``serve.engine: vllm``: the same exported model folder served by vLLM through Ray Serve LLM.

raylm turns its serve config into one Ray Serve LLM ``LLMConfig`` (``ray.serve.llm``): the model folder
(a registry URI or an object-store folder is resolved and downloaded first, on the machine that builds
the app) is ``model_source``, ``serve.vllm.*`` become vLLM's ``engine_kwargs`` (passed through as they
are: vLLM checks them), and the replica count or autoscaling, the queue and the replicas' CPUs come from
the same ``serve.*`` keys as raylm's own engine. The OpenAI routes (``/v1/completions``,
``/v1/chat/completions`` with streaming, ``/v1/models``) are Ray Serve LLM's: its ingress deployment and
FastAPI app, as its ``build_openai_app`` makes them, with raylm's guard (API key, body size) in front and
raylm's ``/healthz`` beside them. raylm's task routes (``/v1/sentiment``, ``/v1/qa``, ``/v1/translate``)
are not served by this engine yet (docs/serving.md says what works).

``ray.serve.llm`` imports vLLM, which is an optional extra (``make install-vllm``): it is imported
when the app is built, so raylm's own engine never needs it.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any, Optional

from raylm.common import storage
from raylm.common.tracking import resolve_model_path
from raylm.compat.ray import llm_model_card, llm_openai_fastapi_app
from raylm.config import ConfigError, ServeConfig
from raylm.inference.task_model import public_model_name
from raylm.serving.guard import GuardMiddleware

logger = logging.getLogger(__name__)

VLLM_MISSING = ("config error: serve.engine vllm needs vLLM and Ray Serve LLM in this Python environment "
                "(make install-vllm; on GPU machines pip install vllm==0.29.0): {reason}")


def vllm_deployment_config(config: ServeConfig) -> dict[str, Any]:
    """Ray Serve LLM's ``deployment_config`` from the serve config: replicas or autoscaling, the queue, the
    replica's CPUs. GPUs are not here: Ray Serve LLM places one per tensor-parallel worker itself."""
    options: dict[str, Any] = {
        "max_ongoing_requests": config.max_ongoing_requests,
        "max_queued_requests": config.max_queued_requests,
        "graceful_shutdown_timeout_s": config.graceful_shutdown_timeout_s,
        "ray_actor_options": {"num_cpus": config.num_cpus_per_replica},
    }
    return {**options, **config.replica_scaling()}


def llm_config_args(model_folder: str | Path, model_id: str, config: ServeConfig) -> dict[str, Any]:
    """The ``LLMConfig`` (as a dict, so it can be checked without vLLM) that serves ``model_folder`` as
    ``model_id``: CPU replicas (vLLM's CPU build) when ``serve.num_gpus_per_replica`` is 0, else GPUs."""
    on_gpu = config.num_gpus_per_replica > 0
    args: dict[str, Any] = {
        "model_loading_config": {"model_id": model_id, "model_source": str(Path(model_folder).resolve())},
        "engine_kwargs": config.vllm.engine_kwargs(),
        "deployment_config": vllm_deployment_config(config),
        "accelerator_config": {"kind": "gpu" if on_gpu else "cpu"},
    }
    if config.vllm.accelerator_type is not None:
        args["accelerator_type"] = config.vllm.accelerator_type
    return args


def resolve_served_model(reference: str, tracking_uri: Optional[str] = None) -> tuple[Path, str]:
    """The local folder and public model id of ``reference`` (a folder, ``models:/...`` or an object-store
    folder). A registry model is downloaded here, into a folder removed when this process exits: vLLM
    reads the weights from this machine's disk (so, on a cluster, the app must be built where the replica
    runs or on a shared file system; see docs/serving.md)."""
    if reference.startswith("models:/") or storage.is_remote(reference):
        folder = resolve_model_path(reference, tracking_uri, str(storage.local_scratch("raylm-vllm-") / "model"))
    else:
        folder = resolve_model_path(reference, tracking_uri)
    name = reference if reference.startswith("models:/") else public_model_name(folder)
    return folder, name


class ReplicaGuard(GuardMiddleware):
    """raylm's guard (API key, then body size) in front of Ray Serve LLM's routes. Starlette builds it in the
    ingress replica at its first request, so the key (``serve.api_key_file``) is read on the replica's node,
    as raylm's own replicas read it."""

    def __init__(self, app, serve_config: dict[str, Any]):
        config = ServeConfig.model_validate(serve_config)
        super().__init__(app, api_key=config.api_key_value(), max_body_bytes=config.max_body_bytes)


def build_openai_ingress(llm_config: Any, config: ServeConfig):
    """What ``ray.serve.llm.build_openai_app`` builds for one model (Ray Serve LLM's ingress deployment, its
    OpenAI routes and middleware, over the model's ``LLMServer`` deployment), with raylm's guard outermost and
    ``GET /healthz`` (no key) on the same FastAPI app."""
    from ray import serve
    from ray.serve.llm import build_llm_deployment
    from ray.serve.llm.ingress import OpenAiIngress, make_fastapi_ingress

    model_id = llm_config.model_id
    api = llm_openai_fastapi_app()
    api.add_middleware(ReplicaGuard, serve_config=config.model_dump())  # added last: runs first

    @api.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "engine": "vllm", "models": [model_id]}

    ingress = make_fastapi_ingress(OpenAiIngress, app=api)
    options = OpenAiIngress.get_deployment_options([llm_config])
    # A router, like Serve's proxy and Ray Serve LLM's own request router: no CPU of its own. With Serve's default
    # of one, `raylm serve`'s local Ray (one replica's CPUs + 1) has none left for it once the engine's worker
    # takes its CPU, and the app never starts.
    options["ray_actor_options"] = {**options.get("ray_actor_options", {}), "num_cpus": 0}
    return serve.deployment(ingress, **options).bind(
        llm_deployments={model_id: build_llm_deployment(llm_config)},
        model_cards={model_id: llm_model_card(model_id, llm_config)}, lora_paths={})


def build_vllm_app(model_path: Optional[str], config: ServeConfig, tracking_uri: Optional[str] = None):
    """The Ray Serve LLM application (OpenAI routes over vLLM) for ``model_path`` or ``config.model_path``.

    A ConfigError (one line) when vLLM or Ray Serve LLM cannot be imported here, or when vLLM refuses an
    engine argument.
    """
    reference = model_path or config.model_path
    if not reference:
        raise ValueError("nothing to serve: give a model (model_path)")
    if importlib.util.find_spec("vllm") is None:  # before ray.serve.llm, which takes seconds to find out
        raise ConfigError(VLLM_MISSING.format(reason="no module named 'vllm'"))
    try:
        from ray.serve.llm import LLMConfig
    except ImportError as err:
        raise ConfigError(VLLM_MISSING.format(reason=err)) from None
    folder, model_id = resolve_served_model(reference, tracking_uri)
    llm_config = LLMConfig(**llm_config_args(folder, model_id, config))
    try:
        app = build_openai_ingress(llm_config, config)
    except ValueError as err:  # e.g. Ray Serve LLM's "Unknown engine argument: ..."
        raise ConfigError(f"config error: serve.vllm: {str(err).splitlines()[0]}") from None
    logger.info("serve.engine vllm: %s as %r, engine_kwargs %s", folder, model_id, llm_config.engine_kwargs)
    return app
