"""MLflow tracking: runs, metrics, artifacts and the model registry.

The driver creates the run and logs the config as parameters; rank 0 of the
training workers logs metrics into the same run by id; the driver then logs
the eval metrics, the model folder and a loss curve, and registers the model.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Iterable
from urllib.parse import urlsplit

from raylm.common import storage
from raylm.common.fingerprints import content_hash
from raylm.config.redaction import redact_uri

logger = logging.getLogger(__name__)

# The tag (on a registered model version and on its run) that holds the model folder's content hash.
CONTENT_HASH_TAG = "raylm.content_hash"

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def mlflow_client(tracking_uri: str):
    """An ``MlflowClient`` for runs and the model registry at ``tracking_uri``."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def _flatten(prefix: str, value: Any, out: dict[str, str]) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), item, out)
    else:
        out[prefix] = str(value)[:500]


def start_run(tracking_uri: str, experiment: str, run_name: str, config: dict[str, Any],
              tags: dict[str, str] | None = None) -> str:
    """Create an MLflow run with the flattened config as params; returns the run id.

    ``config`` must already be free of secrets (``JobConfig.public_dict()``).
    """
    from mlflow.entities import Param

    client = mlflow_client(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else client.create_experiment(experiment)
    run = client.create_run(experiment_id, run_name=run_name, tags=dict(tags or {}))
    params: dict[str, str] = {}
    _flatten("", config, params)
    items = [Param(key, value) for key, value in params.items()]
    for start in range(0, len(items), 100):
        client.log_batch(run.info.run_id, params=items[start : start + 100])
    return run.info.run_id


def reopen_run(tracking_uri: str, run_id: str) -> None:
    """Mark an existing run as running again (a resumed training run logs into its own MLflow run)."""
    mlflow_client(tracking_uri).update_run(run_id, status="RUNNING")


class WorkerTracker:
    """Metric logging from one training worker (rank 0) into an existing run.

    A tracking-server hiccup must not kill a training job: a failed write is
    retried a few times, then dropped with a warning (the metrics also go to
    stdout and into every checkpoint's history).
    """

    def __init__(self, tracking_uri: str, run_id: str, attempts: int = 3):
        self.client = mlflow_client(tracking_uri)
        self.run_id = run_id
        self.attempts = attempts

    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        import math
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(key, float(value), now, step) for key, value in metrics.items()
                 if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step"
                 and math.isfinite(float(value))]
        for attempt in range(self.attempts):
            try:
                self.client.log_batch(self.run_id, metrics=batch)
                return
            except Exception as err:  # any backend error: sqlite lock, HTTP 5xx, network
                if attempt == self.attempts - 1:
                    logger.warning(f"MLflow logging failed at step {step}: {err}")
                    return
                time.sleep(0.5 * (attempt + 1))

    def close(self) -> None:
        pass


def log_metrics(tracking_uri: str, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    WorkerTracker(tracking_uri, run_id).log_metrics(metrics, step)


def plot_loss_curve(history: Iterable[dict[str, Any]], path: Path) -> Path | None:
    """Save a PNG of training (and eval) loss against step; None if there is nothing to plot."""
    rows = [row for row in history if "loss" in row and "step" in row]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    axis.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train loss")
    evals = [r for r in rows if r.get("eval_loss") is not None]
    if evals:
        axis.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval loss")
    axis.set_xlabel("step")
    axis.set_ylabel("loss (nats/token)")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def finish_run(tracking_uri: str, run_id: str, model_dir: Path, metrics: dict[str, float],
               model_name: str | None, extra_artifacts: Iterable[Path] = (),
               version_tags: dict[str, str] | None = None, folder_hash: str | None = None) -> str | None:
    """Log final metrics and artifacts, register the model; returns the registry URI or None.

    ``version_tags`` (lineage, :mod:`raylm.lifecycle.lineage`) go onto the new model version and the run,
    with the model folder's content hash (``folder_hash`` when the caller computed it just before, else
    computed here) as ``raylm.content_hash``: :func:`resolve_model_path` refuses files that no longer match.
    """
    client = mlflow_client(tracking_uri)
    version_tags = {**(version_tags or {}), CONTENT_HASH_TAG: folder_hash or content_hash(model_dir)}
    for key, value in version_tags.items():
        client.set_tag(run_id, key, value)
    log_metrics(tracking_uri, run_id, {key: value for key, value in metrics.items() if isinstance(value, (int, float))})
    client.log_artifacts(run_id, str(model_dir), artifact_path="model")
    for artifact in extra_artifacts:
        if artifact and Path(artifact).is_file():
            client.log_artifact(run_id, str(artifact))
    registry_uri = None
    if model_name:
        from mlflow.exceptions import MlflowException

        try:
            client.create_registered_model(model_name)
        except MlflowException:
            pass  # already registered: add a new version
        source = f"{client.get_run(run_id).info.artifact_uri}/model"
        version = client.create_model_version(model_name, source=source, run_id=run_id, tags=version_tags)
        registry_uri = f"models:/{model_name}/{version.version}"
    client.set_terminated(run_id, status="FINISHED")
    return registry_uri


def end_run(tracking_uri: str, run_id: str, status: str) -> None:
    """End a run that did not finish: ``FAILED``, or ``KILLED`` when it was stopped (SIGTERM, Ctrl-C)."""
    mlflow_client(tracking_uri).set_terminated(run_id, status=status)


def fail_run(tracking_uri: str, run_id: str) -> None:
    end_run(tracking_uri, run_id, "FAILED")


class RegistryError(ValueError):
    """A registry reference a user gave does not resolve (unknown model, version or alias); one line."""


class ModelIntegrityError(RegistryError):
    """A registered version's files no longer hash to what was recorded at registration; one line."""


REGISTRY_URI_FORMS = "models:/<name>/<version> or models:/<name>@<alias>"


def parse_registry_uri(uri: str) -> tuple[str, str | None, str | None]:
    """Split ``models:/name/version`` or ``models:/name@alias`` into ``(name, version, alias)``."""
    if not uri.startswith("models:/"):
        raise RegistryError(f"not a registry URI ({REGISTRY_URI_FORMS}): {uri}")
    rest = uri[len("models:/"):]
    if "/" in rest:
        name, _, version = rest.partition("/")
        if name and version.isdigit() and "@" not in name:
            return name, version, None
    elif "@" in rest:
        name, _, alias = rest.rpartition("@")
        if name and alias:
            return name, None, alias
    raise RegistryError(f"registry URI must look like {REGISTRY_URI_FORMS}: {uri}")


def local_store_path(tracking_uri: str) -> Path | None:
    """The file or folder of a local MLflow store (``sqlite:///...``, ``file:...``, a path); None for a server."""
    if tracking_uri.startswith("sqlite:"):
        path = tracking_uri[len("sqlite:"):].split("?", 1)[0]
        path = path[3:] if path.startswith("///") else path.lstrip("/")
        return None if not path or path == ":memory:" else Path(path)
    if tracking_uri.startswith("file:"):
        return Path(urlsplit(tracking_uri).path)
    if "://" in tracking_uri or tracking_uri.startswith("databricks"):
        return None
    return Path(tracking_uri)


def store_exists(tracking_uri: str) -> bool:
    """False for a local store that is not there: a read would make MLflow create it (an empty database) first."""
    path = local_store_path(tracking_uri)
    return path is None or path.exists()


def check_registry_reference(tracking_uri: str, uri: str) -> None:
    """Fail on a malformed registry URI, or one whose local store does not exist, before MLflow opens anything.

    Light (no MLflow import): the CLI calls it before loading the layers that resolve the version.
    """
    parse_registry_uri(uri)
    if not store_exists(tracking_uri):
        raise RegistryError(f"{uri}: no MLflow tracking store at {redact_uri(tracking_uri)} (nothing was tracked "
                            "there); set tracking.tracking_uri or $MLFLOW_TRACKING_URI to the store that holds it")


def check_model_reference(model: str, tracking_uri: str | None) -> None:
    """:func:`check_registry_reference` for a registry URI; a missing local model folder is a FileNotFoundError."""
    if model.startswith("models:/"):
        if tracking_uri:
            check_registry_reference(tracking_uri, model)
    elif not storage.is_remote(model) and not Path(model).is_dir():
        raise FileNotFoundError(f"model folder not found: {model}")


def get_model_version(tracking_uri: str, uri: str):
    """The MLflow ``ModelVersion`` a ``models:/name/version`` or ``models:/name@alias`` URI names."""
    from mlflow.exceptions import MlflowException

    check_registry_reference(tracking_uri, uri)
    name, version, alias = parse_registry_uri(uri)
    client = mlflow_client(tracking_uri)
    try:
        if alias is not None:
            return client.get_model_version_by_alias(name, alias)
        return client.get_model_version(name, version)
    except MlflowException as err:
        what = f"alias {alias!r}" if alias is not None else f"version {version}"
        raise RegistryError(f"{uri}: registered model {name!r} has no {what} at {redact_uri(tracking_uri)} "
                            f"({err.error_code})") from None


def verify_registered_folder(version, folder: Path, uri: str) -> None:
    """Refuse ``folder`` (the downloaded files of model ``version``) unless it hashes to the recorded hash.

    A version registered before hashes were recorded has no tag: it loads, with a warning.
    """
    expected = version.tags.get(CONTENT_HASH_TAG)
    found = content_hash(folder)
    if expected is None:
        logger.warning(f"{uri}: version {version.version} of {version.name!r} was registered without a content "
                       "hash; loading its files unverified")
    elif found != expected:
        raise ModelIntegrityError(
            f"{uri}: refusing to load version {version.version} of {version.name!r}: its files hash to {found}, "
            f"not {expected} as recorded at registration (the weights changed after registration)")


def resolve_model_path(model_path: str, tracking_uri: str | None = None, destination: str | None = None) -> Path:
    """Turn a model folder, ``models:/name/version`` or ``models:/name@alias`` into a local folder.

    A registry URI is resolved at call time (an alias names whichever version holds it now), the
    version's model folder is downloaded from the tracking server's artifact store and checked
    against the content hash recorded at registration (:class:`ModelIntegrityError` on a mismatch).
    """
    if model_path.startswith("models:/"):
        import mlflow

        tracking_uri = tracking_uri or mlflow.get_tracking_uri()
        version = get_model_version(tracking_uri, model_path)
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=version.source, dst_path=destination,
                                                         tracking_uri=tracking_uri))
        verify_registered_folder(version, local, model_path)
        return local
    if storage.is_remote(model_path):
        # A model folder in an object store, e.g. a run's <workdir>/<run id>/model in S3.
        target = Path(destination) if destination else storage.local_scratch("raylm-model-") / "model"
        return storage.download_folder(model_path, target)
    folder = Path(model_path)
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder not found: {folder}")
    return folder
