"""The per-worker function Ray Train runs: small, and delegating to :class:`LMTrainer`.

Per step it takes this worker's ``grad_accum_steps`` micro-batches of the
step's global batch (:mod:`raylm.train.sample_order`: one order for the run,
whatever the worker count) and calls ``LMTrainer.train_step``. Every ``log_every`` steps rank 0 logs
the metrics (stdout, MLflow, and the history saved with each checkpoint);
every ``eval_every`` steps it evaluates on the dev shard; every
``checkpoint_every`` steps and at the end it writes a checkpoint. On a
(re)start it resumes from the newest checkpoint that verifies, at the same
step, learning rate and data position.

Every evaluation and every checkpoint leaves the workers through
``ray.train.report`` (with the checkpoint when there is one): eval loss, the
tokens and model FLOPs seen so far, the step. That is what the driver, Ray
Tune's schedulers (ASHA) and its callbacks see. The per-``log_every`` metrics
do not go through it: Ray Train V2's controller takes one report per
health-check poll (``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``: 2 s in Ray, 0.5 s as raylm sets it) and a
worker blocks until its previous report was taken, so reporting every few
steps would stall training; rank 0 writes those to MLflow directly.
"""

from __future__ import annotations

import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from raylm.common.cluster import check_worker_code
from raylm.common.tracking import WorkerTracker
from raylm.compat.ray import run_storage
from raylm.config import JobConfig
from raylm.models.lora import apply_lora
from raylm.models.registry import build_model, flops_per_token
from raylm.train.allocator import keep_freed_memory
from raylm.train import parallel
from raylm.train.checkpoint import BEST_CHECKPOINT, choose_valid_checkpoint, open_checkpoint, publish_folder, read_history
from raylm.train.metrics import ThroughputMeter, device_peak_flops
from raylm.train.sample_order import global_steps, rows_position
from raylm.train.tensor_parallel import check_groups_share_nodes
from raylm.train.trainer import LMTrainer


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _log(rank: int, message: str) -> None:
    if rank == 0:
        # The real stdout: Ray Train patches print() to log through the root logger and also
        # tees to sys.stdout when a library has wrapped it, which printed every line twice.
        print(f"[raylm] {message}", file=sys.__stdout__ or sys.stdout, flush=True)


def restore_trainer(trainer: LMTrainer, checkpoint, rank: int, storage=None) -> dict[str, Any]:
    """Load the newest checkpoint that passes its manifest check; {} when there is none.

    ``checkpoint`` is the ``ray.train.Checkpoint`` Ray Train hands a (re)started
    worker group. If it is corrupt or partial, older sibling checkpoints of the
    same run are tried, newest first. Without one, complete checkpoints already
    in the run's storage folder (``storage``: :class:`~raylm.compat.ray.RunStorage`) are
    used: a worker can die after a checkpoint is fully written but before Ray
    Train registers it. Rank 0 chooses the checkpoint and every other rank
    loads the one it chose (a rank that cannot read it fails the group, which
    Ray Train restarts) so that no two ranks resume at different steps. The
    returned state carries the history of logged metrics up to the checkpoint.
    """
    if checkpoint is not None:
        filesystem = getattr(checkpoint, "filesystem", None)
        search = {"latest": checkpoint.path}
    elif storage is not None:
        filesystem = storage.filesystem
        search = {"latest": None, "search_dir": storage.path}
    else:
        return {}
    chosen, problems = choose_valid_checkpoint(filesystem=filesystem, **search) if rank == 0 else (None, [])
    chosen = parallel.broadcast_object(chosen)
    for problem in problems:
        _log(rank, f"skipping corrupt checkpoint: {problem}")
    if chosen is None:
        if checkpoint is not None:
            _log(rank, "no valid checkpoint found: starting from scratch")
        return {}
    with open_checkpoint(chosen, filesystem) as folder:
        state = trainer.load_checkpoint(folder)
        state["history"] = read_history(folder)
        state["restored_from"] = chosen
    _log(rank, f"resumed from step {state['step']} ({state['restored_from']})")
    return state


def publish_best(directory: str, storage, rank: int) -> None:
    """Every rank's part of a checkpoint into the run's best copy; rank 0 clears it first and adds the manifest last."""
    destination = os.path.join(storage.path, BEST_CHECKPOINT)
    if rank == 0:
        publish_folder(directory, destination, storage.filesystem, files=False, manifest=False)
    parallel.barrier()
    publish_folder(directory, destination, storage.filesystem, replace=False, manifest=False)
    parallel.barrier()
    if rank == 0:
        publish_folder(directory, destination, storage.filesystem, replace=False, files=False)


def host_batches(shard, batch_size: int, pin_memory: bool = False, **options) -> Iterator[dict]:
    """``shard``'s batches as CPU tensors (pinned for a CUDA worker): the trainer moves them itself.

    Ray Data's default in a Train worker moves each batch to the worker's GPU on
    its fetch thread; the trainer then counts a step's targets on that GPU copy,
    a host sync every step (the CPU waits for the step before it, the GPU for the
    CPU). On the host the count is free, and from pinned memory the trainer's copy
    is asynchronous.
    """
    return shard.iter_torch_batches(batch_size=batch_size, device="cpu", pin_memory=pin_memory, **options)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train entry point: build, restore, train for ``max_steps``, report and checkpoint."""
    import ray.train
    import ray.train.torch

    check_worker_code(loop_config.get("code_fingerprint"))
    job = JobConfig.model_validate(loop_config["job"])
    config = job.train
    keep_freed_memory()  # no page faults re-mapping the same buffers every step (see raylm.train.allocator)
    torch.set_num_threads(config.threads_per_worker)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    # First: the dev shard's Ray Data coordinator actor then starts in its own process while this one builds the model.
    train_split = ray.train.get_dataset_shard("train")  # the whole split: see raylm.train.sample_order
    dev_shard = ray.train.get_dataset_shard("dev")
    device = ray.train.torch.get_device()
    seq_len = int(loop_config.get("seq_len") or job.data.seq_len)
    _seed_everything(config.seed)
    model = build_model(job.model, loop_config["vocab_size"], seq_len, loop_config["special_ids"], seed=config.seed)
    model_flops_per_token = flops_per_token(model, seq_len, frozen_weights=config.lora is not None)
    if config.lora is not None:
        model = apply_lora(model, config.lora)  # only the adapters train (and are checkpointed)
    trainer = LMTrainer(model, config, device, task=job.model.task)
    if trainer.mesh is not None:
        check_groups_share_nodes(trainer.mesh, ray.get_runtime_context().get_node_id())
    state = restore_trainer(trainer, ray.train.get_checkpoint(), rank, run_storage(context))
    resumed_from_step = trainer.step
    if not state.get("rng_restored"):
        _seed_everything(config.seed + 1000 * rank + trainer.step)
    history: list[dict[str, Any]] = list(state.get("history", []))
    best_eval_loss = state.get("best_eval_loss")
    # The kept best checkpoint is the one with the best train.best_metric (lowest loss, highest accuracy).
    best_metric, best_is_high = config.best_metric, config.best_metric == "eval_accuracy"
    best_value = state.get("best_value", best_eval_loss) if state.get("best_metric", "eval_loss") == best_metric \
        else None
    tokens_seen = int(state.get("tokens_seen", 0))  # all workers together
    evaluations = int(state.get("evaluations", 0))

    tracker = None
    if rank == 0 and loop_config.get("mlflow_run_id"):
        tracker = WorkerTracker(loop_config["tracking_uri"], loop_config["mlflow_run_id"])

    # An elastic run may have fewer workers than num_workers: more micro-batches each keep the global batch.
    grad_accum_steps = config.grad_accum_steps_for(world)
    if grad_accum_steps != config.grad_accum_steps:
        _log(rank, f"{world} of up to {config.num_workers} workers: {grad_accum_steps} micro-batches per step "
                   f"keep the global batch of {config.effective_global_batch_size}")
    meter = ThroughputMeter(model_flops_per_token, device_peak_flops(config.precision, device), world)
    epoch, position = rows_position(state)
    pin = device.type == "cuda"
    step_stream = global_steps(lambda: train_split.iter_batches(batch_size=None, batch_format="numpy"),
                               rank=rank, world=world, micro_batch_size=config.micro_batch_size,
                               grad_accum_steps=grad_accum_steps, seed=config.seed, start_epoch=epoch,
                               start_row=position, pin_memory=pin)

    def dev_batches():
        # Equal shards and the same batch size give every worker the same number of
        # batches, which FSDP's collectives in forward require.
        for produced, batch in enumerate(host_batches(dev_shard, config.micro_batch_size, pin)):
            if produced >= config.eval_batches:
                break
            yield batch

    while trainer.step < config.max_steps:
        epoch, position, micro_batches = next(step_stream)
        step = trainer.step + 1
        is_last = step >= config.max_steps
        should_log = step % config.log_every == 0 or is_last
        should_eval = is_last or bool(config.eval_every and step % config.eval_every == 0)
        should_checkpoint = is_last or bool(config.checkpoint_every and step % config.checkpoint_every == 0)
        step_metrics = trainer.train_step(micro_batches, sync_metrics=should_log or should_eval or should_checkpoint)
        meter.add(step_metrics["tokens"])
        # Equal shards and micro-batches: every worker processed as many tokens as this one.
        tokens_seen += step_metrics["tokens"] * world
        if not (should_log or should_eval or should_checkpoint):
            continue
        metrics: dict[str, Any] = {
            "step": step,
            "epoch": epoch,
            "loss": step_metrics["loss"],
            "lr": step_metrics["lr"],
            "grad_norm": step_metrics["grad_norm"],
            "skipped_steps": step_metrics["skipped_steps"],
            "resumed_from_step": resumed_from_step,
            "workers": world,  # changes in an elastic run
            "tokens_seen": tokens_seen,
            "flops_seen": float(model_flops_per_token) * tokens_seen,
            **meter.read(),
        }
        if should_eval:
            metrics.update(trainer.evaluate(dev_batches()))
            evaluations += 1
            metrics["evaluations"] = evaluations
        history.append({key: value for key, value in metrics.items() if isinstance(value, (int, float))})
        if tracker is not None:
            tracker.log_metrics(metrics, step)
        shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
        _log(rank, shown)
        if not (should_eval or should_checkpoint):
            meter.reset()
            continue
        # The eval loss is all-reduced, so every rank reaches the same verdict (saving is collective).
        eval_loss, value = metrics.get("eval_loss"), metrics.get(best_metric)
        if eval_loss is not None and math.isfinite(eval_loss) and (
                best_eval_loss is None or eval_loss < best_eval_loss):
            best_eval_loss = eval_loss
        is_best = value is not None and math.isfinite(value) and (
            best_value is None or (value > best_value if best_is_high else value < best_value))
        if is_best:
            best_value = value
        keep_best = is_best and config.keep_best_checkpoint
        if not should_checkpoint and not keep_best:
            ray.train.report(metrics)
            meter.reset()
            continue
        with tempfile.TemporaryDirectory(prefix="raylm-ckpt-") as directory:
            trainer.save_checkpoint(
                Path(directory),
                {"epoch": epoch, "rows_in_epoch": position, "micro_batch_size": config.micro_batch_size,
                 "eval_loss": eval_loss, "best_eval_loss": best_eval_loss, "tokens_seen": tokens_seen,
                 "best_metric": best_metric, "best_value": best_value, best_metric: value,
                 "evaluations": evaluations, "time": time.time(),
                 "worker_niceness": os.nice(0)},  # what the OS scheduled this worker at (train.worker_niceness)
                history=history,
            )
            if keep_best:
                # A best evaluation between checkpoints is kept too: train.export=best exports it.
                publish_best(directory, run_storage(context), rank)
            # Every rank uploads its part; Ray Train merges them into one folder (rank 0's name).
            checkpoint = ray.train.Checkpoint.from_directory(directory) if should_checkpoint else None
            if not should_checkpoint:
                ray.train.report(metrics)
                meter.reset()
                continue
            # Step in the folder name for people browsing storage; the time keeps names unique
            # when a run resumes from an older checkpoint and reaches the same step again.
            ray.train.report(metrics, checkpoint=checkpoint,
                             checkpoint_dir_name=f"checkpoint_step{step:08d}_{int(time.time() * 1000)}")
        meter.reset()
    if tracker is not None:
        tracker.close()
