"""An elastic worker range under real Ray Train V2: it starts with what fits and keeps the global batch.

``train.num_workers: [2, 4]`` on the session's local Ray (4 CPUs, 2 per worker):
Ray Train's elastic policy starts with the 2 workers the cluster can hold
instead of waiting for 4, and the worker loop
recomputes gradient accumulation so that every step still trains on the
configured global batch of 24 sequences (``micro_batch_size=2``; 24 splits on
every count from 2 to 4): the tokens counted per step are 24 x seq_len
whatever the worker count.

Then a node lost and back, on a multi-node cluster of its own: the run shrinks
to the workers left and grows again, and its losses, samples and data position
are those of a run without the failure.
"""

from __future__ import annotations

import pytest

from raylm.train.checkpoint import read_state

from tests.integration.test_train_checkpoints import SEQ_LEN, SyntheticTokenizer, make_job, synthetic_datasets

GLOBAL_BATCH, MAX_STEPS = 24, 3


@pytest.fixture(scope="module")
def elastic_run(ray_session, tmp_path_factory):
    from raylm.train.driver import run_training

    job = make_job(tmp_path_factory.mktemp("elastic"), "elastic", "train.num_workers=[2, 4]",
                   f"train.global_batch_size={GLOBAL_BATCH}", "train.micro_batch_size=2", "train.cpus_per_worker=2",
                   f"train.max_steps={MAX_STEPS}", "train.eval_every=0", "train.keep_best_checkpoint=false")
    train, dev = synthetic_datasets()
    return job, run_training(job, train, dev, SyntheticTokenizer())


def test_elastic_range_starts_with_what_fits_and_keeps_the_global_batch(elastic_run):
    job, result = elastic_run
    assert (job.train.min_workers, job.train.num_workers, job.train.is_elastic) == (2, 4, True)
    workers = read_state(result.checkpoint_dir)["world_size"]
    assert workers == 2  # what the 4-CPU cluster holds, not the maximum of 4
    assert result.metrics["step"] == MAX_STEPS
    per_step = [row["tokens_seen"] for row in result.history]
    # 6 micro-batches of 2 on each of 2 workers per step (3 on each of 4 would give the same).
    assert per_step == [GLOBAL_BATCH * SEQ_LEN * step for step in range(1, MAX_STEPS + 1)]


# ----------------------------------------------------------------- a node lost and back

_NODE_LOSS = r"""
import json, sys, threading, time
from pathlib import Path

import ray
from ray.cluster_utils import Cluster

from raylm.train.checkpoint import read_state
from raylm.train.driver import experiment_dir, run_training
from tests.integration.test_train_checkpoints import SyntheticTokenizer, make_job, synthetic_datasets

workdir, settings = Path(sys.argv[1]), json.loads(sys.argv[2])
# A head that trains nothing (the driver and Ray Train's controller live there) and two one-CPU worker nodes.
# Quick health checks: the GCS declares a killed node dead within ~2 s instead of ~30.
cluster = Cluster(initialize_head=True, head_node_args={
    "num_cpus": 0, "include_dashboard": False,
    "_system_config": {"health_check_period_ms": 500, "health_check_failure_threshold": 3,
                       "health_check_initial_delay_ms": 0}})
nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
ray.init(address=cluster.address, log_to_driver=False)
common = settings["overrides"]


def latest(job):
    try:
        snapshot = json.loads((experiment_dir(job) / "checkpoint_manager_snapshot.json").read_text())
        return snapshot["latest_checkpoint_result"]["metrics"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def summary(result):
    state = read_state(result.checkpoint_dir)
    return {"history": result.history, "state": {key: state.get(key) for key in
                                                 ("step", "epoch", "rows_in_epoch", "tokens_seen", "world_size")}}


try:
    steady = make_job(workdir, "steady", *common, "train.num_workers=2")
    train, dev = synthetic_datasets()
    out = {"steady": summary(run_training(steady, train, dev, SyntheticTokenizer()))}

    elastic = make_job(workdir, "elastic", *common, "train.num_workers=[1, 2]", "train.elastic_resize_interval_s=2")
    outcome, events = {}, []

    def fit():
        try:
            train, dev = synthetic_datasets()
            outcome["result"] = run_training(elastic, train, dev, SyntheticTokenizer())
        except BaseException as err:
            outcome["error"] = repr(err)

    thread = threading.Thread(target=fit)
    thread.start()
    deadline = time.time() + settings["timeout_s"]
    phase = "two"
    while thread.is_alive() and time.time() < deadline and phase != "regrown":
        time.sleep(0.1)
        metrics = latest(elastic)
        if not metrics:
            continue
        if phase == "two" and metrics["workers"] == 2 and metrics["step"] >= settings["kill_after"]:
            cluster.remove_node(nodes.pop(), allow_graceful=False)  # the node and its worker, at once
            events.append({"event": "node killed", "checkpoint_step": metrics["step"], "time": time.time()})
            phase = "one"
        elif phase == "one" and metrics["workers"] == 1:
            nodes.append(cluster.add_node(num_cpus=1))
            events.append({"event": "node added", "checkpoint_step": metrics["step"], "time": time.time()})
            phase = "regrown"
    thread.join(timeout=max(1.0, deadline - time.time()))
    out["events"] = events
    out["elastic"] = summary(outcome["result"]) if "result" in outcome else {"error": outcome.get("error")}
    print("ELASTIC " + json.dumps(out))
finally:
    ray.shutdown()
    cluster.shutdown()
"""

# Long enough that the run is still going when Ray notices the node that came back: Ray Train's elastic
# policy sees the cluster through Ray Data's autoscaling coordinator, which refreshes its view every 20 s.
NODE_LOSS_STEPS, NODE_LOSS_BATCH = 240, 32


@pytest.fixture(scope="module")
def node_lost_and_back(tmp_path_factory):
    import json
    import os
    import shutil
    import subprocess
    import sys
    import tempfile

    from tests.conftest import REPO_ROOT

    overrides = [f"train.max_steps={NODE_LOSS_STEPS}", f"train.global_batch_size={NODE_LOSS_BATCH}",
                 "train.micro_batch_size=4", "train.cpus_per_worker=1", "train.checkpoint_every=20",
                 "train.log_every=5", "train.eval_every=0", "train.keep_best_checkpoint=false",
                 "train.max_failures=3"]
    settings = {"overrides": overrides, "kill_after": 20, "timeout_s": 420}
    tmp_path = tmp_path_factory.mktemp("node-loss")
    ray_tmp = tempfile.mkdtemp(prefix="rl-", dir="/tmp")  # short socket paths; no address file others could read
    # Until that view drops the lost node, Ray Train starts the full worker group again and waits for it
    # (RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S, 60 s by default) before it starts on fewer.
    env = dict(os.environ, PYTHONPATH=f"{REPO_ROOT / 'platform'}:{REPO_ROOT}", RAY_USAGE_STATS_ENABLED="0",
               RAY_TMPDIR=ray_tmp, RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S="10")
    env.pop("RAY_ADDRESS", None)
    try:
        result = subprocess.run([sys.executable, "-c", _NODE_LOSS, str(tmp_path), json.dumps(settings)],
                                cwd=tmp_path, env=env, capture_output=True, text=True, timeout=560)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    lines = [line for line in result.stdout.splitlines() if line.startswith("ELASTIC ")]
    assert result.returncode == 0 and lines, (result.stdout[-3000:], result.stderr[-3000:])
    return json.loads(lines[-1].removeprefix("ELASTIC "))


def test_a_lost_node_shrinks_the_run_and_its_return_grows_it_with_the_same_losses(node_lost_and_back):
    """Head + two one-CPU worker nodes (``ray.cluster_utils.Cluster``), ``num_workers: [1, 2]``: after a
    checkpoint at step >= 20 one worker node is killed; Ray Train restarts on the one node left without
    waiting for it (from the latest checkpoint), and once a checkpoint on one worker is registered a node is
    added back and the next resize check grows the run to two workers again. Every step trains on the rows
    the run without a failure trained on (the run-wide sample order), with the global batch fixed, so the
    loss curve, the samples seen and the final data position equal that run's (up to the reduction order)."""
    steady, elastic, events = (node_lost_and_back[key] for key in ("steady", "elastic", "events"))
    assert [event["event"] for event in events] == ["node killed", "node added"], events
    assert "error" not in elastic, elastic
    history = {row["step"]: row for row in elastic["history"]}
    reference = {row["step"]: row for row in steady["history"]}
    assert sorted(history) == sorted(reference) and max(history) == NODE_LOSS_STEPS
    workers = [history[step]["workers"] for step in sorted(history)]
    # Two workers, then one after the loss, then two again: each phase logged steps.
    phases = [count for index, count in enumerate(workers) if index == 0 or count != workers[index - 1]]
    assert phases == [2, 1, 2], workers
    assert {row["workers"] for row in steady["history"]} == {2}
    for step in sorted(history):
        assert history[step]["loss"] == pytest.approx(reference[step]["loss"], rel=2e-4), step
        assert history[step]["tokens_seen"] == reference[step]["tokens_seen"]
        assert history[step]["lr"] == pytest.approx(reference[step]["lr"], rel=1e-12)
    assert history[NODE_LOSS_STEPS]["loss"] < 0.6 * history[5]["loss"]  # it learned throughout
    final = elastic["state"]
    assert final["world_size"] == 2
    assert {key: final[key] for key in ("step", "epoch", "rows_in_epoch", "tokens_seen")} == \
        {key: steady["state"][key] for key in ("step", "epoch", "rows_in_epoch", "tokens_seen")}
