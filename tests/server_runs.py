"""Two tiny GPT-2 runs trained once per test run against the run's MLflow server (``server_runs`` in conftest).

``workflow.train`` runs them as a user would, with ``tracking.promote_alias``:
a short one (1 worker, 8 steps) and a long one (2 DDP workers, 40 steps,
checkpoints every 20) on the four demo tasks. test_registry_server.py checks
registration, the promotion gate, lineage, secrets and serving by alias on
both; test_train_pipeline.py checks the long one as a 2-worker run (model
folder, logged metrics, checkpoints, ``raylm eval``). One set of runs serves
both: a run costs a Ray Train worker group, an export, an evaluation and a
registration, far more than its steps.

The runs are given an API key (from the environment) and a token in their
tracking URI (``http://user:token@host``, which the server ignores); the
driver's raylm log lines are captured, so that the server tests can check
that neither secret is written anywhere.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from raylm.config import JobConfig, load_config

MODEL = "served-by-alias"
SECRET = "s3cret-api-key-do-not-log"
URI_TOKEN = "uri-t0ken-do-not-log"
BASE = [
    "data.demo_num_train=300", "data.demo_num_dev=40", "data.seq_len=64", "data.vocab_size=400",
    "model.size=debug", "train.micro_batch_size=8", "train.lr=3e-3", "eval.max_examples_per_task=40",
    "eval.max_new_tokens=8", "eval.bootstrap_samples=500", "eval.promotion_metrics=[lm_perplexity]",
    f"tracking.model_name={MODEL}", "tracking.promote_alias=production", "tracking.experiment=server-test",
]
# name, overrides: the long run trains 2 DDP workers five times as long and must beat the short one.
RUNS = (
    ("short", ["train.num_workers=1", "train.max_steps=8", "train.warmup_steps=2", "train.eval_every=4",
               "train.log_every=10"]),
    ("long", ["train.num_workers=2", "train.max_steps=40", "train.warmup_steps=4", "train.eval_every=20",
              "train.checkpoint_every=20", "train.log_every=5"]),
)


@dataclass
class ServerRuns:
    summaries: list[dict[str, Any]]  # short, long: workflow.train's summaries
    jobs: list[JobConfig]
    parent_run_id: str  # the MLflow run both are children of (tracking.parent_run_id)
    workdir: Path
    log_lines: list[str]  # the driver's raylm log lines during both runs


class _LogLines(logging.Handler):
    """The driver's raylm log lines, as formatted messages."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def train_server_runs(server: str, workdir: Path) -> ServerRuns:
    """Train the short and the long run against the MLflow server at ``server``, in ``workdir``."""
    import mlflow

    from raylm.lifecycle import workflow

    client = mlflow.tracking.MlflowClient(server)
    parent = client.create_run(client.create_experiment("server-test-parent")).info.run_id
    credentialed = server.replace("http://", f"http://raylm:{URI_TOKEN}@")
    lines = _LogLines()
    raylm_logger = logging.getLogger("raylm")
    level = raylm_logger.level
    raylm_logger.addHandler(lines)
    raylm_logger.setLevel(logging.INFO)
    summaries, jobs = [], []
    try:
        for name, overrides in RUNS:
            with pytest.MonkeyPatch.context() as patch:  # the key reaches the config from the environment
                patch.setenv("RAYLM_API_KEY", SECRET)
                job = load_config(None, BASE + overrides + [
                    f"workdir={workdir}", f"run_name={name}", f"tracking.tracking_uri={credentialed}",
                    f"tracking.parent_run_id={parent}"])
            assert job.serve.api_key_value() == SECRET
            jobs.append(job)
            summaries.append(workflow.train(job))
    finally:
        raylm_logger.removeHandler(lines)
        raylm_logger.setLevel(level)
    return ServerRuns(summaries, jobs, parent, workdir, lines.messages)
