"""Task formatting: one place defines each task's prompt and answer text.

A formatted example is a ``(prompt, answer)`` pair. Training puts the loss on
the answer tokens only (plain language-model text has an empty prompt, so every
token counts); serving sends the prompt alone and reads the answer back.
"""

from __future__ import annotations

from typing import Any

from raylm.data.special_tokens import TASK_TOKENS

SENTIMENT_LABELS = ("negative", "positive")


class FormatError(ValueError):
    """A row that lacks what its task needs."""


def _field(row: dict[str, Any], name: str, task: str) -> Any:
    value = row.get(name)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise FormatError(f"{task} row is missing field {name!r}")
    return value


def sentiment_prompt(text: str) -> str:
    return f"{TASK_TOKENS['sentiment']}Review: {text.strip()}\nSentiment:"


def qa_prompt(context: str, question: str) -> str:
    return f"{TASK_TOKENS['qa']}Context: {context.strip()}\nQuestion: {question.strip()}\nAnswer:"


def translate_prompt(source: str) -> str:
    return f"{TASK_TOKENS['translate']}English: {source.strip()}\nGerman:"


def normalize_label(label: Any) -> str:
    """Accept 0/1, "0"/"1" or the label words; return the label word."""
    if isinstance(label, bool):
        label = int(label)
    if isinstance(label, (int, float)) and int(label) in (0, 1):
        return SENTIMENT_LABELS[int(label)]
    text = str(label).strip().lower()
    if text in ("0", "1"):
        return SENTIMENT_LABELS[int(text)]
    if text in SENTIMENT_LABELS:
        return text
    raise FormatError(f"sentiment label {label!r} is not one of 0, 1, negative, positive")


def format_example(row: dict[str, Any]) -> tuple[str, str]:
    """Return ``(prompt, answer)`` for a row whose ``task`` names its kind."""
    task = row.get("task")
    if task == "lm":
        return TASK_TOKENS["lm"], _field(row, "text", task)
    if task == "sentiment":
        return sentiment_prompt(_field(row, "text", task)), " " + normalize_label(_field(row, "label", task))
    if task == "qa":
        answers = _field(row, "answers", task)
        texts = answers.get("text") if isinstance(answers, dict) else answers
        if not texts:
            raise FormatError("qa row has no answer text")
        return qa_prompt(_field(row, "context", task), _field(row, "question", task)), " " + str(texts[0]).strip()
    if task == "translate":
        return translate_prompt(_field(row, "source", task)), " " + _field(row, "target", task).strip()
    raise FormatError(f"unknown task {task!r}")
