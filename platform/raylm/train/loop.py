"""The per-worker function Ray Train runs: small, and delegating to :class:`LMTrainer`."""

from __future__ import annotations

import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from raylm.config import JobConfig
from raylm.models.registry import build_model, flops_per_token
from raylm.train.checkpoint import find_valid_checkpoint, verify_checkpoint, CorruptCheckpointError
from raylm.train.metrics import ThroughputMeter, device_peak_flops
from raylm.train.trainer import LMTrainer


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _restore(trainer: LMTrainer, checkpoint, rank: int) -> dict[str, Any]:
    """Load the newest checkpoint that passes its manifest check; {} when none does."""
    if checkpoint is None:
        return {}
    local_path = Path(checkpoint.path)
    if local_path.is_dir():
        folder, problems = find_valid_checkpoint(local_path)
        for problem in problems:
            if rank == 0:
                print(f"[raylm] skipping corrupt checkpoint: {problem}", flush=True)
        if folder is None:
            return {}
        state = trainer.load_checkpoint(folder)
    else:
        with checkpoint.as_directory() as directory:
            try:
                verify_checkpoint(directory)
            except CorruptCheckpointError as err:
                if rank == 0:
                    print(f"[raylm] skipping corrupt checkpoint: {err}", flush=True)
                return {}
            state = trainer.load_checkpoint(Path(directory))
    if rank == 0:
        print(f"[raylm] resumed from step {state['step']} ({folder if local_path.is_dir() else checkpoint.path})",
              flush=True)
    return state


def _batches(shard, micro_batch_size: int, seed: int, start_epoch: int, skip: int) -> Iterator[tuple[int, int, dict]]:
    """Endless micro-batches from this worker's shard, as (epoch, index in epoch, batch).

    Every worker runs the same number of steps and its shard is split with
    equal=True, so no worker waits on another at an epoch boundary.
    """
    epoch = start_epoch
    while True:
        produced = 0
        for index, batch in enumerate(
            shard.iter_torch_batches(
                batch_size=micro_batch_size,
                drop_last=True,
                local_shuffle_buffer_size=max(4 * micro_batch_size, 64),
                local_shuffle_seed=seed + epoch,
            )
        ):
            produced += 1
            if epoch == start_epoch and index < skip:
                continue
            yield epoch, index + 1, batch
        if produced == 0:
            raise RuntimeError("the training shard of this worker is empty: use more data or fewer workers")
        epoch += 1


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train entry point: build, restore, train for ``max_steps``, report and checkpoint."""
    import ray.train
    import ray.train.torch

    job = JobConfig.model_validate(loop_config["job"])
    config = job.train
    torch.set_num_threads(config.threads_per_worker)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    _seed_everything(config.seed)
    model = build_model(job.model, loop_config["vocab_size"], job.data.seq_len, loop_config["special_ids"],
                        seed=config.seed)
    trainer = LMTrainer(model, config, device)
    state = _restore(trainer, ray.train.get_checkpoint(), rank)
    _seed_everything(config.seed + 1000 * rank + trainer.step)

    tracker = None
    if rank == 0 and loop_config.get("mlflow_run_id"):
        from raylm.tracking import WorkerTracker

        tracker = WorkerTracker(loop_config["tracking_uri"], loop_config["mlflow_run_id"])

    meter = ThroughputMeter(flops_per_token(trainer.base_model, job.data.seq_len),
                            device_peak_flops(config.precision, device), world)
    train_shard = ray.train.get_dataset_shard("train")
    dev_shard = ray.train.get_dataset_shard("dev")
    batch_stream = _batches(train_shard, config.micro_batch_size, config.seed + rank,
                            int(state.get("epoch", 0)), int(state.get("batches_in_epoch", 0)))
    epoch, position = int(state.get("epoch", 0)), int(state.get("batches_in_epoch", 0))

    def dev_batches():
        produced = 0
        for batch in dev_shard.iter_torch_batches(batch_size=config.micro_batch_size, drop_last=True):
            if produced >= config.eval_batches:
                break
            produced += 1
            yield batch

    while trainer.step < config.max_steps:
        micro_batches = []
        for _ in range(config.grad_accum_steps):
            epoch, position, batch = next(batch_stream)
            micro_batches.append(batch)
        step_metrics = trainer.train_step(micro_batches)
        meter.add(step_metrics["tokens"])
        step = trainer.step
        is_last = step >= config.max_steps
        should_log = step % config.log_every == 0 or is_last
        should_eval = is_last or (config.eval_every and step % config.eval_every == 0)
        should_checkpoint = is_last or (config.checkpoint_every and step % config.checkpoint_every == 0)
        if not (should_log or should_eval or should_checkpoint):
            continue
        metrics: dict[str, Any] = {
            "step": step,
            "epoch": epoch,
            "loss": step_metrics["loss"],
            "lr": step_metrics["lr"],
            "grad_norm": step_metrics["grad_norm"],
            "skipped_steps": step_metrics["skipped_steps"],
            **meter.read(),
        }
        meter.reset()
        if should_eval:
            eval_loss = trainer.evaluate(dev_batches())
            metrics["eval_loss"] = eval_loss
            metrics["eval_perplexity"] = float(np.exp(min(eval_loss, 50.0)))
        if tracker is not None:
            tracker.log_metrics(metrics, step)
        if rank == 0:
            shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
            print(f"[raylm] {shown}", flush=True)
        if should_checkpoint:
            with tempfile.TemporaryDirectory() as directory:
                trainer.save_checkpoint(Path(directory), {"epoch": epoch, "batches_in_epoch": position,
                                                          "eval_loss": metrics.get("eval_loss")})
                checkpoint = ray.train.Checkpoint.from_directory(directory) if rank == 0 else None
                ray.train.report(metrics, checkpoint=checkpoint)
        else:
            ray.train.report(metrics)
    if tracker is not None:
        tracker.close()
