"""Registration: a run's model, metrics and loss curve onto its MLflow run and into the model registry.

:func:`register_run` closes a training run's MLflow run with its final
metrics, the model folder and the loss curve, registers a new model version
(at most once per trained step of a run, with the lineage as version tags) and,
when ``tracking.promote_alias`` is set, runs the promotion gate for it
(:func:`promote_after_training`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

from raylm.common import tracking
from raylm.common.fingerprints import content_hash
from raylm.config import JobConfig
from raylm.lifecycle import runs
from raylm.lifecycle.lineage import lineage_tags
from raylm.lifecycle.promotion import PromotionRefused, promote

logger = logging.getLogger(__name__)


def promote_after_training(job: JobConfig, registry_uri: str) -> dict[str, Any]:
    """The gate of ``tracking.promote_alias`` for a version just registered; returns the decision.

    A refusal is not a failed run: the table is printed and the alias stays.
    """
    alias = job.tracking.promote_alias
    try:
        decision = promote(job.resolved_tracking_uri(), registry_uri, alias, job.eval)
    except PromotionRefused as refused:
        decision = refused.decision
    for line in decision.table().splitlines():
        logger.info(line)
    return decision.as_dict()


def register_run(job: JobConfig, record: dict[str, Any], mlflow_run_id: Optional[str], model_dir: Path,
                 card: dict[str, Any], metrics: dict[str, Any], history: list[dict[str, Any]],
                 scratch: Path) -> tuple[Optional[str], Optional[dict[str, Any]]]:
    """Finish the MLflow run and register the model once per trained step; returns (registry URI, promotion).

    The registry URI is the new version's, or the one this step of the run was
    registered as before (a resumed run that trained no further step); the
    promotion is the gate's decision when a new version was registered and
    ``tracking.promote_alias`` is set. ``record`` (``run.json``) gets the new version and the content
    hash of the model folder as registered (also a tag on the version and the run).
    """
    trained_steps = card["trained_steps"]
    registry_uri = runs.registered_at(record, trained_steps)
    if registry_uri:
        logger.info(f"step {trained_steps} of this run is already registered as {registry_uri}; "
                    "not registering again")
    if not mlflow_run_id:
        return registry_uri, None
    curve = tracking.plot_loss_curve(history, scratch / "loss_curve.png")
    model_name = job.tracking.model_name if job.tracking.register_model and not registry_uri else None
    folder_hash = content_hash(model_dir)
    new_uri = tracking.finish_run(
        job.resolved_tracking_uri(), mlflow_run_id, model_dir, {k: v for k, v in metrics.items() if v is not None},
        model_name, extra_artifacts=[curve] if curve else [], version_tags=lineage_tags(card["lineage"]),
        folder_hash=folder_hash,
    )
    if not new_uri:
        return registry_uri, None
    record["registered"].append({"uri": new_uri, "step": trained_steps, "content_hash": folder_hash})
    logger.info(f"registered {new_uri}")
    promotion = promote_after_training(job, new_uri) if job.tracking.promote_alias else None
    return new_uri, promotion
