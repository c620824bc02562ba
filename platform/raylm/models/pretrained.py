"""Loading pretrained checkpoints (transformers folders and GGUF files) and converting them to model folders.

A model transformers reads from a GGUF file carries the file's quantisation
marker, and transformers refuses to save it; :func:`load_pretrained` rebuilds
it as a plain model of the same config with the dequantised weights, so that it
trains, checkpoints and exports like any other (the logits are unchanged:
``tests/integration/test_pretrained_decoder.py`` checks it).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Optional

import torch

from raylm.common.fingerprints import file_digest
from raylm.common.pretrained import Checkpoint, locate_checkpoint

CONVERTED_CARD = "raylm.json"


def load_pretrained(auto_class, checkpoint: Checkpoint, dtype: Optional[torch.dtype] = None, **kwargs: Any):
    """``auto_class.from_pretrained`` for ``checkpoint``; a GGUF checkpoint comes back as a plain model."""
    model = auto_class.from_pretrained(checkpoint.folder, **checkpoint.model_kwargs(), **kwargs,
                                       **({"dtype": dtype} if dtype is not None else {}))
    if not checkpoint.gguf_file:
        return model
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = auto_class.from_config(config, dtype=dtype or next(model.parameters()).dtype)
    plain.load_state_dict(model.state_dict())
    plain.generation_config = model.generation_config
    return plain


def convert_checkpoint(source: str | Path, out: str | Path, dtype: str = "float32") -> Path:
    """Write the checkpoint at ``source`` (a GGUF file, or a transformers folder) as a model folder at ``out``:
    safetensors weights in ``dtype``, config, generation config, tokenizer with its chat template, and a
    ``raylm.json`` naming the source and its sha256. ``out`` must not exist yet."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    checkpoint = locate_checkpoint(source)
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists: give a new folder")
    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype) or not torch_dtype.is_floating_point:
        raise ValueError(f"dtype {dtype!r}: use float32, bfloat16 or float16")
    tokenizer = AutoTokenizer.from_pretrained(checkpoint.folder, **checkpoint.tokenizer_kwargs())
    model = load_pretrained(AutoModelForCausalLM, checkpoint, dtype=torch_dtype)
    source_file = checkpoint.folder / (checkpoint.gguf_file or "config.json")
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        model.save_pretrained(partial, safe_serialization=True)
        tokenizer.save_pretrained(partial)
        card = {"kind": "causal_lm", "converted_from": source_file.name, "source_sha256": file_digest(source_file),
                "architecture": type(model).__name__, "dtype": dtype}
        (partial / CONVERTED_CARD).write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
        partial.rename(out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return out
