"""cluster.yaml (AWS) and cluster-gcp.yaml: Ray's own autoscaler validation, plus what raylm needs of them.

``prepare_config`` + ``validate_config`` is what `ray up` runs before it asks the
cloud for anything: defaults filled in, the JSON schema, node types and worker
counts checked. On top: a head that runs no training, CPU, 1-GPU and 8-GPU
groups that scale from zero, the Ray 2.60 / Python 3.11 GPU image, raylm
installed from the working tree, token authentication on every node, the
dashboard on 127.0.0.1 only, and a bucket for runs and MLflow artifacts.
"""

import copy
import re

import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from tests.conftest import REPO_ROOT

CLUSTER_FILES = ["cluster.yaml", "cluster-gcp.yaml"]


def _load(name):
    return yaml.safe_load((REPO_ROOT / name).read_text())


@pytest.mark.parametrize("name", CLUSTER_FILES)
def test_ray_autoscaler_accepts_the_cluster_file(name):
    config = _load(name)
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    assert prepared["head_node_type"] == "head"


@pytest.mark.parametrize("name", CLUSTER_FILES)
def test_node_groups(name):
    config = _load(name)
    types = config["available_node_types"]
    assert types["head"]["resources"] == {"CPU": 0}  # the head coordinates and never trains
    workers = {name: spec for name, spec in types.items() if name != "head"}
    assert all(spec["min_workers"] == 0 and spec["max_workers"] >= 1 for spec in workers.values())
    gpus = sorted(spec["resources"].get("GPU", 0) for spec in workers.values())
    assert gpus == [0, 1, 8]  # a CPU group, a 1-GPU group and an 8-GPU group
    assert config["idle_timeout_minutes"] > 0
    assert config["max_workers"] >= sum(spec["max_workers"] for spec in workers.values())


@pytest.mark.parametrize("name", CLUSTER_FILES)
def test_image_install_auth_dashboard_and_bucket(name):
    config = _load(name)
    major_minor = ".".join(ray.__version__.split(".")[:2])
    assert re.fullmatch(rf"rayproject/ray:{re.escape(major_minor)}\.\d+-py311-gpu", config["docker"]["image"])
    # raylm from the working tree.
    assert config["file_mounts"]["~/raylm"] == "."
    assert any("pip install" in command and "~/raylm" in command for command in config["setup_commands"])
    # Token authentication on every node, with the token file mounted where Ray looks for it.
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    # Serve's API key file on every node, where serve/config_gpu.yaml (0.0.0.0) names it.
    assert config["file_mounts"]["~/.raylm/api_key"] == "~/.raylm/api_key"
    gpu_app = yaml.safe_load((REPO_ROOT / "serve" / "config_gpu.yaml").read_text())["applications"][0]
    assert gpu_app["args"]["api_key_file"] == "~/.raylm/api_key"
    starts = {"head": config["head_start_ray_commands"], "worker": config["worker_start_ray_commands"]}
    for role, commands in starts.items():
        ray_start = [command for command in commands if "ray start" in command]
        assert ray_start and all("RAY_AUTH_MODE=token" in command for command in ray_start), role
    head_start = " ".join(starts["head"])
    assert "--dashboard-host=127.0.0.1" in head_start and "0.0.0.0 --autoscaling" not in head_start
    # Runs and MLflow artifacts in the bucket; jobs reach the MLflow server on the head.
    bucket = "s3://raylm-runs" if config["provider"]["type"] == "aws" else "gs://raylm-runs"
    assert f"--artifacts-destination {bucket}/mlflow" in head_start
    assert "MLFLOW_TRACKING_URI=http://" in head_start
    assert "MLFLOW_TRACKING_URI=http://$RAY_HEAD_IP:5000" in " ".join(starts["worker"])


def test_gpu_job_configs_use_the_cluster_bucket_and_groups():
    from raylm.config import load_config

    for name in ("gpt2_small_8gpu", "llama_1b"):
        job = load_config(REPO_ROOT / "jobs" / "configs" / f"{name}.yaml")
        assert job.workdir.startswith("s3://raylm-runs/")
        assert job.train.use_gpu and job.train.num_workers == 8  # one gpu8_worker node
        assert job.train.parallel == "fsdp" and job.train.precision == "bf16"
        assert job.tracking.tracking_uri is None  # the cluster's MLFLOW_TRACKING_URI
    small = load_config(REPO_ROOT / "jobs" / "configs" / "gpt2_small_8gpu.yaml")
    assert (small.model.arch, small.model.size) == ("gpt2", "small")
    llama = load_config(REPO_ROOT / "jobs" / "configs" / "llama_1b.yaml")
    assert (llama.model.arch, llama.model.size) == ("llama", "1b") and llama.train.activation_checkpointing
