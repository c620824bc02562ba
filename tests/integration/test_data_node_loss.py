"""The demo corpus's packed blocks survive the loss of the node whose tasks packed them.

A cluster of its own (``ray.cluster_utils.Cluster``, in a subprocess with a deadline): a head with no CPUs
and one worker node with two. ``prepare_data`` runs its packing tasks on the worker; the worker is then
killed and none comes back, so nothing could rerun those tasks. Before the fix the blocks lived on the
lost node and reading them hung until the object fetch timed out (the two-node kill test's flake).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile

from tests.conftest import REPO_ROOT

_PROBE = r"""
import json, sys
import ray
from ray.cluster_utils import Cluster
from raylm.config import load_config
from raylm.data.pipeline import prepare_data

cluster = Cluster(initialize_head=True, head_node_args={
    "num_cpus": 0, "include_dashboard": False,
    "_system_config": {"fetch_fail_timeout_milliseconds": 5000}})
worker = cluster.add_node(num_cpus=2)
ray.init(address=cluster.address, log_to_driver=False)
try:
    data = prepare_data(load_config(sys.argv[1]))
    rows_before = data.train.count()
    cluster.remove_node(worker, allow_graceful=False)
    rows_after = sum(len(batch["input_ids"]) for batch in data.train.iter_batches(batch_size=64))
    print("COUNTS", json.dumps({"rows_before": rows_before, "rows_after": rows_after}))
finally:
    ray.shutdown()
    cluster.shutdown()
"""


def test_packed_demo_blocks_outlive_the_node_that_packed_them(tmp_path):
    # A short Ray temp dir of its own (socket paths are limited to 107 characters): the cluster's address
    # file there cannot draw another test's ray.init() onto this cluster.
    ray_tmp = tempfile.mkdtemp(prefix="rl-", dir="/tmp")
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT / "platform"), RAY_USAGE_STATS_ENABLED="0",
               RAY_TMPDIR=ray_tmp)
    env.pop("RAY_ADDRESS", None)
    try:
        result = subprocess.run([sys.executable, "-c", _PROBE, str(REPO_ROOT / "jobs" / "configs" / "smoke.yaml")],
                                cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("COUNTS ")]
    assert lines, result.stdout[-3000:]
    counts = json.loads(lines[-1].removeprefix("COUNTS "))
    assert counts["rows_before"] > 0
    assert counts["rows_after"] == counts["rows_before"]
