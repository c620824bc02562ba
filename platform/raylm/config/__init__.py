"""Typed configuration for every raylm component.

One :class:`JobConfig` describes a run. It is loaded from YAML
(:mod:`~raylm.config.loader`), patched by dotted ``key.sub=value`` overrides
(:mod:`~raylm.config.overrides`), and validated before any Ray resource is
taken. Every error a user can cause is raised as :class:`ConfigError` with one
line that names the offending field.

Each component's section has its own module (data, model, train, eval, serve,
tune, tracking; job composes them). This package imports no other raylm
package: the checks that need another component (named model sizes, metric
names, task fields) are in :mod:`raylm.checks`.
"""

from raylm.config.base import StrictModel
from raylm.config.data import (ALL_TASKS, SOURCE_FORMATS, DataConfig, DataSourceConfig, TaskName,
                               infer_source_format)
from raylm.config.errors import ConfigError, format_validation_error
from raylm.config.eval import EvalConfig
from raylm.config.job import JobConfig, public_dump
from raylm.config.loader import load_config, read_yaml, validate_config
from raylm.config.model import PACKAGE_MODEL_PREFIX, SHAPE_OVERRIDES, ModelConfig
from raylm.config.overrides import SECRET_KEYS, apply_overrides, parse_override, refuse_secret_overrides
from raylm.config.serve import (API_KEY_ENV, API_KEY_FILE_ENV, REDACTED, SERVE_ENGINES, SERVE_TASKS,
                                AutoscalingConfig, ServeConfig, VLLMConfig, is_loopback, read_key_file)
from raylm.config.tracking import TrackingConfig
from raylm.config.train import LoraConfig, TrainConfig
from raylm.config.tune import SWEEP_DISTRIBUTIONS, SearchDimension, TuneConfig

__all__ = [
    "ALL_TASKS", "API_KEY_ENV", "API_KEY_FILE_ENV", "PACKAGE_MODEL_PREFIX", "REDACTED", "SECRET_KEYS",
    "SERVE_ENGINES", "SERVE_TASKS", "SHAPE_OVERRIDES", "SOURCE_FORMATS", "SWEEP_DISTRIBUTIONS", "AutoscalingConfig",
    "ConfigError", "DataConfig", "DataSourceConfig", "EvalConfig", "JobConfig", "LoraConfig", "ModelConfig",
    "SearchDimension", "ServeConfig", "StrictModel", "TaskName", "TrackingConfig", "TrainConfig", "TuneConfig",
    "VLLMConfig", "apply_overrides", "format_validation_error", "infer_source_format", "is_loopback", "load_config",
    "parse_override",
    "public_dump", "read_key_file", "read_yaml", "refuse_secret_overrides", "validate_config",
]
