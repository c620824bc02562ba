"""Model sizes, construction and FLOP accounting. No distributed code here."""

from raylm.models.registry import MODEL_SIZES, build_model, flops_per_token, count_parameters, non_embedding_parameters

__all__ = ["MODEL_SIZES", "build_model", "flops_per_token", "count_parameters", "non_embedding_parameters"]
