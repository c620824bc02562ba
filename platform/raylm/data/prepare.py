"""Preparing real corpora: the tokenizer, and the tokenized, packed dataset in Parquet with a manifest.

``raylm prepare tokenizer`` trains a byte-level BPE tokenizer on a sample of the
configured sources, streamed through Ray Data. ``raylm prepare data`` reads,
checks, formats, tokenizes and packs every source with Ray Data and writes the
blocks to ``<cache_dir>/<fingerprint>/{train,dev}/*.parquet`` plus
``manifest.json`` (source fingerprints, tokenizer hash, token and block counts,
bad rows). The fingerprint covers the sources' files, the tokenizer and every
setting that changes the blocks, so a training run whose fingerprint matches
reads the Parquet back lazily instead of tokenizing again.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

from raylm.common import storage
from raylm.common.fingerprints import fingerprint
from raylm.config import JobConfig
from raylm.data.errors import DataError
from raylm.data.execution import ordered_execution, run_ray
from raylm.data.parse import MAX_PROBLEM_EXAMPLES
from raylm.data.plan import ResolvedCorpus, prepared_root, resolve_corpus, source_plans
from raylm.data.segments import sample_texts, segment_rows, write_packed_segments
from raylm.data.sources import map_segments
from raylm.data.tokenizer import encoder_spec, extends_tokenizer, formatting_key, load_tokenizer, tokenizer_fingerprint, \
    train_bpe_tokenizer

logger = logging.getLogger(__name__)

# Bump when a change to reading, formatting or packing changes the blocks for the same input.
PIPELINE_VERSION = "1"
MANIFEST = "manifest.json"


def _fingerprint(payload: Any) -> str:
    return fingerprint(payload, 20)




# --------------------------------------------------------------------------- tokenizer


def tokenizer_key(job: JobConfig, corpus: ResolvedCorpus) -> str:
    return _fingerprint({"version": PIPELINE_VERSION, "vocab_size": job.data.vocab_size,
                  "sample_bytes": job.data.tokenizer_sample_bytes, "seed": job.data.shuffle_seed,
                  "dev_fraction": job.data.dev_fraction, "sources": [s.fingerprint for s in corpus.train]})


def train_tokenizer_on_sources(job: JobConfig, corpus: ResolvedCorpus):
    """Train a BPE tokenizer on a sample of the training sources streamed through Ray Data.

    Each document is kept with probability ``tokenizer_sample_bytes / corpus
    bytes`` (by a hash of the document, so every source is represented and the
    sample is the same every time); the driver only sees the sampled text, one
    batch at a time. Returns ``(tokenizer, stats)``.
    """
    total = sum(source.num_bytes for source in corpus.train)
    fraction = min(1.0, job.data.tokenizer_sample_bytes / max(total, 1))
    # Sampling weights repeat rows; the tokenizer should see each document once.
    pairs = [(source, replace(plan, weight=1.0)) for source, plan in source_plans(job, corpus, "train")]
    sampled = map_segments(pairs, job.data.segment_bytes, sample_texts, fraction=fraction)
    stats = {"sampled_texts": 0, "sampled_chars": 0, "sample_fraction": fraction}

    def texts():
        for batch in sampled.iter_batches(batch_size=256, batch_format="numpy"):
            for text in batch["text"]:
                stats["sampled_texts"] += 1
                stats["sampled_chars"] += len(text)
                yield text

    logger.info(f"training a {job.data.vocab_size}-token BPE tokenizer on {fraction:.1%} of {total / 1e6:.1f} MB")
    tokenizer = run_ray(lambda: train_bpe_tokenizer(texts(), job.data.vocab_size))
    if stats["sampled_texts"] == 0:
        raise DataError("the corpus is empty: no usable rows to train the tokenizer on")
    return tokenizer, stats


@ordered_execution()
def resolve_tokenizer(job: JobConfig, corpus: ResolvedCorpus) -> tuple[Any, dict[str, Any]]:
    """The tokenizer for a sources corpus: ``data.tokenizer_path``, ``model.init_from``, or a BPE
    tokenizer trained on the corpus (cached under the prepared root, keyed by the sources' fingerprints)."""
    for origin, path in (("data.tokenizer_path", job.data.tokenizer_path), ("model.init_from", job.model.init_from)):
        if path:
            return load_tokenizer(path, extend=extends_tokenizer(job)), {"origin": origin,
                                                                         "path": str(Path(path).resolve())}

    location = storage.join(prepared_root(job), "tokenizers", tokenizer_key(job, corpus))
    if storage.is_remote(location):
        return _remote_cached_tokenizer(job, corpus, location)
    folder = Path(location)
    info_path = folder / "raylm_tokenizer.json"
    if info_path.is_file():
        info = json.loads(info_path.read_text())
        return load_tokenizer(folder), {**info, "origin": "cache", "path": str(folder)}
    tokenizer, stats = train_tokenizer_on_sources(job, corpus)
    staging = folder.with_name(f"{folder.name}.tmp-{uuid.uuid4().hex[:8]}")
    tokenizer.save_pretrained(staging)
    info = {"vocab_size": len(tokenizer), "hash": tokenizer_fingerprint(tokenizer),
            "sources": [source.describe() for source in corpus.train], **stats}
    (staging / "raylm_tokenizer.json").write_text(json.dumps(info, indent=2))
    _publish(staging, folder)
    return load_tokenizer(folder), {**info, "origin": "trained", "path": str(folder)}


def _remote_cached_tokenizer(job: JobConfig, corpus: ResolvedCorpus, location: str) -> tuple[Any, dict[str, Any]]:
    """The corpus tokenizer cached in an object store (s3://, gs://): downloaded, or trained and uploaded.

    The description file is uploaded last, so a reader never takes a partial upload for a cached tokenizer.
    """

    local = storage.local_scratch("raylm-tokenizer-")
    info_location = storage.join(location, "raylm_tokenizer.json")
    if storage.is_file(info_location):
        storage.download_folder(location, local)
        info = json.loads((local / "raylm_tokenizer.json").read_text())
        return load_tokenizer(local), {**info, "origin": "cache", "path": location}
    tokenizer, stats = train_tokenizer_on_sources(job, corpus)
    tokenizer.save_pretrained(local)
    info = {"vocab_size": len(tokenizer), "hash": tokenizer_fingerprint(tokenizer),
            "sources": [source.describe() for source in corpus.train], **stats}
    storage.upload_folder(local, location)
    storage.write_text(info_location, json.dumps(info, indent=2))
    return load_tokenizer(local), {**info, "origin": "trained", "path": location}


def _publish(staging: Path, final: Path) -> None:
    """Move a finished folder into place; if another process got there first, keep theirs."""
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(staging, final)
    except OSError:
        if not (final / MANIFEST).exists() and not (final / "raylm_tokenizer.json").exists():
            raise
        shutil.rmtree(staging, ignore_errors=True)


def prepare_tokenizer(job: JobConfig) -> dict[str, Any]:
    """``raylm prepare tokenizer``: resolve (train if needed) the corpus tokenizer; returns its description."""
    corpus = resolve_corpus(job)
    tokenizer, info = resolve_tokenizer(job, corpus)
    return {**info, "vocab_size": len(tokenizer), "hash": tokenizer_fingerprint(tokenizer)}


# --------------------------------------------------------------------------- dataset


def dataset_fingerprint(job: JobConfig, corpus: ResolvedCorpus, tokenizer_hash: str,
                        formatting: dict[str, Any] | None = None) -> str:
    """``formatting``: :func:`raylm.data.tokenizer.formatting_key` of the encoder (BOS, answer end, chat template)."""
    data = job.data
    return _fingerprint({
        **({"formatting": formatting} if formatting else {}),
        "version": PIPELINE_VERSION,
        "train": [s.fingerprint for s in corpus.train],
        "dev": [s.fingerprint for s in corpus.dev],
        "tokenizer": tokenizer_hash,
        "seq_len": data.seq_len,
        "dev_fraction": data.dev_fraction,
        "mixture": data.mixture,
        "seed": data.shuffle_seed,
        "segment_bytes": data.segment_bytes,
        "strict": data.strict,
    })


def summarize_reports(reports: list[dict[str, Any]], seq_len: int) -> dict[str, Any]:
    """Totals per split and per source, problems by kind, and the first few problems (by file and line)."""
    counters = ("rows", "examples", "tokens", "label_tokens", "blocks", "padding_tokens")
    splits: dict[str, dict[str, Any]] = {}
    problems: dict[str, int] = {}
    examples: list = []
    for report in reports:
        split = splits.setdefault(report["role"], {**{c: 0 for c in counters}, "segments": 0, "by_source": {}})
        source = split["by_source"].setdefault(str(report["source"]), {c: 0 for c in counters})
        split["segments"] += 1
        for counter in counters:
            split[counter] += report[counter]
            source[counter] += report[counter]
        for kind, count in report["problems"].items():
            problems[kind] = problems.get(kind, 0) + count
        examples.extend(report["problem_examples"])
    for split in splits.values():
        capacity = split["blocks"] * seq_len
        split["padding_fraction"] = round(split["padding_tokens"] / capacity, 6) if capacity else 0.0
    examples.sort(key=lambda example: (example[0], example[1]))
    return {
        "splits": splits,
        "bad_rows": {
            "count": sum(problems.values()),
            "by_kind": dict(sorted(problems.items())),
            # "line" is the row number for Parquet and Hugging Face sources
            "first": [{"file": path, "line": number, "location": location, "kind": kind, "message": message}
                      for path, number, location, kind, message in examples[:MAX_PROBLEM_EXAMPLES]],
        },
    }


def describe_bad_rows(bad_rows: dict[str, Any]) -> list[str]:
    """Lines for a log: the count by kind, then the first few with file and line."""
    if not bad_rows["count"]:
        return []
    kinds = ", ".join(f"{kind}: {count}" for kind, count in bad_rows["by_kind"].items())
    lines = [f"skipped {bad_rows['count']} bad rows ({kinds})"]
    lines.extend(f"  {item['location']}: {item['message']}" for item in bad_rows["first"])
    return lines


def read_manifest(folder: str) -> Optional[dict[str, Any]]:
    """The manifest of a prepared dataset folder, or None when there is none (or it is unreadable)."""
    filesystem, root = _filesystem(folder)
    try:
        with filesystem.open_input_stream(f"{root}/{MANIFEST}") as stream:
            return json.loads(stream.read().decode("utf-8"))
    except (OSError, ValueError):
        return None


def _filesystem(folder: str):
    import pyarrow.fs as pafs

    if "://" in folder:
        return pafs.FileSystem.from_uri(folder)
    return pafs.LocalFileSystem(), folder


def _write_manifest(folder: str, manifest: dict[str, Any]) -> None:
    filesystem, root = _filesystem(folder)
    with filesystem.open_output_stream(f"{root}/{MANIFEST}") as stream:
        stream.write(json.dumps(manifest, indent=2).encode("utf-8"))


@ordered_execution()
def prepare_dataset(job: JobConfig, corpus: ResolvedCorpus | None = None,
                    tokenizer=None, tokenizer_info: dict | None = None) -> dict[str, Any]:
    """``raylm prepare data``: write the packed dataset and its manifest unless a matching one exists.

    Returns the manifest, with ``"cached": True`` when an existing one matched.
    Raises :class:`DataError` when a split ends up empty or, under
    ``data.strict``, at the first bad row.
    """
    corpus = corpus or resolve_corpus(job)
    if tokenizer is None:
        tokenizer, tokenizer_info = resolve_tokenizer(job, corpus)
    tokenizer_hash = tokenizer_fingerprint(tokenizer)
    encoder = encoder_spec(tokenizer)
    # raylm's own tokenizers format as they always did; a checkpoint's adds how its examples start and end.
    fingerprint = dataset_fingerprint(job, corpus, tokenizer_hash, None if encoder.native else formatting_key(encoder))
    root = prepared_root(job)
    folder = f"{root}/{fingerprint}"
    manifest = read_manifest(folder)
    if manifest is not None and manifest.get("fingerprint") == fingerprint:
        logger.info(f"prepared dataset found: {folder}")
        return {**manifest, "cached": True}

    remote = "://" in root
    staging = folder if remote else f"{root}/{fingerprint}.tmp-{uuid.uuid4().hex[:8]}"
    started = time.time()
    # Both splits in one Ray Data execution: every packing task writes its blocks to
    # <staging>/<split>/ and returns only its segment's report.
    logger.info("tokenizing and packing the train and dev splits with Ray Data")
    pairs = source_plans(job, corpus, "train") + source_plans(job, corpus, "dev")
    try:
        rows = run_ray(lambda: map_segments(
            pairs, job.data.segment_bytes, write_packed_segments, longest_first=True,
            encoder=encoder, seq_len=job.data.seq_len, folder=staging).take_all())
        reports = [json.loads(row["report"]) for row in rows]
    except BaseException:
        if not remote:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    summary = summarize_reports(reports, job.data.seq_len)
    for line in describe_bad_rows(summary["bad_rows"]):
        logger.info(line)
    for role in ("train", "dev"):
        split = summary["splits"].get(role, {"blocks": 0})
        if split["blocks"] == 0:
            if not remote:
                shutil.rmtree(staging, ignore_errors=True)
            bad = summary["bad_rows"]
            detail = f"; {bad['count']} bad rows skipped, first: {bad['first'][0]['location']}: " \
                     f"{bad['first'][0]['message']}" if bad["count"] else ""
            raise DataError(f"the {role} split is empty: no usable rows in the configured sources{detail}")
    manifest = {
        "fingerprint": fingerprint,
        "pipeline_version": PIPELINE_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "seconds": round(time.time() - started, 2),
        "path": folder,
        "seq_len": job.data.seq_len,
        "sources": [source.describe() for source in corpus.train],
        "dev_sources": [source.describe() for source in corpus.dev],
        "dev_fraction": job.data.dev_fraction,
        "mixture": job.data.mixture,
        "tokenizer": {"hash": tokenizer_hash, "vocab_size": len(tokenizer), **(tokenizer_info or {})},
        **summary,
    }
    _write_manifest(staging, manifest)
    if not remote:
        _publish(Path(staging), Path(folder))
    logger.info(f"prepared dataset written: {folder}")
    return {**manifest, "cached": False}


@ordered_execution()
def open_prepared(manifest: dict[str, Any], seed: int):
    """Lazy Ray Datasets ``(train, dev)`` over a prepared dataset's Parquet files.

    The training files are read in one seeded random order, which mixes the
    sources; rows within a file keep their order. The order is the same on every
    epoch, as the demo corpus's is: Ray Data would reseed a file shuffle on each
    execution of the dataset, counting executions from zero again when a worker
    group restarts, so a resumed epoch would read its rows in another order than
    the interrupted one. Each epoch still sees another order, from the run-wide
    windowed shuffle seeded by the epoch (``raylm.train.sample_order``).
    """
    import ray.data
    from ray.data import FileShuffleConfig

    context = ray.data.DataContext.get_current()
    # Ray 2.60's DataSourceV2 Parquet reader starts FooterReader actors on every execution, i.e. on
    # every epoch of every worker's shard; on a small CPU cluster that is seconds per epoch
    # (measured: 12-14 s vs 0.5 s for 300 rows on 2 cores). The plan is fixed when the dataset is
    # created, so reading these files through the V1 reader costs nothing elsewhere.
    use_v2, context.use_datasource_v2 = context.use_datasource_v2, False
    try:
        train = ray.data.read_parquet(f"{manifest['path']}/train",
                                      shuffle=FileShuffleConfig(seed=seed, reseed_after_execution=False))
        dev = ray.data.read_parquet(f"{manifest['path']}/dev")
    finally:
        context.use_datasource_v2 = use_v2
    return train, dev


@ordered_execution()
def read_dev_examples(job: JobConfig, limit_per_task: int, corpus: ResolvedCorpus | None = None) -> list[dict]:
    """Up to ``limit_per_task`` formatted dev rows of each task (not plain LM text), for task metrics."""
    corpus = corpus or resolve_corpus(job)
    rows: list[dict] = []
    taken: dict[str, int] = {}
    for source, plan in source_plans(job, corpus, "dev"):
        if plan.task == "lm":
            continue
        wanted = limit_per_task - taken.get(plan.task, 0)
        if wanted <= 0:
            continue
        dataset = map_segments([(source, plan)], job.data.segment_bytes, segment_rows).limit(wanted)
        found = [json.loads(item["row"]) for item in run_ray(dataset.take_all)]
        taken[plan.task] = taken.get(plan.task, 0) + len(found)
        rows.extend(found)
    return rows
