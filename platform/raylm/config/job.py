"""The whole run's config, composed of every component's section."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import yaml
from pydantic import BaseModel, Field, SecretStr, model_validator

from raylm.config.base import StrictModel
from raylm.config.data import DataConfig
from raylm.config.errors import ConfigError
from raylm.config.locations import is_remote, join
from raylm.config.redaction import redact_values
from raylm.config.eval import EvalConfig
from raylm.config.model import ModelConfig
from raylm.config.serve import ServeConfig
from raylm.config.tracking import TrackingConfig
from raylm.config.train import TrainConfig
from raylm.config.tune import TuneConfig


class JobConfig(StrictModel):
    """A whole run: data -> train -> eval -> track -> serve."""

    run_name: str = Field("demo", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$",
                          description="a readable name; the run's id starts with it")
    run_id: Optional[str] = Field(
        None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,159}$",
        description="set by raylm when a run starts (or by --resume); names the run's folder under workdir")
    workdir: str = Field(
        "runs", min_length=1, description="where each run gets its folder <workdir>/<run id>: a local or shared "
                                          "file system path, or an s3:// / gs:// URI")
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)

    @model_validator(mode="after")
    def _check_best_metric(self) -> "JobConfig":
        measured_by = {"eval_accuracy": "sequence_classification", "eval_perplexity": "causal_lm"}
        task = measured_by.get(self.train.best_metric)
        if task is not None and self.model.task != task:
            raise ValueError(f"train.best_metric={self.train.best_metric} is measured for model.task={task} only "
                             f"(this model's task is {self.model.task}); use eval_loss")
        if self.train.lora is not None and (self.model.init_from is None or self.model.task != "causal_lm"):
            raise ValueError("train.lora adapts a pretrained causal LM: it needs model.init_from and "
                             f"model.task=causal_lm (here init_from={self.model.init_from}, task={self.model.task})")
        return self

    @property
    def storage_is_remote(self) -> bool:
        """True when the workdir is an object-store URI (s3://, gs://) rather than a file system path."""
        return is_remote(self.workdir)

    @property
    def run_uri(self) -> str:
        """The run's folder as a location: an absolute path or a URI (``<workdir>/<run id>``)."""
        return join(self.workdir, self.run_id or self.run_name)

    @property
    def run_dir(self) -> Path:
        """The run's folder on this machine's file system; a remote workdir has none (use :attr:`run_uri`)."""
        if self.storage_is_remote:
            raise ConfigError(f"workdir {self.workdir} is remote: the run folder is {self.run_uri}, not a local path")
        return Path(self.run_uri)

    def resolved_tracking_uri(self) -> Optional[str]:
        """``tracking.tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else an SQLite file in a local workdir.

        None for a remote workdir without a server: an SQLite file cannot live in an object store
        (:func:`raylm.common.cluster.check_tracking` turns that into a config error when tracking is on).
        """
        if self.tracking.tracking_uri:
            return self.tracking.connection_uri()
        if os.environ.get("MLFLOW_TRACKING_URI"):
            return os.environ["MLFLOW_TRACKING_URI"]
        if self.storage_is_remote:
            return None
        return f"sqlite:///{Path(self.workdir).resolve() / 'mlflow.db'}"

    def public_dict(self) -> dict[str, Any]:
        """The config as plain data without its secrets: what may go to MLflow, model cards and logs.

        ``SecretStr`` fields are left out and credentials in URIs (a tracking URI's password) are masked
        (:mod:`raylm.config.redaction`); connections use the config itself, never this dump.
        """
        return public_dump(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.public_dict(), sort_keys=False)


def public_dump(model: BaseModel) -> dict[str, Any]:
    """``model_dump(mode="json")`` with every ``SecretStr`` field left out (set or not), at any depth, and the
    credentials in every URI it holds masked."""
    dumped = model.model_dump(mode="json")

    def is_secret(field) -> bool:  # SecretStr or Optional[SecretStr]: left out even when unset
        annotation = field.annotation
        return annotation is SecretStr or SecretStr in getattr(annotation, "__args__", ())

    def strip(node: BaseModel, out: dict[str, Any]) -> None:
        for name, field in type(node).model_fields.items():
            value = getattr(node, name)
            if isinstance(value, SecretStr) or is_secret(field):
                out.pop(name, None)
            elif isinstance(value, BaseModel) and isinstance(out.get(name), dict):
                strip(value, out[name])

    strip(model, dumped)
    return redact_values(dumped)
