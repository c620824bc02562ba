"""Distributed setup and parallelism, applied to a built model from outside the model code.

``apply_parallelism`` wraps a model for DDP or shards it with FSDP2
(``fully_shard`` on every transformer block, then the root). Ray Train has
already created the process group (gloo on CPU, NCCL on GPU) before the worker
function runs.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    if world_size() > 1:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated decoder blocks of a transformers causal LM (GPT-2 ``h``, Llama ``layers``)."""
    for path in ("transformer.h", "model.layers", "bert.encoder.layer", "encoder.layer"):
        module = model
        try:
            for part in path.split("."):
                module = getattr(module, part)
        except AttributeError:
            continue
        return list(module)
    raise ValueError(f"cannot find transformer blocks in {type(model).__name__}")


def apply_activation_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each block's activations in backward instead of storing them."""
    if hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def apply_parallelism(model: torch.nn.Module, parallel: str, device: torch.device,
                      precision: str = "fp32") -> torch.nn.Module:
    """Return ``model`` wrapped for ``parallel`` ("ddp" or "fsdp") on ``device``."""
    model = model.to(device)
    if world_size() == 1 and parallel == "ddp":
        return model
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)
    if parallel == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        # FSDP2 keeps fp32 master weights and casts for compute; reductions stay in fp32.
        policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if dtype else MixedPrecisionPolicy()
        for block in transformer_blocks(model):
            fully_shard(block, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        return model
    raise ValueError(f"unknown parallel mode {parallel!r}")


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") and isinstance(model.module, torch.nn.Module) else model


@contextlib.contextmanager
def gradient_sync(model: torch.nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce on non-final accumulation micro-steps."""
    if enabled:
        if hasattr(model, "set_requires_gradient_sync"):
            model.set_requires_gradient_sync(True)
        yield
        return
    if hasattr(model, "no_sync"):  # DDP
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield
