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


def non_embedding_parameters(model_config) -> int:
    """Non-embedding parameters of the causal LM a :class:`raylm.config.ModelConfig` describes, without building it.

    The ``N`` of scaling laws (Kaplan et al. 2020; Hoffmann et al. 2022): every
    weight and bias of the transformer blocks and the final norm, without the
    token and position embeddings and without the output head (tied or not), so
    that it does not depend on the vocabulary. For a tied head this equals
    ``count_parameters(build_model(...), exclude_embeddings=True)``.
    """
    if getattr(model_config, "init_from", None):
        raise ValueError("non_embedding_parameters needs a model built from a size, not init_from")
    shape = model_shape(model_config)
    width, layers = shape["hidden_size"], shape["num_layers"]
    if model_config.arch == "gpt2":
        # c_attn (d x 3d + 3d), c_proj (d x d + d), c_fc (d x 4d + 4d), mlp c_proj (4d x d + d), two LayerNorms (4d).
        per_block = 12 * width * width + 13 * width
        return layers * per_block + 2 * width  # + ln_f
    head_dim = width // shape["num_heads"]
    kv_width = shape["num_kv_heads"] * head_dim
    mlp = shape["intermediate_size"]
    # q and o (d x d), k and v (d x kv), gate/up/down (3 x d x mlp), two RMSNorms (2d); no biases.
    per_block = 2 * width * width + 2 * width * kv_width + 3 * width * mlp + 2 * width
    return layers * per_block + width  # + final norm
