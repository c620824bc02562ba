"""cluster.yaml (AWS) and cluster-gcp.yaml: Ray's own autoscaler validation, plus what raylm needs of them.

``prepare_config`` + ``validate_config`` is what `ray up` runs before it asks the
cloud for anything: defaults filled in, the JSON schema, node types and worker
counts checked. On top: a head that runs no training, CPU, 1-GPU and 8-GPU
groups that scale from zero, the Ray 2.60 / Python 3.11 GPU image, raylm
installed from the working tree, token authentication on every node, the
dashboard on 127.0.0.1 only, a bucket for runs and MLflow artifacts, an MLflow
server that answers no one without the cluster's credentials, and nodes whose
cloud identities reach only the run bucket's prefixes (deploy/iam).
"""

import configparser
import copy
import json
import re
import subprocess

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
    assert f"deploy/mlflow/server.sh {bucket}/mlflow" in head_start
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


def _mlflow_server_commands(commands: list[str]) -> list[str]:
    """Every `mlflow server` command line the head runs, with deploy/mlflow/server.sh read for its own."""
    found = [command for command in commands if "mlflow server" in command and "pkill" not in command]
    if any("deploy/mlflow/server.sh" in command for command in commands):
        script = (REPO_ROOT / "deploy" / "mlflow" / "server.sh").read_text().replace("\\\n", " ")
        found += [line for line in script.splitlines() if line.strip().startswith("exec mlflow server")]
    return found


@pytest.mark.parametrize("name", CLUSTER_FILES)
def test_the_mlflow_server_answers_no_one_without_credentials(name):
    config = _load(name)
    servers = _mlflow_server_commands(config["head_start_ray_commands"])
    assert servers, "no MLflow server on the head"
    for command in servers:
        loopback = re.search(r"--host\s+127\.0\.0\.1", command)
        assert loopback or "--app-name basic-auth" in command, f"MLflow on the network without auth: {command}"
        assert "PASSWORD" not in command.upper().replace("MLFLOW_TRACKING_PASSWORD", "")  # never on a command line
    # Every Ray process (drivers on the head; Train workers, eval actors and Serve replicas on the workers)
    # gets the credentials: sourced before `ray start`, whose processes inherit the environment.
    for role in ("head_start_ray_commands", "worker_start_ray_commands"):
        (ray_start,) = [command for command in config[role] if "ray start" in command]
        assert ray_start.index(". ~/raylm/deploy/mlflow/credentials.sh &&") < ray_start.index("ray start"), role
    auth = configparser.ConfigParser()
    auth.read(REPO_ROOT / "deploy" / "mlflow" / "basic_auth.ini")
    assert auth["mlflow"]["default_permission"] == "NO_PERMISSIONS"
    assert "admin_password" not in auth["mlflow"]  # from the environment, derived from the Ray token


def _policy(name):
    return json.loads((REPO_ROOT / "deploy" / "iam" / name).read_text())


def _as_list(value):
    return value if isinstance(value, list) else [value]


def _check_s3_scope(policy, prefixes):
    """s3 only on the run bucket's ``prefixes``: objects under them, listing with a prefix condition."""
    bucket = "arn:aws:s3:::raylm-runs"
    seen = set()
    for statement in policy["Statement"]:
        assert statement["Effect"] == "Allow"
        actions = _as_list(statement["Action"])
        assert "*" not in actions and "s3:*" not in actions
        s3_actions = [action for action in actions if action.startswith("s3:")]
        if not s3_actions:
            continue
        resources = _as_list(statement["Resource"])
        assert "*" not in resources and all(resource.startswith(bucket) for resource in resources), statement
        if resources == [bucket]:  # the bucket itself: its region, or a listing limited to the prefixes
            if s3_actions == ["s3:ListBucket"]:
                listed = _as_list(statement["Condition"]["StringLike"]["s3:prefix"])
                assert {item.split("/")[0] for item in listed} == set(prefixes)
                assert all(item in (p, f"{p}/*") for item in listed for p in [item.split("/")[0]])
            else:
                assert s3_actions == ["s3:GetBucketLocation"], statement
            continue
        for resource in resources:
            prefix = resource[len(bucket) + 1:].split("/")[0]
            assert resource in (f"{bucket}/{prefix}", f"{bucket}/{prefix}/*") and prefix in prefixes, resource
            seen.add(prefix)
    assert seen == set(prefixes)


def test_aws_nodes_use_instance_profiles_scoped_to_the_run_bucket():
    config = _load("cluster.yaml")
    types = config["available_node_types"]
    assert types["head"]["node_config"]["IamInstanceProfile"] == {"Name": "raylm-head"}
    for name, spec in types.items():
        if name != "head":
            assert spec["node_config"]["IamInstanceProfile"] == {"Name": "raylm-worker"}, name
    trust = _policy("aws-ec2-trust.json")
    assert [s["Principal"] for s in trust["Statement"]] == [{"Service": "ec2.amazonaws.com"}]
    worker = _policy("aws-worker-policy.json")
    _check_s3_scope(worker, ["runs", "corpora"])  # MLflow artifacts go through the server, not to S3
    assert {a.split(":")[0] for s in worker["Statement"] for a in _as_list(s["Action"])} == {"s3"}
    head = _policy("aws-head-policy.json")
    _check_s3_scope(head, ["runs", "mlflow", "corpora"])
    for statement in head["Statement"]:
        actions = _as_list(statement["Action"])
        if "iam:PassRole" in actions:
            assert actions == ["iam:PassRole"] and statement["Resource"] == "arn:aws:iam::*:role/raylm-worker"
        if {"ec2:TerminateInstances", "ec2:StopInstances", "ec2:StartInstances"} & set(actions):
            tag = statement["Condition"]["StringEquals"]["ec2:ResourceTag/ray-cluster-name"]
            assert tag == config["cluster_name"]
        assert {a.split(":")[0] for a in actions} <= {"s3", "ec2", "iam"}
        assert all(not a.endswith("*") or a == "ec2:Describe*" for a in actions), actions
    granted = {a for s in head["Statement"] for a in _as_list(s["Action"])}
    assert {"ec2:RunInstances", "ec2:TerminateInstances", "ec2:CreateTags", "ec2:Describe*"} <= granted


def test_gcp_nodes_use_service_accounts_scoped_to_the_run_bucket():
    config = _load("cluster-gcp.yaml")
    project = config["provider"]["project_id"]
    for name, spec in config["available_node_types"].items():
        (account,) = spec["node_config"]["serviceAccounts"]
        role = "raylm-head" if name == "head" else "raylm-worker"
        assert account["email"] == f"{role}@{project}.iam.gserviceaccount.com", name
    autoscaler = yaml.safe_load((REPO_ROOT / "deploy" / "iam" / "gcp-autoscaler-role.yaml").read_text())
    assert all(p.startswith("compute.") and "*" not in p for p in autoscaler["includedPermissions"])
    setup = REPO_ROOT / "deploy" / "iam" / "gcp-setup.sh"
    assert subprocess.run(["bash", "-n", str(setup)]).returncode == 0
    script = setup.read_text()
    # Object roles only through prefix(), whose binding carries the prefix condition; never project-wide.
    object_grants = [line for line in script.splitlines() if "roles/storage.object" in line]
    assert object_grants and all(line.strip().startswith("prefix ") for line in object_grants)
    assert 'resource.name.startsWith(\\"projects/_/buckets/${bucket}/objects/$3/\\")' in script
    assert re.search(r"service-accounts add-iam-policy-binding \"\$worker\"", script)  # actAs on the worker only
