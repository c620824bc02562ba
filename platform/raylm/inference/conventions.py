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

from raylm.data.special_tokens import EOS_TOKEN

# End-of-turn markers of the common chat templates (ChatML, Llama 3, Phi-3, Gemma): a reply ends at whichever
# of them the folder's template writes and its tokenizer holds as one token.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>")
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


def is_native_tokenizer(tokenizer) -> bool:
    """A tokenizer raylm trained (:func:`raylm.data.tokenizer.wrap_tokenizer`): its BOS and EOS are both the
    end-of-text separator."""
    return tokenizer.eos_token == EOS_TOKEN and tokenizer.bos_token == EOS_TOKEN


def _ids(value) -> list[int]:
    if value is None:
        return []
    return [int(item) for item in value] if isinstance(value, (list, tuple)) else [int(value)]


def _added_prefix(tokenizer) -> tuple[int, ...]:
    """The special ids the tokenizer itself puts before a text (a BOS, or nothing)."""
    backend = tokenizer.backend_tokenizer
    plain = backend.encode("a", add_special_tokens=False).ids
    full = backend.encode("a", add_special_tokens=True).ids
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return tuple(full[:start])
    return ()


def token_conventions(tokenizer, generation_config=None) -> TokenConventions:
    """The conventions of a model folder's tokenizer and ``generation_config`` (None: it has none)."""
    if is_native_tokenizer(tokenizer):
        return TokenConventions(native=True, prefix=(int(tokenizer.eos_token_id),),
                                stop_ids=frozenset({int(tokenizer.eos_token_id)}))
    stops = set(_ids(getattr(generation_config, "eos_token_id", None)))
    if tokenizer.eos_token_id is not None:
        stops.add(int(tokenizer.eos_token_id))
    template = getattr(tokenizer, "chat_template", None) or ""
    vocab = tokenizer.get_vocab()
    stops.update(vocab[token] for token in END_OF_TURN_TOKENS if token in template and token in vocab)
    defaults: dict[str, Any] = {}
    if generation_config is not None:
        # What generate() does with this config: sample with its settings only when do_sample is set, else greedy.
        if getattr(generation_config, "do_sample", False):
            defaults = {name: getattr(generation_config, name) for name in SAMPLING_FIELDS
                        if getattr(generation_config, name, None) is not None}
        else:
            defaults = {"temperature": 0.0}
    return TokenConventions(native=False, prefix=_added_prefix(tokenizer), stop_ids=frozenset(stops),
                            sampling_defaults=defaults)
