"""The tracking section: the MLflow server, experiment, registered model and promotion alias."""

from __future__ import annotations

from typing import Optional

from pydantic import Field

from raylm.config.base import StrictModel

class TrackingConfig(StrictModel):
    """MLflow: where runs go and under which registered model name."""

    enabled: bool = True
    tracking_uri: Optional[str] = Field(
        None, description="an MLflow server (http://host:5000) or store; default: $MLFLOW_TRACKING_URI, else an "
                          "SQLite file in a local workdir. A run spanning several nodes needs a server")
    experiment: str = "raylm"
    register_model: bool = True
    model_name: str = "raylm-demo"
    promote_alias: Optional[str] = Field(
        None, pattern=r"^[A-Za-z][A-Za-z0-9_-]{0,63}$",
        description="after registering, move this registry alias to the new version if it passes the promotion "
                    "gate against the current holder (see eval.promotion_metrics)")
    parent_run_id: Optional[str] = Field(
        None, description="MLflow run id of a parent run (a sweep, a recipe) this run belongs to; recorded as "
                          "mlflow.parentRunId and in the lineage of the model versions it registers")
