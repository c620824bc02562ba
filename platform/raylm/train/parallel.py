"""Distributed setup and parallelism, applied to a built model from outside the model code.

``parallelize`` is the one place a model is prepared for training: fused
kernel substitutions, activation checkpointing per block, ``torch.compile``
per block, then DDP or FSDP2 (``fully_shard`` on every transformer block, then
the root), in the order torchtitan uses. Ray Train has already created the
process group (gloo on CPU, NCCL on GPU) before the worker function runs;
without a process group (a single process, e.g. unit tests) the model is left
unwrapped.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.distributed as dist

from raylm.train.kernels import fuse_kernels
from raylm.train.tensor_parallel import apply_tensor_parallel

MIXED_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    if world_size() > 1:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def gather_objects(value) -> list | None:
    """Every rank's ``value`` on rank 0 (None elsewhere); ``[value]`` without a process group."""
    if world_size() == 1:
        return [value]
    gathered = [None] * world_size() if rank() == 0 else None
    dist.gather_object(value, gathered, dst=0)
    return gathered


def broadcast_object(value, src: int = 0):
    """Rank ``src``'s ``value`` on every rank; ``value`` itself without a process group."""
    if world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of a transformers model (GPT-2 ``h``, Llama ``layers``, BERT ``encoder.layer``)."""
    for path in ("transformer.h", "model.layers", "bert.encoder.layer", "encoder.layer", "h", "layers"):
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
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"{type(model).__name__} does not support activation checkpointing")
    # Non-reentrant checkpointing composes with FSDP2 and torch.compile.
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def compile_blocks(model: torch.nn.Module) -> None:
    """``torch.compile`` each transformer block in place.

    Per-block compilation keeps FSDP2's hooks and transformers' mask building
    outside the compiled graphs (no graph breaks on them), keeps parameter names
    unchanged for state dicts, and lets every identical block reuse one graph.
    """
    for block in transformer_blocks(model):
        block.compile()


def apply_ddp(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def apply_fsdp(model: torch.nn.Module, precision: str = "fp32", mesh=None) -> torch.nn.Module:
    """Shard ``model`` in place with FSDP2: each transformer block, then the root.

    With bf16/fp16 the policy keeps fp32 sharded master weights and optimizer
    state, casts the gathered parameters for compute, and reduces gradients in
    fp32. The root's ``fully_shard`` takes the remaining parameters (embeddings,
    final norm, head); tied embeddings stay one parameter. ``mesh``: the
    data-parallel mesh dimension to shard over (default: all ranks).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    dtype = MIXED_DTYPES.get(precision)
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if dtype else MixedPrecisionPolicy()
    blocks = transformer_blocks(model)
    for index, block in enumerate(blocks):
        # The last block is resharded by the root right after it anyway.
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=index < len(blocks) - 1)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def parallelize(model: torch.nn.Module, parallel: str, device: torch.device, precision: str = "fp32",
                activation_checkpointing: bool = False, compile: bool = False,
                fused_kernels: bool = False, mesh=None) -> torch.nn.Module:
    """Prepare a built model for training on ``device``; returns the module to call.

    ``parallel`` is "ddp" or "fsdp". Under FSDP the model is sharded in place, so
    the returned module is ``model`` itself; under DDP it is the DDP wrapper.
    ``fused_kernels`` swaps modules for fused equivalents first (:mod:`raylm.train.kernels`).
    ``mesh``: a ("dp", "tp") mesh (:func:`raylm.train.tensor_parallel.build_mesh`):
    tensor parallelism over "tp" comes before activation checkpointing and
    compile, FSDP2 over "dp" after them (torchtitan's order).
    """
    if parallel not in ("ddp", "fsdp"):
        raise ValueError(f"unknown parallel mode {parallel!r}")
    if fused_kernels:
        fuse_kernels(model)
    model = model.to(device)
    if mesh is not None:
        if parallel != "fsdp":
            raise ValueError("tensor parallelism needs parallel='fsdp'")
        apply_tensor_parallel(model, mesh["tp"])
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    if compile:
        compile_blocks(model)
    if not is_distributed():
        return model
    if parallel == "fsdp":
        return apply_fsdp(model, precision, mesh["dp"] if mesh is not None else None)
    if world_size() == 1:
        return model
    return apply_ddp(model, device)


def is_fsdp(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def model_class(model: torch.nn.Module) -> type:
    """The class ``model`` was built as, under the subclass FSDP2's ``fully_shard`` gives it."""
    from torch.distributed.fsdp import FSDPModule

    return next(cls for cls in type(model).__mro__ if not issubclass(cls, FSDPModule))


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DDP wrapper (an FSDP2 model is its own module)."""
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
