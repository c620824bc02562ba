"""Mapping source records to raylm rows: each task's fields, label forms, and the kinds of bad rows."""

import pytest

from raylm.data.formatting import RowProblem, canonical_row, example_text, format_example
from raylm.data.special_tokens import TASK_TOKENS


def test_each_task_maps_its_fields_and_formats():
    sst = canonical_row({"sentence": "a fine film", "label": 1}, "sentiment", {"text": "sentence"})
    assert sst == {"task": "sentiment", "text": "a fine film", "label": "positive"}
    assert format_example(sst) == (f"{TASK_TOKENS['sentiment']}Review: a fine film\nSentiment:", " positive")

    squad = {"context": "Oslo is cold.", "question": "What is cold?",
             "answers": {"text": ["Oslo"], "answer_start": [0]}}
    qa = canonical_row(squad, "qa")
    assert qa["answers"] == {"text": ["Oslo"], "answer_start": [0]}
    assert format_example(qa)[1] == " Oslo"
    # a bare string or list answer gets its start looked up in the context
    assert canonical_row({**squad, "answers": "cold"}, "qa")["answers"] == {"text": ["cold"], "answer_start": [8]}

    pair = canonical_row({"src": "the dog.", "tgt": "Der Hund."}, "translate", {"source": "src", "target": "tgt"})
    assert pair == {"task": "translate", "source": "the dog.", "target": "Der Hund."}
    assert example_text(pair) == f"{TASK_TOKENS['translate']}English: the dog.\nGerman: Der Hund."

    lm = canonical_row({"content": "Some text."}, "lm", {"text": "content"})
    assert format_example(lm) == (TASK_TOKENS["lm"], "Some text.")


@pytest.mark.parametrize("label, word", [(0, "negative"), (1, "positive"), ("1", "positive"), (True, "positive"),
                                         ("Negative", "negative")])
def test_sentiment_label_forms(label, word):
    assert canonical_row({"text": "x", "label": label}, "sentiment")["label"] == word


@pytest.mark.parametrize(
    "record, task, fields, kind, fragment",
    [
        ({"text": "x"}, "sentiment", {}, "missing_field", "'label'"),
        ({"sentence": "x", "label": 0}, "sentiment", {}, "missing_field", "'text'"),
        ({"text": "  ", "label": 0}, "sentiment", {}, "empty_document", "'text' is empty"),
        ({"text": "x", "label": 3}, "sentiment", {}, "invalid_value", "label 3"),
        ({"text": 5}, "lm", {}, "invalid_value", "not a string"),
        ({"text": ""}, "lm", {}, "empty_document", "empty"),
        ({"context": "c", "question": "q", "answers": {"text": []}}, "qa", {}, "invalid_value", "no answer text"),
        ({"context": "c", "question": "q"}, "qa", {}, "missing_field", "'answers'"),
        ({"src": "a"}, "translate", {"source": "src", "target": "tgt"}, "missing_field", "'tgt' (for target)"),
    ],
)
def test_bad_records_name_the_problem(record, task, fields, kind, fragment):
    with pytest.raises(RowProblem) as info:
        canonical_row(record, task, fields)
    assert info.value.kind == kind and fragment in str(info.value)
