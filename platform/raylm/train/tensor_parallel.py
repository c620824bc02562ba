"""2D parallelism: a (dp x tp) device mesh and DTensor tensor parallelism for transformers' Llama.

Applied to a built ``LlamaForCausalLM`` from outside the model code, in
torchtitan's ``parallelize_llama`` order (the caller then adds activation
checkpointing, per-block compile and FSDP2 over the ``dp`` mesh dimension):

- every block: q/k/v and gate/up column-wise, o and down row-wise (Megatron's
  split: one all-reduce-equivalent per attention and per MLP);
- sequence parallelism: the residual stream between blocks is sharded over
  the sequence (dim 1); the RMSNorms run on their sequence shard, and the
  attention and MLP inputs are all-gathered into full sequences before the
  column-wise projections; the row-wise outputs are reduce-scattered back;
- vocabulary parallelism: the token embedding is sharded over the vocabulary
  (row-wise) and the output head column-wise; the logits are all-gathered
  (no loss parallelism: the trainer's cross-entropy reads full logits).
  A tied head stays tied: both shard the same weight over the vocabulary.

transformers' Llama attention reshapes its projections with ``view(..., -1,
head_dim)`` and ``reshape(..., -1)``, so with local (column-sharded) outputs it
sees ``num_heads / tp`` query heads and ``num_kv_heads / tp`` key/value heads
without any change to its attributes; ``num_key_value_groups`` (their ratio)
stays right. The rotary embedding and the attention mask are computed by the
root from the full position ids and reach every block unsharded.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

TP_ARCHITECTURES = ("LlamaForCausalLM",)


def build_mesh(tensor_parallel: int, device: torch.device):
    """The ("dp", "tp") device mesh over all ranks: consecutive ranks form a tensor-parallel group.

    Ray Train numbers the workers of one node consecutively, so a group of
    consecutive ranks shares a node when each node holds a multiple of
    ``tensor_parallel`` workers (:func:`check_groups_share_nodes` verifies it).
    """
    from torch.distributed.device_mesh import init_device_mesh

    world = dist.get_world_size()
    if world % tensor_parallel:
        raise ValueError(f"tensor_parallel={tensor_parallel} does not divide the {world} workers")
    return init_device_mesh(device.type, (world // tensor_parallel, tensor_parallel), mesh_dim_names=("dp", "tp"))


def check_groups_share_nodes(mesh, node_id: str) -> None:
    """Fail clearly unless every rank of this rank's tensor-parallel group runs on this rank's node."""
    tp_group = mesh["tp"].get_group()
    nodes = [None] * dist.get_world_size(tp_group)
    dist.all_gather_object(nodes, node_id, group=tp_group)
    if len(set(nodes)) > 1:
        raise RuntimeError(
            f"train.tensor_parallel={len(nodes)}: a tensor-parallel group spans {len(set(nodes))} nodes; "
            "place a multiple of tensor_parallel workers on each node (placement_strategy PACK or STRICT_PACK)")


def check_supported(model: torch.nn.Module, tensor_parallel: int) -> None:
    """Raise ValueError unless ``model`` is a Llama whose heads divide by ``tensor_parallel``."""
    name = type(model).__name__
    if name not in TP_ARCHITECTURES:
        raise ValueError(f"tensor parallelism supports {', '.join(TP_ARCHITECTURES)}, not {name}")
    config = model.config
    for field in ("num_attention_heads", "num_key_value_heads"):
        if getattr(config, field) % tensor_parallel:
            raise ValueError(f"tensor_parallel={tensor_parallel} does not divide {field}={getattr(config, field)}")


def apply_tensor_parallel(model: torch.nn.Module, tp_mesh) -> None:
    """Shard a transformers Llama causal LM's weights over ``tp_mesh`` in place (see the module docstring)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, RowwiseParallel,
                                                   SequenceParallel, parallelize_module)

    check_supported(model, tp_mesh.size())
    embeddings, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and head.weight is embeddings.weight
    parallelize_module(model, tp_mesh, {
        "model.embed_tokens": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
        "model.norm": SequenceParallel(),
        "lm_head": ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate()),
    })
    if tied:
        # Both plans shard the (vocab, hidden) weight on dim 0 over the same mesh: one parameter again.
        model.lm_head.weight = model.model.embed_tokens.weight
    block_plan = {
        "input_layernorm": SequenceParallel(),
        "self_attn": PrepareModuleInput(input_kwarg_layouts={"hidden_states": Shard(1)},
                                        desired_input_kwarg_layouts={"hidden_states": Replicate()}),
        "self_attn.q_proj": ColwiseParallel(),
        "self_attn.k_proj": ColwiseParallel(),
        "self_attn.v_proj": ColwiseParallel(),
        "self_attn.o_proj": RowwiseParallel(output_layouts=Shard(1)),
        "post_attention_layernorm": SequenceParallel(),
        "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
        "mlp.gate_proj": ColwiseParallel(),
        "mlp.up_proj": ColwiseParallel(),
        "mlp.down_proj": RowwiseParallel(output_layouts=Shard(1)),
    }
    for block in model.model.layers:
        parallelize_module(block, tp_mesh, block_plan)


def gather_rows(batch: dict[str, torch.Tensor], group) -> dict[str, torch.Tensor]:
    """Every rank's rows of ``batch`` concatenated in rank order, on every rank of ``group``.

    The ranks of a tensor-parallel group must compute on identical inputs. Each
    still reads its own data shard (so the shards, the data position and the
    global batch mean what they mean without tensor parallelism), and the group
    trains on the union of its members' micro-batches.
    """
    gathered = {}
    for key, value in batch.items():
        parts = [torch.empty_like(value) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, value.contiguous(), group=group)
        gathered[key] = torch.cat(parts)
    return gathered
