"""Attention masks for packed training blocks, built on the device without a host sync.

A packed block holds several documents; its position ids restart at every
document. Given position ids and no mask, transformers builds the
block-diagonal causal mask itself, but first asks whether a row holds more than
one document (``find_packed_sequence_indices``: ``(...).all()`` on a GPU tensor
read on the host). That read waits for the GPU to finish all queued work, so
every forward pass of a CUDA step starts with the GPU idle while the CPU
launches its first kernels. raylm builds the same mask itself and passes it as
a 4-D boolean mask, which transformers uses as given.
"""

from __future__ import annotations

import torch

from raylm.compat.transformers import attention_implementation


def packed_causal_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """(batch, 1, seq, seq) bool: query i sees key j iff j <= i and both lie in the same document.

    A document starts wherever a position does not follow the one before it by
    one (as in transformers), so a row of one document gives the plain causal mask.
    """
    first = position_ids[:, :1] - 1
    documents = (torch.diff(position_ids, prepend=first, dim=-1) != 1).cumsum(-1)
    length = position_ids.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=position_ids.device).tril()
    return ((documents[:, :, None] == documents[:, None, :]) & causal).unsqueeze(1)


def packed_attention_mask(model: torch.nn.Module, position_ids: torch.Tensor | None) -> torch.Tensor | None:
    """The mask to pass a causal LM for ``position_ids``, or None to let transformers build it.

    Only for SDPA attention (a boolean mask is its input as is); other
    implementations (eager adds a float mask, flash attention reads the position
    ids) keep transformers' own handling.
    """
    if position_ids is None or position_ids.dim() != 2:
        return None
    if attention_implementation(model) != "sdpa":
        return None
    return packed_causal_mask(position_ids)


def single_documents(position_ids: torch.Tensor | None) -> bool:
    """Whether every row of a (batch, seq) host tensor is one document counted from position 0.

    Such rows need no document mask: the plain causal mask, and the positions a
    model uses when given none. Meant for the host copy of a batch (on a GPU
    tensor the answer would be a device sync).
    """
    if position_ids is None or position_ids.dim() != 2 or position_ids.shape[-1] == 0:
        return False
    return not bool(position_ids[:, 0].any()) and bool((torch.diff(position_ids, dim=-1) == 1).all())
