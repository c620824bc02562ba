"""The train section: workers, batch arithmetic, optimiser and schedule, checkpoints."""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import Field, model_validator

from raylm.config.base import StrictModel


class LoraConfig(StrictModel):
    """Low-rank adapters (LoRA, with peft): only the adapters train; the pretrained weights stay frozen."""

    r: int = Field(8, ge=1, le=1024, description="rank of each adapter's two matrices")
    alpha: float = Field(16.0, gt=0, description="scale: the adapter's update is multiplied by alpha / r")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the adapters' input")
    target_modules: Optional[list[str]] = Field(
        None, min_length=1,
        description="names of the Linear modules to adapt (matched as name suffixes); default: the attention and "
                    "MLP projections of the architecture (q/k/v/o/gate/up/down_proj for Llama and Qwen2, "
                    "c_attn/c_proj/c_fc for GPT-2)")


class TrainConfig(StrictModel):
    """The distributed training loop: workers, batch arithmetic, optimiser, checkpoints."""

    num_workers: int = Field(
        2, ge=1, description="training workers; a range [min, max] makes the run elastic: Ray Train starts with "
                             "what the cluster has between them, continues on fewer after a node is lost and grows "
                             "back, from the latest checkpoint each time (then num_workers is max, min_workers min)",
    )
    min_workers: Optional[int] = Field(
        None, ge=1, description="elastic runs: the fewest workers to train on (set by num_workers: [min, max])")
    elastic_resize_interval_s: float = Field(
        60.0, gt=0, description="elastic runs: how often Ray Train checks whether more workers fit; growing "
                                "restarts the workers from the latest checkpoint")
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    threads_per_worker: int = Field(1, ge=1)
    parallel: Literal["ddp", "fsdp"] = "ddp"
    tensor_parallel: int = Field(
        1, ge=1, description="tensor-parallel group size (Llama only): the workers form a (num_workers / N) x N "
                             "mesh; each group of N consecutive workers shares one node and shards every block's "
                             "weights, and FSDP2 (train.parallel=fsdp) shards over the data-parallel groups",
    )
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

    lora: Optional[LoraConfig] = Field(
        None, description="fine-tune low-rank adapters of model.init_from instead of every weight "
                          "(train.lora={} for the defaults); checkpoints hold the adapters only")
    export_merged: bool = Field(
        False, description="with train.lora: also export the base with the adapters merged in, as a plain model "
                           "folder (<run>/model-merged)")

    @model_validator(mode="before")
    @classmethod
    def _derive_grad_accum(cls, raw: Any) -> Any:
        """Split an elastic ``num_workers: [min, max]``; derive grad_accum_steps from global_batch_size when only the
        latter is given (for max workers: an elastic run recomputes it for the workers it has)."""
        if isinstance(raw, dict) and isinstance(raw.get("num_workers"), (list, tuple)):
            bounds = list(raw["num_workers"])
            if len(bounds) != 2 or "min_workers" in raw:
                raise ValueError("num_workers must be a count or a range [min, max] (without min_workers)")
            raw = {**raw, "min_workers": bounds[0], "num_workers": bounds[1]}
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
        if self.min_workers is not None:
            self._check_elastic()
        if self.tensor_parallel > 1:
            if self.lora is not None:
                # peft replaces each adapted Linear with its LoRA layer, which the column/row-wise plans
                # (nn.Linear and nn.Embedding only) cannot shard.
                raise ValueError(f"tensor_parallel={self.tensor_parallel} does not combine with train.lora yet: "
                                 "use tensor_parallel=1 (parallel=fsdp shards the frozen base)")
            if self.num_workers % self.tensor_parallel:
                raise ValueError(f"tensor_parallel ({self.tensor_parallel}) must divide num_workers "
                                 f"({self.num_workers})")
            if self.parallel != "fsdp":
                raise ValueError(f"tensor_parallel={self.tensor_parallel} needs parallel=fsdp (DDP cannot wrap "
                                 "tensor-parallel weights)")
            if self.compile:
                # torch 2.13: compiled blocks with DTensor TP weights drift from the eager gradients from the
                # second step on (CPU, gloo), and with activation checkpointing AOT autograd fails outright.
                raise ValueError(f"tensor_parallel={self.tensor_parallel} does not combine with compile yet")
            if self.placement_strategy == "STRICT_SPREAD":
                raise ValueError(f"tensor_parallel={self.tensor_parallel} needs its groups on one node, but "
                                 "placement_strategy=STRICT_SPREAD puts every worker on its own node")
        if self.export_merged and self.lora is None:
            raise ValueError("export_merged merges LoRA adapters: it needs train.lora")
        if self.warmup_steps >= self.max_steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be < max_steps ({self.max_steps})")
        return self

    def _check_elastic(self) -> None:
        """Every worker count in [min_workers, num_workers] must split the global batch into whole micro-batches."""
        if self.min_workers > self.num_workers:
            raise ValueError(f"num_workers: min ({self.min_workers}) must be <= max ({self.num_workers})")
        if self.tensor_parallel > 1 and self.min_workers < self.num_workers:
            raise ValueError("an elastic num_workers range and tensor_parallel > 1 do not combine yet")
        total = self.effective_global_batch_size
        uneven = [w for w in range(self.min_workers, self.num_workers + 1) if total % (self.micro_batch_size * w)]
        if uneven:
            raise ValueError(f"num_workers: [{self.min_workers}, {self.num_workers}]: the global batch of {total} "
                             f"sequences does not split into micro_batch_size ({self.micro_batch_size}) x whole "
                             f"grad_accum_steps on {uneven[0]} worker(s); choose a global_batch_size that is a "
                             f"multiple of micro_batch_size x every worker count in the range")

    @property
    def effective_global_batch_size(self) -> int:
        return self.micro_batch_size * self.grad_accum_steps * self.num_workers

    @property
    def is_elastic(self) -> bool:
        return self.min_workers is not None and self.min_workers < self.num_workers

    def grad_accum_steps_for(self, num_workers: int) -> int:
        """Micro-batches per step on ``num_workers`` workers that keep the global batch fixed (elastic runs)."""
        return self.effective_global_batch_size // (self.micro_batch_size * num_workers)
