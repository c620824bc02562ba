"""Plan: which sources make up each split, and how each pass over a source reads, weights and checks it.

The first stage of the one data path (plan -> read -> parse -> tokenize and pack -> write,
orchestrated by :mod:`raylm.data.prepare`): the configured ``data.sources`` and
``data.dev_sources`` resolved to files and fingerprints, and one picklable
:class:`~raylm.data.parse.SourcePlan` per pass that the Ray Data tasks carry.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from raylm.common import storage
from raylm.config import DataSourceConfig, JobConfig
from raylm.data.errors import DataError
from raylm.data.parse import SourcePlan
from raylm.data.sources import ResolvedSource, check_local_paths, resolve_source


def configured_sources(job: JobConfig) -> tuple[list[tuple[str, DataSourceConfig]], list[tuple[str, DataSourceConfig]]]:
    """``(train, dev)`` source configs with the config path of each, for messages."""
    train = [(f"data.sources[{i}]", source) for i, source in enumerate(job.data.sources)]
    dev = [(f"data.dev_sources[{i}]", source) for i, source in enumerate(job.data.dev_sources)]
    return train, dev


def check_sources(job: JobConfig) -> None:
    """Fail on missing local source paths before any cluster resource is taken."""
    if job.data.corpus != "sources":
        return
    train, dev = configured_sources(job)
    check_local_paths(train + dev)


@dataclass
class ResolvedCorpus:
    train: list[ResolvedSource]
    dev: list[ResolvedSource]


def resolve_corpus(job: JobConfig) -> ResolvedCorpus:
    if job.data.corpus != "sources":
        raise DataError("data.sources is empty: raylm prepare reads real corpora (the demo corpus is generated "
                        "in memory at train time)")
    train, dev = configured_sources(job)
    return ResolvedCorpus(train=[resolve_source(name, config) for name, config in train],
                          dev=[resolve_source(name, config) for name, config in dev])


def prepared_root(job: JobConfig) -> str:
    """Where prepared datasets and trained tokenizers live (``data.cache_dir``, default ``<workdir>/prepared``)."""

    if job.data.cache_dir:
        return job.data.cache_dir if "://" in job.data.cache_dir else str(Path(job.data.cache_dir).resolve())
    return storage.join(job.workdir, "prepared")


def source_plans(job: JobConfig, corpus: ResolvedCorpus, role: str) -> list[tuple[ResolvedSource, SourcePlan]]:
    """The passes that produce split ``role``: every dev source, or the held-out share of every train source."""
    data = job.data
    if role == "dev" and corpus.dev:
        sources = [(index, source, 0.0) for index, source in enumerate(corpus.dev)]
        count_problems = True
    else:
        sources = [(index, source, data.dev_fraction) for index, source in enumerate(corpus.train)]
        count_problems = role == "train"
    plans = []
    for index, source, holdout in sources:
        config = source.config
        weight = config.weight * data.mixture.get(config.task, 1.0) if role == "train" else 1.0
        plans.append((source, SourcePlan(
            index=index, label=config.path, format=source.read_format, task=config.task,
            fields=tuple(sorted(config.fields.items())), text_unit=config.text_unit, role=role,
            holdout=holdout, weight=weight, seed=data.shuffle_seed, strict=data.strict,
            count_problems=count_problems)))
    return plans
