"""transformers' private attributes that raylm reads, written for transformers 5.24 (tests/unit/test_compat.py)."""

from __future__ import annotations

from typing import Any, Optional

WRITTEN_FOR = "5.24"


class CompatError(RuntimeError):
    """A private API raylm relies on is missing from the installed transformers."""


def attention_implementation(model: Any) -> Optional[str]:
    """The attention implementation a transformers model runs (``sdpa``, ``eager``, ...), None for a model
    that is not a transformers model. transformers keeps it in the private ``config._attn_implementation``."""
    from transformers import PretrainedConfig

    config = getattr(model, "config", None)
    if not isinstance(config, PretrainedConfig):
        return None
    try:
        return config._attn_implementation
    except AttributeError:
        import transformers

        raise CompatError(f"raylm.compat: transformers PretrainedConfig._attn_implementation is gone in "
                          f"transformers {transformers.__version__} (written for {WRITTEN_FOR})") from None
