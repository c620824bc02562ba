"""Reading files as segments, checking rows, splitting, weighting, and packing a segment (no Ray)."""

import io
import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raylm.data.errors import DataError
from raylm.data.packing import IGNORE_INDEX, unpack_segments
from raylm.data.parse import SourcePlan, segment_examples
from raylm.data.read import iter_columnar_segments, iter_line_segments, read_bytes_segments
from raylm.data.segments import pack_examples, pack_segment
from raylm.data.tokenizer import encode_texts, encoder_spec, train_bpe_tokenizer


def _text_file(seed: int, paragraphs: int) -> bytes:
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "épée", "naïve", "東京", "x"]
    out = []
    for _ in range(paragraphs):
        lines = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 12))) for _ in range(rng.randint(1, 5))]
        out.append("\n".join(lines))
    return ("\n\n".join(out) + "\n").encode("utf-8")


@pytest.mark.parametrize("unit", ["line", "paragraph", "file"])
@pytest.mark.parametrize("segment_bytes, read_size", [(64, 7), (300, 1000), (1 << 20, 1 << 20)])
def test_segments_cover_the_file_exactly(unit, segment_bytes, read_size):
    data = _text_file(0, 60)
    segments = list(iter_line_segments(io.BytesIO(data), segment_bytes, unit, read_size=read_size))
    assert b"".join(s["payload"] for s in segments) == data
    line = 1
    for segment in segments:
        assert segment["first_line"] == line
        line += segment["payload"].count(b"\n")
        assert segment["payload"].endswith(b"\n") or segment is segments[-1]
    assert not segments[-1]["continued"]
    for before, after in zip(segments, segments[1:]):
        assert after["continues"] == before["continued"]
        if before["continued"]:
            assert after["doc_start"] == before["last_doc_start"]
    if unit == "line":
        assert not any(s["continued"] for s in segments)
    if unit == "paragraph" and segment_bytes == 300:
        # cut where a paragraph ends (the segment ends with a blank line), never inside one
        assert all(not s["continued"] and s["payload"].endswith(b"\n\n") for s in segments[:-1])
    if unit == "file" and len(segments) > 1:
        assert all(s["continued"] for s in segments[:-1]) and all(s["doc_start"] == 1 for s in segments[1:])


def test_paragraph_longer_than_the_limit_is_continued():
    data = ("\n".join(["word " * 10] * 200) + "\n").encode()  # one paragraph, ~12 kB
    segments = list(iter_line_segments(io.BytesIO(data), 1000, "paragraph", read_size=512))
    assert len(segments) > 1 and all(s["continued"] for s in segments[:-1])
    assert b"".join(s["payload"] for s in segments) == data


def test_empty_stream_is_one_empty_segment():
    segments = list(iter_line_segments(io.BytesIO(b""), 100, "file"))
    assert len(segments) == 1 and segments[0]["payload"] == b""


@pytest.fixture(scope="module")
def encoder():
    texts = [_text_file(seed, 20).decode() for seed in range(5)] + ["the movie was good", "Review: Sentiment:"]
    return encoder_spec(train_bpe_tokenizer(texts, vocab_size=400))


def _plan(**overrides):
    base = dict(index=0, label="corpus", format="jsonl", task="sentiment")
    return SourcePlan(**{**base, **overrides})


BAD_JSONL = b"\n".join([
    b'{"text": "a fine film", "label": 1}',
    b'{"text": "not closed", "label": 0',
    b'',
    b'{"text": "no label"}',
    b'{"text": "caf\xe9 au lait", "label": 1}',
    b'{"text": "   ", "label": 0}',
    b'["a", "list"]',
    b'{"text": "label seven", "label": 7}',
    b'{"text": "a dull film", "label": "negative"}',
]) + b"\n"


def test_bad_rows_are_counted_located_and_skipped():
    segment = read_bytes_segments(BAD_JSONL, "/data/reviews.jsonl", 1 << 20, "line")[0]
    examples, problems, rows = segment_examples(segment, _plan())
    assert [e.row for e in examples] == [{"task": "sentiment", "text": "a fine film", "label": "positive"},
                                         {"task": "sentiment", "text": "a dull film", "label": "negative"}]
    found = {(p.location, p.kind) for p in problems}
    assert found == {
        ("/data/reviews.jsonl:2", "malformed_json"),
        ("/data/reviews.jsonl:4", "missing_field"),
        ("/data/reviews.jsonl:5", "invalid_utf8"),
        ("/data/reviews.jsonl:6", "empty_document"),
        ("/data/reviews.jsonl:7", "malformed_json"),
        ("/data/reviews.jsonl:8", "invalid_value"),
    }
    assert rows == 2  # usable rows; the six bad ones are problems, the blank line is neither
    assert [e.location for e in examples] == ["/data/reviews.jsonl:1", "/data/reviews.jsonl:9"]


def test_strict_mode_fails_on_the_first_bad_row_with_its_location():
    segment = read_bytes_segments(BAD_JSONL, "/data/reviews.jsonl", 1 << 20, "line")[0]
    with pytest.raises(DataError) as info:
        segment_examples(segment, _plan(strict=True))
    assert str(info.value).startswith("/data/reviews.jsonl:2: malformed JSON")
    assert "\n" not in str(info.value)


def test_a_byte_order_mark_is_not_a_bad_row():
    data = b"\xef\xbb\xbf" + b'{"text": "first", "label": 1}\n{"text": "second", "label": 0}\n'
    examples, problems, _ = segment_examples(read_bytes_segments(data, "bom.jsonl", 1 << 20, "line")[0], _plan())
    assert not problems and [e.row["text"] for e in examples] == ["first", "second"]
    text = segment_examples(read_bytes_segments(b"\xef\xbb\xbfHello.\n", "bom.txt", 1 << 20, "file")[0],
                            _plan(format="text", task="lm"))[0]
    assert [e.row["text"] for e in text] == ["Hello."]


def test_bad_lines_keep_numbering_across_segments():
    lines = [json.dumps({"text": f"row {i}", "label": i % 2}).encode() for i in range(40)]
    lines[25] = b'{"text": "\xff", "label": 1}'
    data = b"\n".join(lines) + b"\n"
    segments = read_bytes_segments(data, "f.jsonl", 200, "line")
    assert len(segments) > 3
    located = [p.location for s in segments for p in segment_examples(s, _plan())[1]]
    assert located == ["f.jsonl:26"]
    kept = [e.location for s in segments for e in segment_examples(s, _plan())[0]]
    assert kept == [f"f.jsonl:{n}" for n in range(1, 41) if n != 26]


def test_text_documents_by_unit():
    data = b"First para\nstill first.\n\n\nSecond para.\n\n   \nThird.\n"
    segment = read_bytes_segments(data, "t.txt", 1 << 20, "paragraph")[0]
    docs = [e.row["text"] for e in segment_examples(segment, _plan(format="text", task="lm", text_unit="paragraph"))[0]]
    assert docs == ["First para\nstill first.", "Second para.", "Third."]
    segment = read_bytes_segments(data, "t.txt", 1 << 20, "line")[0]
    docs = [e.row["text"] for e in segment_examples(segment, _plan(format="text", task="lm", text_unit="line"))[0]]
    assert docs == ["First para", "still first.", "Second para.", "Third."]
    for unit in ("file", "paragraph", "line"):
        examples, problems, _ = segment_examples(read_bytes_segments(b" \n\n", "blank.txt", 1 << 20, unit)[0],
                                                 _plan(format="text", task="lm", text_unit=unit))
        assert not examples and [(p.location, p.kind) for p in problems] == [("blank.txt:1", "empty_document")]
    # blank lines at the start of a longer file are not an empty file
    segments = read_bytes_segments(b"\n" * 300 + b"text\n", "late.txt", 100, "paragraph")
    assert len(segments) > 1
    plan = _plan(format="text", task="lm", text_unit="paragraph")
    results = [segment_examples(s, plan) for s in segments]
    assert not any(problems for _, problems, _ in results)
    assert [e.row["text"] for examples, _, _ in results for e in examples] == ["text"]


def test_a_document_over_several_segments_keeps_all_its_text():
    data = _text_file(3, 40)
    plan = _plan(format="text", task="lm", text_unit="file")
    segments = read_bytes_segments(data, "book.txt", 256, "file")
    pieces = [e for s in segments for e in segment_examples(s, plan)[0]]
    assert len(pieces) == len(segments) > 2
    assert pieces[0].starts and not pieces[0].ends and pieces[-1].ends and not pieces[-1].starts
    assert "".join(p.row["text"] for p in pieces) == data.decode().rstrip()
    assert len({p.key for p in pieces}) == 1  # one document: held out or weighted as a whole


def _rows_jsonl(count: int) -> bytes:
    return b"".join(json.dumps({"src": f"the dog {i} runs.", "tgt": f"Der Hund {i} rennt."}).encode() + b"\n"
                    for i in range(count))


def test_dev_holdout_is_disjoint_complete_and_deterministic():
    segment = read_bytes_segments(_rows_jsonl(400), "pairs.jsonl", 1 << 20, "line")[0]
    common = dict(format="jsonl", task="translate", fields=(("source", "src"), ("target", "tgt")), holdout=0.2)
    train = [e.key for e in segment_examples(segment, _plan(role="train", **common))[0]]
    dev = [e.key for e in segment_examples(segment, _plan(role="dev", **common))[0]]
    assert not set(train) & set(dev) and len(train) + len(dev) == 400
    assert 40 <= len(dev) <= 120
    assert dev == [e.key for e in segment_examples(segment, _plan(role="dev", **common))[0]]
    other_seed = [e.key for e in segment_examples(segment, _plan(role="dev", seed=1, **common))[0]]
    assert other_seed != dev


def test_weights_repeat_or_subsample_training_rows_only():
    segment = read_bytes_segments(_rows_jsonl(300), "pairs.jsonl", 1 << 20, "line")[0]
    common = dict(format="jsonl", task="translate", fields=(("source", "src"), ("target", "tgt")))
    doubled = segment_examples(segment, _plan(weight=2.0, **common))[0]
    assert len(doubled) == 600 and doubled[0].key == doubled[1].key
    half = segment_examples(segment, _plan(weight=0.5, **common))[0]
    assert 110 <= len(half) <= 190
    assert [e.key for e in half] == [e.key for e in segment_examples(segment, _plan(weight=0.5, **common))[0]]
    assert len(segment_examples(segment, _plan(weight=2.0, role="dev", **common))[0]) == 300


def test_backend_encoding_matches_the_transformers_wrapper():
    tokenizer = train_bpe_tokenizer([_text_file(1, 30).decode()], vocab_size=400)
    spec = encoder_spec(tokenizer)
    texts = ["<|sentiment|>Review: a naïve film\nSentiment:", " positive", "東京 <|endoftext|> tail", ""]
    assert encode_texts(spec, texts) == tokenizer(texts, add_special_tokens=False)["input_ids"]


def test_packed_task_segment_masks_prompts_and_keeps_every_token(encoder):
    lines = [json.dumps({"text": f"the movie was good {i}", "label": i % 2}).encode() for i in range(50)]
    segment = read_bytes_segments(b"\n".join(lines), "s.jsonl", 1 << 20, "line")[0]
    examples = segment_examples(segment, _plan())[0]
    packed, tokens = pack_examples(examples, "sentiment", encoder, 64)
    segments = unpack_segments(packed, encoder.pad_id)
    assert sum(len(ids) for ids, _ in segments) == tokens
    assert len(segments) == 50
    answers = {word: encode_texts(encoder, [" " + word])[0] + [encoder.eos_id] for word in ("positive", "negative")}
    found = []
    for ids, labels in segments:
        targets = [token for token, label in zip(ids, labels) if label != IGNORE_INDEX]
        found.append(next(word for word, answer in answers.items() if targets == answer))
        # labels sit on the answer at the end; the separator and the prompt before it are masked
        assert ids[len(ids) - len(targets):] == targets and labels[0] == IGNORE_INDEX and ids[0] == encoder.eos_id
    assert found.count("positive") == found.count("negative") == 25


def test_pack_segment_lm_stream_has_separators_and_no_padding_waste(encoder):
    data = _text_file(9, 80)
    plan = _plan(format="text", task="lm", text_unit="paragraph")
    segment = read_bytes_segments(data, "p.txt", 1 << 20, "paragraph")[0]
    packed = pack_segment(segment, plan, encoder, 32)[0]
    examples = segment_examples(segment, plan)[0]
    assert len(examples) == 80
    flat = packed["input_ids"].reshape(-1)
    assert int((flat == encoder.eos_id).sum()) == 80  # one separator per document
    padding = int((flat == encoder.pad_id).sum())
    assert padding < 32
    texts = [e.row["text"] for e in examples]
    expected = [token for ids in encode_texts(encoder, texts) for token in ids]
    body = [t for t in flat.tolist() if t not in (encoder.eos_id, encoder.pad_id)]
    lm_token = encode_texts(encoder, ["<|lm|>"])[0][0]
    assert [t for t in body if t != lm_token] == expected


def test_columnar_segments_round_trip_rows(tmp_path):
    table = pa.table({"sentence": [f"text {i}" for i in range(3000)], "label": [i % 2 for i in range(3000)],
                      "extra": list(range(3000))})
    path = tmp_path / "rows.parquet"
    pq.write_table(table, path, row_group_size=700)
    batches = pq.ParquetFile(path).iter_batches(batch_size=1024, columns=["sentence", "label"])
    segments = [{"path": str(path), **s} for s in iter_columnar_segments(batches, 8_000)]
    assert len(segments) > 3
    plan = _plan(format="parquet", fields=(("text", "sentence"),))
    examples = [e for s in segments for e in segment_examples(s, plan)[0]]
    assert [e.row["text"] for e in examples] == [f"text {i}" for i in range(3000)]
    assert examples[1234].location == f"{path} row 1235"
