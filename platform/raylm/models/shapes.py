"""Named model sizes for GPT-2 and Llama, and the shape a model config asks for.

The sizes are product features: ``tiny`` and ``debug`` run on a laptop CPU in
tests and the demo; the larger ones match the well-known checkpoints' shapes.
This module imports no torch, so that checking a config stays fast.
"""

from __future__ import annotations

from typing import Any

from raylm.config import SHAPE_OVERRIDES

# Each entry holds the shape; vocabulary and context length come from the data config.
MODEL_SIZES: dict[str, dict[str, dict[str, int]]] = {
    "gpt2": {
        "debug": {"num_layers": 2, "hidden_size": 64, "num_heads": 2},
        "tiny": {"num_layers": 4, "hidden_size": 192, "num_heads": 6},
        "small": {"num_layers": 12, "hidden_size": 768, "num_heads": 12},  # ~124M with GPT-2 vocab
        "medium": {"num_layers": 24, "hidden_size": 1024, "num_heads": 16},  # ~350M
    },
    "llama": {
        "debug": {"num_layers": 2, "hidden_size": 64, "num_heads": 2, "num_kv_heads": 2, "intermediate_size": 176},
        "tiny": {"num_layers": 4, "hidden_size": 192, "num_heads": 6, "num_kv_heads": 2, "intermediate_size": 512},
        "160m": {"num_layers": 12, "hidden_size": 768, "num_heads": 12, "num_kv_heads": 12, "intermediate_size": 3072},
        "1b": {"num_layers": 16, "hidden_size": 2048, "num_heads": 32, "num_kv_heads": 8, "intermediate_size": 8192},
    },
}


def model_shape(model_config: Any) -> dict[str, int]:
    """The named size's shape of a :class:`raylm.config.ModelConfig`, with its shape overrides applied."""
    shape = dict(MODEL_SIZES[model_config.arch][model_config.size])
    for name in SHAPE_OVERRIDES:
        value = getattr(model_config, name, None)
        if value is not None:
            shape[name] = value
    return shape
