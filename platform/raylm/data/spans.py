"""Extractive QA for encoders: question + context windows, span labels, and span decoding.

One encoding serves training and inference alike, so a span head is trained on
exactly the inputs it later sees. A row becomes one or more windows
``[CLS] question [SEP] context-part [SEP]`` of ``max_length`` tokens; a context
too long for one window is split into overlapping parts (``stride`` tokens of
overlap), as in the SQuAD recipes for BERT. A window's label is the (start,
end) token position of the gold answer, or (0, 0), the [CLS] position, when
the answer is not inside that window. At inference the best-scoring span over
all windows of a row (start logit + end logit, start <= end, at most
``max_answer_tokens`` long, inside the context) is mapped back to characters of
the context through the tokenizer's offsets.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

DEFAULT_STRIDE = 128
DEFAULT_MAX_ANSWER_TOKENS = 30


def encode_windows(tokenizer, questions: Sequence[str], contexts: Sequence[str], max_length: int,
                   stride: int = DEFAULT_STRIDE):
    """Tokenize question/context pairs into padded windows (a fast tokenizer's ``BatchEncoding``).

    The result has ``overflow_to_sample_mapping`` (window -> row), ``offset_mapping``
    and ``sequence_ids(window)`` (0 question, 1 context, None special/padding).
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("extractive QA needs a fast tokenizer (it maps tokens back to characters)")
    stride = min(stride, max_length // 4)
    return tokenizer(
        [question.strip() for question in questions], list(contexts), truncation="only_second",
        max_length=max_length, stride=stride, return_overflowing_tokens=True, return_offsets_mapping=True,
        padding="max_length",
    )


def span_labels(encoding, answer_starts: Sequence[int], answer_texts: Sequence[str]) -> np.ndarray:
    """(start, end) token positions of each window's answer; (0, 0) when the window does not hold it."""
    labels = np.zeros((len(encoding["input_ids"]), 2), dtype=np.int64)
    for window, row in enumerate(encoding["overflow_to_sample_mapping"]):
        start_char = int(answer_starts[row])
        end_char = start_char + len(answer_texts[row])
        sequence_ids = encoding.sequence_ids(window)
        offsets = encoding["offset_mapping"][window]
        context = [i for i, sid in enumerate(sequence_ids) if sid == 1]
        if not context or start_char < 0:
            continue
        first, last = context[0], context[-1]
        if offsets[first][0] > start_char or offsets[last][1] < end_char:
            continue  # the answer is not (wholly) inside this window
        start = first
        while start <= last and offsets[start][1] <= start_char:
            start += 1
        end = last
        while end >= first and offsets[end][0] >= end_char:
            end -= 1
        if start <= end:
            labels[window] = (start, end)
    return labels


def tokenize_span_rows(rows: Sequence[dict[str, Any]], tokenizer, max_length: int,
                       stride: int = DEFAULT_STRIDE) -> dict[str, np.ndarray]:
    """QA rows (raylm's ``qa`` shape) -> fixed-length windows with span labels; ValueError names a bad row."""
    questions, contexts, starts, texts = [], [], [], []
    for index, row in enumerate(rows):
        answers = row.get("answers") or {}
        answer_texts, answer_starts = answers.get("text") or [], answers.get("answer_start") or []
        if not isinstance(row.get("context"), str) or not isinstance(row.get("question"), str):
            raise ValueError(f"row {index}: needs 'context' and 'question' strings")
        if not answer_texts or not answer_starts:
            raise ValueError(f"row {index}: needs an answer with its answer_start")
        start = int(answer_starts[0])
        if start < 0 or row["context"][start:start + len(answer_texts[0])] != answer_texts[0]:
            found = row["context"].find(answer_texts[0])
            if found < 0:
                raise ValueError(f"row {index}: the answer {answer_texts[0]!r} is not in its context")
            start = found
        questions.append(row["question"])
        contexts.append(row["context"])
        starts.append(start)
        texts.append(answer_texts[0])
    if not questions:
        raise ValueError("no rows to tokenize")
    encoding = encode_windows(tokenizer, questions, contexts, max_length, stride)
    arrays = {
        "input_ids": np.asarray(encoding["input_ids"], dtype=np.int64),
        "attention_mask": np.asarray(encoding["attention_mask"], dtype=np.int64),
        "labels": span_labels(encoding, starts, texts),
    }
    if "token_type_ids" in encoding:
        arrays["token_type_ids"] = np.asarray(encoding["token_type_ids"], dtype=np.int64)
    return arrays


def best_spans(encoding, start_logits: np.ndarray, end_logits: np.ndarray, contexts: Sequence[str],
               max_answer_tokens: int = DEFAULT_MAX_ANSWER_TOKENS) -> list[tuple[str, float]]:
    """The best (answer text, score) per row over all its windows; ("", -inf) when no span is valid."""
    best: list[tuple[str, float]] = [("", float("-inf"))] * len(contexts)
    for window, row in enumerate(encoding["overflow_to_sample_mapping"]):
        sequence_ids = encoding.sequence_ids(window)
        offsets = encoding["offset_mapping"][window]
        in_context = np.array([sid == 1 for sid in sequence_ids])
        if not in_context.any():
            continue
        starts = np.where(in_context, start_logits[window], -np.inf)
        ends = np.where(in_context, end_logits[window], -np.inf)
        # scores[i, j] = start i + end j for i <= j < i + max_answer_tokens.
        scores = starts[:, None] + ends[None, :]
        positions = np.arange(len(starts))
        allowed = (positions[None, :] >= positions[:, None]) & (positions[None, :] < positions[:, None]
                                                                  + max_answer_tokens)
        scores = np.where(allowed, scores, -np.inf)
        flat = int(np.argmax(scores))
        start, end = divmod(flat, scores.shape[1])
        score = float(scores[start, end])
        if score > best[row][1]:
            best[row] = (contexts[row][offsets[start][0]:offsets[end][1]], score)
    return best
