"""The evaluator: eval-set fingerprints, reports, perplexity on text, and the trivial baselines."""

from __future__ import annotations

import math

import pytest
import torch

from raylm.config import EvalConfig, ModelConfig
from raylm.eval.baselines import build_baseline, first_sentence
from raylm.eval.runner import EvalReport, evaluate_model, fingerprint_rows, select_rows, text_losses

ROWS = [
    {"task": "sentiment", "text": "a fine film", "label": 1},
    {"task": "sentiment", "text": "dull and long", "label": "negative"},
    {"task": "qa", "context": "Ada lives in Oslo. She is a pilot.", "question": "Where does Ada live?",
     "answers": {"text": ["Oslo"], "answer_start": [13]}},
    {"task": "translate", "source": "the dog sleeps.", "target": "der Hund schläft."},
    {"task": "lm", "text": "to be or not to be"},
]


def test_fingerprint_follows_the_examples_not_incidental_fields():
    sentiment = select_rows(ROWS, 10)["sentiment"]
    base = fingerprint_rows("sentiment", sentiment)
    assert fingerprint_rows("sentiment", [{**row, "id": 7} for row in sentiment]) == base  # extra fields
    assert fingerprint_rows("sentiment", [{**sentiment[0], "label": "positive"}, sentiment[1]]) == base  # 1 == positive
    assert fingerprint_rows("sentiment", [sentiment[1], sentiment[0]]) != base  # order: a paired test needs it
    assert fingerprint_rows("sentiment", [{**sentiment[0], "label": 0}, sentiment[1]]) != base  # another reference
    assert fingerprint_rows("sentiment", sentiment[:1]) != base


def test_select_rows_takes_the_first_rows_of_each_task():
    selected = select_rows(ROWS * 3, 2)
    assert {task: len(rows) for task, rows in selected.items()} == {"sentiment": 2, "qa": 2, "translate": 2, "lm": 2}
    assert selected["sentiment"] == ROWS[:2]


def test_baselines_score_through_the_evaluator():
    config = EvalConfig(bootstrap_samples=200)
    majority = build_baseline("majority", [{"task": "sentiment", "label": 1}] * 3 + [{"task": "sentiment", "label": 0}])
    report = evaluate_model(majority, ROWS, config)
    assert report.metrics["sentiment_accuracy"] == 0.5 and report.skipped_tasks.keys() == {"qa", "translate", "lm"}
    assert first_sentence("Ada lives in Oslo. She is a pilot.") == "Ada lives in Oslo."
    qa = evaluate_model(build_baseline("first-sentence"), ROWS, config)
    # "Ada lives in Oslo." vs "Oslo": precision 1/4, recall 1 -> F1 0.4
    assert qa.metrics["qa_f1"] == pytest.approx(0.4) and qa.metrics["qa_exact_match"] == 0
    copy = evaluate_model(build_baseline("copy-source"), ROWS, config)
    assert copy.predictions["translate"] == ["the dog sleeps."]
    with pytest.raises(ValueError, match="unknown baseline"):
        build_baseline("oracle")


def test_report_round_trips_and_carries_per_example_scores():
    report = evaluate_model(build_baseline("copy-source"), ROWS * 4, EvalConfig(bootstrap_samples=200), split="test")
    again = EvalReport.from_json(report.to_json())
    assert again.summary() == report.summary() and again.split == "test"
    assert again.metric_stats("translation_bleu").shape == (4, 10)  # sacrebleu's statistics per sentence
    flat = report.flat_metrics()
    assert flat["translate_examples"] == 4 and "translation_chrf_ci_low" in flat


@pytest.fixture(scope="module")
def tiny_lm():
    from raylm.data.demo import generate_demo_corpus
    from raylm.data.formatting import format_example
    from raylm.data.tokenizer import special_token_ids, train_bpe_tokenizer
    from raylm.inference.engine import Engine
    from raylm.models.registry import build_model

    corpus = generate_demo_corpus(seed=0, num_train=100, num_dev=10)
    tokenizer = train_bpe_tokenizer((p + a for p, a in map(format_example, corpus["train"])), vocab_size=400)
    model = build_model(ModelConfig(size="debug"), len(tokenizer), 128, special_token_ids(tokenizer))
    return Engine(model, tokenizer)


def test_text_losses_equal_the_models_own_loss_on_each_text(tiny_lm):
    texts = [{"task": "lm", "text": "the big dog sees the red ball"}, {"task": "lm", "text": "a cat"}]
    losses = text_losses(tiny_lm, texts, batch_size=2)  # padded together in one batch
    from raylm.data.formatting import format_example

    for row, (loss_sum, count) in zip(texts, losses):
        prompt, answer = format_example(row)
        tokenizer = tiny_lm.tokenizer
        prompt_ids = [tokenizer.eos_token_id, *tokenizer(prompt, add_special_tokens=False)["input_ids"]]
        ids = prompt_ids + tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        labels = [-100] * len(prompt_ids) + ids[len(prompt_ids):]
        with torch.no_grad():
            out = tiny_lm.model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels]))
        assert count == len(ids) - len(prompt_ids)
        assert loss_sum / count == pytest.approx(float(out.loss), rel=1e-4)
    # An untrained model is about as unsure as its vocabulary is large.
    report = evaluate_model(tiny_lm, texts, EvalConfig(bootstrap_samples=200))
    assert 0.3 * 400 < report.metrics["lm_perplexity"] < 3 * 400 and not math.isnan(report.metrics["lm_perplexity"])
