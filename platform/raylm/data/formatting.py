"""Task formatting: one place defines each task's prompt and answer text.

A formatted example is a ``(prompt, answer)`` pair. Training puts the loss on
the answer tokens only (plain language-model text has an empty prompt, so every
token counts); serving sends the prompt alone and reads the answer back.
"""

from __future__ import annotations

from typing import Any

from raylm.data.special_tokens import TASK_TOKENS

SENTIMENT_LABELS = ("negative", "positive")

# The raylm fields each task reads; a source maps them to its own columns (DataSourceConfig.fields).
TASK_FIELDS: dict[str, tuple[str, ...]] = {
    "lm": ("text",),
    "sentiment": ("text", "label"),
    "qa": ("context", "question", "answers"),
    "translate": ("source", "target"),
}


class FormatError(ValueError):
    """A row that lacks what its task needs."""


class RowProblem(ValueError):
    """Why one input row is unusable; ``kind`` is a short name used to count problems."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


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


# Instruct checkpoints (a chat template of their own) get each task as one user turn of plain instructions; the
# answer is the assistant's reply. raylm's own models and base checkpoints use the task-token prompts above.
INSTRUCT_PROMPTS = {
    # The question after the review: 0.67 zero-shot on the first 100 SST-2 dev rows for SmolLM2-135M-Instruct,
    # against 0.47 (all positive) with the question first.
    "sentiment": "Review: {text}\n\nIs this movie review positive or negative? Answer with one word.",
    "qa": "Answer the question with the shortest exact phrase copied from the context.\n\nContext: {context}\n"
          "Question: {question}",
    "translate": "Translate this English sentence into German. Reply with the German sentence only.\n\n"
                 "English: {source}",
}


def instruct_messages(task: str, **fields: str) -> list[dict[str, str]]:
    """The chat messages that ask an instruct checkpoint for ``task`` on ``fields`` (stripped)."""
    content = INSTRUCT_PROMPTS[task].format(**{name: value.strip() for name, value in fields.items()})
    return [{"role": "user", "content": content}]


def instruct_example(row: dict[str, Any]) -> tuple[list[dict[str, str]], str]:
    """``(messages, answer)`` of a task row for an instruct checkpoint: the user turn the engine sends
    (:func:`instruct_messages`) and the reply to train on. A sentiment reply is the label word (the engine
    scores the reply's first word) and a translation the German sentence; an extractive answer keeps the
    leading space of raylm's format, because the engine decodes it as a span of ``" " + context``'s tokens."""
    task = row.get("task")
    _, answer = format_example(row)  # checks the fields
    if task == "sentiment":
        return instruct_messages(task, text=row["text"]), answer.strip()
    if task == "qa":
        return instruct_messages(task, context=row["context"], question=row["question"]), answer
    if task == "translate":
        return instruct_messages(task, source=row["source"]), answer.strip()
    raise FormatError(f"task {task!r} has no instruct prompt")


# The chat format of raylm models (a Jinja template, as transformers' apply_chat_template takes it):
# plain-text turns after the language-model task token, the assistant's turn cued by "Assistant:".
# export_model writes it into every model folder; the engine stops a reply where the next turn would start.
CHAT_TEMPLATE = (
    "{{ '" + TASK_TOKENS["lm"] + "' }}"
    "{%- for message in messages -%}"
    "{%- if message['role'] in ('system', 'developer') -%}{{ message['content'] | trim }}{{ '\\n' }}"
    "{%- elif message['role'] == 'user' -%}{{ 'User: ' }}{{ message['content'] | trim }}{{ '\\n' }}"
    "{%- elif message['role'] == 'assistant' -%}{{ 'Assistant: ' }}{{ message['content'] | trim }}{{ '\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'Assistant:' }}{%- endif -%}"
)
CHAT_STOP_SEQUENCES = ("\nUser:", "\nAssistant:")


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


def _require_text(value: Any, field: str, column: str) -> str:
    if value is None:
        raise RowProblem("missing_field", f"missing field {column!r}" + (f" (for {field})" if column != field else ""))
    if not isinstance(value, str):
        raise RowProblem("invalid_value", f"field {column!r} is not a string")
    return value


def canonical_row(record: dict[str, Any], task: str, fields: dict[str, str] | None = None) -> dict[str, Any]:
    """Map a source record to raylm's row for ``task`` (the shape the demo corpus has).

    ``fields`` maps raylm field names to the record's column names. The result
    always passes :func:`format_example`; anything that would not raises
    :class:`RowProblem` with a kind: ``missing_field``, ``empty_document`` or
    ``invalid_value``.
    """
    fields = fields or {}

    def get(name: str) -> tuple[Any, str]:
        column = fields.get(name, name)
        return record.get(column), column

    if task == "lm":
        value, column = get("text")
        text = _require_text(value, "text", column)
        if not text.strip():
            raise RowProblem("empty_document", f"field {column!r} is empty")
        return {"task": "lm", "text": text}
    if task == "sentiment":
        value, column = get("text")
        text = _require_text(value, "text", column)
        if not text.strip():
            raise RowProblem("empty_document", f"field {column!r} is empty")
        label, label_column = get("label")
        if label is None:
            raise RowProblem("missing_field", f"missing field {label_column!r}")
        try:
            label_word = normalize_label(label)
        except FormatError as err:
            raise RowProblem("invalid_value", str(err)) from None
        return {"task": "sentiment", "text": text, "label": label_word}
    if task == "qa":
        row: dict[str, Any] = {"task": "qa"}
        for name in ("context", "question"):
            value, column = get(name)
            row[name] = _require_text(value, name, column)
            if not row[name].strip():
                raise RowProblem("empty_document", f"field {column!r} is empty")
        answers, column = get("answers")
        if answers is None:
            raise RowProblem("missing_field", f"missing field {column!r}")
        if isinstance(answers, dict):
            texts = answers.get("text")
            starts = answers.get("answer_start")
        else:
            texts, starts = answers, None
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, (list, tuple)) or not texts or not all(isinstance(t, str) for t in texts) \
                or not str(texts[0]).strip():
            raise RowProblem("invalid_value", f"field {column!r} has no answer text")
        texts = [str(t) for t in texts]
        if isinstance(starts, (list, tuple)) and len(starts) == len(texts):
            starts = [int(s) for s in starts]
        else:
            starts = [row["context"].find(t) for t in texts]
        row["answers"] = {"text": texts, "answer_start": starts}
        return row
    if task == "translate":
        row = {"task": "translate"}
        for name in ("source", "target"):
            value, column = get(name)
            row[name] = _require_text(value, name, column)
            if not row[name].strip():
                raise RowProblem("empty_document", f"field {column!r} is empty")
        return row
    raise RowProblem("invalid_value", f"unknown task {task!r}")


def example_text(row: dict[str, Any]) -> str:
    """The model-visible text of a row (prompt and answer), as the tokenizer is trained on it."""
    prompt, answer = format_example(row)
    return prompt + answer


def example_key(row: dict[str, Any]) -> str:
    """What makes two rows the same example: the model-visible input of the row (its task and text)."""
    task = row.get("task")
    if task == "qa":
        return f"qa|{row['context']}|{row['question']}"
    if task == "translate":
        return f"translate|{row['source']}"
    return f"{task}|{row.get('text')}"
