from collections import Counter

from raylm.data.demo import generate_demo_corpus
from raylm.data.formatting import example_key


def test_deterministic_for_a_seed():
    first = generate_demo_corpus(seed=3, num_train=200, num_dev=50)
    second = generate_demo_corpus(seed=3, num_train=200, num_dev=50)
    assert first == second
    other = generate_demo_corpus(seed=4, num_train=200, num_dev=50)
    assert other["train"] != first["train"]


def test_splits_disjoint_and_sized():
    corpus = generate_demo_corpus(seed=0, num_train=1500, num_dev=200)
    train_keys = {example_key(row) for row in corpus["train"]}
    dev_keys = [example_key(row) for row in corpus["dev"]]
    assert not train_keys & set(dev_keys)
    assert len(set(dev_keys)) == len(dev_keys)
    assert Counter(row["task"] for row in corpus["train"]) == {t: 1500 for t in ("lm", "sentiment", "qa", "translate")}
    assert Counter(row["task"] for row in corpus["dev"]) == {t: 200 for t in ("lm", "sentiment", "qa", "translate")}


def test_qa_answers_are_extractive_spans():
    corpus = generate_demo_corpus(seed=1, num_train=300, num_dev=100, tasks=["qa"])
    for row in corpus["train"] + corpus["dev"]:
        answer = row["answers"]["text"][0]
        start = row["answers"]["answer_start"][0]
        assert row["context"][start : start + len(answer)] == answer
        # several facts per passage, so the question is not answerable by position alone
        assert row["context"].count(".") >= 4


def test_sentiment_needs_more_than_one_rule():
    corpus = generate_demo_corpus(seed=0, num_train=2000, num_dev=10, tasks=["sentiment"])
    rows = corpus["train"]
    labels = Counter(row["label"] for row in rows)
    assert 0.4 < labels["positive"] / len(rows) < 0.6
    # negation and contrast both occur and both flip the naive reading
    negated_positive = [r for r in rows if " not " in r["text"] and r["label"] == "positive"]
    contrast = [r for r in rows if ", but " in r["text"]]
    assert negated_positive and contrast
    # "contains a positive word" is not a good classifier
    from raylm.data.demo import _POSITIVE

    naive = sum((any(f" {w}" in r["text"] for w in _POSITIVE)) == (r["label"] == "positive") for r in rows)
    assert naive / len(rows) < 0.8


def test_translation_has_word_order_rules():
    corpus = generate_demo_corpus(seed=0, num_train=500, num_dev=10, tasks=["translate"])
    rows = corpus["train"]
    inverted = [r for r in rows if r["source"].startswith("today ")]
    assert inverted and all(r["target"].split()[1] in {"sieht", "mag", "findet", "kauft", "hat", "trägt", "malt",
                                                       "will", "hält", "kennt"} for r in inverted)
    subordinate = [r for r in rows if r["source"].startswith("i think that")]
    assert subordinate and all(r["target"].startswith("Ich glaube, dass") for r in subordinate)
