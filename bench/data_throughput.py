"""Tokenize-and-pack throughput: raylm's Ray Data pipeline against datasets.Dataset.map (num_proc=2).

Builds corpora of at least 50 MB and 200 MB of plain text by replicating the
shared corpora (Tiny Shakespeare; SST-2, XQuAD and Multi30k train/dev text, one
paragraph per sentence, context or question; never the *_test files) into
~2 MB files, and trains one BPE tokenizer on the unreplicated text (not timed).

Both sides do the same work, in a fresh process each, warmed the same way:

- raylm: ``prepare_dataset`` (read -> check -> format -> tokenize -> pack ->
  Parquet + manifest) on ``data.sources=[{path: corpus/*.txt, text_unit:
  paragraph}]`` and a small dev file, on ``ray.init(num_cpus=2)``.
- baseline: ``datasets.load_dataset("text", sample_by="document")`` (one row per
  file) then ``Dataset.map(batched=True, num_proc=2)`` with the same tokenizer
  and raylm's packing: each file cut into segments as raylm cuts it (its
  segmenter, the same ``--segment-bytes``, raylm's default unless given) and
  each segment packed by the same function, for the corpus and the same dev
  file; the packed blocks end up in its Arrow cache files, as raylm's end up in
  Parquet. Both produce the same packed blocks (checked by a digest at 50 MB).
  Its unit of parallelism is the file (one row each), raylm's the segment.

Warm-up: each process first runs its own pipeline once on a small corpus, not
timed (Ray's workers and raylm's imports there; the datasets modules, the
tokenizer's first load and the page cache here); ``cold_seconds`` is that
first run (with ``ray.init`` for raylm). Then the timed run. Throughput is the
training split's tokens in packed blocks (padding excluded) per second of the
whole run (both splits); the baseline's token count is taken after its clock
stops. Each figure is the median of ``--repeats`` runs, raylm and baseline
interleaved (alternating which goes first), each started once the machine has
settled after the run before (``bench._common.settle``: dirty pages flushed,
CPU idle).

Memory is the peak PSS summed over the whole process tree
(:class:`TreeMemorySampler`): for raylm the driver, raylet, GCS, Ray's other
processes, the workers and the shared-memory object store (PSS counts shared
pages once); for the baseline the process and its map workers. It is measured
in runs of their own after the timed repeats (one per side and corpus), not
during the timed runs: a sample walks every process's page tables, which cost
raylm's 12 processes ~2.1 s of CPU per 50 MB run against ~1.1 s for the
baseline's 4, on the same two cores as the work. ``rss_growth`` is raylm's peak
at the large corpus over its peak at the small one; the large corpus's
throughput comes from its memory run.

Prints one JSON object. Not run in CI: it takes several minutes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "bench"))

from _common import TreeMemorySampler, machine_state, settle, spawn_json  # noqa: E402  (bench/ on the path above)

SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
FILE_BYTES = 2_000_000
SEQ_LEN = 256
PAD_ID = 1  # <|pad|> in raylm's BPE tokenizers (checked below)


# --------------------------------------------------------------------------- corpus


def base_paragraphs() -> list[str]:
    """The shared corpora as paragraphs of plain text (train and dev splits only)."""
    paragraphs = [p.strip() for p in (SHARED_DATA / "lm/tiny_shakespeare.txt").read_text().split("\n\n") if p.strip()]

    def rows(name: str):
        with open(SHARED_DATA / name, encoding="utf-8") as handle:
            return [json.loads(line) for line in handle if line.strip()]

    for split in ("train", "dev"):
        paragraphs += [row["text"] for row in rows(f"sentiment/sst2_{split}.jsonl")]
        qa = rows(f"qa/xquad_en_{split}.jsonl")
        paragraphs += list(dict.fromkeys(row["context"] for row in qa)) + [row["question"] for row in qa]
        for row in rows(f"translation/multi30k_en_de_{split}.jsonl"):
            paragraphs += [row["src"], row["tgt"]]
    return [p for p in paragraphs if p.strip()]


def write_corpus(folder: Path, total_bytes: int, paragraphs: list[str]) -> int:
    """Files of about FILE_BYTES, cycling through the paragraphs, until ``total_bytes`` are written."""
    folder.mkdir(parents=True, exist_ok=True)
    written, index, position = 0, 0, 0
    while written < total_bytes:
        chunk: list[str] = []
        size = 0
        while size < FILE_BYTES:
            paragraph = paragraphs[position % len(paragraphs)]
            position += 1
            chunk.append(paragraph)
            size += len(paragraph.encode("utf-8")) + 2
        data = ("\n\n".join(chunk) + "\n").encode("utf-8")
        (folder / f"part-{index:05d}.txt").write_bytes(data)
        written += len(data)
        index += 1
    return written


def blocks_digest(input_ids, labels, position_ids) -> str:
    import numpy as np

    digest = hashlib.sha256()
    for array in (input_ids, labels, position_ids):
        digest.update(np.ascontiguousarray(array, dtype=np.int32).tobytes())
    return digest.hexdigest()[:16]


# --------------------------------------------------------------------------- workers (one process per run)


def _measured(memory: bool):
    """The memory sampler for a memory run; nothing for a timed one."""
    import contextlib

    return TreeMemorySampler() if memory else contextlib.nullcontext()


def run_raylm(corpus: Path, dev: Path, tokenizer: Path, warmup: Path, scratch: Path, digest: bool,
              segment_bytes: int, memory: bool = False) -> dict:
    import ray

    from raylm.config import load_config
    from raylm.data.prepare import prepare_dataset

    def job(source: Path, cache: str):
        return load_config(None, [
            f"data.sources=[{{path: '{source}/*.txt', text_unit: paragraph}}]",
            f"data.dev_sources=[{{path: '{dev}', text_unit: paragraph}}]",
            f"data.tokenizer_path={tokenizer}", f"data.seq_len={SEQ_LEN}", f"data.cache_dir={scratch / cache}",
            f"data.segment_bytes={segment_bytes}",
        ])

    started = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"RAY_USAGE_STATS_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false"}})
    prepare_dataset(job(warmup, "warmup"))
    cold_seconds = time.perf_counter() - started
    with _measured(memory) as sampler:
        started = time.perf_counter()
        manifest = prepare_dataset(job(corpus, "run"))
        seconds = time.perf_counter() - started
    result = {
        "seconds": seconds,
        "cold_seconds": cold_seconds,
        "tokens": manifest["splits"]["train"]["tokens"] + manifest["splits"]["dev"]["tokens"],
        "train_tokens": manifest["splits"]["train"]["tokens"],
        "blocks": manifest["splits"]["train"]["blocks"],
        "padding_fraction": manifest["splits"]["train"]["padding_fraction"],
        **(sampler.figures() if memory else {}),
    }
    ray.shutdown()
    if digest:
        import numpy as np
        import pyarrow.parquet as pq

        files = sorted(Path(manifest["path"], "train").glob("*.parquet"))  # names carry the block order
        columns = {name: [] for name in ("input_ids", "labels", "position_ids")}
        for file in files:
            table = pq.read_table(file)
            for name in columns:
                columns[name].append(np.stack(table.column(name).to_numpy(zero_copy_only=False)))
        result["digest"] = blocks_digest(*(np.concatenate(columns[name]) for name in columns))
    return result


def _pack_files(batch, plan, encoder, seq_len, segment_bytes):
    """The baseline's map function: each row is one whole file, cut into segments and packed exactly as raylm
    cuts and packs it (:func:`raylm.data.read.read_bytes_segments`, the same segment size)."""
    import numpy as np

    from raylm.data.parse import segment_examples
    from raylm.data.read import read_bytes_segments
    from raylm.data.segments import pack_examples

    outputs = []
    for text in batch["text"]:
        for segment in read_bytes_segments(text.encode("utf-8"), "file", segment_bytes, plan.text_unit):
            examples, _, _ = segment_examples(segment, plan)
            outputs.append(pack_examples(examples, plan.task, encoder, seq_len)[0])
    return {name: np.concatenate([out[name] for out in outputs]) for name in ("input_ids", "labels", "position_ids")}


def hf_pipeline(files: list[str], dev: Path, tokenizer: Path, cache: Path, segment_bytes: int):
    """The baseline's work, as raylm's ``prepare_dataset``: load the tokenizer, then read, tokenize and pack
    the training files and the dev file into packed blocks on disk (the map's Arrow cache). Returns the
    training split's dataset."""
    import datasets

    from raylm.data.parse import SourcePlan
    from raylm.data.tokenizer import encoder_spec, load_tokenizer

    encoder = encoder_spec(load_tokenizer(tokenizer))
    packed = {}
    for role, data_files in (("train", files), ("dev", [str(dev)])):
        plan = SourcePlan(index=0, label=role, format="text", task="lm", text_unit="paragraph", role=role)
        loaded = datasets.load_dataset("text", data_files=data_files, sample_by="document", split="train",
                                       cache_dir=str(cache))
        packed[role] = loaded.map(_pack_files, batched=True, batch_size=1, num_proc=2, remove_columns=["text"],
                                  fn_kwargs={"plan": plan, "encoder": encoder, "seq_len": SEQ_LEN,
                                             "segment_bytes": segment_bytes},
                                  load_from_cache_file=False)
    return packed["train"]


def run_hf(corpus: Path, dev: Path, tokenizer: Path, warmup: Path, scratch: Path, digest: bool,
           segment_bytes: int, memory: bool = False) -> dict:
    import datasets
    import numpy as np

    datasets.disable_progress_bars()
    started = time.perf_counter()
    hf_pipeline(sorted(str(path) for path in warmup.glob("*.txt")), dev, tokenizer, scratch / "hf_warmup",
                segment_bytes)
    cold_seconds = time.perf_counter() - started
    files = sorted(str(path) for path in corpus.glob("*.txt"))
    with _measured(memory) as sampler:
        started = time.perf_counter()
        packed = hf_pipeline(files, dev, tokenizer, scratch / "hf_cache", segment_bytes)
        seconds = time.perf_counter() - started

    def column(name: str):
        chunks = packed.data.column(name).chunks
        return np.concatenate([chunk.flatten().to_numpy() for chunk in chunks]).reshape(-1, SEQ_LEN)

    ids = column("input_ids")
    result = {"seconds": seconds, "cold_seconds": cold_seconds, "train_tokens": int((ids != PAD_ID).sum()),
              "blocks": len(packed), **(sampler.figures() if memory else {})}
    if digest:
        result["digest"] = blocks_digest(ids, column("labels"), column("position_ids"))
    return result


# --------------------------------------------------------------------------- orchestration


def _spawn(arguments: list[str]) -> dict:
    return spawn_json(__file__, arguments, env={"PYTHONPATH": str(REPO_ROOT / "platform"),
                                                "RAY_USAGE_STATS_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mb", type=int, nargs=2, default=[50, 200], metavar=("SMALL", "LARGE"))
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement (median)")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--segment-bytes", type=int, default=None,
                        help="raylm's data.segment_bytes (default: raylm's default); the baseline cuts its files the "
                             "same way, so both pack the same blocks")
    parser.add_argument("--worker", choices=["raylm", "hf"], help=argparse.SUPPRESS)
    parser.add_argument("--corpus", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--dev", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--scratch", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--digest", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--memory", action="store_true", help=argparse.SUPPRESS)  # a memory run
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.segment_bytes is None:
        sys.path.insert(0, str(REPO_ROOT / "platform"))
        from raylm.config import DataConfig

        args.segment_bytes = DataConfig.model_fields["segment_bytes"].default
    if args.worker:
        run = run_raylm if args.worker == "raylm" else run_hf
        result = run(args.corpus, args.dev, args.tokenizer, args.warmup, args.scratch, args.digest,
                     args.segment_bytes, args.memory)
        args.out.write_text(json.dumps({**result, "niceness": os.nice(0)}))
        return

    if not SHARED_DATA.is_dir():
        sys.exit(f"error: shared corpora not found at {SHARED_DATA}")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="raylm-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    paragraphs = base_paragraphs()
    small_mb, large_mb = args.sizes_mb
    corpora = {}
    for megabytes in (small_mb, large_mb):
        folder = workdir / f"corpus_{megabytes}mb"
        if not folder.is_dir():
            write_corpus(folder, megabytes * 1_000_000, paragraphs)
        corpora[megabytes] = folder
    dev = workdir / "dev.txt"
    dev.write_text("\n\n".join(paragraphs[-200:]) + "\n")
    warmup = workdir / "warmup"
    if not warmup.is_dir():
        write_corpus(warmup, 200_000, paragraphs[::7])

    sys.path.insert(0, str(REPO_ROOT / "platform"))
    from raylm.data.tokenizer import load_tokenizer, train_bpe_tokenizer

    tokenizer_dir = workdir / f"tokenizer_{args.vocab_size}"
    if not tokenizer_dir.is_dir():
        train_bpe_tokenizer(paragraphs, args.vocab_size).save_pretrained(tokenizer_dir)
    assert load_tokenizer(tokenizer_dir).pad_token_id == PAD_ID

    runs: dict[str, list[dict]] = {"raylm_small": [], "hf_small": [], "raylm_large": [],
                                   "raylm_small_memory": [], "hf_small_memory": []}
    at_start = machine_state()

    def spawn(key: str, name: str, corpus: Path, *options: str) -> None:
        scratch = Path(tempfile.mkdtemp(prefix="run-", dir=workdir))
        waited = settle()  # the run before's writes flushed and its processes gone, for either side
        runs[key].append(_spawn(["--worker", name, "--corpus", str(corpus), "--dev", str(dev), "--warmup",
                                 str(warmup), "--tokenizer", str(tokenizer_dir), "--scratch", str(scratch),
                                 "--segment-bytes", str(args.segment_bytes), *options]))
        runs[key][-1]["settled_s"] = round(waited, 1)
        subprocess.run(["rm", "-rf", str(scratch)], check=False)
        print(f"[bench] {key} #{len(runs[key])}: {runs[key][-1]['seconds']:.1f} s (settled {waited:.1f} s)",
              file=sys.stderr, flush=True)

    # Timed repeats, no memory sampler; alternate which side goes first, so neither always runs after the other.
    for repeat in range(args.repeats):
        digest = ["--digest"] if repeat == 0 else []
        for name in (("raylm", "hf") if repeat % 2 == 0 else ("hf", "raylm")):
            spawn(f"{name}_small", name, corpora[small_mb], *digest)
    # Memory runs: one per side at the small corpus, and raylm at the large one.
    spawn("raylm_small_memory", "raylm", corpora[small_mb], "--memory")
    spawn("hf_small_memory", "hf", corpora[small_mb], "--memory")
    spawn("raylm_large", "raylm", corpora[large_mb], "--memory")

    def median(key: str, field: str) -> float:
        return statistics.median(run[field] for run in runs[key])

    def rate(key: str) -> float:
        # both times cover the small dev split too; only the training tokens are counted
        return statistics.median(run["train_tokens"] / run["seconds"] for run in runs[key])

    raylm_rate, hf_rate = rate("raylm_small"), rate("hf_small")
    small_memory = max(run["peak_tree_pss_bytes"] for run in runs["raylm_small_memory"])
    large_memory = max(run["peak_tree_pss_bytes"] for run in runs["raylm_large"])
    hf_memory = max(run["peak_tree_pss_bytes"] for run in runs["hf_small_memory"])
    same_blocks = runs["raylm_small"][0]["digest"] == runs["hf_small"][0]["digest"]
    result = {
        "benchmark": "data_throughput",
        "machine": {**at_start, "ray_num_cpus": 2, "hf_num_proc": 2,
                    # other work on the machine skews both engines; the runs are interleaved to share it
                    "load_average_at_end": machine_state()["load_average"]},
        "corpus_mb": {str(mb): round(sum(f.stat().st_size for f in corpora[mb].glob("*.txt")) / 1e6, 1)
                      for mb in corpora},
        "files": {str(mb): len(list(corpora[mb].glob("*.txt"))) for mb in corpora},
        "seq_len": SEQ_LEN,
        "segment_bytes": args.segment_bytes,
        "vocab_size": args.vocab_size,
        "repeats": args.repeats,
        "tokens": runs["raylm_small"][0]["train_tokens"],
        "blocks": runs["raylm_small"][0]["blocks"],
        "padding_fraction": runs["raylm_small"][0]["padding_fraction"],
        "same_packed_blocks": same_blocks,
        "raylm_tokens_per_s": round(raylm_rate),
        "hf_tokens_per_s": round(hf_rate),
        "speedup_vs_hf": round(raylm_rate / hf_rate, 3),
        "speedup_vs_hf_per_repeat": [round((r["train_tokens"] / r["seconds"]) / (h["train_tokens"] / h["seconds"]), 3)
                                     for r, h in zip(runs["raylm_small"], runs["hf_small"])],
        "raylm_seconds": round(median("raylm_small", "seconds"), 2),
        "hf_seconds": round(median("hf_small", "seconds"), 2),
        "raylm_cold_seconds": round(median("raylm_small", "cold_seconds"), 2),
        "hf_cold_seconds": round(median("hf_small", "cold_seconds"), 2),
        f"raylm_tokens_per_s_{large_mb}mb": round(rate("raylm_large")),  # in its memory run
        "memory_sampling_cpu_s": {key: runs[key][0]["memory_sampling_cpu_s"]
                                  for key in ("raylm_small_memory", "hf_small_memory", "raylm_large")},
        f"raylm_peak_tree_pss_mb_{small_mb}mb": round(small_memory / 2**20, 1),
        f"raylm_peak_tree_pss_mb_{large_mb}mb": round(large_memory / 2**20, 1),
        f"hf_peak_tree_pss_mb_{small_mb}mb": round(hf_memory / 2**20, 1),
        "rss_growth": round(large_memory / small_memory, 3),
        "targets_met": {"speedup_vs_hf>=1.0": raylm_rate / hf_rate >= 1.0,
                        "rss_growth<=1.3": large_memory / small_memory <= 1.3,
                        "same_packed_blocks": same_blocks},
        "runs": runs,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
