"""Resolving sources to files and fingerprints (no Ray): globs, folders, URIs, Hugging Face datasets."""

import json
import os

import pytest

from raylm.config import DataSourceConfig
from raylm.data.errors import DataError
from raylm.data.sources import resolve_source


def _source(**fields):
    return DataSourceConfig(**fields)


@pytest.fixture()
def tree(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "one.jsonl").write_text('{"text": "x"}\n')
    (tmp_path / "a" / "two.jsonl.gz").write_bytes(b"")
    (tmp_path / "a" / "notes.txt").write_text("ignored for jsonl\n")
    (tmp_path / "a" / ".hidden.jsonl").write_text("{}\n")
    (tmp_path / "a" / "_SUCCESS.jsonl").write_text("{}\n")
    (tmp_path / "a" / "deeper").mkdir()
    (tmp_path / "a" / "deeper" / "three.jsonl").write_text('{"text": "y"}\n')
    return tmp_path


def test_folders_globs_files_and_uris(tree):
    folder = resolve_source("s", _source(path=str(tree / "a"), format="jsonl"))
    assert [os.path.relpath(f, tree) for f in folder.files] == ["a/deeper/three.jsonl", "a/one.jsonl", "a/two.jsonl.gz"]
    globbed = resolve_source("s", _source(path=str(tree / "a" / "*.jsonl")))
    assert [os.path.basename(f) for f in globbed.files] == ["_SUCCESS.jsonl", "one.jsonl"]  # a glob is taken literally
    single = resolve_source("s", _source(path=str(tree / "a" / "one.jsonl")))
    assert single.files == (str(tree / "a" / "one.jsonl"),) and single.num_bytes == len('{"text": "x"}\n')
    uri = resolve_source("s", _source(path=f"file://{tree / 'a'}", format="jsonl"))
    assert [f.rsplit("/", 1)[-1] for f in uri.files] == ["three.jsonl", "one.jsonl", "two.jsonl.gz"]
    assert all(f.startswith("file://") for f in uri.files)


@pytest.mark.parametrize("path, message", [
    ("missing.jsonl", "data.sources[2].path: no such file or folder: '{root}/missing.jsonl'"),
    ("a/*.parquet", "data.sources[2].path: no files match '{root}/a/*.parquet'"),
    ("a/deeper", None),
])
def test_missing_paths_name_the_field(tree, path, message):
    config = _source(path=str(tree / path), format="text")
    if message is None:  # a folder without files of the format
        message = "data.sources[2].path: no text files (.txt, .text, .md) in folder '{root}/a/deeper'"
    with pytest.raises(DataError) as info:
        resolve_source("data.sources[2]", config)
    assert str(info.value) == message.format(root=tree)


def test_fingerprint_follows_content_and_config(tree):
    config = _source(path=str(tree / "a" / "one.jsonl"))
    first = resolve_source("s", config).fingerprint
    assert resolve_source("s", config).fingerprint == first
    (tree / "a" / "one.jsonl").write_text('{"text": "changed, longer"}\n')
    assert resolve_source("s", config).fingerprint != first
    assert resolve_source("s", config.model_copy(update={"task": "sentiment"})).fingerprint != \
        resolve_source("s", config).fingerprint


def test_hugging_face_folders_splits_and_columns(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")

    data = {"sentence": ["good", "bad"], "label": [1, 0]}
    datasets.Dataset.from_dict(data).save_to_disk(str(tmp_path / "single"))
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(data),
                          "validation": datasets.Dataset.from_dict(data)}).save_to_disk(str(tmp_path / "dict"))
    fields = {"text": "sentence"}
    single = resolve_source("s", _source(path=str(tmp_path / "single"), format="hf", task="sentiment", fields=fields))
    assert single.read_format == "arrow" and single.files[0].endswith(".arrow")
    split = resolve_source("s", _source(path=str(tmp_path / "dict"), format="hf", task="sentiment", fields=fields,
                                        split="validation"))
    assert "validation" in split.files[0]
    with pytest.raises(DataError, match=r"^s.split: 'test' is not a split of .* \(it has train, validation\)$"):
        resolve_source("s", _source(path=str(tmp_path / "dict"), format="hf", task="sentiment", fields=fields,
                                    split="test"))
    with pytest.raises(DataError, match=r"^s: column 'text' not in .* \(columns: sentence, label\); map it with fields$"):
        resolve_source("s", _source(path=str(tmp_path / "single"), format="hf", task="sentiment"))
    # a folder of data files is resolved by datasets.load_dataset (the json builder here)
    files = tmp_path / "files"
    files.mkdir()
    (files / "train.jsonl").write_text("\n".join(json.dumps({"text": t, "label": 1}) for t in ("a", "b")) + "\n")
    loaded = resolve_source("s", _source(path=str(files), format="hf", task="sentiment"))
    assert loaded.files and loaded.read_format == "arrow"


def test_unreachable_hub_name_is_one_line(monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError) as info:
        resolve_source("data.sources[0]", _source(path="nobody/nothing-here", format="hf", task="sentiment"))
    assert str(info.value).startswith("data.sources[0]: cannot load Hugging Face dataset 'nobody/nothing-here': ")
    assert "\n" not in str(info.value)
