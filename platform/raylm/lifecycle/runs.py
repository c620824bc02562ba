"""Run identity: every training run has an id, a folder and a record of what it did.

``raylm train`` starts a fresh run by default: a new id (``<run_name>-<UTC
time>-<random>``) and a new folder ``<workdir>/<run id>``. Resuming is explicit
(``--resume <run id or folder>``) and only allowed when the stored config
matches the new one, apart from :data:`RESUMABLE_KEYS`, the settings that do
not change what the finished steps computed. Ray Train's own restarts after a
worker failure happen inside one run and need none of this.

The record (``run.json`` in the run folder) says which MLflow run describes
the run, how far it trained and which model versions were registered from
which step, so a rerun never logs work that did not happen and never
registers the same weights twice.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from raylm.common import storage
from raylm.common.fingerprints import fingerprint
from raylm.common.run_ids import new_run_id
from raylm.config import ConfigError, JobConfig

RECORD_FILE = "run.json"

# Dotted keys (or whole sections, ending in ".") that may differ between a run and its resumption:
# they change how long the run goes on, how often it reports, or what happens after training,
# never what the steps already taken computed. Extending train.max_steps recomputes the decay
# of the schedule from the resumed step on.
RESUMABLE_KEYS: tuple[str, ...] = (
    "run_id", "workdir",
    "train.max_steps", "train.log_every", "train.eval_every", "train.eval_batches", "train.checkpoint_every",
    "train.keep_checkpoints", "train.keep_best_checkpoint", "train.max_failures", "train.num_workers",
    "train.micro_batch_size", "train.grad_accum_steps", "train.cpus_per_worker", "train.threads_per_worker",
    "train.use_gpu", "train.placement_strategy", "train.export", "train.worker_niceness", "data.test_sources",
    "eval.", "serve.", "tracking.", "tune.",
)


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), item, out)
    else:
        out[prefix] = value


def flat_config(job: JobConfig | dict[str, Any]) -> dict[str, Any]:
    """The public config as ``{dotted key: value}``."""
    out: dict[str, Any] = {}
    _flatten("", job.public_dict() if isinstance(job, JobConfig) else job, out)
    return out


def _resumable(key: str) -> bool:
    return any(key == entry or (entry.endswith(".") and key.startswith(entry)) for entry in RESUMABLE_KEYS)


def identity(job: JobConfig) -> dict[str, Any]:
    """What defines the computation of a run: the flat config without :data:`RESUMABLE_KEYS`."""
    flat = flat_config(job)
    # The global batch, not how it is split over workers and accumulation steps, defines the run.
    flat["train.global_batch_size"] = job.train.effective_global_batch_size
    return {key: value for key, value in flat.items() if not _resumable(key)}


def config_hash(job: JobConfig) -> str:
    """SHA-256 (16 hex digits) of the config without :data:`RESUMABLE_KEYS`."""
    return fingerprint(identity(job), length=16)


def config_differences(stored: dict[str, Any], job: JobConfig) -> list[str]:
    """Keys whose value differs between a stored :func:`identity` and ``job``'s.

    A key the stored identity lacks was added to raylm after that run started: the
    run computed what its default computes, so it differs only if ``job`` sets it
    to something else than the default.
    """
    before = {key: value for key, value in stored.items() if not _resumable(key)}
    after = identity(job)
    missing = set(after) - set(before)
    if missing:
        defaults = flat_config(JobConfig())
        before.update({key: defaults[key] for key in missing if key in defaults})
    return sorted(key for key in set(before) | set(after) if before.get(key) != after.get(key))


def read_record(run_location: str | os.PathLike) -> dict[str, Any]:
    """The record of the run in folder ``run_location`` (a path or a URI)."""
    path = storage.join(run_location, RECORD_FILE)
    try:
        return json.loads(storage.read_text(path))
    except FileNotFoundError:
        raise ConfigError(f"resume: {run_location} is not a raylm run (no {RECORD_FILE})") from None
    except ValueError:
        raise ConfigError(f"resume: {path} is not valid JSON") from None


def write_record(run_location: str | os.PathLike, record: dict[str, Any]) -> None:
    """Write ``run.json`` whole (readers never see half a record), locally or to an object store."""
    record["updated"] = time.time()
    storage.write_text(storage.join(run_location, RECORD_FILE), json.dumps(record, indent=2, default=str))


def locate_run(job: JobConfig, reference: str) -> str:
    """The folder of the run ``reference`` names: a run folder (path or URI), or a run id under ``job.workdir``."""
    candidates = [reference]
    if "/" not in reference.rstrip("/"):
        candidates.append(storage.join(job.workdir, reference))
    for candidate in candidates:
        try:
            if storage.is_file(storage.join(candidate, RECORD_FILE)):
                return storage.normalize(candidate)
        except OSError:  # an unreachable or unknown file system: try the next reading
            continue
    raise ConfigError(f"resume: no run {reference!r} (neither a run folder nor a run id under {job.workdir})")


def begin_run(job: JobConfig, resume: str | None = None) -> dict[str, Any]:
    """Give ``job`` its run id and folder and return the run's record (written to ``run.json``).

    Fresh runs get a new id. With ``resume`` the stored record is checked against
    ``job``: a config that differs outside :data:`RESUMABLE_KEYS` raises
    :class:`ConfigError` naming the keys, and so does resuming a run that already
    reached ``train.max_steps``.
    """
    if resume is None:
        job.run_id = job.run_id or new_run_id(job.run_name)
        if storage.exists(storage.join(job.run_uri, RECORD_FILE)):
            raise ConfigError(f"run {job.run_id} already exists in {job.workdir}; resume it with --resume {job.run_id}")
        storage.make_dirs(job.run_uri)
        record = {"run_id": job.run_id, "run_name": job.run_name, "config_hash": config_hash(job),
                  "identity": identity(job), "status": "running", "created": time.time(), "attempts": 1,
                  "trained_steps": 0, "mlflow_run_id": None, "registered": []}
        write_record(job.run_uri, record)
        return record
    run_location, record = _resumable_record(job, resume)
    record.update(status="running", attempts=int(record.get("attempts", 1)) + 1)
    write_record(run_location, record)
    return record


def check_resume(job: JobConfig, resume: str) -> None:
    """:func:`begin_run`'s checks of ``--resume`` alone: nothing is written and ``job`` is left as it is."""
    _resumable_record(job.model_copy(deep=True), resume)


def _resumable_record(job: JobConfig, resume: str) -> tuple[str, dict[str, Any]]:
    """The folder and record of the run ``resume`` names, once its config is known to match ``job``'s.

    Gives ``job`` the run's workdir, id and name.
    """
    run_location = locate_run(job, resume)
    record = read_record(run_location)
    job.workdir = storage.parent(run_location)
    job.run_id = record["run_id"]
    if record["run_name"] != job.run_name:
        # The run name is part of the id; take the stored one rather than fail on a default.
        job.run_name = record["run_name"]
    differences = config_differences(record["identity"], job)
    if differences:
        shown = ", ".join(differences[:6]) + (f" and {len(differences) - 6} more" if len(differences) > 6 else "")
        raise ConfigError(f"resume: the config of run {job.run_id} differs in {shown}; only "
                          f"{', '.join(key.rstrip('.') for key in RESUMABLE_KEYS[2:])} may change on resume")
    trained = int(record.get("trained_steps") or 0)
    if record.get("status") == "finished" and trained >= job.train.max_steps:
        raise ConfigError(f"resume: run {job.run_id} already finished at step {trained}; "
                          f"raise train.max_steps above {trained} to train it further")
    return run_location, record


def registered_at(record: dict[str, Any], step: int) -> str | None:
    """The registry URI already registered from ``step`` of this run, if any."""
    for entry in record.get("registered", []):
        if int(entry.get("step", -1)) == int(step):
            return entry["uri"]
    return None


def model_uri(job: JobConfig) -> str:
    """Where a run's exported model folder lives: ``<run folder>/model``, a local path or a URI."""
    return storage.join(job.run_uri, "model")
