"""Byte-level BPE tokenizer training and loading.

The tokenizer is trained with the ``tokenizers`` library and wrapped as a
transformers fast tokenizer so that it saves and loads with the model folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from raylm.common.fingerprints import fingerprint_text
from raylm.common.pretrained import Checkpoint, locate_checkpoint
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


def special_token_ids(tokenizer) -> dict[str, int]:
    return {"bos": tokenizer.eos_token_id, "eos": tokenizer.eos_token_id, "pad": tokenizer.pad_token_id}


def tokenizer_fingerprint(tokenizer) -> str:
    """A stable hash of the tokenizer's vocabulary and merges."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    payload = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return fingerprint_text(payload)


@dataclass(frozen=True)
class EncoderSpec:
    """What a Ray Data task needs to tokenize: the fast tokenizer as JSON and its special ids.

    Small and picklable; each worker process builds the Rust tokenizer from it
    once (:func:`encode_texts` caches it by fingerprint).
    """

    tokenizer_json: str
    eos_id: int
    pad_id: int
    fingerprint: str


def encoder_spec(tokenizer) -> EncoderSpec:
    """The :class:`EncoderSpec` of a transformers fast tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError("raylm needs a fast (Rust-backed) tokenizer")
    return EncoderSpec(backend.to_str(), int(tokenizer.eos_token_id), int(tokenizer.pad_token_id),
                       tokenizer_fingerprint(tokenizer))


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
