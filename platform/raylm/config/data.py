"""The data section: corpus sources, splits, tokenizer and packing settings."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import Field, model_validator

from raylm.config.base import StrictModel

TaskName = Literal["lm", "sentiment", "qa", "translate"]
ALL_TASKS: tuple[str, ...] = ("lm", "sentiment", "qa", "translate")


SOURCE_FORMATS: tuple[str, ...] = ("text", "jsonl", "parquet", "hf")
# File suffix -> format, for sources that do not name their format. Compressed files
# (.gz, .bz2, .zst, .lz4) are read through transparently and inferred from the inner suffix.
_FORMAT_SUFFIXES = {".txt": "text", ".text": "text", ".md": "text", ".jsonl": "jsonl", ".ndjson": "jsonl",
                    ".json": "jsonl", ".parquet": "parquet"}
_COMPRESSION_SUFFIXES = (".gz", ".bz2", ".zst", ".lz4")


def infer_source_format(path: str) -> Optional[str]:
    """The format a path's suffix implies (``data/*.jsonl.gz`` -> ``jsonl``), or None."""
    name = path.rstrip("/").lower()
    for suffix in _COMPRESSION_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return _FORMAT_SUFFIXES.get(Path(name).suffix)


class DataSourceConfig(StrictModel):
    """One corpus source: files, a glob, a folder, a remote URI or a Hugging Face dataset."""

    path: str = Field(..., min_length=1, description="file, folder, glob, s3:// or gs:// URI, or HF dataset name/folder")
    format: Optional[Literal["text", "jsonl", "parquet", "hf"]] = Field(
        None, description="default: inferred from the path's suffix"
    )
    task: TaskName = "lm"
    fields: dict[str, str] = Field(
        default_factory=dict, description="raylm field -> column in the source, e.g. {source: src, target: tgt}"
    )
    split: Optional[str] = Field(None, description="split of a Hugging Face dataset (default 'train')")
    subset: Optional[str] = Field(None, description="configuration name of a Hugging Face dataset")
    weight: float = Field(1.0, ge=0, description="sampling weight: 2.0 repeats every row, 0.5 keeps half")
    text_unit: Literal["file", "paragraph", "line"] = Field(
        "file", description="what one document is in a text file (documents are separated by EOS)"
    )

    @model_validator(mode="before")
    @classmethod
    def _infer_format(cls, raw: Any) -> Any:
        if isinstance(raw, dict) and raw.get("format") is None and isinstance(raw.get("path"), str):
            inferred = infer_source_format(raw["path"])
            if inferred is None:
                raise ValueError(f"cannot infer the format of {raw['path']!r}; set format to one of "
                                 + ", ".join(SOURCE_FORMATS))
            raw = {**raw, "format": inferred}
        return raw

    @model_validator(mode="after")
    def _check_text_task(self) -> "DataSourceConfig":
        # Whether ``fields`` names fields the task uses is checked by raylm.checks (the task fields live in data).
        if self.format == "text" and self.task != "lm":
            raise ValueError(f"text files hold plain text: task must be 'lm', not {self.task!r}")
        return self

    def column(self, name: str) -> str:
        """The source column that holds raylm field ``name``."""
        return self.fields.get(name, name)


class DataConfig(StrictModel):
    """Where the text comes from and how it becomes packed token blocks."""

    corpus: Literal["demo", "sources"] = Field(
        "demo", description="'demo' for the built-in corpus, 'sources' for data.sources (implied by them)"
    )
    sources: list[DataSourceConfig] = Field(default_factory=list, description="training corpus sources")
    dev_sources: list[DataSourceConfig] = Field(default_factory=list, description="dev split sources")
    test_sources: list[DataSourceConfig] = Field(
        default_factory=list, description="held-out test split: read only by 'raylm eval --split test', never "
                                          "for training, checkpoint choice or tuning")
    dev_fraction: float = Field(
        0.0, ge=0, lt=1, description="without dev_sources: share of training documents held out as dev"
    )
    cache_dir: Optional[str] = Field(
        None, description="where prepared (tokenized, packed) datasets and tokenizers go; default <workdir>/prepared"
    )
    segment_bytes: int = Field(
        1 << 20, ge=1024, description="files are read, tokenized and packed in segments of about this many bytes "
                                      "(one Ray Data task each; a packing group wastes < 1 block)"
    )
    tokenizer_sample_bytes: int = Field(
        64 << 20, ge=1024, description="corpus bytes sampled (spread over all sources) to train the BPE tokenizer"
    )
    demo_seed: int = 0
    demo_num_train: int = Field(6000, ge=10, description="training examples per task")
    demo_num_dev: int = Field(300, ge=10, description="dev examples per task")
    tasks: list[TaskName] = Field(default_factory=lambda: list(ALL_TASKS),
                                  description="tasks of the demo corpus (each source names its own task)")
    mixture: dict[TaskName, float] = Field(
        default_factory=dict, description="relative sampling weight per task (default 1.0)"
    )
    seq_len: int = Field(256, ge=16, le=8192)
    vocab_size: int = Field(2048, ge=300, le=262144)
    tokenizer_path: Optional[str] = Field(
        None, description="a local transformers tokenizer folder; default trains a BPE tokenizer"
    )
    shuffle_seed: int = 0
    strict: bool = False

    @model_validator(mode="after")
    def _check_mixture(self) -> "DataConfig":
        for task, weight in self.mixture.items():
            if weight < 0:
                raise ValueError(f"mixture weight for {task!r} must be >= 0")
        if not self.tasks:
            raise ValueError("tasks must name at least one task")
        if self.corpus == "sources":
            if not self.sources:
                raise ValueError("corpus is 'sources' but sources is empty")
            if not self.dev_sources and self.dev_fraction == 0:
                raise ValueError("give dev_sources or a dev_fraction > 0 for the dev split")
            if self.dev_sources and self.dev_fraction > 0:
                raise ValueError("give dev_sources or dev_fraction, not both")
        return self

    @model_validator(mode="before")
    @classmethod
    def _sources_imply_corpus(cls, raw: Any) -> Any:
        if isinstance(raw, dict) and raw.get("sources"):
            corpus = raw.get("corpus", "sources")
            if corpus == "demo":
                raise ValueError("sources are listed but corpus is 'demo'; set corpus to 'sources' or drop it")
            raw = {**raw, "corpus": corpus}
        return raw
