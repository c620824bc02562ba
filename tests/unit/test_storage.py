"""raylm.common.storage: locations as paths or URIs; whole-file writes; folder upload and download (local file system).

The same functions against a real S3 API (moto's server) run in tests/integration/test_cluster.py.
"""

import json
from pathlib import Path

import pytest

from raylm.lifecycle import runs
from raylm.common import storage
from raylm.config import ConfigError, load_config


def test_locations_join_and_split_for_uris_and_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.is_remote("s3://bucket/runs") and storage.is_remote("gs://b/x")
    assert not storage.is_remote("runs") and not storage.is_remote("file:///tmp/x")
    assert storage.join("s3://bucket/runs/", "r1", "run.json") == "s3://bucket/runs/r1/run.json"
    assert storage.parent("s3://bucket/runs/r1") == "s3://bucket/runs"
    assert storage.basename("gs://b/runs/r1/") == "r1"
    assert storage.join("runs", "r1") == str(tmp_path / "runs" / "r1")
    assert storage.normalize("file:///tmp/x/") == "/tmp/x"
    assert storage.parent(str(tmp_path / "a" / "b")) == str(tmp_path / "a")


def test_write_read_and_folder_round_trip(tmp_path):
    target = tmp_path / "deep" / "record.json"
    storage.write_text(target, '{"a": 1}')
    assert json.loads(storage.read_text(target)) == {"a": 1}
    assert not [p for p in target.parent.iterdir() if p.name.endswith(".tmp")]  # temporary name renamed away
    with pytest.raises(FileNotFoundError):
        storage.read_text(tmp_path / "missing.json")

    source = tmp_path / "model"
    (source / "sub").mkdir(parents=True)
    (source / "weights.bin").write_bytes(b"\x00\x01" * 1000)
    (source / "sub" / "config.json").write_text("{}")
    destination = tmp_path / "published"
    (destination / "stale").mkdir(parents=True)
    (destination / "stale" / "old.txt").write_text("old")
    storage.upload_folder(source, destination)
    assert sorted(str(p.relative_to(destination)) for p in destination.rglob("*") if p.is_file()) == [
        "sub/config.json", "weights.bin"]  # the old contents are replaced, not merged
    copy = storage.download_folder(destination, tmp_path / "copy")
    assert (copy / "weights.bin").read_bytes() == b"\x00\x01" * 1000
    with pytest.raises(FileNotFoundError):
        storage.download_folder(tmp_path / "nope", tmp_path / "x")


def test_job_locations_for_local_and_remote_workdirs(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    local = load_config(None, [f"workdir={tmp_path}", "run_id=r1"])
    assert local.run_uri == str(tmp_path / "r1") and local.run_dir == tmp_path / "r1"
    assert runs.model_uri(local) == str(tmp_path / "r1" / "model")
    assert local.resolved_tracking_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}"

    remote = load_config(None, ["workdir=s3://bucket/runs", "run_id=r1"])
    assert remote.storage_is_remote and remote.run_uri == "s3://bucket/runs/r1"
    assert runs.model_uri(remote) == "s3://bucket/runs/r1/model"
    with pytest.raises(ConfigError, match="is remote"):
        remote.run_dir
    # An SQLite file cannot live in an object store: no default tracking URI, unless MLflow's own variable names one.
    assert remote.resolved_tracking_uri() is None
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    assert remote.resolved_tracking_uri() == "http://mlflow.internal:5000"
    assert load_config(None, ["workdir=s3://b/r", "tracking.tracking_uri=http://x:1"]).resolved_tracking_uri() == \
        "http://x:1"


def test_run_records_resume_from_a_folder_given_as_a_file_uri(tmp_path):
    job = load_config(None, [f"workdir={tmp_path}", "run_name=uri", "model.size=debug"])
    runs.begin_run(job)
    resumed = load_config(None, ["workdir=/elsewhere", "run_name=uri", "model.size=debug"])
    runs.begin_run(resumed, resume=f"file://{job.run_dir}")
    assert resumed.run_id == job.run_id and resumed.run_dir == job.run_dir
    assert runs.read_record(job.run_uri)["attempts"] == 2
    assert Path(storage.join(job.run_uri, runs.RECORD_FILE)).is_file()
