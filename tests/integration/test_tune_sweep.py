"""A real Ray Tune sweep of real Ray Train runs (tiny GPT-2s, CPU) with ASHA and MLflow, interrupted with
SIGINT after its first trial and resumed: one sweep for the module."""

import json
import logging
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from raylm.config import load_config

TINY = [
    "data.demo_num_train=150", "data.demo_num_dev=20", "data.seq_len=32", "data.vocab_size=300",
    "model.size=debug", "model.num_layers=1", "train.num_workers=1", "train.micro_batch_size=8", "train.max_steps=16",
    "train.warmup_steps=2", "train.eval_every=4", "train.eval_batches=2", "train.log_every=1000",
    "tune.scheduler=asha", "tune.grace_period=2", "tune.reduction_factor=2", "tune.max_concurrent_trials=2",
    "tune.trial_start_timeout_s=600", "tracking.experiment=raylm-sweep-test",
]


def _sweep(workdir, *extra):
    return load_config(None, TINY + [f"workdir={workdir}", *extra])


class _Lines(logging.Handler):
    """Keeps the messages of raylm's log records (the lines a user of `raylm tune` reads)."""

    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def _interrupt_after_first_finished_trial(workdir: Path, interrupted: threading.Event) -> None:
    """Ctrl-C, as a user would, once one trial of the sweep under ``workdir`` has finished."""
    while not interrupted.is_set():
        for record in workdir.glob("*/trials/*/trial.json"):
            if json.loads(record.read_text()).get("status") == "finished":
                os.kill(os.getpid(), signal.SIGINT)
                interrupted.set()
                return
        time.sleep(0.5)


@pytest.fixture(scope="module")
def asha_sweep(ray_session, tmp_path_factory):
    """One ASHA sweep of four trials, interrupted with SIGINT once its first trial finished, then resumed.

    One trial at a time: an interrupted sweep resumes a trial that was in flight only when it was the only
    one (with two in flight, Tune records the second as terminated; see the closing note of issue 20)."""
    from raylm.tune.sweep import run_sweep

    workdir = tmp_path_factory.mktemp("sweep")
    # A learning rate 300x too small cannot keep up with 3e-3 by the first rung (8 steps): ASHA must stop it.
    job = _sweep(workdir, "run_name=asha", "tune.max_concurrent_trials=1",
                 "tune.space={train.lr: [3.0e-3, 1.0e-5], model.hidden_size: [32, 16]}")
    raylm_logger, lines = logging.getLogger("raylm"), _Lines()
    level = raylm_logger.level
    raylm_logger.addHandler(lines)
    raylm_logger.setLevel(logging.INFO)
    interrupted = threading.Event()
    watcher = threading.Thread(target=_interrupt_after_first_finished_trial, args=(workdir, interrupted),
                               daemon=True)
    watcher.start()
    try:
        first = run_sweep(job)
        interrupted.set()
        sweep_dir = Path(first["sweep_dir"])
        state_after_interrupt = json.loads((sweep_dir / "sweep.json").read_text())["status"]
        results = run_sweep(None, resume=str(sweep_dir))
    finally:
        interrupted.set()
        raylm_logger.removeHandler(lines)
        raylm_logger.setLevel(level)
    return job, results, lines.lines, {"first": first, "state": state_after_interrupt}


def test_an_interrupted_sweep_says_so_and_resume_reruns_no_finished_trial(asha_sweep):
    from raylm.config import ConfigError
    from raylm.tune.sweep import run_sweep

    job, results, lines, interrupted = asha_sweep
    first = interrupted["first"]
    assert first["status"] == "interrupted" and interrupted["state"] == "interrupted"
    done_before = {row["trial_id"] for row in first["trials"] if row["status"] == "finished"}
    assert 1 <= len(done_before) < 4
    # A trial in flight when Ctrl-C came (if Tune had started the next one) is unfinished, not "stopped": Tune's
    # result grid shows it terminated like an ASHA stop, but ASHA stops no trial before its grace period (2
    # evaluations). Seen before the fix: {'..._00001': ('stopped', 0)}, and a 2-trial sweep then "finished".
    statuses = {row["trial_id"]: (row["status"], row["evaluations"]) for row in first["trials"]}
    assert all(status != "stopped" or evaluations >= 2 for status, evaluations in statuses.values()), statuses
    assert any("raylm tune --resume" in line for line in lines)
    assert results["status"] == "finished" and {row["trial_id"] for row in results["trials"]} >= done_before
    for row in results["trials"]:
        starts = json.loads((Path(row["run_dir"]) / "trial.json").read_text())["starts"]
        assert starts == 1 if row["trial_id"] in done_before else starts >= 1
    with pytest.raises(ConfigError, match="already finished"):
        run_sweep(None, resume=results["sweep_dir"])


def test_asha_stops_a_trial_early_and_the_rest_finish(asha_sweep, ray_session):
    job, results, lines, _ = asha_sweep
    trials = results["trials"]
    assert len(trials) == 4 and results["status"] == "finished"
    statuses = {row["trial_id"]: row["status"] for row in trials}
    assert "error" not in statuses.values(), [row["error"] for row in trials]
    stopped = [row for row in trials if row["status"] == "stopped"]
    assert stopped, statuses
    for row in stopped:
        assert 0 < row["step"] < row["max_steps"] and row["evaluations"] >= 2  # not before the grace period
    # The grid runs the good learning rate first; the 300x smaller one is behind it at the first rung.
    assert all(row["status"] == "stopped" for row in trials if row["params"]["train.lr"] == 1e-5), statuses
    finished = [row for row in trials if row["status"] == "finished"]
    assert finished and all(row["step"] == 16 and row["evaluations"] == 4 for row in finished)
    assert results["total_steps"] < 4 * 16
    # Every evaluation reached Tune, with the tokens and FLOPs seen so far.
    for row in finished:
        assert [point["step"] for point in row["history"]] == [4, 8, 12, 16]
        assert row["D"] == 16 * 8 * 32 and row["history"][-1]["tokens_seen"] == row["D"]
        assert row["N"] > 0 and row["history"][-1]["flops_seen"] > 6 * row["N"] * row["D"]
    # The table ranks by final dev loss, and the best trial is a finished one with the good learning rate.
    losses = [row["eval_loss"] for row in trials]
    assert losses == sorted(losses)
    best = next(row for row in trials if row["trial_id"] == results["best_trial"])
    assert best["status"] == "finished" and best["params"]["train.lr"] == 3e-3
    assert any(line.startswith("rank  trial") for line in lines)
    assert any("eval loss" in line for line in lines)  # progress while it ran
    # No placement group of a stopped trial is left holding CPUs.
    deadline = time.time() + 120
    while ray_session.available_resources().get("CPU", 0) < ray_session.cluster_resources()["CPU"] - 0.01:
        assert time.time() < deadline, ray_session.available_resources()
        time.sleep(2)


def test_sweep_folder_holds_table_plots_and_best_model(asha_sweep):
    job, results, _, _ = asha_sweep
    folder = Path(results["sweep_dir"])
    # asha_state.pkl: ASHA's rungs, read back by a resumed sweep (raylm.tune.scheduler; test_tune_config).
    for name in ("sweep.json", "config.yaml", "results.json", "results.csv", "loss_vs_compute.png",
                 "asha_state.pkl"):
        assert (folder / name).is_file(), name
    assert (Path(results["best_model_dir"]) / "model.safetensors").is_file()
    card = json.loads((Path(results["best_model_dir"]) / "raylm.json").read_text())
    assert card["trial_id"] == results["best_trial"]
    # Four trials, at most two finished: too few for the five-parameter fit, said plainly.
    assert results["fit"] is None and "needs tune.min_fit_trials=5" in results["fit_problem"]
    # Each trial trained in its own folder named by its Tune trial id.
    for row in results["trials"]:
        assert Path(row["run_dir"]).name == row["trial_id"]
        assert (Path(row["run_dir"]) / "ray_results" / "trial").is_dir()


def test_every_trial_is_a_child_mlflow_run_with_its_eval_curve(asha_sweep):
    from mlflow.tracking import MlflowClient

    job, results, _, _ = asha_sweep
    client = MlflowClient(tracking_uri=job.resolved_tracking_uri())
    parent = client.get_run(results["parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["num_trials"] == 4 and parent.data.tags["raylm.best_trial"] == results["best_trial"]
    artifacts = {item.path for item in client.list_artifacts(parent.info.run_id)}
    assert {"results.csv", "results.json", "loss_vs_compute.png"} <= artifacts
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 4
    by_trial = {run.data.tags["raylm.trial_id"]: run for run in children}
    for row in results["trials"]:
        child = by_trial[row["trial_id"]]
        curve = sorted((m.step, m.value) for m in client.get_metric_history(child.info.run_id, "eval_loss"))
        reported = [point["step"] for point in row["history"]]
        # Rank 0 logs to MLflow itself: a stopped trial may log one more evaluation than Tune took.
        assert [step for step, _ in curve][:len(reported)] == reported
        if row["status"] == "finished":
            assert [step for step, _ in curve] == reported
        expected = {"finished": "FINISHED", "stopped": "KILLED"}[row["status"]]
        assert child.info.status == expected
        assert child.data.params["train.lr"] == str(row["params"]["train.lr"])
    # The key file's path (unset here) may be a param; the key never is.
    assert all(not key.startswith("serve.api_key") or key == "serve.api_key_file"
               for run in children for key in run.data.params)
