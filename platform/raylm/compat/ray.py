"""Ray's private and developer APIs that raylm uses, written for Ray 2.60 (see tests/unit/test_compat.py).

Each function names what it reaches for; when a Ray upgrade moves or removes
it, the function raises :class:`CompatError` saying which attribute is gone
and which Ray it was written for, instead of failing somewhere deep in a run.
Ray is imported inside the functions: this module sits at the bottom of
raylm's layers and must stay cheap to import.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, NamedTuple, Optional

WRITTEN_FOR = "2.60"


class CompatError(RuntimeError):
    """A private API raylm relies on is missing from the installed dependency."""


def _ray_version() -> str:
    import ray

    return getattr(ray, "__version__", "unknown")


def _gone(what: str) -> CompatError:
    return CompatError(f"raylm.compat: {what} is gone in Ray {_ray_version()} (written for {WRITTEN_FOR})")


def require_attribute(module: str, name: str) -> Any:
    """``module.name``, or a :class:`CompatError` naming it and the installed Ray when it is gone."""
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        raise _gone(f"{module}.{name}") from None


def job_config_env_var() -> str:
    """The environment variable in which Ray hands a submitted job's driver its job config (JSON).

    Ray keeps it in ``ray._private.runtime_env.constants.RAY_JOB_CONFIG_JSON_ENV_VAR``;
    its ``runtime_env`` field tells a driver what the submission already set.
    """
    return str(require_attribute("ray._private.runtime_env.constants", "RAY_JOB_CONFIG_JSON_ENV_VAR"))


def worker_group_callback_class() -> type:
    """Ray Train V2's ``WorkerGroupCallback`` base class (``ray.train.v2._internal.execution.callback``)."""
    return require_attribute("ray.train.v2._internal.execution.callback", "WorkerGroupCallback")


def worker_group_placement_group(worker_group) -> Any:
    """The placement group (``ray.util.placement_group.PlacementGroup``) of a started Ray Train worker group."""
    try:
        return worker_group.get_worker_group_state().placement_group_handle.placement_group
    except AttributeError:
        raise _gone("WorkerGroup.get_worker_group_state().placement_group_handle.placement_group") from None


def on_worker_group_start(record: Callable[[str], None]) -> Any:
    """A Ray Train ``RunConfig`` callback that calls ``record(placement group id, hex)`` each time the
    worker group of a run starts (Ray Train V2 creates that group from its controller, out of the driver's
    reach); ``record`` travels to the controller, so it must be picklable."""
    base = worker_group_callback_class()

    class RecordPlacementGroup(base):
        def after_worker_group_start(self, worker_group):
            record(worker_group_placement_group(worker_group).id.hex())

    if not hasattr(base, "after_worker_group_start"):
        raise _gone("WorkerGroupCallback.after_worker_group_start")
    return RecordPlacementGroup()


def placement_group_from_hex(group_id: str) -> Any:
    """A ``PlacementGroup`` handle for the id :func:`on_worker_group_start` recorded (hex), e.g. to remove it.

    Ray has no public constructor from an id; it takes ``ray._raylet.PlacementGroupID``.
    """
    from ray.util.placement_group import PlacementGroup

    placement_group_id = require_attribute("ray._raylet", "PlacementGroupID")
    return PlacementGroup(placement_group_id(bytes.fromhex(group_id)))


class RunStorage(NamedTuple):
    """Where a Ray Train run keeps its checkpoints: a pyarrow file system and the run's folder on it."""

    filesystem: Any
    path: str


def run_storage(train_context) -> RunStorage:
    """The storage of the run a Ray Train worker belongs to (``train_context``: ``ray.train.get_context()``).

    ``TrainContext.get_storage()`` is a DeveloperAPI returning Ray's internal
    ``StorageContext``, whose interface "may change without notice between minor
    versions"; raylm reads its ``storage_filesystem`` and ``experiment_fs_path``.
    """
    try:
        storage = train_context.get_storage()
        return RunStorage(storage.storage_filesystem, str(storage.experiment_fs_path))
    except AttributeError:
        raise _gone("TrainContext.get_storage().storage_filesystem / .experiment_fs_path") from None


def result_grid_trials(result_grid) -> list:
    """The Tune trials of a ``ResultGrid``, in the grid's order (each with ``trial_id`` and ``status``).

    ``ResultGrid`` exposes results, not trials; the trials (and their status, which
    tells a stopped trial from an interrupted one) sit in ``_experiment_analysis``.
    """
    try:
        return list(result_grid._experiment_analysis.trials)
    except AttributeError:
        raise _gone("ResultGrid._experiment_analysis.trials") from None


# Ray Serve's HAProxy ingress (ray/serve/_private/haproxy.py and haproxy_templates.py): the ports of its stats
# page and Prometheus exporter come from these variables, with these defaults when they are unset.
HAPROXY_MONITOR_PORTS: dict[str, int] = {"RAY_SERVE_HAPROXY_STATS_PORT": 8404, "RAY_SERVE_HAPROXY_METRICS_PORT": 9101}


def haproxy_bind_rewrite(port: str, host: str = "127.0.0.1") -> str:
    """A ``sed -E`` expression that moves the ``bind`` line of HAProxy's configuration on ``port`` to ``host``.

    Ray 2.60 renders HAProxy's stats page as ``listen stats`` / ``bind *:<stats port>`` and its
    Prometheus exporter as ``frontend prometheus`` / ``bind :<metrics port>``
    (``HAPROXY_CONFIG_TEMPLATE``): every interface, with no setting for the address. The
    expression matches a ``bind`` on ``port`` whatever its address (``*``, empty, ``0.0.0.0``,
    ``[::]``), so a template that changes the address form is still caught. ``port`` may be a
    shell variable (``$stats``): the launcher expands it inside double quotes, hence ``\\$``.
    """
    return rf"s/^([[:space:]]*bind[[:space:]]+)[^[:space:]]*:{port}([[:space:]]|\$)/\1{host}:{port}\2/"


def running_serve_http_host() -> tuple[bool, Optional[str]]:
    """``(True, host)`` for the Serve instance running on the Ray this process is connected to (``host`` None
    when its HTTP proxies are off); ``(False, None)`` when this process has no Ray connection or no Serve runs.

    Serve has no public API for the HTTP options of a running instance (a Serve config's
    ``http_options`` go to the controller, not to the app builder): raylm asks the controller
    through Serve's cached controller client, ``ray.serve.context._get_global_client``, whose
    ``http_config`` is the controller's ``get_http_config()``. Ray is never started here.
    """
    import ray

    if not ray.is_initialized():
        return False, None
    get_client = require_attribute("ray.serve.context", "_get_global_client")
    client = get_client(raise_if_no_controller_running=False)
    if client is None:
        return False, None
    try:
        return True, client.http_config.host
    except AttributeError:
        raise _gone("ServeControllerClient.http_config.host") from None


def llm_openai_fastapi_app() -> Any:
    """The FastAPI app Ray Serve LLM's ``build_openai_app`` puts its OpenAI routes on, with its middleware
    (OpenAI-shaped JSON errors, CORS, request ids, HTTP metrics): ``init()`` in
    ``ray.llm._internal.serve.core.ingress.ingress``. raylm adds its guard and ``/healthz`` to it and hands it
    to the public ``ray.serve.llm.ingress.make_fastapi_ingress(..., app=)``. Needs vLLM installed."""
    return require_attribute("ray.llm._internal.serve.core.ingress.ingress", "init")()


def llm_model_card(model_id: str, llm_config: Any) -> Any:
    """The ``ModelCard`` ``/v1/models`` lists for ``llm_config`` (what ``build_openai_app`` binds as
    ``model_cards``): ``to_model_metadata`` in ``ray.llm._internal.serve.core.configs.openai_api_models``."""
    return require_attribute("ray.llm._internal.serve.core.configs.openai_api_models",
                             "to_model_metadata")(model_id, llm_config)
