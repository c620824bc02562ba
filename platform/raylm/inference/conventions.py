"""How a model folder's tokenizer starts a prompt and ends a reply.

raylm's own models were trained on documents that each follow an end-of-text
separator, so a prompt starts with that token and the same token ends a row.
A pretrained checkpoint brings its own conventions: its tokenizer adds a BOS
(Llama) or nothing (SmolLM2, GPT-2); its ``generation_config`` names one or
more end-of-sequence ids and the sampling defaults its authors chose; its chat
template closes each turn with an end-of-turn token. The engine follows those,
so that its greedy output equals ``transformers``' ``generate`` token for token.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from raylm.data.conventions import END_OF_TURN_TOKENS, added_prefix, end_of_turn_ids, is_native_tokenizer

__all__ = ["END_OF_TURN_TOKENS", "SAMPLING_FIELDS", "TokenConventions", "is_native_tokenizer", "token_conventions"]

# The generation_config fields that default a request's sampling settings.
SAMPLING_FIELDS = ("temperature", "top_p", "top_k")


@dataclass(frozen=True)
class TokenConventions:
    """``prefix``: ids before every prompt; ``stop_ids``: ids that end a row (not part of its text);
    ``sampling_defaults``: temperature / top_p / top_k from ``generation_config`` for requests that set none."""

    native: bool
    prefix: tuple[int, ...]
    stop_ids: frozenset[int]
    sampling_defaults: dict[str, Any] = field(default_factory=dict)


def _ids(value) -> list[int]:
    if value is None:
        return []
    return [int(item) for item in value] if isinstance(value, (list, tuple)) else [int(value)]


def token_conventions(tokenizer, generation_config=None) -> TokenConventions:
    """The conventions of a model folder's tokenizer and ``generation_config`` (None: it has none)."""
    if is_native_tokenizer(tokenizer):
        return TokenConventions(native=True, prefix=(int(tokenizer.eos_token_id),),
                                stop_ids=frozenset({int(tokenizer.eos_token_id)}))
    stops = set(_ids(getattr(generation_config, "eos_token_id", None)))
    if tokenizer.eos_token_id is not None:
        stops.add(int(tokenizer.eos_token_id))
    template = getattr(tokenizer, "chat_template", None)
    stops.update(end_of_turn_ids(tokenizer, template if isinstance(template, str) else None))
    defaults: dict[str, Any] = {}
    if generation_config is not None:
        # What generate() does with this config: sample with its settings only when do_sample is set, else greedy.
        if getattr(generation_config, "do_sample", False):
            defaults = {name: getattr(generation_config, name) for name in SAMPLING_FIELDS
                        if getattr(generation_config, name, None) is not None}
        else:
            defaults = {"temperature": 0.0}
    return TokenConventions(native=False, prefix=added_prefix(tokenizer), stop_ids=frozenset(stops),
                            sampling_defaults=defaults)
