"""The eval section: dev-split evaluation, its confidence intervals, and the promotion gate."""

from __future__ import annotations

from pydantic import Field, field_validator

from raylm.config.base import StrictModel

class EvalConfig(StrictModel):
    """Evaluation on the dev split after training, its confidence intervals, and the promotion gate."""

    max_examples_per_task: int = Field(300, ge=1)
    batch_size: int = Field(32, ge=1)
    max_new_tokens: int = Field(48, ge=1, le=1024)
    confidence: float = Field(0.95, gt=0.5, lt=1.0, description="level of the bootstrap intervals and of the "
                                                                "promotion gate's paired test")
    bootstrap_samples: int = Field(1000, ge=100, le=100000, description="resamples per interval / paired test")
    bootstrap_seed: int = 0
    promotion_metrics: list[str] = Field(
        default_factory=list, description="metrics on which a candidate must beat the alias holder (paired "
                                          "bootstrap); default: the main metric of each task both were scored on")
    promotion_min_delta: dict[str, float] = Field(
        default_factory=dict, description="metric -> gain the candidate must exceed (default 0), in the metric's "
                                          "units (accuracy 0-1, BLEU 0-100; perplexity: a reduction)")
    distributed_min_examples: int = Field(
        2000, ge=1, description="eval sets with at least this many rows run as Ray Data batch inference over a "
                                "pool of model actors; smaller ones run in the driver process")
    num_actors: int = Field(2, ge=1, description="model actors for distributed evaluation")
    cpus_per_actor: float = Field(1.0, gt=0)

    @field_validator("promotion_min_delta")
    @classmethod
    def _positive_margins(cls, margins: dict[str, float]) -> dict[str, float]:
        # Whether the names are metrics raylm computes is checked by raylm.checks (the metrics live in eval).
        for name, margin in margins.items():
            if margin < 0:
                raise ValueError(f"{name}: the margin must be >= 0")
        return margins
