"""The decoder engine on a tiny real model: batching, budgets, stops, sampling, log-probabilities, streaming,
span constraints, scoring; and the loader that picks a TaskModel implementation from a model folder."""

from __future__ import annotations

import json

import pytest
import torch

from raylm.inference.task_model import (
    GenerationRequest,
    InputError,
    ModelLoadError,
    SamplingParams,
    TaskModel,
    UnsupportedTaskError,
    load_task_model,
    model_kind,
)
from tests.model_folders import build_tiny_model_folder

PROMPTS = ["the dog", "a long prompt about the red ball and the big cat that sees it", "hi",
           "Anna lives in Oslo.", "translate this please"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_tiny_model_folder(tmp_path_factory.mktemp("engine") / "model", seq_len=128)


@pytest.fixture(scope="module")
def engine(folder):
    torch.manual_seed(0)
    from raylm.inference.engine import Engine

    return Engine.from_directory(folder, max_new_tokens=12)


def greedy(max_tokens, **extra):
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, **extra)


def test_batched_greedy_equals_one_by_one_and_transformers_generate(engine):
    budgets = [3, 9, 5, 12, 1]
    batch = engine.generate([GenerationRequest(p, greedy(b)) for p, b in zip(PROMPTS, budgets)])
    for prompt, budget, result in zip(PROMPTS, budgets, batch):
        alone = engine.generate([GenerationRequest(prompt, greedy(budget))])[0]
        assert result.text == alone.text and result.completion_tokens == alone.completion_tokens
        ids = torch.tensor([[engine.eos_id, *engine.tokenizer(prompt, add_special_tokens=False)["input_ids"]]])
        with torch.inference_mode():
            out = engine.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=budget,
                                        do_sample=False, eos_token_id=engine.eos_id, pad_token_id=engine.pad_id)
        expected = [t for t in out[0, ids.shape[1]:].tolist() if t != engine.pad_id]
        produced = expected[:-1] if expected and expected[-1] == engine.eos_id else expected
        assert result.text == engine.tokenizer.decode(produced, skip_special_tokens=True)


def test_per_row_budgets_and_finish_reasons(engine):
    results = engine.generate([GenerationRequest("the dog", greedy(budget)) for budget in (1, 4, 11)])
    for budget, result in zip((1, 4, 11), results):
        assert result.completion_tokens <= budget
        assert result.finish_reason == ("length" if result.completion_tokens == budget else "stop")
        assert result.prompt_tokens == engine.count_tokens("the dog")


def test_stop_sequences_cut_the_text_in_results_and_streams(engine):
    free = engine.generate([GenerationRequest("the dog", greedy(12))])[0].text
    assert len(free) > 4, "the tiny model must produce some text"
    stop = free[2:4]
    request = GenerationRequest("the dog", greedy(12, stop=(stop,)))
    stopped = engine.generate([request])[0]
    assert stopped.text == free[: free.index(stop)] and stopped.finish_reason == "stop"
    streamed, seen = "", []
    for step in engine.stream([request]):
        if step[0] is not None:
            streamed += step[0].text
            seen.append(streamed)
    assert streamed == stopped.text and all(stop not in text for text in seen)


def test_stream_concatenates_to_generate_with_echo(engine):
    requests = [GenerationRequest(p, SamplingParams(max_tokens=7, temperature=0.9, seed=3), echo=True)
                for p in PROMPTS[:3]]
    expected = engine.generate(requests)
    texts, finishes = ["", "", ""], [None, None, None]
    for step in engine.stream(requests):
        for index, delta in enumerate(step):
            if delta is not None:
                texts[index] += delta.text
                finishes[index] = delta.finish_reason or finishes[index]
    assert texts == [result.text for result in expected]
    assert all(text.startswith(prompt) for text, prompt in zip(texts, PROMPTS))
    assert finishes == [result.finish_reason for result in expected]


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(engine):
    def sampled(seed, **extra):
        return GenerationRequest("the cat", SamplingParams(max_tokens=12, temperature=1.0, seed=seed, **extra))

    alone = engine.generate([sampled(5)])[0].text
    in_batch = engine.generate([sampled(1), sampled(5), GenerationRequest("x", greedy(3))])[1].text
    assert alone == in_batch
    assert len({engine.generate([sampled(seed)])[0].text for seed in range(6)}) > 1
    greedy_text = engine.generate([GenerationRequest("the cat", greedy(12))])[0].text
    # top_k=1 and a tiny top_p leave only the most likely token: sampling then is greedy decoding.
    assert engine.generate([sampled(9, top_k=1)])[0].text == greedy_text
    assert engine.generate([sampled(9, top_p=1e-6)])[0].text == greedy_text


def test_logprobs_are_the_models_log_probabilities(engine):
    result = engine.generate([GenerationRequest("the dog", greedy(6, logprobs=3))])[0]
    assert len(result.logprobs) == result.completion_tokens - (1 if result.finish_reason == "stop" else 0)
    prompt = [engine.eos_id, *engine.tokenizer("the dog", add_special_tokens=False)["input_ids"]]
    tokens = [entry.token_id for entry in result.logprobs]
    with torch.inference_mode():
        logits = engine.model(torch.tensor([prompt + tokens])).logits[0].float()
    log_probs = torch.log_softmax(logits, dim=-1)
    for position, entry in enumerate(result.logprobs):
        row = log_probs[len(prompt) - 1 + position]
        assert entry.logprob == pytest.approx(row[entry.token_id].item(), abs=1e-4)
        assert len(entry.top) == 3 and entry.top[0][1] == pytest.approx(row.max().item(), abs=1e-4)
        assert entry.top[0][0] == entry.token  # greedy: the chosen token is the most likely one


def test_extractive_answers_are_spans_of_the_context(engine):
    contexts = ["Anna lives in Oslo. Ben works as a baker.", "The favorite color of Carl is green.",
                "Dora plays the piano every day."]
    answers = engine.answer_questions(contexts, ["Where does Anna live?", "What color?", "What does Dora play?"])
    assert all(answer in context for answer, context in zip(answers, contexts))


def test_sentiment_scores_batch_like_single(engine):
    texts = ["a fine film", "dull and long", "the acting was truly wonderful"]
    batch = engine.classify_sentiment(texts)
    singles = [engine.classify_sentiment([text])[0] for text in texts]
    assert [r["label"] for r in batch] == [r["label"] for r in singles]
    assert [r["score"] for r in batch] == pytest.approx([r["score"] for r in singles], abs=1e-5)
    assert all(0.5 <= r["score"] <= 1.0 for r in batch)


def test_choice_scores_are_the_models_probabilities_of_each_choice(engine):
    """Single-token choices take the one-pass path, longer ones the prompt + choice path: both must give the
    model's own probabilities of the choice tokens after the prompt, renormalised over the choices."""
    import math

    prompts = ["Review: a dull and lifeless film\nSentiment:", "Review: great\nSentiment:"]

    def expected(prompt, choices):
        totals = []
        for choice in choices:
            prompt_ids = [engine.eos_id, *engine._encode_texts([prompt])[0]]
            choice_ids = engine._encode_texts([" " + choice])[0]
            ids = torch.tensor([[*prompt_ids, *choice_ids]])
            with torch.inference_mode():
                log_probs = torch.log_softmax(engine.model(input_ids=ids).logits[0].float(), dim=-1)
            totals.append(sum(float(log_probs[len(prompt_ids) - 1 + k, token]) for k, token in enumerate(choice_ids)))
        weights = [math.exp(total - max(totals)) for total in totals]
        return [weight / sum(weights) for weight in weights]

    single = [choice for choice in ("a", "b", "c") if len(engine._encode_texts([" " + choice])[0]) == 1]
    multi = ["positive sentiment overall", "negative"]
    assert len(single) >= 2 and len(engine._encode_texts([" " + multi[0]])[0]) > 1
    for choices in (single, multi):
        scores = engine.score_choices(prompts, choices)
        for prompt, row in zip(prompts, scores):
            assert row == pytest.approx(expected(prompt, choices), rel=1e-3, abs=1e-30)
        margins = [math.log(row[0]) - math.log(row[1]) for row in scores]
        assert abs(margins[0] - margins[1]) > 1e-2  # the prompt matters


def test_requests_that_cannot_fit_are_refused_before_batching(engine):
    with pytest.raises(InputError) as too_long:
        engine.check_generation(GenerationRequest("the dog", greedy(engine.max_positions)))
    assert too_long.value.code == "context_length_exceeded"
    with pytest.raises(InputError, match="vocabulary"):
        engine.check_generation(GenerationRequest((1, engine.vocab_size + 5), greedy(2)))
    assert engine.check_generation(GenerationRequest("the dog", greedy(4))) == engine.count_tokens("the dog")
    # The task adapters keep the end of an over-long prompt instead of refusing it.
    long_text = "the dog sees the cat. " * 200
    assert isinstance(engine.translate([long_text])[0], str)


def test_chat_template_comes_from_the_folder(engine):
    prompt = engine.render_chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}])
    assert prompt == "<|lm|>Be brief.\nUser: hi\nAssistant:"


def test_loader_picks_the_implementation_from_the_folder(folder, tmp_path):
    from raylm.inference.engine import Engine

    assert model_kind(folder) == "causal_lm"
    model = load_task_model(folder, name="served")
    assert isinstance(model, Engine) and model.name == "served" and model.supports("chat")
    assert load_task_model(folder).name == "tiny-served-model"  # the run id in raylm.json

    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["WhisperForConditionalGeneration"]}))
    with pytest.raises(ModelLoadError, match="cannot tell what kind"):
        model_kind(tmp_path)
    (tmp_path / "raylm.json").write_text(json.dumps({"kind": "diffusion"}))
    with pytest.raises(ModelLoadError, match="diffusion"):
        model_kind(tmp_path)
    with pytest.raises(FileNotFoundError):
        load_task_model(tmp_path / "missing")


def test_unsupported_task_names_what_the_model_does():
    class SentimentOnly(TaskModel):
        kind = "test"
        supported_tasks = frozenset({"sentiment"})

        @classmethod
        def from_directory(cls, folder, options=None):
            return cls()

    model = SentimentOnly()
    model.name = "clf"
    with pytest.raises(UnsupportedTaskError, match=r"'clf' does not support task 'translate' \(it supports: sentiment\)"):
        model.translate(["hello"])
    with pytest.raises(UnsupportedTaskError):
        model.require("chat")
    assert model.describe() == {"id": "clf", "kind": "test", "tasks": ["sentiment"]}


def test_exported_model_folders_carry_the_chat_template(folder, tmp_path):
    from raylm.data.formatting import CHAT_TEMPLATE
    from raylm.data.tokenizer import load_tokenizer
    from raylm.train.checkpoint import STATE_FILE
    from raylm.train.driver import export_model

    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    for name in ("config.json", "model.safetensors"):
        (checkpoint / name).write_bytes((folder / name).read_bytes())
    (checkpoint / STATE_FILE).write_text(json.dumps({"step": 3}))
    tokenizer = load_tokenizer(folder)
    tokenizer.chat_template = None
    exported = export_model(checkpoint, tokenizer, tmp_path / "exported",
                            {"config": {"model": {"task": "causal_lm"}}})
    assert load_tokenizer(exported).chat_template == CHAT_TEMPLATE


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_bf16_engine_matches_cpu_closely(folder):
    """What a GPU replica runs (serve.device=cuda, dtype auto -> bf16) against the fp32 CPU engine."""
    from raylm.inference.engine import Engine
    from raylm.inference.task_model import InferenceOptions

    cpu = Engine.from_directory(folder, InferenceOptions(device="cpu", max_new_tokens=8))
    gpu = Engine.from_directory(folder, InferenceOptions(device="cuda", dtype="auto", max_new_tokens=8))
    assert gpu.describe()["dtype"] == "bfloat16" and gpu.describe()["device"].startswith("cuda")
    texts = ["a fine film", "dull and long"]
    assert [r["score"] for r in gpu.classify_sentiment(texts)] == pytest.approx(
        [r["score"] for r in cpu.classify_sentiment(texts)], abs=0.05)
    sampled = [GenerationRequest(p, SamplingParams(max_tokens=8, temperature=0.8, seed=1, logprobs=2)) for p in PROMPTS]
    results = gpu.generate(sampled)
    assert all(0 < r.completion_tokens <= 8 for r in results)
    assert gpu.generate(sampled)[0].text == results[0].text  # seeded on the GPU too
