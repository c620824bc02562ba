"""Byte-level BPE tokenizer training and loading.

The tokenizer is trained with the ``tokenizers`` library and wrapped as a
transformers fast tokenizer so that it saves and loads with the model folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

from raylm.common.fingerprints import fingerprint_text
from raylm.common.pretrained import Checkpoint, locate_checkpoint
from raylm.data.conventions import answer_end_id, instruct_template, is_native_tokenizer, prompt_prefix
from raylm.data.special_tokens import ALL_SPECIAL_TOKENS, EOS_TOKEN, PAD_TOKEN, TASK_TOKENS


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int):
    """Train a byte-level BPE tokenizer on ``texts`` and return a fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=ALL_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return wrap_tokenizer(tokenizer)


def wrap_tokenizer(tokenizer):
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=list(TASK_TOKENS.values()),
    )
    fast.padding_side = "left"
    return fast


def load_tokenizer(path: str | Path, extend: bool = True):
    """Load a local tokenizer (a folder, or a checkpoint's GGUF file; never from a hub), padding on the left.

    ``extend``: add raylm's task tokens (and an EOS / pad token) where the tokenizer lacks them, as data
    preparation does before training; the engine loads a model folder's tokenizer as it was saved.
    """
    from transformers import AutoTokenizer

    if not Path(path).exists():
        raise FileNotFoundError(f"tokenizer folder not found: {path}")
    checkpoint = locate_checkpoint(path) if Path(path).is_file() else Checkpoint(Path(path))
    tokenizer = AutoTokenizer.from_pretrained(checkpoint.folder, **checkpoint.tokenizer_kwargs())
    if extend:
        missing = [token for token in TASK_TOKENS.values() if token not in tokenizer.get_vocab()]
        if missing:
            tokenizer.add_special_tokens({"additional_special_tokens": missing})
        if tokenizer.eos_token is None:
            tokenizer.add_special_tokens({"eos_token": EOS_TOKEN})
        if tokenizer.pad_token is None:
            tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    tokenizer.padding_side = "left"
    return tokenizer


def extends_tokenizer(job) -> bool:
    """Whether data preparation adds raylm's task tokens to a given tokenizer: not to a pretrained causal LM's,
    whose vocabulary is its embedding rows (``model.init_from``); a fresh model or an encoder head gets them."""
    return not (job.model.init_from and job.model.task == "causal_lm")


def special_token_ids(tokenizer) -> dict[str, int]:
    return {"bos": tokenizer.eos_token_id, "eos": tokenizer.eos_token_id, "pad": tokenizer.pad_token_id}


def tokenizer_fingerprint(tokenizer) -> str:
    """A stable hash of the tokenizer's vocabulary and merges."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    payload = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return fingerprint_text(payload)


@dataclass(frozen=True)
class EncoderSpec:
    """What a Ray Data task needs to tokenize: the fast tokenizer as JSON and how examples start and end.

    Small and picklable; each worker process builds the Rust tokenizer from it
    once (:func:`encode_texts` caches it by fingerprint). ``prefix``: the ids
    before every example (:func:`raylm.data.conventions.prompt_prefix`);
    ``native``: raylm's own tokenizer (its task tokens start plain text);
    ``chat_template``: an instruct checkpoint's template, through which task
    examples are formatted (with ``special_tokens``, the variables transformers
    renders it with), each answer ending with ``answer_end_id``.
    """

    tokenizer_json: str
    eos_id: int
    pad_id: int
    fingerprint: str
    prefix: tuple[int, ...] = ()
    native: bool = True
    chat_template: Optional[str] = None
    special_tokens: tuple[tuple[str, Any], ...] = ()
    answer_end_id: Optional[int] = None

    @property
    def end_id(self) -> int:
        """The id after every answer."""
        return self.eos_id if self.answer_end_id is None else self.answer_end_id


def encoder_spec(tokenizer) -> EncoderSpec:
    """The :class:`EncoderSpec` of a transformers fast tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError("raylm needs a fast (Rust-backed) tokenizer")
    eos_id = int(tokenizer.eos_token_id)
    # A checkpoint's tokenizer may have no pad token (GPT-2); padding is masked out of the loss either way.
    pad_id = eos_id if tokenizer.pad_token_id is None else int(tokenizer.pad_token_id)
    template = instruct_template(tokenizer)
    special = tuple(sorted((key, tuple(value) if isinstance(value, list) else value)
                           for key, value in tokenizer.special_tokens_map.items())) if template else ()
    return EncoderSpec(backend.to_str(), eos_id, pad_id, tokenizer_fingerprint(tokenizer),
                       prefix=prompt_prefix(tokenizer), native=is_native_tokenizer(tokenizer), chat_template=template,
                       special_tokens=special, answer_end_id=answer_end_id(tokenizer) if template else None)


def formatting_key(spec: EncoderSpec) -> dict[str, Any]:
    """What, beside the vocabulary, decides the token ids of an example: for fingerprints of prepared data."""
    return {"prefix": list(spec.prefix), "native": spec.native, "end": spec.end_id,
            "chat_template": fingerprint_text(spec.chat_template) if spec.chat_template else None}


_BACKENDS: dict[str, object] = {}


def encode_texts(spec: EncoderSpec, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens added: the same ids the wrapper's
    ``tokenizer(texts, add_special_tokens=False)`` gives, with less overhead."""
    backend = _BACKENDS.get(spec.fingerprint)
    if backend is None:
        from tokenizers import Tokenizer

        backend = _BACKENDS[spec.fingerprint] = Tokenizer.from_str(spec.tokenizer_json)
    if not texts:
        return []
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    return [encoding.ids for encoding in encode(texts, add_special_tokens=False)]


_CHAT_TOKENIZERS: dict[str, object] = {}


def render_chat_prompts(spec: EncoderSpec, conversations: list[list[dict[str, str]]]) -> list[str]:
    """Each conversation through the spec's chat template with the assistant's cue, as the engine renders a
    prompt (transformers' ``apply_chat_template`` on a tokenizer with the same special tokens)."""
    if spec.chat_template is None:
        raise ValueError("this tokenizer has no chat template of its own")
    key = f"{spec.fingerprint}:{spec.special_tokens}"
    tokenizer = _CHAT_TOKENIZERS.get(key)
    if tokenizer is None:
        from tokenizers import Tokenizer
        from transformers import PreTrainedTokenizerFast

        tokenizer = _CHAT_TOKENIZERS[key] = PreTrainedTokenizerFast(
            tokenizer_object=Tokenizer.from_str(spec.tokenizer_json),
            **{key: list(value) if isinstance(value, tuple) else value for key, value in spec.special_tokens})
    return [tokenizer.apply_chat_template(messages, chat_template=spec.chat_template, tokenize=False,
                                          add_generation_prompt=True) for messages in conversations]
