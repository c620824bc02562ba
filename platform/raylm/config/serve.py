"""The serve section: the Ray Serve application's models, replicas, batching, limits and API key."""

from __future__ import annotations

import os
from typing import Any, Literal, Optional

from pydantic import Field, SecretStr, field_validator, model_validator

from raylm.config.base import StrictModel

API_KEY_ENV = "RAYLM_API_KEY"
REDACTED = "**********"  # what pydantic writes for a SecretStr in JSON mode

SERVE_TASKS: tuple[str, ...] = ("sentiment", "qa", "translate", "completions", "chat")


class AutoscalingConfig(StrictModel):
    """Ray Serve autoscaling of the model deployment (replaces serve.num_replicas when set)."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(2, ge=1)
    initial_replicas: Optional[int] = Field(None, ge=0, description="default: min_replicas")
    target_ongoing_requests: float = Field(
        16.0, gt=0, description="requests in flight per replica that autoscaling aims for; with batching, "
                                "about one batch's worth")
    upscale_delay_s: float = Field(5.0, ge=0, description="how long demand must stay high before adding a replica")
    downscale_delay_s: float = Field(60.0, ge=0, description="how long demand must stay low before removing one")

    @model_validator(mode="after")
    def _check_range(self) -> "AutoscalingConfig":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) must be <= max_replicas ({self.max_replicas})")
        if self.initial_replicas is not None and not self.min_replicas <= self.initial_replicas <= self.max_replicas:
            raise ValueError(f"initial_replicas ({self.initial_replicas}) must lie between min_replicas and "
                             f"max_replicas ({self.min_replicas}..{self.max_replicas})")
        return self


class ServeConfig(StrictModel):
    """The Ray Serve application: models, replicas and autoscaling, batching, request limits, auth."""

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    route_prefix: str = "/"
    ingress: Literal["haproxy", "proxy"] = Field(
        "haproxy", description="haproxy: HAProxy on host:port in front of replicas that answer HTTP themselves; "
                               "proxy: Serve's Python proxy actor (see raylm.serving.ingress)")
    model_path: Optional[str] = Field(None, description="model folder, models:/name/version or models:/name@alias")
    models: dict[Literal["sentiment", "qa", "translate", "completions", "chat"], str] = Field(
        default_factory=dict, description="task -> model (folder or registry URI) for tasks that use their own "
                                          "model; the others use model_path")
    num_replicas: int = Field(1, ge=1, description="fixed replica count (without autoscaling)")
    autoscaling: Optional[AutoscalingConfig] = None
    num_cpus_per_replica: float = Field(1.0, gt=0, description="also the replica's torch threads (at least 1)")
    num_gpus_per_replica: float = Field(0.0, ge=0)
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto: cuda when the replica has a GPU (num_gpus_per_replica > 0), else cpu")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: bfloat16 on cuda, float32 on cpu")
    max_batch_size: int = Field(32, ge=1, le=1024, description="inputs per model call (@serve.batch)")
    batch_wait_timeout_s: float = Field(0.005, ge=0, le=10, description="how long a batch waits to fill up")
    max_concurrent_batches: int = Field(1, ge=1, le=16, description="batches of one kind run interleaved per replica")
    max_ongoing_requests: int = Field(64, ge=1, description="requests a replica works on at once "
                                                            "(at least max_batch_size)")
    max_queued_requests: int = Field(256, ge=1, description="requests waiting for a replica; more get 503 "
                                                            "with Retry-After")
    retry_after_s: float = Field(1.0, ge=0, description="the Retry-After of a 503 when the queue is full")
    graceful_shutdown_timeout_s: float = Field(30.0, gt=0, description="how long a stopping replica drains")
    api_key: Optional[SecretStr] = Field(
        None, validate_default=True, description="if set, requests need 'Authorization: Bearer <key>'; default: $RAYLM_API_KEY")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="larger request bodies get 413 before parsing")
    max_input_chars: int = Field(4000, ge=1)
    max_inputs_per_request: int = Field(64, ge=1, description="inputs in one task request's 'inputs' list")
    max_new_tokens: int = Field(64, ge=1, le=2048, description="default budget of translate and chat")
    max_request_tokens: Optional[int] = Field(
        None, ge=1, description="most tokens one request may ask to generate: prompts x n x max_tokens "
                                "(completions), n x max_tokens (chat), the inputs' max_new_tokens summed "
                                "(translate); more is a 400 before anything is queued. Default: max_batch_size x "
                                "the model's context length, one full batch of full-length rows")

    @model_validator(mode="after")
    def _check_serving(self) -> "ServeConfig":
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(f"max_ongoing_requests ({self.max_ongoing_requests}) must be >= max_batch_size "
                             f"({self.max_batch_size}), or batches can never fill")
        if self.autoscaling is not None and self.autoscaling.target_ongoing_requests > self.max_ongoing_requests:
            raise ValueError(f"autoscaling.target_ongoing_requests ({self.autoscaling.target_ongoing_requests}) "
                             f"must be <= max_ongoing_requests ({self.max_ongoing_requests})")
        if self.device == "cuda" and self.num_gpus_per_replica == 0:
            raise ValueError("device is 'cuda' but num_gpus_per_replica is 0: a replica would get no GPU")
        if self.device == "cpu" and self.num_gpus_per_replica > 0:
            raise ValueError("num_gpus_per_replica > 0 with device 'cpu' reserves GPUs that are never used")
        if self.max_request_tokens is not None and self.max_request_tokens < self.max_new_tokens:
            raise ValueError(f"max_request_tokens ({self.max_request_tokens}) must be >= max_new_tokens "
                             f"({self.max_new_tokens}), or a chat request with the default budget is refused")
        return self

    def resolved_device(self) -> str:
        """The replicas' torch device: ``cuda`` when they get a GPU (or are told to), else ``cpu``."""
        if self.device == "auto":
            return "cuda" if self.num_gpus_per_replica > 0 else "cpu"
        return self.device

    def request_token_budget(self, context_length: int) -> int:
        """The most tokens one request may ask a model with ``context_length`` positions to generate.

        ``max_request_tokens`` when set; else one full batch of rows that each fill the context
        (``max_batch_size x context_length``): the most one model call can be asked to do, so a single
        request can take at most about one batch's time from the other callers.
        """
        if self.max_request_tokens is not None:
            return self.max_request_tokens
        return self.max_batch_size * context_length

    def task_models(self) -> dict[str, str]:
        """Task -> model reference for every task (``models`` entries, the rest ``model_path``)."""
        return {task: self.models.get(task) or self.model_path for task in SERVE_TASKS
                if self.models.get(task) or self.model_path}

    @field_validator("api_key", mode="before")
    @classmethod
    def _key_from_environment(cls, value: Any) -> Any:
        if value is None or value == "":
            value = os.environ.get(API_KEY_ENV) or None
        if isinstance(value, str) and value == REDACTED:
            raise ValueError("api_key is the redaction mask; give the real key or set $" + API_KEY_ENV)
        return value

    def api_key_value(self) -> Optional[str]:
        return self.api_key.get_secret_value() if self.api_key is not None else None
