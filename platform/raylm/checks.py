"""Config checks that need another component: named model sizes, metric names, task fields.

:mod:`raylm.config` checks each section on its own and imports no other raylm
package, so what only a component knows is checked here, in one place that
the components themselves do not import: that ``model.size`` names a size of
its architecture and the shape divides into heads (:mod:`raylm.models.shapes`),
that the promotion gate names metrics raylm computes (:mod:`raylm.eval.metrics`),
and that each source's ``fields`` are fields of its task (:mod:`raylm.data.formatting`).
Entry points load configs through :func:`load_job`; code that builds a
:class:`JobConfig` itself calls :func:`check_job` before it takes any Ray resource.
Every problem is a :class:`ConfigError` with one line that names the field.
:func:`check_inputs` adds the local inputs (workdir, folders, source paths): all
of it runs without Ray, so the CLI calls it before it imports Ray and torch.
"""

from __future__ import annotations

import os
from typing import Any

from raylm.common import cluster
from raylm.config import ConfigError, DataConfig, EvalConfig, JobConfig, ModelConfig, load_config, validate_config
from raylm.data.formatting import TASK_FIELDS
from raylm.data.plan import check_sources
from raylm.eval.metrics import METRICS
from raylm.models.shapes import MODEL_SIZES, model_shape


def check_model(model: ModelConfig, location: str = "model") -> None:
    """A model built from a size names a known size, and its shape (with overrides) divides into heads."""
    if model.init_from is not None:
        return
    if model.size not in MODEL_SIZES[model.arch]:
        known = ", ".join(MODEL_SIZES[model.arch])
        raise ConfigError(f"config error: {location}: unknown size {model.size!r} for {model.arch}; known: {known}")
    shape = model_shape(model)
    if shape["hidden_size"] % shape["num_heads"]:
        raise ConfigError(f"config error: {location}: hidden_size ({shape['hidden_size']}) must be a multiple of "
                          f"num_heads ({shape['num_heads']})")
    if model.arch == "llama" and shape["num_heads"] % shape["num_kv_heads"]:
        raise ConfigError(f"config error: {location}: num_heads ({shape['num_heads']}) must be a multiple of "
                          f"num_kv_heads ({shape['num_kv_heads']})")


def check_tensor_parallel(job: JobConfig) -> None:
    """``train.tensor_parallel`` > 1 needs a Llama whose query and key/value heads it divides."""
    tensor_parallel = job.train.tensor_parallel
    if tensor_parallel == 1:
        return
    if job.model.arch != "llama":
        raise ConfigError(f"config error: train.tensor_parallel: {tensor_parallel} needs model.arch=llama "
                          f"(got {job.model.arch}; use train.parallel=fsdp without tensor parallelism)")
    if job.model.init_from is not None:
        return  # the worker checks the loaded model's heads
    shape = model_shape(job.model)
    for field in ("num_heads", "num_kv_heads"):
        if shape[field] % tensor_parallel:
            raise ConfigError(f"config error: train.tensor_parallel: {tensor_parallel} does not divide "
                              f"model {field} ({shape[field]})")


def check_source_fields(data: DataConfig, location: str = "data") -> None:
    """Every source's ``fields`` map only fields its task reads (a typo would silently read the wrong column)."""
    for split in ("sources", "dev_sources", "test_sources"):
        for index, source in enumerate(getattr(data, split)):
            used = TASK_FIELDS[source.task]
            unknown = sorted(set(source.fields) - set(used))
            if unknown:
                raise ConfigError(f"config error: {location}.{split}.{index}: fields: {', '.join(unknown)} not used "
                                  f"by task {source.task!r} (it uses {', '.join(used)})")


def check_metrics(evaluation: EvalConfig, location: str = "eval") -> None:
    """The promotion gate names only metrics that evaluation computes."""
    named = [("promotion_metrics", name) for name in evaluation.promotion_metrics]
    named += [("promotion_min_delta", name) for name in evaluation.promotion_min_delta]
    for field, name in named:
        if name not in METRICS:
            raise ConfigError(f"config error: {location}.{field}: unknown metric {name!r}; "
                              f"known: {', '.join(METRICS)}")


def check_job(job: JobConfig) -> JobConfig:
    """Run every cross-component check on a schema-valid job config; returns it unchanged."""
    check_source_fields(job.data)
    check_model(job.model)
    check_tensor_parallel(job)
    check_metrics(job.eval)
    return job


def check_inputs(job: JobConfig) -> None:
    """Fail on an invalid config, missing local inputs and unusable storage before any cluster resource is taken."""
    check_job(job)
    cluster.check_local_inputs(job)
    check_sources(job)


def validate_job(raw: dict[str, Any]) -> JobConfig:
    """A raw mapping validated as a :class:`JobConfig` and checked against the components (one-line ConfigError)."""
    return check_job(validate_config(raw))


def load_job(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> JobConfig:
    """:func:`raylm.config.load_config` (YAML plus dotted overrides) followed by :func:`check_job`."""
    return check_job(load_config(path, overrides))
