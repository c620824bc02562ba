"""Checkpoints under real Ray Train: resume after SIGKILL, corrupt-checkpoint fallback, N -> M workers.

The runs use raylm's own driver and worker loop (``run_training``) on a small
synthetic corpus of packed blocks (arithmetic sequences, learnable in a few
dozen steps), so they do not depend on the demo data.

- A 2-worker FSDP2 run with ``max_failures=1`` has one worker SIGKILLed after its
  first checkpoint is registered; it must restart from a checkpoint (not from
  0) and finish at ``max_steps``. The steps between that checkpoint and the
  kill run twice; because the shards, the data position, the optimiser and the
  RNG all resume exactly (each worker's weight and optimiser shards written by
  that worker with torch.distributed.checkpoint), the second attempt logs the
  same losses (rel 1e-5).
  It evaluates at every checkpoint and keeps the best one apart.
- That run's latest checkpoint is then corrupted, and the run is started again
  under the same run name with 1 worker (same global batch through gradient
  accumulation): it skips the corrupt checkpoint (one byte of worker 1's part
  flipped), loads the previous one (saved by 2 FSDP workers, resharded for 1)
  and continues at the same step, learning rate and rows, so with the losses of the 2-worker run. (One
  2-worker run serves both: a worker group start costs more than its training.)
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from raylm.config import load_config
from raylm.train.checkpoint import BEST_CHECKPOINT, read_history, read_state, verify_checkpoint

VOCAB, SEQ_LEN = 96, 32


class SyntheticTokenizer:
    """Just what the driver needs from a tokenizer: vocabulary size and special ids."""

    eos_token_id = 0
    pad_token_id = 0

    def __len__(self) -> int:
        return VOCAB


def synthetic_datasets(num_train: int = 512, num_dev: int = 64, seed: int = 0):
    import ray.data

    rng = np.random.default_rng(seed)

    def rows(count):
        out = []
        for _ in range(count):
            start, stride = rng.integers(1, VOCAB), rng.integers(1, 4)
            ids = ((start + stride * np.arange(SEQ_LEN)) % (VOCAB - 1) + 1).astype(np.int64)
            labels = ids.copy()
            labels[: rng.integers(1, 8)] = -100
            out.append({"input_ids": ids, "labels": labels, "position_ids": np.arange(SEQ_LEN, dtype=np.int64)})
        return out

    return ray.data.from_items(rows(num_train)), ray.data.from_items(rows(num_dev))


def make_job(workdir: Path, run_name: str, *overrides: str):
    return load_config(None, [
        f"workdir={workdir}", f"run_name={run_name}", f"data.seq_len={SEQ_LEN}", "model.size=debug",
        "train.num_workers=2", "train.micro_batch_size=4", "train.lr=3e-3", "train.warmup_steps=2",
        "train.log_every=1", "train.eval_every=4", "train.eval_batches=2", "train.keep_checkpoints=3",
        "tracking.enabled=false", *overrides,
    ])


def _train(job):
    from raylm.train.driver import run_training

    train, dev = synthetic_datasets()
    return run_training(job, train, dev, SyntheticTokenizer())


def _ray_train_workers() -> list:
    """Live Ray Train worker processes of this test session's Ray (children of our raylet)."""
    import psutil

    workers = []
    for raylet in psutil.Process().children(recursive=True):
        if "raylet" not in raylet.name():
            continue
        for child in raylet.children():
            try:
                if "RayTrainWorker" in " ".join(child.cmdline()):
                    workers.append(child)
            except psutil.NoSuchProcess:
                continue
    return workers


def _registered_checkpoint_step(experiment: Path) -> int | None:
    """The step of the latest checkpoint Ray Train has registered (from its manager's snapshot)."""
    try:
        snapshot = json.loads((experiment / "checkpoint_manager_snapshot.json").read_text())
        return int(snapshot["latest_checkpoint_result"]["metrics"]["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


# ----------------------------------------------------------------- SIGKILL

# Few checkpoints: each report after the first waits for Ray Train's controller poll (2 s).
MAX_STEPS, CHECKPOINT_EVERY = 40, 10
FAULT_OVERRIDES = (f"train.max_steps={MAX_STEPS}", f"train.checkpoint_every={CHECKPOINT_EVERY}", "train.max_failures=1",
                   f"train.eval_every={CHECKPOINT_EVERY}", "train.parallel=fsdp")


@pytest.fixture(scope="module")
def killed_run(ray_session, tmp_path_factory):
    from raylm.common import tracking
    from raylm.train.driver import experiment_dir, run_training

    workdir = tmp_path_factory.mktemp("fault")
    job = make_job(workdir, "killed", *FAULT_OVERRIDES, "tracking.enabled=true")
    tracking_uri = job.resolved_tracking_uri()
    run_id = tracking.start_run(tracking_uri, "raylm-test", job.run_name, job.model_dump(mode="json"))
    outcome: dict = {}

    def fit():
        try:
            train, dev = synthetic_datasets()
            outcome["result"] = run_training(job, train, dev, SyntheticTokenizer(), mlflow_run_id=run_id)
        except BaseException as err:  # surfaced by the assertions below
            outcome["error"] = err

    thread = threading.Thread(target=fit)
    thread.start()
    import mlflow

    client = mlflow.tracking.MlflowClient(tracking_uri=tracking_uri)
    experiment = experiment_dir(job)
    deadline = time.time() + 300
    killed = None
    while thread.is_alive() and time.time() < deadline and killed is None:
        time.sleep(0.05)
        registered = _registered_checkpoint_step(experiment)
        if not registered:
            continue
        # Kill once a few steps past the registered checkpoint have been logged, so that
        # the restarted run has lost steps to repeat.
        logged_steps = [metric.step for metric in client.get_metric_history(run_id, "loss")]
        workers = _ray_train_workers()
        if logged_steps and max(logged_steps) >= registered + 2 and len(workers) == 2:
            victim = max(workers, key=lambda process: process.pid)
            os.kill(victim.pid, signal.SIGKILL)
            killed = {"pid": victim.pid, "registered_step": registered, "logged_step": max(logged_steps)}
    thread.join(timeout=600)
    logged: dict[int, list[float]] = {}
    for metric in client.get_metric_history(run_id, "loss"):
        logged.setdefault(metric.step, []).append(metric.value)
    # What Ray Train kept, read now: the one-worker run below continues in the same folder.
    snapshot = json.loads((experiment / "checkpoint_manager_snapshot.json").read_text())
    kept = {"snapshot_steps": [entry["metrics"]["step"] for entry in snapshot["checkpoint_results"]],
            "folders": sorted(path.name for path in experiment.glob("checkpoint_*") if path.is_dir())}
    return job, outcome, killed, logged, kept


def test_sigkilled_worker_resumes_and_finishes(killed_run):
    job, outcome, killed, _, kept = killed_run
    assert killed is not None, "the run ended before a worker could be killed"
    assert "error" not in outcome, outcome.get("error")
    result = outcome["result"]
    assert result.metrics["step"] == job.train.max_steps
    assert read_state(result.checkpoint_dir)["step"] == job.train.max_steps
    resumed = result.metrics["resumed_from_step"]
    assert resumed >= killed["registered_step"] > 0
    assert resumed % CHECKPOINT_EVERY == 0 and resumed < job.train.max_steps
    history = {row["step"]: row for row in result.history}
    assert sorted(history) == list(range(1, MAX_STEPS + 1))
    # Retention: Ray Train keeps the last keep_checkpoints=3 and deletes older folders.
    assert kept["snapshot_steps"] == [20, 30, 40]
    assert not [name for name in kept["folders"] if name.startswith("checkpoint_step00000010_")]
    for step, row in history.items():
        assert row["resumed_from_step"] == (0 if step <= resumed else resumed)
    assert history[MAX_STEPS]["loss"] < 0.6 * history[1]["loss"]


def test_resumed_steps_repeat_the_lost_ones_exactly(killed_run):
    """Rank 0 logged each step to MLflow once per attempt. The steps between the checkpoint and
    the kill ran twice: from the same weights, optimiser state, RNG and data position, the
    second attempt must reproduce the first (rel 1e-5)."""
    _, outcome, _, logged, _ = killed_run
    resumed = outcome["result"].metrics["resumed_from_step"]
    assert sorted(logged) == list(range(1, MAX_STEPS + 1))
    assert all(len(logged[step]) == 1 for step in range(1, resumed + 1))  # rank 0 only, one attempt
    repeated = [step for step, values in logged.items() if len(values) == 2]
    assert repeated and min(repeated) == resumed + 1, repeated
    for step in repeated:
        first, second = logged[step]
        assert second == pytest.approx(first, rel=1e-5), step


# ----------------------------------------------------------------- corrupt + N -> M

@pytest.fixture(scope="module")
def fsdp_then_one_worker(killed_run):
    """The killed 2-worker FSDP run, its latest checkpoint corrupted, continued by 1 DDP worker."""
    from raylm.train.driver import experiment_dir

    first_job, outcome, _, _, _ = killed_run
    if "result" not in outcome:
        pytest.fail(f"the 2-worker run failed: {outcome.get('error')}")
    first = outcome["result"]
    experiment = experiment_dir(first_job)
    checkpoints = {read_state(m.parent)["step"]: m.parent for m in experiment.glob("checkpoint_*/manifest.json")}
    first_snapshot = {"checkpoints": sorted(checkpoints), "history": first.history,
                      "best": read_state(experiment / BEST_CHECKPOINT),
                      "niceness": read_state(checkpoints[MAX_STEPS - CHECKPOINT_EVERY])["worker_niceness"]}
    weights = checkpoints[MAX_STEPS] / "dcp" / "__1_0.distcp"  # rank 1's part: rank 0's manifest covers it
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    # The second run keeps the cluster's worker niceness (Ray's 15); the first ran at raylm's default 0.
    second_job = make_job(first_job.workdir, first_job.run_name, *FAULT_OVERRIDES, "train.parallel=ddp",
                          "train.num_workers=1", "train.global_batch_size=8", "train.max_failures=0",
                          "train.worker_niceness=null")
    second = _train(second_job)
    return first_job, first_snapshot, second_job, second


def test_fsdp_checkpoints_every_n_steps_and_keeps_best(fsdp_then_one_worker):
    first_job, snapshot, _, _ = fsdp_then_one_worker
    assert snapshot["checkpoints"] == [20, 30, 40]  # every 10 steps, the last keep_checkpoints=3
    evals = {row["step"]: row["eval_loss"] for row in snapshot["history"] if "eval_loss" in row}
    assert sorted(evals) == [10, 20, 30, 40]
    assert snapshot["best"]["eval_loss"] == pytest.approx(min(evals.values()))
    assert snapshot["best"]["step"] == min(evals, key=evals.get)


def test_one_worker_resumes_from_the_last_good_two_worker_checkpoint(fsdp_then_one_worker):
    _, snapshot, second_job, second = fsdp_then_one_worker
    assert second_job.train.grad_accum_steps == 2  # derived: same global batch of 8 on 1 worker
    assert second.metrics["resumed_from_step"] == 30  # step 40 is corrupt; step 30 verifies
    assert second.metrics["step"] == MAX_STEPS
    first = {row["step"]: row for row in snapshot["history"]}
    after = {row["step"]: row for row in second.history}
    assert sorted(after) == list(range(1, MAX_STEPS + 1))
    for step in range(1, 31):  # the restored history is the first run's
        assert after[step]["loss"] == first[step]["loss"]
    for step in range(31, MAX_STEPS + 1):  # the schedule continues where it was
        assert after[step]["lr"] == pytest.approx(first[step]["lr"], rel=1e-12)
        # Loaded weights, and the same rows in each global batch on 1 worker as on 2 (the run-wide sample
        # order): the first run's losses, up to the order of the reductions (FSDP2 on 2 ranks vs 1 DDP rank).
        assert after[step]["loss"] == pytest.approx(first[step]["loss"], rel=2e-4)
    assert after[31]["loss"] < 0.9 * first[1]["loss"]


def test_training_workers_run_at_the_configured_niceness(fsdp_then_one_worker):
    import ray

    _, snapshot, _, second = fsdp_then_one_worker
    ray_default = ray.get(ray.remote(num_cpus=0)(lambda: os.nice(0)).remote())  # any other Ray worker
    assert ray_default > os.nice(0)  # Ray nices its workers (15 by default)
    assert snapshot["niceness"] == os.nice(0)  # train.worker_niceness=0: like this process, not like Ray's workers
    assert read_state(second.checkpoint_dir)["worker_niceness"] == ray_default  # null: the cluster's setting


def test_final_checkpoint_verifies_and_exports(fsdp_then_one_worker, tmp_path):
    from raylm.train.driver import export_model

    _, _, _, second = fsdp_then_one_worker
    verify_checkpoint(second.checkpoint_dir)
    assert read_state(second.checkpoint_dir)["world_size"] == 1
    assert len(read_history(second.checkpoint_dir)) == MAX_STEPS

    class Tokenizer(SyntheticTokenizer):
        def save_pretrained(self, folder):
            (Path(folder) / "tokenizer_config.json").write_text("{}")

    folder = export_model(second.checkpoint_dir, Tokenizer(), tmp_path / "model", {})
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    assert model.config.n_layer == 2 and model.config.vocab_size == VOCAB
