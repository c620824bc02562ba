"""The tracking section: the MLflow server, experiment, registered model and promotion alias."""

from __future__ import annotations

import os
from typing import Any, Optional

from pydantic import Field, field_validator

from raylm.config.base import StrictModel
from raylm.config.errors import ConfigError
from raylm.config.redaction import is_redacted, redact_uri

TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"

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

    @field_validator("tracking_uri", mode="before")
    @classmethod
    def _complete_masked_uri(cls, value: Any) -> Any:
        """A URI whose credentials raylm masked when it recorded it (a sweep's config, a run's ``config.yaml``)
        takes them back from ``$MLFLOW_TRACKING_URI`` when that names the same server.

        Otherwise it stays masked: a worker rebuilds its job from the public dump and connects with
        the URI the driver hands it, while :meth:`connection_uri` refuses to connect with a masked one.
        """
        if isinstance(value, str) and is_redacted(value):
            from_env = os.environ.get(TRACKING_URI_ENV, "")
            if from_env and redact_uri(from_env) == value:
                return from_env
        return value

    def connection_uri(self) -> Optional[str]:
        """``tracking_uri`` to connect with; a config error when it holds masked credentials."""
        if self.tracking_uri and is_redacted(self.tracking_uri):
            raise ConfigError(f"config error: tracking.tracking_uri: {self.tracking_uri} has its credentials "
                              f"masked (raylm never records them); set ${TRACKING_URI_ENV} to the full URI")
        return self.tracking_uri
