"""Typed configuration for every raylm component.

One :class:`JobConfig` describes a run. It is loaded from YAML, then patched by
dotted ``key.sub=value`` overrides, and validated before any Ray resource is
taken. Every error a user can cause is raised as :class:`ConfigError` with one
line that names the offending field.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A user-caused configuration problem; its message is one line."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


TaskName = Literal["lm", "sentiment", "qa", "translate"]
ALL_TASKS: tuple[str, ...] = ("lm", "sentiment", "qa", "translate")


class DataConfig(_Strict):
    """Where the text comes from and how it becomes packed token blocks."""

    corpus: str = Field("demo", description="'demo' for the built-in corpus")
    demo_seed: int = 0
    demo_num_train: int = Field(6000, ge=10, description="training examples per task")
    demo_num_dev: int = Field(300, ge=10, description="dev examples per task")
    tasks: list[TaskName] = Field(default_factory=lambda: list(ALL_TASKS))
    mixture: dict[TaskName, float] = Field(
        default_factory=dict, description="relative sampling weight per task (default 1.0)"
    )
    seq_len: int = Field(256, ge=16, le=8192)
    vocab_size: int = Field(2048, ge=300, le=262144)
    tokenizer_path: Optional[str] = Field(
        None, description="a local transformers tokenizer folder; default trains a BPE tokenizer"
    )
    shuffle_seed: int = 0
    strict: bool = False

    @model_validator(mode="after")
    def _check_mixture(self) -> "DataConfig":
        for task, weight in self.mixture.items():
            if weight < 0:
                raise ValueError(f"mixture weight for {task!r} must be >= 0")
        if not self.tasks:
            raise ValueError("tasks must name at least one task")
        return self


class ModelConfig(_Strict):
    """Which architecture and size to build, or a local checkpoint to start from."""

    arch: Literal["gpt2", "llama"] = "gpt2"
    size: str = "tiny"
    init_from: Optional[str] = Field(None, description="local transformers checkpoint folder")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _check_size(self) -> "ModelConfig":
        from raylm.models.registry import MODEL_SIZES

        if self.init_from is None and self.size not in MODEL_SIZES[self.arch]:
            known = ", ".join(MODEL_SIZES[self.arch])
            raise ValueError(f"unknown size {self.size!r} for {self.arch}; known: {known}")
        return self


class TrainConfig(_Strict):
    """The distributed training loop: workers, batch arithmetic, optimiser, checkpoints."""

    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    threads_per_worker: int = Field(1, ge=1)
    parallel: Literal["ddp", "fsdp"] = "ddp"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    micro_batch_size: int = Field(16, ge=1)
    grad_accum_steps: int = Field(1, ge=1)
    global_batch_size: Optional[int] = Field(
        None, ge=1, description="if set, must equal micro_batch_size * grad_accum_steps * num_workers"
    )
    max_steps: int = Field(400, ge=1)
    lr: float = Field(3e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    warmup_steps: int = Field(30, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    max_grad_norm: float = Field(1.0, gt=0)
    seed: int = 0
    log_every: int = Field(10, ge=1)
    eval_every: int = Field(0, ge=0, description="steps between dev-loss evals; 0 = only at the end")
    eval_batches: int = Field(8, ge=1)
    checkpoint_every: int = Field(0, ge=0, description="0 = only at the end")
    keep_checkpoints: int = Field(2, ge=1)
    max_failures: int = Field(0, ge=-1)
    activation_checkpointing: bool = False
    compile: bool = False

    @model_validator(mode="after")
    def _check_batch(self) -> "TrainConfig":
        derived = self.micro_batch_size * self.grad_accum_steps * self.num_workers
        if self.global_batch_size is not None and self.global_batch_size != derived:
            raise ValueError(
                f"global_batch_size={self.global_batch_size} does not equal micro_batch_size "
                f"({self.micro_batch_size}) x grad_accum_steps ({self.grad_accum_steps}) x "
                f"num_workers ({self.num_workers}) = {derived}"
            )
        if self.warmup_steps >= self.max_steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be < max_steps ({self.max_steps})")
        return self

    @property
    def effective_global_batch_size(self) -> int:
        return self.micro_batch_size * self.grad_accum_steps * self.num_workers


class EvalConfig(_Strict):
    """Evaluation on the dev split after training."""

    max_examples_per_task: int = Field(300, ge=1)
    batch_size: int = Field(32, ge=1)
    max_new_tokens: int = Field(48, ge=1, le=1024)


class ServeConfig(_Strict):
    """The Ray Serve application: where it listens, how big requests may be."""

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    route_prefix: str = "/"
    model_path: Optional[str] = Field(None, description="model folder or models:/name/version")
    num_replicas: int = Field(1, ge=1)
    num_cpus_per_replica: float = Field(1.0, gt=0)
    api_key: Optional[str] = Field(None, description="if set, requests need 'Authorization: Bearer <key>'")
    max_input_chars: int = Field(4000, ge=1)
    max_new_tokens: int = Field(64, ge=1, le=2048)


class TrackingConfig(_Strict):
    """MLflow: where runs go and under which registered model name."""

    enabled: bool = True
    tracking_uri: Optional[str] = Field(None, description="default: sqlite store in the workdir")
    experiment: str = "raylm"
    register_model: bool = True
    model_name: str = "raylm-demo"


class JobConfig(_Strict):
    """A whole run: data -> train -> eval -> track -> serve."""

    run_name: str = "demo"
    workdir: str = "runs"
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.workdir).resolve() / self.run_name

    @property
    def model_dir(self) -> Path:
        return self.run_dir / "model"

    def resolved_tracking_uri(self) -> str:
        if self.tracking.tracking_uri:
            return self.tracking.tracking_uri
        return f"sqlite:///{Path(self.workdir).resolve() / 'mlflow.db'}"

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _format_validation_error(err: ValidationError) -> str:
    first = err.errors()[0]
    location = ".".join(str(part) for part in first["loc"]) or "<root>"
    message = first["msg"]
    if first["type"] == "extra_forbidden":
        message = "unknown key"
    elif message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    extra = f" (and {len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"config error: {location}: {message}{extra}"


def parse_override(override: str) -> tuple[list[str], Any]:
    """Split ``a.b=value`` into a key path and a YAML-parsed value."""
    if "=" not in override:
        raise ConfigError(f"config error: override {override!r} must look like key.sub=value")
    key, raw = override.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"config error: override {override!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``raw`` with each dotted override applied."""
    import copy

    merged = copy.deepcopy(raw)
    for override in overrides:
        path, value = parse_override(override)
        node = merged
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"config error: {'.'.join(path)}: {part} is not a section")
            node = child
        node[path[-1]] = value
    return merged


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML mapping, turning missing files and syntax errors into ConfigError."""
    config_path = Path(path)
    if not config_path.is_file():
        raise ConfigError(f"config error: file not found: {config_path}")
    try:
        loaded = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"config error: {config_path}{where}: invalid YAML") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"config error: {config_path}: top level must be a mapping")
    return loaded


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> JobConfig:
    """Load a :class:`JobConfig` from an optional YAML file plus dotted overrides."""
    raw = read_yaml(path) if path is not None else {}
    raw = apply_overrides(raw, list(overrides or []))
    return validate_config(raw)


def validate_config(raw: dict[str, Any]) -> JobConfig:
    try:
        return JobConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err)) from None
