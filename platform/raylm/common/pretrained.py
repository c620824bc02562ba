"""Where a pretrained checkpoint lives: a transformers folder or a GGUF file.

``model.init_from`` and ``raylm convert`` accept a local transformers folder
(``config.json`` and safetensors weights), a ``.gguf`` file, or a folder that
holds exactly one ``.gguf`` file; never a hub id. transformers reads a GGUF
file (with the ``gguf`` package) as the folder it lies in plus the file's name,
dequantising its weights and building its tokenizer from the file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from raylm.common.fingerprints import file_digest, fingerprint

GGUF_SUFFIX = ".gguf"


@dataclass(frozen=True)
class Checkpoint:
    """A located checkpoint: its folder and, for GGUF, the file's name inside it."""

    folder: Path
    gguf_file: Optional[str] = None

    def tokenizer_kwargs(self) -> dict[str, Any]:
        """``AutoTokenizer.from_pretrained`` keywords: local files only, no remote code."""
        return {"local_files_only": True, "trust_remote_code": False,
                **({"gguf_file": self.gguf_file} if self.gguf_file else {})}

    def model_kwargs(self) -> dict[str, Any]:
        """``from_pretrained`` keywords for the weights: safetensors only (a GGUF file is read by transformers'
        own GGUF reader, never unpickled)."""
        return {**self.tokenizer_kwargs(), **({} if self.gguf_file else {"use_safetensors": True})}


def locate_checkpoint(source: str | Path) -> Checkpoint:
    """The :class:`Checkpoint` at ``source``; FileNotFoundError / ValueError with one line when there is none."""
    path = Path(source)
    if path.is_file():
        if path.suffix.lower() != GGUF_SUFFIX:
            raise ValueError(f"{path}: a checkpoint is a transformers folder or a .gguf file")
        return Checkpoint(path.parent, path.name)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if (path / "config.json").is_file():
        return Checkpoint(path)
    ggufs = sorted(p.name for p in path.iterdir() if p.suffix.lower() == GGUF_SUFFIX)
    if len(ggufs) == 1:
        return Checkpoint(path, ggufs[0])
    if ggufs:
        raise ValueError(f"{path} holds {len(ggufs)} .gguf files ({', '.join(ggufs)}): name one")
    raise FileNotFoundError(f"not a model folder (no config.json or .gguf file): {path}")


def checkpoint_fingerprint(checkpoint: Checkpoint) -> str:
    """A fingerprint of the checkpoint's weights and config: the GGUF file, or the folder's safetensors and
    config.json (names and SHA-256); what an adapter trained on it records as its base."""
    if checkpoint.gguf_file:
        return fingerprint({checkpoint.gguf_file: file_digest(checkpoint.folder / checkpoint.gguf_file)})
    files = sorted(path for path in checkpoint.folder.iterdir()
                   if path.suffix == ".safetensors" or path.name == "config.json")
    return fingerprint({path.name: file_digest(path) for path in files})


# config.json's names for the context length, by architecture family (Llama/Qwen2, GPT-2).
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "n_ctx")


def context_length(checkpoint: Checkpoint) -> Optional[int]:
    """The checkpoint's context length in tokens (config.json, or the GGUF file's ``<arch>.context_length``);
    None when it does not say (or the gguf package that reads the file is not installed)."""
    if checkpoint.gguf_file is None:
        try:
            config = json.loads((checkpoint.folder / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return next((int(config[key]) for key in CONTEXT_KEYS if isinstance(config.get(key), int)), None)
    reader = _gguf_reader(checkpoint)
    if reader is None:
        return None
    arch = reader.get_field("general.architecture")
    field = reader.get_field(f"{arch.contents()}.context_length") if arch is not None else None
    return int(field.contents()) if field is not None else None


def _gguf_reader(checkpoint: Checkpoint):
    try:
        from gguf import GGUFReader
    except ImportError:
        return None
    return GGUFReader(checkpoint.folder / checkpoint.gguf_file)


def embedding_rows(checkpoint: Checkpoint) -> Optional[int]:
    """The rows of the checkpoint's token embedding (config.json's ``vocab_size``, or the GGUF file's
    ``<arch>.vocab_size``); None when it does not say."""
    if checkpoint.gguf_file is None:
        try:
            config = json.loads((checkpoint.folder / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        size = config.get("vocab_size", (config.get("text_config") or {}).get("vocab_size"))
        return size if isinstance(size, int) else None
    reader = _gguf_reader(checkpoint)
    arch = reader.get_field("general.architecture") if reader is not None else None
    field = reader.get_field(f"{arch.contents()}.vocab_size") if arch is not None else None
    if field is None and reader is not None:
        tokens = reader.get_field("tokenizer.ggml.tokens")
        return len(tokens.contents()) if tokens is not None else None
    return int(field.contents()) if field is not None else None


def tokenizer_vocabulary(source: str | Path) -> Optional[dict[str, int]]:
    """Token -> id of the tokenizer in a folder (its ``tokenizer.json``, added tokens included) or a GGUF
    checkpoint; None when there is none this can read without transformers (or the gguf package is absent)."""
    path = Path(source)
    if path.is_dir() and (path / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(path / "tokenizer.json")).get_vocab(with_added_tokens=True)
    try:
        checkpoint = locate_checkpoint(path)
    except (FileNotFoundError, ValueError):
        return None
    reader = _gguf_reader(checkpoint) if checkpoint.gguf_file else None
    tokens = reader.get_field("tokenizer.ggml.tokens") if reader is not None else None
    return {token: index for index, token in enumerate(tokens.contents())} if tokens is not None else None


def vocabulary_mismatch(checkpoint: Checkpoint, tokenizer_path: str | Path) -> Optional[str]:
    """Why the tokenizer at ``tokenizer_path`` cannot feed the checkpoint, or None: ids beyond its embedding
    rows, or a vocabulary other than the checkpoint's own tokenizer's (where it brings one)."""
    given = tokenizer_vocabulary(tokenizer_path)
    if not given:
        return None
    rows = embedding_rows(checkpoint)
    needed = max(given.values()) + 1
    if rows is not None and needed > rows:
        return f"its token ids reach {needed - 1}, beyond the {rows} embedding rows of model.init_from"
    own = tokenizer_vocabulary(checkpoint.folder / checkpoint.gguf_file if checkpoint.gguf_file
                               else checkpoint.folder)
    if own is not None and own != given:
        differ = len(set(own.items()) ^ set(given.items()))
        return (f"not the tokenizer of model.init_from ({len(given)} tokens against its {len(own)}, "
                f"{differ} token ids differ)")
    return None
