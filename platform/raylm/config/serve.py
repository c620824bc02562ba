"""The serve section: the Ray Serve application's models, replicas, batching, limits and API key.

The API key comes from ``serve.api_key_file`` (a file read on the machine that
builds the app and on each replica's node: on a cluster, a file that
``cluster.yaml`` mounts on every node), ``$RAYLM_API_KEY_FILE``, or
``$RAYLM_API_KEY``; ``serve.api_key`` in a YAML file also works, but never as
a command-line override (:mod:`raylm.config.overrides` refuses it). An app
whose HTTP host is not a loopback address refuses to start without a key
unless ``serve.allow_unauthenticated`` is true (:meth:`ServeConfig.check_exposure`).
"""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import Field, SecretStr, field_validator, model_validator

from raylm.config.base import StrictModel
from raylm.config.errors import ConfigError

API_KEY_ENV = "RAYLM_API_KEY"
API_KEY_FILE_ENV = "RAYLM_API_KEY_FILE"
REDACTED = "**********"  # what pydantic writes for a SecretStr in JSON mode


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address (127.0.0.0/8, ::1) or ``localhost``: reachable from this machine only."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False  # a host name other than localhost, or 0.0.0.0 / :: (every interface) above


def read_key_file(path: str) -> str:
    """The key in the file ``path`` (``~`` expanded on this machine), stripped; a ConfigError when the file
    cannot be read, is empty or holds more than one line."""
    try:
        text = Path(os.path.expanduser(path)).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as err:
        reason = getattr(err, "strerror", None) or type(err).__name__
        raise ConfigError(f"config error: serve.api_key_file: cannot read {path} on this node ({reason})") from None
    if not text:
        raise ConfigError(f"config error: serve.api_key_file: {path} is empty")
    if "\n" in text:
        raise ConfigError(f"config error: serve.api_key_file: {path} holds more than one line; "
                          "it must hold the key alone")
    return text


# An adapter's name is the OpenAI "model" field that selects it.
ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
SERVE_TASKS: tuple[str, ...] = ("sentiment", "qa", "translate", "completions", "chat")
SERVE_ENGINES: tuple[str, ...] = ("raylm", "vllm")


class VLLMConfig(StrictModel):
    """Engine settings for ``serve.engine: vllm``, passed to vLLM 0.29 as Ray Serve LLM's ``engine_kwargs``.

    A key left unset (None) is not passed, so vLLM's own default applies. Only keys vLLM 0.29's engine
    arguments accept are here; Ray Serve LLM refuses any other (``Unknown engine argument``).
    """

    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="vLLM's dtype: auto takes the checkpoint's torch_dtype (bfloat16 on CPU for float32 "
                            "checkpoints is vLLM's choice, not raylm's)")
    max_model_len: Optional[int] = Field(None, ge=1, description="context length vLLM allocates for; "
                                                                  "default: the model's")
    gpu_memory_utilization: Optional[float] = Field(
        None, gt=0, le=1, description="fraction of each GPU's memory vLLM takes for weights and KV cache "
                                      "(vLLM's default 0.9); ignored by the CPU build")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs (or CPU workers) one replica's engine spans")
    enable_prefix_caching: Optional[bool] = Field(None, description="reuse KV cache across shared prompt prefixes")
    max_num_seqs: Optional[int] = Field(None, ge=1, description="sequences the engine batches at once")
    max_lora_rank: Optional[int] = Field(None, ge=1, description="largest LoRA rank served (with LoRA adapters)")
    kv_cache_memory_bytes: Optional[int] = Field(
        None, ge=1, description="KV cache size per engine in bytes; on the CPU build the way to bound it "
                                "(default: vLLM's, a share of the machine's memory)")
    enforce_eager: Optional[bool] = Field(None, description="no CUDA graphs or torch.compile: a faster start, "
                                                            "slower decoding")
    accelerator_type: Optional[str] = Field(None, description="Ray accelerator type of the replicas' GPUs, "
                                                              "e.g. H100 (GPU replicas only)")

    def engine_kwargs(self) -> dict[str, Any]:
        """The ``engine_kwargs`` of Ray Serve LLM's ``LLMConfig``: the keys that are set."""
        keys = ("dtype", "max_model_len", "gpu_memory_utilization", "tensor_parallel_size", "enable_prefix_caching",
                "max_num_seqs", "max_lora_rank", "kv_cache_memory_bytes", "enforce_eager")
        return {key: getattr(self, key) for key in keys if getattr(self, key) is not None}


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

    engine: Literal["raylm", "vllm"] = Field(
        "raylm", description="raylm: raylm's own engine and routes; vllm: vLLM through Ray Serve LLM "
                             "(OpenAI routes only, needs the vllm extra; see docs/serving.md)")
    vllm: VLLMConfig = Field(default_factory=VLLMConfig, description="vLLM engine settings (serve.engine: vllm)")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    route_prefix: str = "/"
    ingress: Literal["haproxy", "proxy"] = Field(
        "haproxy", description="haproxy: HAProxy on host:port in front of replicas that answer HTTP themselves; "
                               "proxy: Serve's Python proxy actor (see raylm.serving.ingress)")
    model_path: Optional[str] = Field(None, description="model folder, models:/name/version or models:/name@alias")
    models: dict[Literal["sentiment", "qa", "translate", "completions", "chat"], str] = Field(
        default_factory=dict, description="task -> model (folder or registry URI, or the name of one of adapters) "
                                          "for tasks that use their own model; the others use model_path")
    adapters: dict[str, str] = Field(
        default_factory=dict, description="LoRA adapters served on model_path, their base, held in memory once: "
                                          "name -> adapter folder or registry URI (an alias is looked up again "
                                          "every adapter_alias_ttl_s). The OpenAI routes pick one by their "
                                          "'model' field; models may name one for a task route")
    max_adapters_per_replica: int = Field(
        4, ge=1, description="adapters a replica keeps loaded; beyond it the least recently used is unloaded "
                             "(Ray Serve model multiplexing)")
    adapter_alias_ttl_s: float = Field(
        5.0, ge=0, description="how long a replica keeps an adapter alias's version before asking the registry "
                               "again: moving the alias reaches running replicas within this time, no restart")
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
        None, description="if set, requests need 'Authorization: Bearer <key>'; default: $RAYLM_API_KEY "
                          "(never a command-line override)")
    api_key_file: Optional[str] = Field(
        None, description="a file holding the key, read where the app is built and on each replica's node "
                          "(~ expanded there); default: $RAYLM_API_KEY_FILE")
    allow_unauthenticated: bool = Field(
        False, description="serve without a key on a host that is not a loopback address (without it, "
                           "such an app refuses to start)")
    playground: Optional[bool] = Field(
        None, description="serve the try-it page at GET /playground (the page needs no key; every call it makes "
                          "does). Default: true for `raylm serve` on a loopback host, false otherwise "
                          "(serve run, serve deploy, raylm deploy, any other host)")
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
        if self.engine == "vllm" and self.models:
            raise ValueError("engine vllm serves one model (model_path); per-task models (models) "
                             "are served by the raylm engine only")
        if self.engine == "vllm" and self.num_gpus_per_replica not in (0, self.vllm.tensor_parallel_size):
            # Ray Serve LLM places one GPU per tensor-parallel worker; a fraction or a spare GPU is not expressible.
            raise ValueError(f"with engine vllm, num_gpus_per_replica ({self.num_gpus_per_replica:g}) must be 0 "
                             f"(CPU) or vllm.tensor_parallel_size ({self.vllm.tensor_parallel_size})")
        if self.adapters:
            if self.engine == "vllm":
                raise ValueError("adapters are served by engine raylm only; drop adapters or use engine raylm")
            for name in self.adapters:
                if not ADAPTER_NAME.fullmatch(name):
                    raise ValueError(f"adapters: name {name!r} must be letters, digits, '.', '_' or '-' "
                                     "(it is the OpenAI 'model' field that selects the adapter)")
        if self.engine == "vllm" and self.playground:
            raise ValueError("the playground is served by engine raylm only; drop playground or use engine raylm")
        if self.engine != "vllm" and self.vllm != VLLMConfig():
            raise ValueError("vllm settings are given but engine is raylm: set engine: vllm or drop them")
        if self.vllm.accelerator_type is not None and self.num_gpus_per_replica == 0:
            raise ValueError("vllm.accelerator_type names a GPU type, but num_gpus_per_replica is 0")
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

    def replica_scaling(self) -> dict[str, Any]:
        """Serve's deployment options for the replica count: ``autoscaling_config`` or ``num_replicas``."""
        if self.autoscaling is None:
            return {"num_replicas": self.num_replicas}
        scaling = self.autoscaling
        return {"autoscaling_config": {
            "min_replicas": scaling.min_replicas,
            "max_replicas": scaling.max_replicas,
            "initial_replicas": scaling.initial_replicas if scaling.initial_replicas is not None
            else max(1, scaling.min_replicas),
            "target_ongoing_requests": scaling.target_ongoing_requests,
            "upscale_delay_s": scaling.upscale_delay_s,
            "downscale_delay_s": scaling.downscale_delay_s,
        }}

    def task_models(self) -> dict[str, str]:
        """Task -> model reference for every task (``models`` entries, the rest ``model_path``), less the tasks
        that ``models`` gives to one of ``adapters`` (:meth:`task_adapters`)."""
        return {task: self.models.get(task) or self.model_path for task in SERVE_TASKS
                if (self.models.get(task) or self.model_path) and self.models.get(task) not in self.adapters}

    def task_adapters(self) -> dict[str, str]:
        """Task -> adapter name, for the tasks ``models`` gives to one of ``adapters``."""
        return {task: name for task, name in self.models.items() if name in self.adapters}

    @model_validator(mode="before")
    @classmethod
    def _key_source(cls, data: Any) -> Any:
        """One source for the key: api_key or api_key_file if given, else $RAYLM_API_KEY_FILE or $RAYLM_API_KEY."""
        if not isinstance(data, dict):
            return data
        key, key_file = data.get("api_key") or None, data.get("api_key_file") or None
        if key is not None and key_file is not None:
            raise ValueError("api_key and api_key_file are both given: keep one (on a cluster, the key file)")
        if key is None and key_file is None:
            key, key_file = os.environ.get(API_KEY_ENV) or None, os.environ.get(API_KEY_FILE_ENV) or None
            if key is not None and key_file is not None:
                raise ValueError(f"${API_KEY_ENV} and ${API_KEY_FILE_ENV} are both set: keep one")
        return {**data, "api_key": key, "api_key_file": key_file}

    @field_validator("api_key", mode="before")
    @classmethod
    def _not_the_mask(cls, value: Any) -> Any:
        if isinstance(value, str) and value == REDACTED:
            raise ValueError("api_key is the redaction mask; give the real key or set $" + API_KEY_ENV)
        return value

    @field_validator("api_key_file")
    @classmethod
    def _a_path(cls, value: Optional[str]) -> Optional[str]:
        # Kept as written: "~" is expanded where the file is read (each node), not where the config was loaded.
        if value is not None and not value.strip():
            raise ValueError("api_key_file is blank; give the path of a file that holds the key")
        return value.strip() if value is not None else None

    def api_key_value(self) -> Optional[str]:
        """The key requests must carry: ``api_key``, or the content of ``api_key_file`` read now, on this
        machine (a ConfigError if that file cannot be read); None without a key."""
        if self.api_key is not None:
            return self.api_key.get_secret_value()
        return read_key_file(self.api_key_file) if self.api_key_file is not None else None

    def playground_enabled(self, host: Optional[str], local_server: bool = False) -> bool:
        """Whether the app serves ``GET /playground``: ``playground`` when set; else true only for an app that
        ``raylm serve`` runs in its own process (``local_server``) on a loopback ``host``."""
        if self.engine == "vllm":
            return False  # not served by the vLLM app (yet)
        if self.playground is not None:
            return self.playground
        return local_server and host is not None and is_loopback(host)

    def check_exposure(self, host: Optional[str]) -> None:
        """Fail closed: a ConfigError (one line) when Serve's HTTP ``host`` is not a loopback address and there is
        no key, unless ``allow_unauthenticated``. Reads ``api_key_file`` (its errors come first). ``host`` None:
        Serve starts no HTTP proxy."""
        if self.api_key_value() is not None or host is None or is_loopback(host) or self.allow_unauthenticated:
            return
        raise ConfigError(
            f"config error: Serve listens on {host}, not a loopback address, and serve has no API key: name a "
            f"file that holds one in serve.api_key_file (or set ${API_KEY_ENV} where the app is built), or set "
            "serve.allow_unauthenticated: true to serve without one")
