"""raylm on a real two-node Ray cluster on this machine, with token authentication, S3 and an MLflow server.

Started once for the module, every process in its own process group and torn
down at the end: an S3 API (moto's server), an MLflow tracking server whose
artifacts go to that S3, a head started with `ray start --head` and a second
node started with `ray start --address`, both with `RAY_AUTH_MODE=token` and a
token file of their own. Like cluster.yaml, the nodes pass MLFLOW_TRACKING_URI
to the jobs' drivers.

- The smoke job, submitted with the real `ray job submit` (workdir on a shared
  path) and with `raylm submit` from a modified copy of the repo (workdir in
  S3), ends SUCCEEDED with a model folder; the copy's code, not the installed
  raylm, ran on every worker.
- A job with a relative workdir (the issue's lost-run defect) and one with an
  unknown key end FAILED with the one-line config error in their logs.
- No token, or a wrong one: one clear line.
- A driver on this cluster pointed at a local SQLite MLflow store: one config
  error before any worker starts.
- A 2-worker job with one worker per node (STRICT_SPREAD): the second node is
  SIGKILLed after a checkpoint; the job resumes from that checkpoint once a node
  is back and finishes at the configured step with, step for step, the losses of
  an uninterrupted run of the same training (the `raylm submit` job above, which
  trains with the same keys, so that the module trains once less).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from tests.conftest import REPO_ROOT
from tests.integration.local_cluster import (LocalRayCluster, NodePorts, kill_group, s3_env, start_mlflow_server,
                                             start_moto)

# This engineer's port range (6400-6999): GCS, dashboard, node ports, workers, MLflow, S3.
GCS_PORT, DASHBOARD_PORT, CLIENT_PORT = 6700, 6701, 6704
HEAD_PORTS = NodePorts(6702, 6703, 6705, 6706, 6707, 6708, 6750, 6799)
NODE_PORTS = NodePorts(6712, 6713, 6715, 6716, 6717, 6718, 6800, 6849)
REPLACEMENT_NODE_PORTS = NodePorts(6722, 6723, 6725, 6726, 6727, 6728, 6850, 6899)
MLFLOW_PORT, S3_PORT = 6950, 6960
BUCKET = "raylm-test"
SMOKE = ["--config", "jobs/configs/smoke.yaml", "train.max_steps=6", "train.warmup_steps=1",
         "eval.max_examples_per_task=5"]
# The training of the node-failure job; the S3 job trains the same way and is its uninterrupted reference.
FAULT_TRAINING = ["train.max_steps=30", "train.checkpoint_every=10", "train.log_every=1", "train.eval_every=0",
                  "train.max_failures=3"]
JOB_TIMEOUT_S = 900
RAY_LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+\t(INFO|WARNING) ")


class Cluster:
    def __init__(self, root: Path, ray: LocalRayCluster, node, mlflow_uri: str):
        self.root, self.ray, self.node, self.mlflow_uri = root, ray, node, mlflow_uri

    def client_env(self, **changes) -> dict[str, str]:
        """A client's environment: the cluster's token, our S3, no RAY_ADDRESS of anyone else."""
        env = {**self.ray.env(), "PYTHONPATH": str(REPO_ROOT / "platform")}
        env.pop("RAY_ADDRESS", None)
        env.update(changes)
        return {key: value for key, value in env.items() if value is not None}

    def jobs_client(self):
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.ray.dashboard_url, headers=self.ray.headers())

    def run(self, command: list[str], cwd: Path = REPO_ROOT, timeout: float = JOB_TIMEOUT_S, **env_changes):
        return subprocess.run(command, capture_output=True, text=True, cwd=cwd, env=self.client_env(**env_changes),
                              timeout=timeout)

    def raylm(self, *args, cwd: Path = REPO_ROOT, timeout: float = JOB_TIMEOUT_S, **env_changes):
        return self.run([sys.executable, "-m", "raylm.cli", *args], cwd=cwd, timeout=timeout, **env_changes)

    def submit(self, *job_args, cwd: Path = REPO_ROOT):
        """`raylm submit` of a job and wait for it; returns the finished subprocess."""
        return self.raylm("submit", "--address", self.ray.dashboard_url, "--", *job_args, cwd=cwd)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster")
    s3 = s3_env(S3_PORT)
    saved = {key: os.environ.get(key) for key in s3}
    os.environ.update(s3)  # this process reads the runs' files in S3 too
    processes = []
    ray_cluster = None
    try:
        processes.append(start_moto(S3_PORT, root / "moto.log"))
        import boto3

        boto3.client("s3").create_bucket(Bucket=BUCKET)
        mlflow_uri = f"http://127.0.0.1:{MLFLOW_PORT}"
        ray_cluster = LocalRayCluster(root / "ray", GCS_PORT, DASHBOARD_PORT, CLIENT_PORT, HEAD_PORTS,
                                      extra_env={**s3, "MLFLOW_TRACKING_URI": mlflow_uri})
        ray_cluster.start_head(num_cpus=4)  # starts while MLflow does; stopped in `finally` whatever happens
        processes.append(start_mlflow_server(MLFLOW_PORT, root / "mlflow", f"s3://{BUCKET}/mlflow",
                                             {**os.environ, **s3}))
        ray_cluster.wait_for_head()
        node = ray_cluster.add_node(NODE_PORTS, num_cpus=1, name="node2")
        node = ray_cluster.wait_for_nodes(2, process=node)
        yield Cluster(root, ray_cluster, node, mlflow_uri)
    finally:
        if ray_cluster is not None:
            ray_cluster.stop()
        for process in reversed(processes):
            kill_group(process, grace_s=3)  # S3 and MLflow hold nothing worth a clean stop once the tests are done
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _s3_read(uri: str) -> bytes:
    from raylm.common import storage

    return storage.read_bytes(uri)


def _modified_checkout(root: Path) -> tuple[Path, str]:
    """A copy of the repo's code with one change: what a user submits after editing raylm."""
    from raylm.common.cluster import fingerprint_folder

    copy = root / "checkout"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc")
    shutil.copytree(REPO_ROOT / "platform", copy / "platform", ignore=ignore)
    shutil.copytree(REPO_ROOT / "jobs", copy / "jobs", ignore=ignore)
    with (copy / "platform" / "raylm" / "storage.py").open("a") as handle:
        handle.write("\n# edited after the cluster was set up: only a submitted copy has this line\n")
    return copy, fingerprint_folder(copy / "platform" / "raylm")


# ----------------------------------------------------------------- submitting jobs


@pytest.fixture(scope="module")
def submitted(cluster):
    """The four submissions of this module, run side by side; returns their finished processes."""
    checkout, checkout_code = _modified_checkout(cluster.root)
    shared_runs = cluster.root / "shared-runs"
    address = cluster.ray.dashboard_url
    commands = {
        "ray_cli": ([str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", address,
                     "--working-dir", str(REPO_ROOT), "--", "python", "jobs/train.py", *SMOKE,
                     f"workdir={shared_runs}", "run_id=smoke-ray-cli"], REPO_ROOT),
        "raylm_s3": ([sys.executable, "-m", "raylm.cli", "submit", "--address", address, "--", "python",
                      "jobs/train.py", *SMOKE, *FAULT_TRAINING, f"workdir=s3://{BUCKET}/runs", "run_id=smoke-raylm"],
                     checkout),
        # The lost run: a relative workdir would land in Ray's temporary copy of the working dir.
        "relative_workdir": ([str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", address,
                              "--working-dir", str(REPO_ROOT), "--", "python", "jobs/train.py", *SMOKE], REPO_ROOT),
        "unknown_key": ([sys.executable, "-m", "raylm.cli", "submit", "--no-wait", "--address", address, "--",
                         "python", "jobs/train.py", *SMOKE, "train.lrr=1"], REPO_ROOT),
    }
    results: dict = {}

    def run(names):
        for name in names:
            command, cwd = commands[name]
            results[name] = cluster.run(command, cwd=cwd)

    # All four side by side: the two training jobs fit the cluster together (2 workers of 1 CPU each on 5 CPUs).
    threads = [threading.Thread(target=run, args=(names,))
               for names in (["raylm_s3"], ["ray_cli"], ["relative_workdir", "unknown_key"])]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(2 * JOB_TIMEOUT_S + 60)
    return results, shared_runs, checkout_code


def _job_id(stdout: str) -> str:
    return next(line.split()[1] for line in stdout.splitlines() if line.startswith("submitted raysubmit_"))


def test_ray_job_submit_runs_the_smoke_job_on_a_shared_path(cluster, submitted):
    results, shared_runs, _ = submitted
    result = results["ray_cli"]
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    job_id = re.search(r"raysubmit_\w+", result.stdout + result.stderr).group(0)
    assert str(cluster.jobs_client().get_job_status(job_id)) == "SUCCEEDED"
    run = shared_runs / "smoke-ray-cli"
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == "finished" and record["trained_steps"] == 6
    assert (run / "model" / "model.safetensors").is_file() and (run / "model" / "tokenizer.json").is_file()
    # MLflow is the cluster's server (MLFLOW_TRACKING_URI from the nodes' environment).
    assert f"MLflow run {record['mlflow_run_id']} at {cluster.mlflow_uri}" in result.stdout


def test_raylm_submit_ships_the_submitted_code_and_writes_the_run_to_s3(cluster, submitted):
    from raylm.common.cluster import code_fingerprint

    results, _, checkout_code = submitted
    result = results["raylm_s3"]
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert any(line.startswith("submitted raysubmit_") for line in lines)
    assert lines[-1].startswith("job raysubmit_") and lines[-1].endswith(" SUCCEEDED")
    # The driver ran the edited copy, and every training worker checked that it imported the same code
    # (a worker importing the installed raylm would have failed the job).
    assert checkout_code != code_fingerprint()
    assert f"workers run this job's raylm (code {checkout_code})" in result.stdout
    run = f"s3://{BUCKET}/runs/smoke-raylm"
    record = json.loads(_s3_read(f"{run}/run.json"))
    assert record["status"] == "finished" and record["trained_steps"] == 30 and record["registered"]
    card = json.loads(_s3_read(f"{run}/model/raylm.json"))
    assert card["run_id"] == "smoke-raylm" and card["trained_steps"] == 30
    assert len(_s3_read(f"{run}/model/model.safetensors")) > 10_000
    # The model folder in S3 is usable as it is: eval and serve take its URI.
    from raylm.common.tracking import resolve_model_path

    folder = resolve_model_path(f"{run}/model")
    assert json.loads((folder / "raylm.json").read_text())["run_id"] == "smoke-raylm"
    assert (folder / "model.safetensors").stat().st_size == len(_s3_read(f"{run}/model/model.safetensors"))
    snapshot = json.loads(_s3_read(f"{run}/ray_results/smoke/checkpoint_manager_snapshot.json"))
    assert snapshot["latest_checkpoint_result"]["metrics"]["step"] == 30
    # The registered model's artifacts went through the MLflow server into S3.
    from mlflow.tracking import MlflowClient

    version = MlflowClient(cluster.mlflow_uri, registry_uri=cluster.mlflow_uri).get_model_version(
        "raylm-smoke", record["registered"][0]["uri"].rsplit("/", 1)[1])
    assert version.run_id == record["mlflow_run_id"]


def test_relative_workdir_fails_with_one_config_line_instead_of_losing_the_run(cluster, submitted):
    results, _, _ = submitted
    result = results["relative_workdir"]
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert errors and errors[0].startswith("error: config error: workdir: 'runs' is relative, and this job runs in "
                                           "Ray's temporary copy of its working directory, which Ray deletes")
    assert "Traceback" not in output and "[raylm] preparing data" not in output


def test_unknown_key_job_fails_and_jobs_commands_show_it(cluster, submitted):
    results, _, _ = submitted
    submit = results["unknown_key"]
    assert submit.returncode == 0, submit.stdout + submit.stderr  # --no-wait: accepted
    job_id = _job_id(submit.stdout)
    logs = cluster.raylm("jobs", "logs", job_id, "--follow", "--address", cluster.ray.dashboard_url)
    assert logs.returncode == 1  # the job FAILED
    assert "error: config error: train.lrr: unknown key" in logs.stdout
    assert "Traceback" not in logs.stdout
    listed = cluster.raylm("jobs", "list", "--json", "--address", cluster.ray.dashboard_url)
    assert listed.returncode == 0, listed.stderr
    statuses = {row["submission_id"]: row["status"] for row in json.loads(listed.stdout)}
    assert statuses[job_id] == "FAILED"
    assert sum(status == "SUCCEEDED" for status in statuses.values()) >= 2


def test_jobs_logs_of_a_missing_job_is_one_line_and_jobs_list_masks_secrets(cluster, tmp_path):
    address = cluster.ray.dashboard_url
    missing = cluster.raylm("jobs", "logs", "raysubmit_nope", "--address", address, cwd=tmp_path, timeout=120)
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    lines = missing.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "raysubmit_nope" in lines[0], missing.stderr
    assert list(tmp_path.rglob("*")) == []
    # A job submitted some other way (`ray job submit`, the Jobs API) may carry a secret in its command.
    job_id = cluster.jobs_client().submit_job(
        entrypoint="echo tracking.tracking_uri=https://u:list-secret@h:5000 serve.api_key=list-secret")
    table = cluster.raylm("jobs", "list", "--address", address, timeout=120)
    listed = cluster.raylm("jobs", "list", "--json", "--address", address, timeout=120)
    assert table.returncode == 0 and listed.returncode == 0, table.stderr + listed.stderr
    assert "list-secret" not in table.stdout + listed.stdout
    row = next(row for row in json.loads(listed.stdout) if row["submission_id"] == job_id)
    assert row["entrypoint"] == "echo tracking.tracking_uri=https://u:***@h:5000 serve.api_key=***"
    assert any(line.startswith(job_id) and line.endswith(row["entrypoint"]) for line in table.stdout.splitlines())


def test_missing_or_wrong_token_is_one_clear_line(cluster, tmp_path):
    address = cluster.ray.dashboard_url
    # Ray itself refuses a request without the token.
    assert requests.get(f"{address}/api/jobs/", timeout=10).status_code == 401
    # A laptop that never ran a Ray cluster: no RAY_AUTH_MODE, no token anywhere.
    missing = cluster.raylm("jobs", "list", "--address", address, timeout=120, RAY_AUTH_TOKEN_PATH=None,
                            RAY_AUTH_TOKEN=None, RAY_AUTH_MODE=None, HOME=str(tmp_path))
    assert missing.returncode == 1
    assert missing.stderr.strip().splitlines() == [
        f"error: the Ray cluster at {address} requires an authentication token and none was found (looked in "
        f"$RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH, {tmp_path / '.ray' / 'auth_token'}); set RAY_AUTH_TOKEN, or "
        "RAY_AUTH_TOKEN_PATH to a file holding the token, or put it in ~/.ray/auth_token (on the cluster, "
        "`ray get-auth-token` prints it)"]
    wrong = cluster.raylm("jobs", "list", "--address", address, timeout=120, RAY_AUTH_TOKEN="not-the-token",
                          RAY_AUTH_MODE=None, HOME=str(tmp_path))
    assert wrong.returncode == 1
    assert wrong.stderr.strip().splitlines() == [
        f"error: the Ray cluster at {address} rejected the authentication token from $RAY_AUTH_TOKEN; use the "
        "cluster's token (`ray get-auth-token` on its head node)"]


def test_local_mlflow_store_on_a_multi_node_run_is_refused_before_workers_start(cluster):
    sqlite = cluster.root / "driver-mlflow.db"
    result = cluster.raylm("train", *SMOKE, f"workdir={cluster.root / 'driver-runs'}", "run_id=sqlite-refused",
                           f"tracking.tracking_uri=sqlite:///{sqlite}", timeout=300, RAY_ADDRESS=cluster.ray.address)
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
    # Ray's own log lines (connecting to the cluster) aside, one line and no traceback.
    assert "Traceback" not in result.stderr
    assert [line for line in result.stderr.strip().splitlines() if not RAY_LOG_LINE.match(line)] == [
        f"error: config error: tracking.tracking_uri: sqlite:///{sqlite} is a local MLflow store, but the training "
        "workers run on several nodes; give an MLflow server (tracking.tracking_uri=http://host:5000 or "
        "$MLFLOW_TRACKING_URI)"]
    assert "[raylm] preparing data" not in result.stdout and not sqlite.exists()
    record = json.loads((cluster.root / "driver-runs" / "sqlite-refused" / "run.json").read_text())
    assert record["status"] == "failed" and record["trained_steps"] == 0


# ----------------------------------------------------------------- a node dies

FAULT = [*SMOKE, *FAULT_TRAINING, "tracking.register_model=false", f"workdir=s3://{BUCKET}/runs",
         "tracking.experiment=raylm-fault"]


def _mlflow_losses(cluster, run_id: str) -> dict[int, list[float]]:
    from mlflow.tracking import MlflowClient

    losses: dict[int, list[float]] = {}
    for metric in sorted(MlflowClient(cluster.mlflow_uri).get_metric_history(run_id, "loss"),
                         key=lambda metric: metric.timestamp):
        losses.setdefault(metric.step, []).append(metric.value)
    return losses


@pytest.fixture(scope="module")
def node_failure(cluster, submitted):
    """Run the fault job, SIGKILL the second node mid-run and bring a node back (the S3 job of `submitted`,
    which trained the same way uninterrupted, is the reference)."""
    client = cluster.jobs_client()
    run = f"s3://{BUCKET}/runs/fault-run"
    fault = cluster.raylm("submit", "--no-wait", "--address", cluster.ray.dashboard_url, "--", "python",
                          "jobs/train.py", *FAULT, "train.placement_strategy=STRICT_SPREAD", "run_id=fault-run")
    assert fault.returncode == 0, fault.stdout + fault.stderr
    fault_job = _job_id(fault.stdout)
    second_node = next(node["node_id"] for node in cluster.ray.alive_nodes() if not node["is_head_node"])
    killed = None
    deadline = time.time() + JOB_TIMEOUT_S
    while killed is None and time.time() < deadline:
        time.sleep(0.2)
        if str(client.get_job_status(fault_job).value) in ("SUCCEEDED", "FAILED", "STOPPED"):
            break
        try:
            snapshot = json.loads(_s3_read(f"{run}/ray_results/smoke/checkpoint_manager_snapshot.json"))
            registered = int(snapshot["latest_checkpoint_result"]["metrics"]["step"])
            mlflow_run = json.loads(_s3_read(f"{run}/run.json"))["mlflow_run_id"]
        except (FileNotFoundError, KeyError, TypeError, ValueError, OSError):
            continue
        logged = max(_mlflow_losses(cluster, mlflow_run) or [0])
        workers = cluster.ray.actors("RayTrainWorker")
        nodes = sorted(worker["node_id"] for worker in workers)
        if registered and logged >= registered + 2 and len(nodes) == 2:
            pids = cluster.ray.kill_node(cluster.node)
            killed = {"registered": registered, "logged": logged, "worker_nodes": nodes, "pids": pids}
    assert killed is not None, f"the fault job ended before the node could be killed: {client.get_job_logs(fault_job)[-3000:]}"
    replacement = cluster.ray.add_node(REPLACEMENT_NODE_PORTS, num_cpus=1, name="node2b")
    cluster.ray.wait_for_nodes(2, process=replacement, exclude=(second_node,))
    replacement_node = next(node["node_id"] for node in cluster.ray.alive_nodes()
                            if not node["is_head_node"] and node["node_id"] != second_node)
    fault_ray_job = client.get_job_info(fault_job).job_id  # the Ray job id of its driver, which owns the workers
    resumed_nodes = None
    statuses = {}
    while time.time() < deadline and not statuses:
        status = str(client.get_job_status(fault_job).value)
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            statuses["fault"] = status
        if resumed_nodes is None and "fault" not in statuses:
            workers = [w for w in cluster.ray.actors("RayTrainWorker") if w.get("job_id") == fault_ray_job]
            nodes = {worker["node_id"] for worker in workers}
            if replacement_node in nodes:
                resumed_nodes = nodes
        time.sleep(1)
    return {"killed": killed, "second_node": second_node, "replacement_node": replacement_node,
            "resumed_nodes": resumed_nodes, "statuses": statuses,
            "logs": {"fault": client.get_job_logs(fault_job)}}


def test_one_worker_per_node_and_the_killed_node_took_its_processes(cluster, node_failure):
    killed = node_failure["killed"]
    assert len(set(killed["worker_nodes"])) == 2 and node_failure["second_node"] in killed["worker_nodes"]
    import psutil

    assert not [pid for pid in killed["pids"] if psutil.pid_exists(pid) and
                psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]


def test_the_job_resumes_from_its_checkpoint_once_a_node_is_back(cluster, node_failure):
    assert node_failure["statuses"] == {"fault": "SUCCEEDED"}, \
        node_failure["logs"]["fault"][-5000:]
    killed = node_failure["killed"]
    record = json.loads(_s3_read(f"s3://{BUCKET}/runs/fault-run/run.json"))
    assert record["status"] == "finished" and record["trained_steps"] == 30
    resumed = [int(line.split("resumed from step ")[1].split()[0])
               for line in node_failure["logs"]["fault"].splitlines() if "[raylm] resumed from step" in line]
    assert resumed and resumed[-1] >= killed["registered"] and resumed[-1] % 10 == 0 and resumed[-1] < 30
    # The restarted worker group spread over the head and the node that replaced the dead one.
    assert node_failure["resumed_nodes"] and node_failure["replacement_node"] in node_failure["resumed_nodes"]
    assert node_failure["second_node"] not in node_failure["resumed_nodes"]


def test_losses_after_the_failure_equal_the_uninterrupted_run(cluster, submitted, node_failure):
    killed = node_failure["killed"]
    assert submitted[0]["raylm_s3"].returncode == 0, "the uninterrupted reference (the S3 job) failed"
    records = {name: json.loads(_s3_read(f"s3://{BUCKET}/runs/{name}/run.json"))
               for name in ("fault-run", "smoke-raylm")}
    faulted = _mlflow_losses(cluster, records["fault-run"]["mlflow_run_id"])
    reference = _mlflow_losses(cluster, records["smoke-raylm"]["mlflow_run_id"])
    assert sorted(faulted) == sorted(reference) == list(range(1, 31))
    resumed = [int(line.split("resumed from step ")[1].split()[0])
               for line in node_failure["logs"]["fault"].splitlines() if "[raylm] resumed from step" in line][-1]
    repeated = sorted(step for step, values in faulted.items() if len(values) > 1)
    # The steps between the checkpoint and the kill ran twice, from the same state: the same losses.
    assert repeated == list(range(resumed + 1, max(repeated) + 1)) and max(repeated) >= killed["logged"]
    for step in repeated:
        assert faulted[step][-1] == pytest.approx(faulted[step][0], rel=1e-5), step
    for step in range(1, 31):
        assert faulted[step][-1] == pytest.approx(reference[step][0], rel=1e-5), step
