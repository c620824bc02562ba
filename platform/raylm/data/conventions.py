"""How a tokenizer starts a prompt and ends an answer: raylm's conventions, or a pretrained checkpoint's.

Data preparation and the engine both read them from here, so that a model is
trained on the token sequences it is later asked to continue. raylm's own
tokenizer puts its end-of-text separator before every example and after every
answer. A pretrained tokenizer puts its own BOS before a text (Llama) or
nothing (SmolLM2, GPT-2), and its EOS after an answer; an instruct checkpoint
(a chat template of its own) gets each task as a user turn of its template, and
its answer ends with the template's end-of-turn token.
"""

from __future__ import annotations

from typing import Optional

from raylm.data.formatting import CHAT_TEMPLATE
from raylm.data.special_tokens import EOS_TOKEN

# End-of-turn markers of the common chat templates (ChatML, Llama 3, Phi-3, Gemma): a reply ends at whichever
# of them the folder's template writes and its tokenizer holds as one token.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>")


def is_native_tokenizer(tokenizer) -> bool:
    """A tokenizer raylm trained (:func:`raylm.data.tokenizer.wrap_tokenizer`): its BOS and EOS are both the
    end-of-text separator."""
    return tokenizer.eos_token == EOS_TOKEN and tokenizer.bos_token == EOS_TOKEN


def added_prefix(tokenizer) -> tuple[int, ...]:
    """The special ids the tokenizer itself puts before a text (a BOS, or nothing)."""
    backend = tokenizer.backend_tokenizer
    plain = backend.encode("a", add_special_tokens=False).ids
    full = backend.encode("a", add_special_tokens=True).ids
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return tuple(full[:start])
    return ()


def prompt_prefix(tokenizer) -> tuple[int, ...]:
    """The ids before every prompt: raylm's separator for its own tokenizer, else what the tokenizer adds."""
    return (int(tokenizer.eos_token_id),) if is_native_tokenizer(tokenizer) else added_prefix(tokenizer)


def instruct_template(tokenizer) -> Optional[str]:
    """The chat template of an instruct checkpoint, or None: raylm's own models and base checkpoints (whose
    exported folders carry raylm's chat format for /v1/chat/completions) take tasks in raylm's task format."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named templates: the default one renders conversations
        template = template.get("default")
    if not isinstance(template, str) or not template or template == CHAT_TEMPLATE or is_native_tokenizer(tokenizer):
        return None
    return template


def end_of_turn_ids(tokenizer, template: Optional[str]) -> list[int]:
    """The ids of the end-of-turn tokens ``template`` writes that the tokenizer holds as one token."""
    if not template:
        return []
    vocab = tokenizer.get_vocab()
    return [vocab[token] for token in END_OF_TURN_TOKENS if token in template and token in vocab]


def answer_end_id(tokenizer) -> int:
    """The id that ends a trained answer: the chat template's end-of-turn token for an instruct checkpoint
    (the tokenizer's EOS where the template writes none of the known markers), else the EOS."""
    ends = end_of_turn_ids(tokenizer, instruct_template(tokenizer))
    return ends[0] if ends else int(tokenizer.eos_token_id)
