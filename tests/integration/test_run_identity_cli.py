"""The rerun defect of issue 11, through the real `raylm train` command.

Before: `raylm train ... run_name=killtest` ran; the same command with
`train.lr=1e-2` printed "resumed from step 80", trained nothing, logged an MLflow
run saying lr=0.01 and registered the old weights as a new version. Now a rerun is
a fresh run (new id, trained from step 0 with the new lr), resuming is explicit,
`--resume` with another lr is one config-error line, and resuming a finished run
trains and registers nothing.

The two runs join the test session's Ray through ``RAY_ADDRESS``, as `raylm train`
does on a cluster, instead of starting and stopping a Ray each; the SIGTERM test
starts its own local Ray, as on a laptop.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO_ROOT

SMOKE = ["--config", "jobs/configs/smoke.yaml", "run_name=killtest", "train.max_steps=4", "train.warmup_steps=1",
         "eval.max_examples_per_task=5", "train.num_workers=1"]


def _env(ray_address: str | None = None) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "platform"), "RAY_USAGE_STATS_ENABLED": "0"}
    for name in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI"):
        env.pop(name, None)
    if ray_address:
        env["RAY_ADDRESS"] = ray_address
    return env


def _raylm(*args, timeout=900, ray_address: str | None = None):
    return subprocess.run([sys.executable, "-m", "raylm.cli", *args], capture_output=True, text=True,
                          cwd=REPO_ROOT, env=_env(ray_address), timeout=timeout)


def _summary(result) -> dict:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(result.stdout[result.stdout.index("\n{") + 1:])


@pytest.fixture(scope="module")
def two_runs(ray_session, tmp_path_factory):
    # A worker and Ray Data's tasks need free CPUs: a Serve app another module left behind would hold them.
    free = ray_session.available_resources().get("CPU", 0)
    assert free >= 2, f"the session's Ray has {free} free CPUs: {ray_session.available_resources()}"
    address = ray_session.get_runtime_context().gcs_address
    workdir = tmp_path_factory.mktemp("rerun")
    first = _summary(_raylm("train", *SMOKE, f"workdir={workdir}", ray_address=address))
    second_result = _raylm("train", *SMOKE, f"workdir={workdir}", "train.lr=1e-2", ray_address=address)
    return workdir, first, _summary(second_result), second_result.stdout + second_result.stderr


def _mlflow(workdir):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _state(workdir):
    client = _mlflow(workdir)
    experiment = client.get_experiment_by_name("raylm")
    run_ids = {run.info.run_id for run in client.search_runs([experiment.experiment_id])}
    versions = sorted(int(v.version) for v in client.search_model_versions("name='raylm-smoke'"))
    return run_ids, versions


def test_a_rerun_with_another_lr_is_a_fresh_run(two_runs):
    workdir, first, second, output = two_runs
    assert first["run_id"] != second["run_id"] and first["run_id"].startswith("killtest-")
    assert "resumed from step" not in output
    records = {s["run_id"]: json.loads((workdir / s["run_id"] / "run.json").read_text()) for s in (first, second)}
    assert all(record["status"] == "finished" and record["trained_steps"] == 4 for record in records.values())
    assert records[first["run_id"]]["config_hash"] != records[second["run_id"]]["config_hash"]
    # The second run's record and MLflow run describe training that happened: from step 0, with lr=0.01.
    client = _mlflow(workdir)
    assert client.get_run(second["mlflow_run_id"]).data.params["train.lr"] == "0.01"
    assert client.get_run(first["mlflow_run_id"]).data.params["train.lr"] == "0.003"
    losses = client.get_metric_history(second["mlflow_run_id"], "resumed_from_step")
    assert losses and all(metric.value == 0 for metric in losses)
    card = json.loads((workdir / second["run_id"] / "model" / "raylm.json").read_text())
    assert card["run_id"] == second["run_id"] and card["trained_steps"] == 4
    # Different training, different weights: not the first run's model registered again.
    weights = [(workdir / s["run_id"] / "model" / "model.safetensors").read_bytes() for s in (first, second)]
    assert weights[0] != weights[1]
    assert first["registry_uri"] != second["registry_uri"]


def test_resume_with_another_lr_is_one_config_error(two_runs):
    workdir, first, _, _ = two_runs
    before = _state(workdir)
    record_before = (workdir / first["run_id"] / "run.json").read_text()
    result = _raylm("train", *SMOKE, f"workdir={workdir}", "train.lr=1e-2", "--resume", first["run_id"], timeout=300)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith(f"error: resume: the config of run {first['run_id']} differs in train.lr;")
    assert _state(workdir) == before  # no MLflow run, no model version
    assert (workdir / first["run_id"] / "run.json").read_text() == record_before


def test_resuming_a_finished_run_trains_and_registers_nothing(two_runs):
    workdir, first, _, _ = two_runs
    before = _state(workdir)
    result = _raylm("train", *SMOKE, f"workdir={workdir}", "--resume", str(workdir / first["run_id"]), timeout=300)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert result.stderr.strip() == (f"error: resume: run {first['run_id']} already finished at step 4; "
                                      "raise train.max_steps above 4 to train it further")
    assert "[raylm] training" not in result.stdout
    assert _state(workdir) == before
    run_ids, versions = before
    assert len(run_ids) == 2 and versions == [1, 2]


def test_sigterm_mid_run_marks_the_run_and_its_mlflow_run_killed(tmp_path):
    """`kill`, `ray job stop` or a scheduler stops a training run: its record and MLflow run say so."""
    workdir = tmp_path / "runs"
    out, err = (tmp_path / "stdout").open("w+"), (tmp_path / "stderr").open("w+")
    process = subprocess.Popen([sys.executable, "-m", "raylm.cli", "train", *SMOKE, "run_name=sigterm",
                                "train.max_steps=5000", "train.log_every=1", f"workdir={workdir}"],
                               stdout=out, stderr=err, text=True, cwd=REPO_ROOT, env=_env())
    try:
        deadline = time.time() + 600
        while time.time() < deadline and process.poll() is None:  # mid-run: a worker has logged a step
            if "[raylm] step=" in (tmp_path / "stdout").read_text():
                break
            time.sleep(0.5)
        assert process.poll() is None, (tmp_path / "stdout").read_text()[-3000:] + (tmp_path / "stderr").read_text()
        (run_dir,) = [path.parent for path in workdir.glob("sigterm-*/run.json")]
        record = json.loads((run_dir / "run.json").read_text())
        assert record["status"] == "running" and record["mlflow_run_id"]
        process.send_signal(signal.SIGTERM)
        stopped = time.time()
        returncode = process.wait(timeout=90)
        assert time.time() - stopped < 60
    finally:
        if process.poll() is None:
            process.kill()
    stdout, stderr = (tmp_path / "stdout").read_text(), (tmp_path / "stderr").read_text()
    assert returncode == 143, stdout[-3000:] + stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == "error: stopped by SIGTERM"
    # No traceback from this process (Ray's actors, prefixed "(Name pid=...)", report their own troubles).
    assert not [line for line in stderr.splitlines() if "Traceback" in line and " pid=" not in line], stderr[-3000:]
    assert f"[raylm] warning: run {run_dir.name} killed (stopped by SIGTERM); continue it with --resume" in stdout
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "killed" and record["trained_steps"] == 0 and record["registered"] == []
    run = _mlflow(workdir).get_run(record["mlflow_run_id"])
    assert run.info.status == "KILLED" and run.info.end_time
    assert not _mlflow(workdir).search_model_versions("name='raylm-smoke'")
