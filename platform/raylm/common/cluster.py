"""Running raylm on a Ray cluster: shipping the code to every worker, and checks before workers start.

A job submitted to a cluster must run the code that was submitted, on the
driver and on every worker: the nodes may have an older raylm installed (the
one baked into the image at ``ray up`` time). :func:`runtime_env_for_cluster`
adds this process's own ``raylm`` package to the job's runtime environment
(``py_modules``), which Ray puts ahead of site-packages on every worker; the
training workers then compare :func:`code_fingerprint` with the driver's and
stop with a clear message if they imported something else.

:func:`check_storage_and_tracking` refuses, before any worker starts, the
settings that lose a run on a cluster: a relative workdir inside Ray's
temporary copy of the working directory, and a local MLflow store (SQLite or
files) when the training workers may run on other nodes.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from pathlib import Path
from typing import Any

import raylm
from raylm.common import storage
from raylm.compat.ray import job_config_env_var
from raylm.common.fingerprints import fingerprint_folder
from raylm.common.pretrained import context_length, locate_checkpoint, vocabulary_mismatch
from raylm.config import ConfigError, JobConfig
from raylm.config.redaction import redact_uri

logger = logging.getLogger(__name__)

# What a job's working folder upload leaves out (also used by `raylm submit`).
UPLOAD_EXCLUDES = (".git", ".venv", "venv", "runs", "mlruns", "mlflow.db", "*.db", "__pycache__", "*.pyc",
                   ".pytest_cache", ".mypy_cache", ".ruff_cache", "*.egg-info", "build", "dist", ".raylm",
                   "node_modules", "*.safetensors", "*.parquet")
# Where Ray keeps a string worker_process_setup_hook once a runtime env has been submitted.
SETUP_HOOK_ENV_VAR = "__RAY_WORKER_PROCESS_SETUP_HOOK_ENV_VAR"
TRACKING_SERVER_SCHEMES = ("http://", "https://", "databricks", "postgresql", "mysql", "mssql")


def package_dir() -> Path:
    """The folder of the ``raylm`` package this process imported."""
    return Path(raylm.__file__).resolve().parent


@functools.lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """:func:`fingerprint_folder` of the raylm package this process imported (computed once)."""
    return fingerprint_folder(package_dir())


def check_worker_code(expected: str | None) -> None:
    """Fail a training worker whose raylm is not the driver's (``expected``: the driver's fingerprint)."""
    if expected and code_fingerprint() != expected:
        raise RuntimeError(
            f"this worker imported raylm from {package_dir()} (code {code_fingerprint()}), not the code the "
            f"driver runs ({expected}): submit with `raylm submit` or `python jobs/<entrypoint>.py`, which ship "
            "the submitted raylm to every worker")


def submitted_job_runtime_env() -> dict[str, Any]:
    """The runtime environment this driver's job was submitted with ({} outside a submitted job)."""
    raw = os.environ.get(job_config_env_var())
    if not raw:
        return {}
    try:
        return dict(json.loads(raw).get("runtime_env") or {})
    except (ValueError, AttributeError):
        return {}


def runtime_env_for_cluster(env_vars: dict[str, str], setup_hook: str | None) -> dict[str, Any]:
    """The runtime env a driver passes to ``ray.init(address=...)``: this process's raylm as a py_module.

    Ray refuses to merge a driver's runtime env with the submitted job's when
    both set the same field or environment variable, so fields the job already
    sets are left to it (``raylm submit`` sets ``py_modules`` itself).
    """
    submitted = submitted_job_runtime_env()
    runtime_env: dict[str, Any] = {}
    if "py_modules" not in submitted:
        runtime_env["py_modules"] = [str(package_dir())]
        if "excludes" not in submitted:
            runtime_env["excludes"] = ["__pycache__", "*.pyc"]
    taken = set((submitted.get("env_vars") or {}).keys())
    free_vars = {key: value for key, value in env_vars.items() if key not in taken}
    if free_vars:
        runtime_env["env_vars"] = free_vars
    hook_given = "worker_process_setup_hook" in submitted or SETUP_HOOK_ENV_VAR in taken
    if setup_hook and not hook_given:
        runtime_env["worker_process_setup_hook"] = setup_hook
    return runtime_env


def in_ray_working_dir_copy(cwd: str | os.PathLike | None = None) -> bool:
    """True when this process runs in Ray's unpacked copy of a job's working directory.

    Ray unpacks ``--working-dir`` under its session folder
    (``.../runtime_resources/working_dir_files/_ray_pkg_<hash>``) and deletes it
    when the session ends.
    """
    parts = Path(cwd or os.getcwd()).resolve().parts
    return "working_dir_files" in parts or any(part.startswith("_ray_pkg_") for part in parts)


def is_local_tracking_uri(uri: str | None) -> bool:
    """True for an MLflow store only this machine can open (an SQLite file, a file store)."""
    if not uri:
        return False
    return not uri.startswith(TRACKING_SERVER_SCHEMES)


def workers_may_leave_this_node(num_workers: int, resources_per_worker: dict[str, float]) -> bool:
    """Whether the training workers may run on another node than this driver's.

    True on a cluster of several live nodes, and on one whose driver node
    cannot hold all the workers (a head node that runs no training, with the
    autoscaler adding workers later). Needs a connected Ray.
    """
    import ray

    alive = [node for node in ray.nodes() if node.get("Alive")]
    if len(alive) > 1:
        return True
    here = ray.get_runtime_context().get_node_id()
    local = next((node for node in alive if node.get("NodeID") == here), None)
    if local is None:
        return True
    capacity = local.get("Resources", {})
    return any(capacity.get(name, 0.0) < amount * num_workers for name, amount in resources_per_worker.items())


def check_workdir(job: JobConfig) -> None:
    """Refuse a relative workdir inside Ray's temporary copy of the job's working directory."""
    if storage.is_remote(job.workdir) or Path(job.workdir).expanduser().is_absolute() \
            or job.workdir.startswith("file://"):
        return
    if in_ray_working_dir_copy():
        raise ConfigError(
            f"config error: workdir: {job.workdir!r} is relative, and this job runs in Ray's temporary copy of its "
            "working directory, which Ray deletes; set workdir to an s3:// or gs:// URI or to an absolute path on "
            "a shared file system (e.g. workdir=s3://my-bucket/raylm)")


def check_tracking(job: JobConfig, spans_nodes: bool) -> None:
    """Refuse tracking settings that cannot work for this run (before any worker starts)."""
    if not job.tracking.enabled:
        return
    uri = job.resolved_tracking_uri()
    if uri is None:
        raise ConfigError(
            f"config error: tracking.tracking_uri: workdir {job.workdir} is remote and an SQLite file cannot live "
            "there; give an MLflow server (tracking.tracking_uri=http://host:5000 or $MLFLOW_TRACKING_URI) or set "
            "tracking.enabled=false")
    if spans_nodes and is_local_tracking_uri(uri):
        raise ConfigError(
            f"config error: tracking.tracking_uri: {redact_uri(uri)} is a local MLflow store, but the training workers "
            "run on several nodes; give an MLflow server (tracking.tracking_uri=http://host:5000 or "
            "$MLFLOW_TRACKING_URI)")


def check_local_inputs(job: JobConfig) -> None:
    """Fail on a lost workdir, unusable tracking and missing local folders, before any cluster resource is taken."""
    check_workdir(job)
    if job.tracking.enabled and job.resolved_tracking_uri() is None:
        check_tracking(job, spans_nodes=False)
    if job.data.tokenizer_path and "://" not in job.data.tokenizer_path and not Path(job.data.tokenizer_path).exists():
        raise FileNotFoundError(f"data.tokenizer_path: folder not found: {job.data.tokenizer_path}")
    if job.model.init_from and "://" not in job.model.init_from:
        try:
            checkpoint = locate_checkpoint(job.model.init_from)  # a transformers folder or a .gguf file
        except (FileNotFoundError, ValueError) as err:
            raise FileNotFoundError(f"model.init_from: {err}") from None
        context = context_length(checkpoint)
        if context is not None and job.data.seq_len > context:
            raise ConfigError(f"config error: data.seq_len: {job.data.seq_len} tokens exceed the context of "
                              f"model.init_from ({context} tokens)")
        if job.data.tokenizer_path and "://" not in job.data.tokenizer_path:
            mismatch = vocabulary_mismatch(checkpoint, job.data.tokenizer_path)
            if mismatch:
                raise ConfigError(f"config error: data.tokenizer_path: {mismatch}")


def check_storage_and_tracking(job: JobConfig) -> None:
    """The checks a connected driver runs before it prepares data or starts workers.

    A local workdir on a run spanning nodes only warns: it is right on a shared
    file system mounted at the same path on every node, which cannot be told
    from here.
    """
    import ray

    check_workdir(job)
    resources = {"CPU": job.train.cpus_per_worker, **({"GPU": 1.0} if job.train.use_gpu else {})}
    spans_nodes = ray.is_initialized() and workers_may_leave_this_node(job.train.num_workers, resources)
    check_tracking(job, spans_nodes)
    if spans_nodes and not job.storage_is_remote:
        logger.warning(f"workdir {storage.normalize(job.workdir)} is a local path and the workers may run on other "
            "nodes: it must be a shared file system mounted at the same path everywhere (or use s3:// / gs://)")


_connected_to_cluster = False


def mark_connected() -> None:
    """Record that this driver joined an existing cluster (its workers must run this process's raylm)."""
    global _connected_to_cluster
    _connected_to_cluster = True


def expected_worker_code() -> str | None:
    """The fingerprint training workers must match: this process's code on a cluster, else None.

    A local Ray started by this process runs its workers from the same files,
    so there is nothing to compare (and an edit during a local run is no error).
    """
    return code_fingerprint() if _connected_to_cluster else None
