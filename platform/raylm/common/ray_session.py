"""Starting or joining the Ray a run uses, with raylm's environment in every worker."""

from __future__ import annotations

import logging
import math
import os
from typing import Mapping, Optional

from raylm.common import cluster
from raylm.common.logging import VERBOSE_ENV_VAR, WORKER_SETUP_HOOK, is_verbose
from raylm.config import JobConfig

logger = logging.getLogger(__name__)

WORKER_ENV_VARS = {"RAY_USAGE_STATS_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false"}


def worker_env_vars() -> dict[str, str]:
    """:data:`WORKER_ENV_VARS`, plus ``--verbose`` when this process was given it."""
    return {**WORKER_ENV_VARS, **({VERBOSE_ENV_VAR: "1"} if is_verbose() else {})}


def ensure_ray(job: JobConfig, extra_env: Optional[Mapping[str, str]] = None) -> None:
    """Connect to ``RAY_ADDRESS`` if set, else start a local Ray sized for the run.

    On a cluster (a submitted job has ``RAY_ADDRESS`` set) this process's own
    raylm package travels to every worker in the job's runtime environment
    (:mod:`raylm.common.cluster`), so no worker imports an older installed copy.
    ``extra_env`` goes into the environment of a local Ray this call starts (a
    caller that will run Serve on it passes Serve's ingress settings); a Ray
    that is already running, or a cluster, keeps its own.
    """
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Serve's proxy must import FastAPI and friends within its readiness check; on a busy
    # 2-core laptop the 5 s default is too short and the proxy is killed and restarted.
    os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        # Only what the submitted job's runtime env lacks (nothing, for a `raylm submit` job). The code
        # fingerprint is taken before ray.init uploads the package, which it then describes.
        fingerprint = cluster.code_fingerprint()
        runtime_env = cluster.runtime_env_for_cluster(worker_env_vars(), WORKER_SETUP_HOOK)
        ray.init(address=address, runtime_env=runtime_env or None)
        cluster.mark_connected()
        logger.info(f"connected to Ray at {address}; workers run this job's raylm (code {fingerprint})")
        return
    # Logical CPUs: the training workers, plus room for Ray Data tasks and a Serve replica.
    num_cpus = int(job.train.num_workers * job.train.cpus_per_worker) + 2
    # ... or room for every replica the serve config may start (autoscaling up to max_replicas), and the proxy.
    max_replicas = job.serve.autoscaling.max_replicas if job.serve.autoscaling else job.serve.num_replicas
    num_cpus = max(num_cpus, math.ceil(max_replicas * job.serve.num_cpus_per_replica) + 1)
    # The local Ray's processes inherit this process's environment.
    os.environ.update(extra_env or {})
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True,
             runtime_env={"env_vars": worker_env_vars(), "worker_process_setup_hook": WORKER_SETUP_HOOK})
    logger.info(f"started a local Ray with {num_cpus} logical CPUs")
