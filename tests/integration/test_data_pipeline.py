"""The real-corpus data layer on local Ray: every source type, bad rows, determinism, the prepared-dataset
cache, and disjoint, complete, non-stalling shards for 2 Ray Train workers.

The corpora are generated here (small, with planted bad rows) and, when present,
taken from ../shared/data (dev and train splits only, never *_test).
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raylm.config import load_config
from raylm.data.errors import DataError
from raylm.data.packing import IGNORE_INDEX
from tests.conftest import REPO_ROOT

SEQ_LEN = 64


def _write_corpus(root: Path) -> dict[str, Path]:
    """Small sources of every format; bad rows are planted at known lines."""
    words = "the a cat dog sat ran on under mat table quickly slowly red blue big small".split()
    rng = np.random.default_rng(0)

    def sentence(n: int) -> str:
        return " ".join(rng.choice(words, size=n)) + "."

    text = root / "text"
    text.mkdir()
    for index in range(3):
        paragraphs = ["\n".join(sentence(8) for _ in range(3)) for _ in range(30)]
        (text / f"part{index}.txt").write_text("\n\n".join(paragraphs) + "\n")
    with open(text / "part1.txt", "ab") as handle:
        handle.write(b"caf\xe9 latin-1 line\n")  # line 90 + 29 blank + 1 = line 120
    (text / "empty.txt").write_text("\n \n")
    (text / "notes.csv").write_text("not picked up by the glob\n")

    reviews = root / "reviews.jsonl"
    lines = [json.dumps({"sentence": f"{sentence(6)} {'good' if i % 2 else 'bad'}", "label": i % 2})
             for i in range(300)]
    lines[10] = '{"sentence": "broken json", "label": 1'
    lines[20] = json.dumps({"label": 1})
    lines[30] = json.dumps({"sentence": "", "label": 0})
    reviews.write_bytes("\n".join(lines).encode() + b"\n" + b'{"sentence": "\xff\xfe", "label": 0}\n')

    pairs = root / "pairs.parquet"
    pq.write_table(pa.table({"src": [f"the dog {i} sees the cat." for i in range(400)],
                             "tgt": [f"Der Hund {i} sieht die Katze." for i in range(400)]}), pairs,
                   row_group_size=150)

    import datasets

    hf_folder = root / "hf_qa"
    contexts = [f"{name} lives in {city}." for name, city in zip(["Anna", "Ben", "Clara", "David"] * 50,
                                                                  ["Oslo", "Rome", "Lyon", "Bergen"] * 50)]
    datasets.Dataset.from_dict({
        "context": contexts,
        "question": [f"Where does {c.split()[0]} live?" for c in contexts],
        "answers": [{"text": [c.split()[-1][:-1]], "answer_start": [c.index(c.split()[-1])]} for c in contexts],
    }).save_to_disk(str(hf_folder))
    return {"text": text, "reviews": reviews, "pairs": pairs, "hf": hf_folder}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return _write_corpus(tmp_path_factory.mktemp("corpus"))


def _sources(corpus: dict[str, Path]) -> str:
    return ("data.sources=["
            f"{{path: '{corpus['text']}/*.txt', text_unit: paragraph}}, "
            f"{{path: '{corpus['reviews']}', task: sentiment, fields: {{text: sentence}}}}, "
            # a URI goes to pyarrow and Ray Data as it is (file:// stands in for s3:// or gs:// here)
            f"{{path: 'file://{corpus['pairs']}', task: translate, fields: {{source: src, target: tgt}}, weight: 0.5}}, "
            f"{{path: '{corpus['hf']}', format: hf, task: qa}}]")


def _job(corpus, workdir, *extra):
    return load_config(None, [_sources(corpus), "data.dev_fraction=0.2", f"data.seq_len={SEQ_LEN}",
                              "data.vocab_size=400", "data.segment_bytes=4096", f"workdir={workdir}", *extra])


def _read_blocks(folder: str) -> dict[str, np.ndarray]:
    table = pq.read_table(folder)  # file names carry the block index: sorted = dataset order
    files = sorted(Path(folder).glob("*.parquet"))
    table = pa.concat_tables([pq.read_table(f) for f in files])
    return {name: np.stack(table.column(name).to_numpy(zero_copy_only=False)) for name in
            ("input_ids", "labels", "position_ids")}


@pytest.fixture(scope="module")
def prepared(ray_session, corpus, tmp_path_factory):
    from raylm.data.prepare import prepare_dataset

    workdir = tmp_path_factory.mktemp("work")
    job = _job(corpus, workdir)
    manifest = prepare_dataset(job)
    return job, manifest


def test_every_source_type_is_read_formatted_and_packed(prepared):
    job, manifest = prepared
    assert manifest["cached"] is False
    train, dev = manifest["splits"]["train"], manifest["splits"]["dev"]
    rows = {index: train["by_source"][str(index)]["rows"] for index in range(4)}
    # text: 90 paragraphs + the latin-1 line's paragraph... the bad line itself is skipped
    assert rows == {0: 90, 1: 297, 2: 400, 3: 200}
    # dev holds out about 20% of every source's documents (by hash), train keeps the rest
    for index in range(4):
        kept, held = train["by_source"][str(index)]["examples"], dev["by_source"][str(index)]["examples"]
        expected = rows[index] * (0.5 if index == 2 else 1.0)
        assert 0.05 * rows[index] < held < 0.35 * rows[index], (index, held)
        assert kept + held * (0.5 if index == 2 else 1.0) == pytest.approx(expected, rel=0.2)
    blocks = _read_blocks(f"{manifest['path']}/train")
    assert blocks["input_ids"].shape == (train["blocks"], SEQ_LEN)
    pad = manifest["tokenizer"]["vocab_size"] and 1  # <|pad|> is id 1 in raylm's BPE tokenizers
    assert int((blocks["input_ids"] != pad).sum()) == train["tokens"]
    assert int((blocks["labels"] != IGNORE_INDEX).sum()) == train["label_tokens"]
    assert np.all((blocks["labels"] == IGNORE_INDEX) | (blocks["labels"] == blocks["input_ids"]))
    assert np.all(blocks["labels"][blocks["input_ids"] == pad] == IGNORE_INDEX)
    assert train["padding_fraction"] < 0.3


def test_bad_rows_are_counted_and_the_first_reported_with_file_and_line(prepared, corpus):
    _, manifest = prepared
    bad = manifest["bad_rows"]
    assert bad["by_kind"] == {"empty_document": 2, "invalid_utf8": 2, "malformed_json": 1, "missing_field": 1}
    assert bad["count"] == 6
    reviews, text = str(corpus["reviews"]), str(corpus["text"])
    # the first five by file and line (reviews.jsonl sorts before text/); part1.txt:120 is sixth
    assert [(item["location"], item["kind"]) for item in bad["first"]] == [
        (f"{reviews}:11", "malformed_json"), (f"{reviews}:21", "missing_field"), (f"{reviews}:31", "empty_document"),
        (f"{reviews}:301", "invalid_utf8"), (f"{text}/empty.txt:1", "empty_document")]
    assert [(item["file"], item["line"]) for item in bad["first"]][:2] == [(reviews, 11), (reviews, 21)]
    messages = [item["message"] for item in bad["first"]]
    assert messages[1] == "missing field 'sentence' (for text)"
    assert messages[3] == "not UTF-8 (byte 0xff at column 15)"


def test_lm_stream_keeps_every_token_in_order(ray_session, corpus, tmp_path):
    from raylm.data.prepare import prepare_dataset
    from raylm.data.tokenizer import encode_texts, encoder_spec, load_tokenizer

    text_only = [f"data.sources=[{{path: '{corpus['text']}/part0.txt', text_unit: paragraph}}]",
                 f"data.dev_sources=[{{path: '{corpus['text']}/part2.txt', text_unit: paragraph}}]",
                 f"data.seq_len={SEQ_LEN}", "data.vocab_size=400", "data.segment_bytes=1024", f"workdir={tmp_path}"]
    manifest = prepare_dataset(load_config(None, text_only))
    tokenizer = load_tokenizer(manifest["tokenizer"]["path"])
    spec = encoder_spec(tokenizer)
    paragraphs = (corpus["text"] / "part0.txt").read_text().strip().split("\n\n")
    lm = tokenizer.convert_tokens_to_ids("<|lm|>")
    expected = [token for ids in encode_texts(spec, paragraphs) for token in [lm, *ids, spec.eos_id]]
    blocks = _read_blocks(f"{manifest['path']}/train")["input_ids"].reshape(-1)
    assert [int(t) for t in blocks if t != spec.pad_id] == expected
    # several segments, each padded at most once
    assert manifest["splits"]["train"]["segments"] > 3
    assert manifest["splits"]["train"]["padding_tokens"] < SEQ_LEN * manifest["splits"]["train"]["segments"]


def test_cache_hit_determinism_and_miss_on_change(ray_session, prepared, corpus, tmp_path):
    import ray.data

    from raylm.data.pipeline import prepare_data
    from raylm.data.prepare import prepare_dataset, prepare_tokenizer

    job, first = prepared
    data = prepare_data(job)  # a training run's data stage
    assert data.stats["cache"] == "hit" and data.fingerprint == first["fingerprint"]
    assert data.stats["num_train_blocks"] == data.train.count() == first["splits"]["train"]["blocks"]
    assert isinstance(data.train, ray.data.Dataset)
    tasks = collections.Counter(row["task"] for row in data.dev_examples)
    assert set(tasks) == {"sentiment", "translate", "qa"}
    assert prepare_tokenizer(job)["origin"] == "cache"

    # the same corpus prepared into another cache gives the same blocks in the same order
    again = prepare_dataset(job.model_copy(update={"data": job.data.model_copy(
        update={"cache_dir": str(tmp_path / "other")})}))
    assert again["cached"] is False and again["fingerprint"] == first["fingerprint"]
    for split in ("train", "dev"):
        a, b = _read_blocks(f"{first['path']}/{split}"), _read_blocks(f"{again['path']}/{split}")
        assert all(np.array_equal(a[key], b[key]) for key in a)

    # a changed source file is a new fingerprint: prepared again (the tokenizer is fixed here, to be quick)
    changed = corpus["text"].parent / "changed"
    changed.mkdir(exist_ok=True)
    (changed / "extra.txt").write_text("A new paragraph of text.\n")
    job_changed = job.model_copy(update={"data": job.data.model_copy(update={
        "tokenizer_path": first["tokenizer"]["path"],
        "sources": [*job.data.sources, job.data.sources[0].model_copy(update={"path": str(changed / "*.txt")})]})})
    third = prepare_dataset(job_changed)
    assert third["cached"] is False and third["fingerprint"] != first["fingerprint"]
    (changed / "extra.txt").write_text("A different paragraph, changed later.\n")
    fourth = prepare_dataset(job_changed)
    assert fourth["cached"] is False and fourth["fingerprint"] != third["fingerprint"]


def test_strict_mode_and_empty_corpus_fail_with_one_line(ray_session, corpus, tmp_path):
    from raylm.data.prepare import prepare_dataset

    tokenizer_dir = tmp_path / "tok"
    from raylm.data.tokenizer import train_bpe_tokenizer

    train_bpe_tokenizer(["the cat sat on the mat"] * 10, vocab_size=300).save_pretrained(tokenizer_dir)
    base = [f"data.tokenizer_path={tokenizer_dir}", "data.dev_fraction=0.2", f"workdir={tmp_path}"]
    # no tokenizer_path: the bad row is met while sampling text for the tokenizer, inside Ray Data
    strict = load_config(None, [f"data.sources=[{{path: '{corpus['reviews']}', task: sentiment, "
                                f"fields: {{text: sentence}}}}]", "data.strict=true", *base[1:]])
    with pytest.raises(DataError) as info:
        prepare_dataset(strict)
    message = str(info.value)
    assert message == (f"{corpus['reviews']}:11: malformed JSON (Expecting ',' delimiter at column 39) "
                       "(data.strict is true)")
    assert not list((tmp_path / "prepared").glob("*/manifest.json"))

    wrong_field = load_config(None, [f"data.sources=[{{path: '{corpus['reviews']}', task: sentiment}}]", *base])
    with pytest.raises(DataError) as info:
        prepare_dataset(wrong_field)
    assert str(info.value).startswith("the train split is empty: no usable rows in the configured sources; "
                                      "301 bad rows skipped, first: ")
    assert "missing field 'text'" in str(info.value) and "\n" not in str(info.value)


def test_a_dataset_created_under_quiet_progress_keeps_it_after_the_block(ray_session):
    """Training streams the prepared Datasets after prepare returned: they must carry the quiet context with
    them, while the process-wide context gets its setting back."""
    import ray.data

    from raylm.data.execution import quiet_progress

    context = ray.data.DataContext.get_current()
    saved, context.enable_progress_bars = context.enable_progress_bars, True
    try:
        with quiet_progress():
            dataset = ray.data.from_items([{"x": 1}, {"x": 2}])
        assert context.enable_progress_bars is True
        assert dataset.context.enable_progress_bars is False
        assert dataset.take_all() == [{"x": 1}, {"x": 2}]
    finally:
        context.enable_progress_bars = saved


def test_missing_path_is_a_clear_error_before_ray(tmp_path):
    from raylm.data.plan import check_sources

    job = load_config(None, [f"data.sources=[{{path: '{tmp_path}/nope/*.jsonl'}}]", "data.dev_fraction=0.1"])
    with pytest.raises(DataError, match=r"^data.sources\[0\].path: no files match '.*nope/\*.jsonl'$"):
        check_sources(job)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "platform"), "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    result = subprocess.run([sys.executable, "-m", "raylm.cli", "prepare", "data",
                             f"data.dev_sources=[{{path: {tmp_path}/dev.jsonl}}]",
                             f"data.sources=[{{path: {tmp_path}/train.jsonl}}]"],
                            capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip() == f"error: data.sources[0].path: no such file or folder: '{tmp_path}/train.jsonl'"


def _shard_loop(config):
    """Each worker reads its shard for several epochs in lockstep (an all-reduce per batch, like DDP),
    with a local shuffle buffer as the training loop uses."""
    import ray.train
    import torch
    import torch.distributed as dist

    context = ray.train.get_context()
    rank = context.get_world_rank()
    shard = ray.train.get_dataset_shard("train")
    epochs = []
    for _ in range(config["epochs"]):
        seen = []
        for batch in shard.iter_torch_batches(batch_size=config["batch_size"], drop_last=False,
                                              local_shuffle_buffer_size=32, local_shuffle_seed=rank):
            seen.extend(int(v) for v in batch["input_ids"].to(torch.int64).sum(dim=1) * 100003
                        + batch["input_ids"][:, :8].to(torch.int64).sum(dim=1))
            count = torch.tensor([1.0])
            dist.all_reduce(count)  # a worker with an extra batch would wait here for ever
        epochs.append(seen)
    Path(config["out"], f"rank{rank}.json").write_text(json.dumps(epochs))


def test_two_workers_get_disjoint_complete_shards_without_stalling(prepared, tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from raylm.data.prepare import open_prepared

    _, manifest = prepared
    train, _ = open_prepared(manifest, seed=0)
    total = manifest["splits"]["train"]["blocks"]
    files = sorted(Path(manifest["path"], "train").glob("*.parquet"))
    sizes = {pq.ParquetFile(f).metadata.num_rows for f in files}
    assert len(sizes) > 1  # uneven files, so the split has to cut and balance them
    trainer = TorchTrainer(
        _shard_loop, train_loop_config={"epochs": 2, "batch_size": 8, "out": str(tmp_path)},
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name="shards", storage_path=str(tmp_path / "ray_results")),
        torch_config=TorchConfig(backend="gloo"), datasets={"train": train})
    result = trainer.fit()
    assert result.error is None
    ranks = [json.loads(Path(tmp_path, f"rank{r}.json").read_text()) for r in range(2)]
    everything = collections.Counter(
        int(ids.astype(np.int64).sum() * 100003 + ids[:8].astype(np.int64).sum())
        for ids in _read_blocks(f"{manifest['path']}/train")["input_ids"])
    for epoch in range(2):
        first, second = collections.Counter(ranks[0][epoch]), collections.Counter(ranks[1][epoch])
        assert sum(first.values()) == sum(second.values())  # equal shards: DDP steps stay in lockstep
        union = first + second
        assert not (union - everything)  # nothing read twice or invented
        assert sum((everything - union).values()) <= 1  # equal=True may drop at most world_size - 1 rows
    assert total == sum(everything.values())


def test_shared_data_through_every_source_type(ray_session, shared_data, tmp_path):
    """Real corpora: Tiny Shakespeare as text, XQuAD dev as JSON Lines, Multi30k dev as Parquet, SST-2 dev
    as a Hugging Face dataset folder; row counts match the files and nothing is reported bad."""
    import datasets

    from raylm.data.prepare import prepare_dataset

    pairs = [json.loads(line) for line in (shared_data / "translation/multi30k_en_de_dev.jsonl").open()]
    pq.write_table(pa.Table.from_pylist(pairs), tmp_path / "multi30k_dev.parquet")
    datasets.load_dataset("json", data_files=str(shared_data / "sentiment/sst2_dev.jsonl"),
                          split="train", cache_dir=str(tmp_path / "hf_cache")).save_to_disk(str(tmp_path / "sst2_dev"))
    job = load_config(None, [
        "data.sources=["
        f"{{path: '{shared_data}/lm/tiny_shakespeare.txt', text_unit: paragraph}}, "
        f"{{path: '{shared_data}/qa/xquad_en_dev.jsonl', task: qa}}, "
        f"{{path: '{tmp_path}/multi30k_dev.parquet', task: translate, fields: {{source: src, target: tgt}}}}, "
        f"{{path: '{tmp_path}/sst2_dev', format: hf, task: sentiment}}]",
        "data.dev_fraction=0.1", "data.seq_len=128", "data.vocab_size=500", "data.tokenizer_sample_bytes=300000",
        f"workdir={tmp_path}",
    ])
    manifest = prepare_dataset(job)
    assert manifest["bad_rows"]["count"] == 0
    rows = {int(k): v["rows"] for k, v in manifest["splits"]["train"]["by_source"].items()}
    shakespeare = (shared_data / "lm/tiny_shakespeare.txt").read_text()
    assert rows == {0: len([p for p in shakespeare.split("\n\n") if p.strip()]), 1: 220, 2: 1014, 3: 872}
    assert manifest["tokenizer"]["sample_fraction"] < 0.5  # trained on a sample, not the whole corpus
    train, dev = manifest["splits"]["train"], manifest["splits"]["dev"]
    assert train["blocks"] > 0 and dev["blocks"] > 0
    assert train["examples"] + dev["examples"] == sum(rows.values())
