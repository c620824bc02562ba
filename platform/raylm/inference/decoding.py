"""Per-row decoding state and the token choice of one decoding step: sampling cuts, span-constrained masks."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from raylm.inference.task_model import SamplingParams, TokenLogprob


@dataclass
class DecodeRow:
    """Decoding state of one request in a batch."""

    prompt_ids: list[int]
    params: SamplingParams
    budget: int
    span_source: Optional[list[int]] = None
    generator: Optional[torch.Generator] = None
    prefix: str = ""  # echoed prompt text, emitted first
    generated: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0
    finish_reason: Optional[str] = None
    logprobs: list[TokenLogprob] = field(default_factory=list)


def sample_tokens(rows: list[DecodeRow], logits: torch.Tensor) -> torch.Tensor:
    """Draw one token per row after its temperature, top-k and top-p (nucleus) cuts, from its own generator.

    One sort serves both cuts for the whole batch; each row then draws a single
    uniform number from its own generator (so a seeded row's tokens do not
    depend on the rest of the batch) and picks its token by inverse CDF.
    """
    device = logits.device
    temperature = torch.tensor([max(row.params.temperature, 1e-5) for row in rows], device=device)
    ordered, order = torch.sort(logits / temperature[:, None], dim=-1, descending=True)
    vocab = ordered.shape[-1]
    top_k = torch.tensor([row.params.top_k if 0 < row.params.top_k < vocab else vocab for row in rows], device=device)
    drop = torch.arange(vocab, device=device)[None, :] >= top_k[:, None]
    top_p = torch.tensor([row.params.top_p for row in rows], device=device)
    if bool((top_p < 1.0).any()):
        probs = torch.softmax(ordered.masked_fill(drop, -math.inf), dim=-1)
        # Drop a token when the tokens before it already hold top_p of the mass; the first always stays.
        drop |= (probs.cumsum(-1) - probs) >= top_p[:, None]
    probs = torch.softmax(ordered.masked_fill(drop, -math.inf), dim=-1)
    cumulative = probs.cumsum(-1)
    uniform = torch.stack([torch.rand((), generator=row.generator, device=device) for row in rows])
    picked = torch.searchsorted(cumulative, (uniform * cumulative[:, -1])[:, None]).clamp(max=vocab - 1)
    return order.gather(-1, picked).squeeze(-1)


def span_mask(sources: list[list[int]], generated: list[list[int]], vocab_size: int, eos: int) -> torch.Tensor:
    """Additive logit mask allowing only tokens that keep each output a span of its source."""
    mask = torch.full((len(sources), vocab_size), float("-inf"))
    for row, (source, prefix) in enumerate(zip(sources, generated)):
        k = len(prefix)
        if k == 0:
            allowed = set(source)
        else:
            allowed = {source[i + k] for i in range(len(source) - k) if source[i: i + k] == prefix}
            allowed.add(eos)
        allowed.discard(-1)
        mask[row, [token for token in allowed if token < vocab_size]] = 0.0
    return mask
