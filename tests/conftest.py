"""Shared fixtures, each started once per test run (the local Ray once per pytest-xdist worker): a local Ray,
an MLflow server, Serve's HTTP port, a tiny model folder, two tiny runs trained against the MLflow server, and
the paths to the shared data.

Modules that need a Ray of their own (the CLI's subprocesses, the two-node cluster) start it themselves.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")
# Ray Train's preemption watcher (an actor per run that polls for spot-node drain notices) guards nothing these
# tests check (node loss is detected by Ray's health checks): off, it saves about 95 of the suite's ~3,600
# CPU-seconds (its ~31 actors, measured over a whole `make test`). Every Ray the tests start inherits this.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
if "PYTEST_XDIST_WORKER" in os.environ:
    # Two workers share two cores with their Ray processes: torch in each test process (and in the CLI runs it
    # starts) keeps to one thread, as raylm's Ray workers already do, instead of spinning against the other.
    os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
# Serve keeps the HTTP port of whoever starts it first in a Ray session: every in-process Serve test uses this
# one, so that Serve (controller, proxy, ingress) starts once per run and each module deploys and deletes
# only its own applications.
# RAYLM_TEST_PORT_OFFSET moves both, for two test runs side by side on one machine; each pytest-xdist worker
# (gw0, gw1, ...) adds 5 more per worker number.
_XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
_PORT_OFFSET = int(os.environ.get("RAYLM_TEST_PORT_OFFSET", "0")) + 5 * int(_XDIST_WORKER.removeprefix("gw") or 0)
SERVE_PORT = 8210 + _PORT_OFFSET
MLFLOW_SERVER_PORT = 8460 + _PORT_OFFSET


@pytest.fixture(scope="session")
def ray_session():
    """A real local Ray for the whole session (4 logical CPUs on this 2-core machine)."""
    import ray

    if not ray.is_initialized():
        from raylm.serving.ingress import set_ingress_env

        set_ingress_env("haproxy")  # the default serve.ingress
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"RAY_USAGE_STATS_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false"}})
    yield ray
    try:
        from ray import serve

        serve.shutdown()
    except Exception:
        pass
    ray.shutdown()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """One real ``mlflow server`` per test run: its own process group, SQLite backend, artifacts served over
    HTTP, 127.0.0.1. Tests share it, so each uses its own experiment and model names."""
    from tests.integration.local_cluster import kill_group, start_mlflow_server

    root = tmp_path_factory.mktemp("mlflow-server")
    env = {key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"}
    process = start_mlflow_server(MLFLOW_SERVER_PORT, root, str(root / "artifacts"), env, timeout_s=600)
    try:
        yield f"http://127.0.0.1:{MLFLOW_SERVER_PORT}"
    finally:
        kill_group(process, grace_s=5)  # SIGKILL after 5 s: it can take a minute to stop on SIGTERM


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny causal-LM model folder (debug GPT-2, BPE tokenizer), built once per run; tests only read it."""
    from tests.model_folders import build_tiny_model_folder

    return build_tiny_model_folder(tmp_path_factory.mktemp("tiny-model") / "model")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA


@pytest.fixture(scope="session")
def server_runs(ray_session, mlflow_server, tmp_path_factory):
    """A short and a long tiny GPT-2 run, trained and registered against the run's MLflow server, once per
    test run (tests/server_runs.py); the registry-server and train-pipeline tests both read them."""
    from tests.server_runs import train_server_runs

    return train_server_runs(mlflow_server, tmp_path_factory.mktemp("server-runs"))


# `make test` runs the suite on two pytest-xdist workers (TEST_WORKERS=0: one process; a single process leaves
# a core idle while Ray, Serve, MLflow and CLI subprocesses start and stop). Each module runs whole on one
# worker, so its module fixtures start once; the modules that read the
# trained `server_runs` share a worker, so the runs (and the MLflow server) start once; and the slowest modules
# start first, so that the two workers finish together.
_SHARED_WORKER = {"test_registry_server": "server_runs", "test_train_pipeline": "server_runs"}
_SLOWEST_FIRST = ["test_tune_sweep", "test_cluster", "test_registry_server", "test_train_pipeline", "test_cli",
                  "test_registry_encoders", "test_pretrained_decoder", "test_recipes_sst2",
                  "test_run_identity_cli", "test_prepared_resume", "test_train_checkpoints", "test_train_lora",
                  "test_train_tensor_parallel", "test_train_elastic",
                  "test_serving", "test_serve_adapters", "test_train_parallel", "test_serving_cli", "test_registry_export",
                  "test_serve_deploy_auth", "test_playground", "test_data_pipeline"]


def _module_rank(item) -> int:
    name = item.path.stem
    return _SLOWEST_FIRST.index(name) if name in _SLOWEST_FIRST else len(_SLOWEST_FIRST)


def pytest_collection_modifyitems(config, items):
    if "PYTEST_XDIST_WORKER" in os.environ:
        items.sort(key=_module_rank)  # stable: a module's own tests keep their order


if importlib.util.find_spec("xdist") is not None:
    def pytest_xdist_make_scheduler(config, log):
        """Work units are modules (``--dist loadfile``), except that the server-runs modules are one unit.
        (``--dist loadgroup`` would say this with marks, but it does not group under pytest 9.)"""
        from xdist.scheduler import LoadScopeScheduling

        class ModuleScheduling(LoadScopeScheduling):
            def _split_scope(self, nodeid: str) -> str:
                path = nodeid.split("::", 1)[0]
                return _SHARED_WORKER.get(Path(path).stem, path)

        return ModuleScheduling(config, log)
