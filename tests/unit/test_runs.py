"""Run identity (raylm.lifecycle.runs): fresh ids, explicit resume, config checks, secrets kept out of records."""

import json

import pytest

from raylm.lifecycle import runs
from raylm.config import ConfigError, load_config

BASE = ["model.size=debug", "train.max_steps=20", "train.warmup_steps=2", "run_name=idtest"]


def _job(tmp_path, *overrides):
    return load_config(None, [*BASE, f"workdir={tmp_path}", *overrides])


def test_fresh_runs_get_distinct_ids_and_folders(tmp_path):
    first, second = _job(tmp_path), _job(tmp_path)
    runs.begin_run(first)
    runs.begin_run(second)
    assert first.run_id != second.run_id
    assert first.run_id.startswith("idtest-") and first.run_dir == tmp_path / first.run_id
    record = json.loads((first.run_dir / runs.RECORD_FILE).read_text())
    assert record["status"] == "running" and record["config_hash"] == runs.config_hash(first)


def _finished_run(tmp_path):
    """A run begun and recorded as finished after 20 steps."""
    job = _job(tmp_path)
    runs.begin_run(job)
    record = runs.read_record(job.run_dir)
    record.update(status="finished", trained_steps=20)
    runs.write_record(job.run_dir, record)
    return job


def test_resume_by_id_or_folder_allows_extending_max_steps(tmp_path):
    job = _finished_run(tmp_path)
    by_id = _job(tmp_path, "train.max_steps=40", "train.log_every=3")
    resumed = runs.begin_run(by_id, resume=job.run_id)
    assert by_id.run_id == job.run_id and by_id.run_dir == job.run_dir and resumed["attempts"] == 2
    elsewhere = load_config(None, [*BASE, "workdir=/nonexistent", "train.max_steps=40"])
    runs.begin_run(elsewhere, resume=str(job.run_dir))
    assert elsewhere.run_dir == job.run_dir


def test_resume_with_a_changed_config_names_the_keys(tmp_path):
    job = _job(tmp_path)
    runs.begin_run(job)
    changed = _job(tmp_path, "train.lr=1e-2", "model.dropout=0.1")
    with pytest.raises(ConfigError) as err:
        runs.begin_run(changed, resume=job.run_id)
    message = str(err.value)
    assert "model.dropout, train.lr" in message and "\n" not in message


def test_a_key_added_after_the_run_started_counts_as_its_default(tmp_path):
    job = _job(tmp_path)
    runs.begin_run(job)
    record = runs.read_record(job.run_dir)
    del record["identity"]["train.schedule"]  # a run recorded before raylm had train.schedule
    runs.write_record(job.run_dir, record)
    runs.begin_run(_job(tmp_path, "tune.num_samples=3"), resume=job.run_id)  # the default schedule: same run
    with pytest.raises(ConfigError, match="differs in train.schedule"):
        runs.begin_run(_job(tmp_path, "train.schedule=wsd"), resume=job.run_id)


def test_same_global_batch_on_other_workers_may_resume(tmp_path):
    job = _job(tmp_path, "train.num_workers=2", "train.micro_batch_size=4")
    runs.begin_run(job)
    other = _job(tmp_path, "train.num_workers=1", "train.global_batch_size=8", "train.micro_batch_size=4")
    runs.begin_run(other, resume=job.run_id)
    bigger = _job(tmp_path, "train.num_workers=1", "train.micro_batch_size=16")
    with pytest.raises(ConfigError, match="train.global_batch_size"):
        runs.begin_run(bigger, resume=job.run_id)


def test_resuming_a_finished_run_without_more_steps_is_refused(tmp_path):
    job = _job(tmp_path)
    runs.begin_run(job)
    record = runs.read_record(job.run_dir)
    record.update(status="finished", trained_steps=20, registered=[{"uri": "models:/m/1", "step": 20}])
    runs.write_record(job.run_dir, record)
    with pytest.raises(ConfigError, match="already finished at step 20"):
        runs.begin_run(_job(tmp_path), resume=job.run_id)
    assert runs.registered_at(record, 20) == "models:/m/1" and runs.registered_at(record, 40) is None


def test_unknown_run_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="no run 'nope'"):
        runs.begin_run(_job(tmp_path), resume="nope")


def test_api_key_is_secret_everywhere(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYLM_API_KEY", "sk-very-secret")
    job = _job(tmp_path)
    assert job.serve.api_key_value() == "sk-very-secret"
    assert "sk-very-secret" not in job.to_yaml() and "sk-very-secret" not in repr(job)
    assert "api_key" not in job.public_dict()["serve"]
    runs.begin_run(job)
    assert "sk-very-secret" not in (job.run_dir / runs.RECORD_FILE).read_text()
    config_file = tmp_path / "masked.yaml"
    config_file.write_text("serve:\n  api_key: '**********'\n")
    with pytest.raises(ConfigError, match="redaction mask"):
        load_config(config_file, [*BASE, f"workdir={tmp_path}"])


def test_sigterm_raises_inside_the_block_and_the_previous_handler_comes_back():
    import os
    import signal

    from raylm.common import interrupts

    def previous(signum, frame):  # stands in for the handler ray.init installs
        raise AssertionError("the displaced handler ran")

    original = signal.signal(signal.SIGTERM, previous)
    try:
        with pytest.raises(interrupts.Terminated, match="stopped by SIGTERM") as caught:
            with interrupts.sigterm_raises() as renew:
                signal.signal(signal.SIGTERM, signal.default_int_handler)  # what ray.init would do
                renew()
                os.kill(os.getpid(), signal.SIGTERM)
        # Ray re-raises an interrupt that arrives while it waits as a plain KeyboardInterrupt: still SIGTERM's.
        assert interrupts.was_terminated(caught.value) and interrupts.was_terminated(KeyboardInterrupt())
        assert interrupts.ended_status(caught.value) == ("killed", "KILLED")
        assert interrupts.ended_status(ValueError("bad")) == ("failed", "FAILED")
        # After the block: the handler installed inside it (ray.init's), not ours and not the one before.
        assert signal.getsignal(signal.SIGTERM) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGTERM, original)


def test_check_resume_refuses_as_begin_run_does_and_writes_nothing(tmp_path):
    job = _finished_run(tmp_path)
    written = (job.run_dir / runs.RECORD_FILE).read_text()
    with pytest.raises(ConfigError, match=f"the config of run {job.run_id} differs in train.lr;"):
        runs.check_resume(_job(tmp_path, "train.lr=1e-2"), job.run_id)
    with pytest.raises(ConfigError, match="already finished at step 20"):
        runs.check_resume(_job(tmp_path), str(job.run_dir))
    longer = load_config(None, [*BASE, "workdir=/nonexistent", "train.max_steps=40"])
    runs.check_resume(longer, str(job.run_dir))
    assert longer.run_id is None and longer.workdir == "/nonexistent"  # the caller's job is left as it is
    assert (job.run_dir / runs.RECORD_FILE).read_text() == written
