"""The Ray Data pipeline: read -> format -> tokenize -> pack, for training and dev splits.

Two corpora: the built-in demo corpus (generated in memory, packed on the fly),
and real sources (``data.sources``), which are prepared once into Parquet with a
manifest (:mod:`raylm.data.prepare`) and read back lazily by every run whose
fingerprint matches.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass, field
from typing import Any

from raylm.common.fingerprints import fingerprint
from raylm.config import JobConfig
from raylm.data import prepare
from raylm.data.demo import generate_demo_corpus
from raylm.data.errors import DataError
from raylm.data.execution import ordered_execution
from raylm.data.formatting import FormatError, format_example
from raylm.data.packing import tokenize_and_pack
from raylm.data.plan import resolve_corpus
from raylm.data.tokenizer import encoder_spec, extends_tokenizer, load_tokenizer, tokenizer_fingerprint, \
    train_bpe_tokenizer

logger = logging.getLogger(__name__)

DEMO_CORPUS_VERSION = "1"

__all__ = ["DataError", "PreparedData", "prepare_data", "load_corpus", "load_dev_examples"]


@dataclass
class PreparedData:
    """Everything training and evaluation need from the data stage."""

    train: Any  # ray.data.Dataset of packed blocks
    dev: Any  # ray.data.Dataset of packed blocks
    dev_examples: list[dict]  # raw dev rows, for task metrics
    tokenizer: Any
    fingerprint: str
    stats: dict[str, Any] = field(default_factory=dict)


def apply_mixture(records: list[dict], weights: dict[str, float], seed: int) -> list[dict]:
    """Resample each task's rows by its mixture weight (1.0 keeps them as they are)."""
    if not weights:
        return records
    rng = random.Random(seed)
    by_task: dict[str, list[dict]] = {}
    for record in records:
        by_task.setdefault(record["task"], []).append(record)
    mixed: list[dict] = []
    for task, rows in by_task.items():
        weight = weights.get(task, 1.0)
        whole, fraction = divmod(weight, 1.0)
        mixed.extend(rows * int(whole))
        mixed.extend(rng.sample(rows, int(round(fraction * len(rows)))))
    rng.shuffle(mixed)
    return mixed


def load_corpus(job: JobConfig) -> dict[str, list[dict]]:
    """Return ``{"train": rows, "dev": rows}`` for the configured corpus."""
    data = job.data
    if data.corpus != "demo":
        raise DataError("load_corpus holds only the demo corpus in memory; real sources go through prepare_data")
    corpus = generate_demo_corpus(seed=data.demo_seed, num_train=data.demo_num_train,
                                  num_dev=data.demo_num_dev, tasks=data.tasks)
    if not corpus["train"]:
        raise DataError("the corpus is empty")
    return corpus


def corpus_fingerprint(job: JobConfig) -> str:
    description = {
        "corpus": job.data.corpus,
        "version": DEMO_CORPUS_VERSION,
        "seed": job.data.demo_seed,
        "num_train": job.data.demo_num_train,
        "num_dev": job.data.demo_num_dev,
        "tasks": job.data.tasks,
        "mixture": job.data.mixture,
        "seq_len": job.data.seq_len,
    }
    return fingerprint(description)


def build_tokenizer(job: JobConfig, train_rows: list[dict]):
    if job.data.tokenizer_path or job.model.init_from:
        return load_tokenizer(job.data.tokenizer_path or job.model.init_from, extend=extends_tokenizer(job))

    def texts():
        for row in train_rows:
            try:
                prompt, answer = format_example(row)
            except FormatError:
                continue
            yield prompt + answer

    return train_bpe_tokenizer(texts(), job.data.vocab_size)


def to_dataset(rows: list[dict], tokenizer, seq_len: int, batch_size: int = 1024):
    """Rows -> Ray Dataset of packed blocks (lazy; executes when iterated)."""
    import ray.data

    # One JSON column keeps rows of different tasks (different fields) in one schema.
    encoded = [{"row": json.dumps(row, ensure_ascii=False)} for row in rows]
    num_blocks = max(1, min(16, len(encoded) // batch_size))
    dataset = ray.data.from_items(encoded, override_num_blocks=num_blocks)
    return dataset.map_batches(
        _decode_tokenize_pack,
        fn_kwargs={"encoder": encoder_spec(tokenizer), "seq_len": seq_len},
        batch_size=batch_size,
        batch_format="numpy",
    )


def _decode_tokenize_pack(batch, encoder, seq_len: int):
    import numpy as np

    rows = [json.loads(text) for text in batch["row"]]
    columns = sorted({key for row in rows for key in row})
    as_columns = {column: np.array([row.get(column) for row in rows], dtype=object) for column in columns}
    return tokenize_and_pack(as_columns, encoder, seq_len)



def _held_by_driver(dataset):
    """Execute ``dataset`` and keep its blocks in the driver's own object store.

    Materialized blocks live on the nodes whose tasks packed them. When such a node is lost mid-run, Ray
    rebuilds them by rerunning the tasks, but only once CPUs are free: while the retried training attempt
    holds them, its fetch of the lost block timed out (ObjectFetchTimedOutError in the two-node kill test,
    once in six runs). Blocks put by the driver stay on its node, which the job cannot outlive anyway.
    """
    import ray
    import ray.data

    return ray.data.from_arrow(ray.get(dataset.to_arrow_refs()))


@ordered_execution()
def prepare_data(job: JobConfig) -> PreparedData:
    """Generate or read the corpus, train/load the tokenizer and build lazy packed datasets."""
    if job.data.corpus == "sources":
        return _prepare_sources(job)
    corpus = load_corpus(job)
    train_rows = apply_mixture(corpus["train"], job.data.mixture, job.data.shuffle_seed)
    tokenizer = build_tokenizer(job, train_rows)
    fingerprint = f"{corpus_fingerprint(job)}-{tokenizer_fingerprint(tokenizer)}"
    # The generated corpus already lives in memory and is small: tokenize it once and keep the
    # packed blocks in the object store instead of re-tokenizing on every epoch.
    train = _held_by_driver(to_dataset(train_rows, tokenizer, job.data.seq_len))
    dev = _held_by_driver(to_dataset(corpus["dev"], tokenizer, job.data.seq_len))
    stats = {"num_train_rows": len(train_rows), "num_dev_rows": len(corpus["dev"]),
             "vocab_size": len(tokenizer)}
    return PreparedData(train=train, dev=dev, dev_examples=corpus["dev"], tokenizer=tokenizer,
                        fingerprint=fingerprint, stats=stats)


def _prepare_sources(job: JobConfig) -> PreparedData:
    corpus = resolve_corpus(job)
    tokenizer, tokenizer_info = prepare.resolve_tokenizer(job, corpus)
    manifest = prepare.prepare_dataset(job, corpus=corpus, tokenizer=tokenizer, tokenizer_info=tokenizer_info)
    if manifest["cached"]:
        logger.info(f"reading the prepared dataset {manifest['fingerprint']} (fingerprints match; no tokenizing)")
        for line in prepare.describe_bad_rows(manifest["bad_rows"]):
            logger.info(line)
    train, dev = prepare.open_prepared(manifest, job.data.shuffle_seed)
    dev_examples = prepare.read_dev_examples(job, job.eval.max_examples_per_task, corpus=corpus)
    splits = manifest["splits"]
    stats = {
        "num_train_rows": splits["train"]["examples"], "num_dev_rows": splits["dev"]["examples"],
        "num_train_blocks": splits["train"]["blocks"], "num_dev_blocks": splits["dev"]["blocks"],
        "num_train_tokens": splits["train"]["tokens"], "bad_rows": manifest["bad_rows"]["count"],
        "vocab_size": len(tokenizer), "cache": "hit" if manifest["cached"] else "miss",
        "prepared_path": manifest["path"],
    }
    return PreparedData(train=train, dev=dev, dev_examples=dev_examples, tokenizer=tokenizer,
                        fingerprint=manifest["fingerprint"], stats=stats)


def load_dev_examples(job: JobConfig, limit_per_task: int) -> list[dict]:
    """Formatted dev rows for task metrics: the demo corpus's dev split, or up to
    ``limit_per_task`` rows per task from the dev sources."""
    if job.data.corpus == "sources":
        return prepare.read_dev_examples(job, limit_per_task)
    return load_corpus(job)["dev"]
