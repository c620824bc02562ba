"""Batched decoding and choice scoring over a causal LM and its tokenizer: the core of the engine.

Decoding is written by hand (one batched prefill over left-padded prompts,
then one step per token with a KV cache; rows that finish are dropped from
the batch and its cache) because on this project's models it beats
``transformers.generate`` (``bench/decode_compare.py`` measures both), and
because each row of a batch here has its own budget, sampling settings, seed,
stop strings, log-probabilities and output stream, which one ``generate``
call cannot express. A prompt starts, and a row ends, by the model folder's
conventions (:mod:`raylm.inference.conventions`).
"""

from __future__ import annotations

import inspect
from types import MappingProxyType
from typing import Iterator, Optional, Sequence

import torch
from tokenizers import Tokenizer

from raylm.data.conventions import instruct_template
from raylm.data.formatting import CHAT_STOP_SEQUENCES, CHAT_TEMPLATE
from raylm.inference.conventions import token_conventions
from raylm.inference.decoding import DecodeRow, sample_tokens, span_mask
from raylm.inference.task_model import GenerationRequest, GenerationResult, InputError, StreamDelta, TokenLogprob


class Decoder:
    """Holds a causal LM and its tokenizer; every method takes and returns batches."""

    def __init__(self, model, tokenizer, max_new_tokens: int = 64, device: str = "cpu", dtype=None):
        self.model = model.to(device=device, dtype=dtype).eval() if dtype is not None else model.to(device).eval()
        self.tokenizer = tokenizer
        self.architecture = type(self.model).__name__
        self.device = device
        self.max_new_tokens = max_new_tokens
        self.max_positions = int(getattr(model.config, "n_positions", None)
                                 or getattr(model.config, "max_position_embeddings", 1024))
        self.vocab_size = int(model.config.vocab_size)
        self.eos_id = int(tokenizer.eos_token_id)
        # The prompt prefix, the ids that end a row and the sampling defaults: raylm's own convention for its
        # models, the checkpoint's tokenizer and generation_config for a pretrained one.
        self.conventions = token_conventions(tokenizer, getattr(model, "generation_config", None))
        self._prefix = list(self.conventions.prefix)
        self._stop_ids = self.conventions.stop_ids
        self.sampling_defaults = MappingProxyType(dict(self.conventions.sampling_defaults))
        self.pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
        # The Rust tokenizer directly: decoding every row at every step through the Python wrapper costs more.
        # A copy: calling the wrapper with padding=True leaves padding switched on in its backend.
        self._backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        self._backend.no_padding()
        self._backend.no_truncation()
        self._special_ids = set(tokenizer.all_special_ids)
        self._token_text: dict[int, str] = {}
        self.chat_template = getattr(tokenizer, "chat_template", None) or CHAT_TEMPLATE
        # raylm's template marks turns with text; a checkpoint's template ends a turn with a token (a stop id).
        self.chat_stop_sequences = CHAT_STOP_SEQUENCES if self.conventions.native else ()
        # An instruct checkpoint (its own chat template) gets tasks as a user turn; the others raylm's task format,
        # as data preparation formats them (a base checkpoint's exported folder carries raylm's chat template).
        self.instruct = instruct_template(tokenizer) is not None
        # transformers 5 renamed the key/value cache argument from past_key_values to cache.
        self._cache_kwarg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        # Models that can compute the vocabulary projection for the last position alone.
        self._keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters

    # ----------------------------------------------------------------- tokens

    def _encode_texts(self, texts: Sequence[str]) -> list[list[int]]:
        if not texts:
            return []
        return [encoding.ids for encoding in self._backend.encode_batch(list(texts), add_special_tokens=False)]

    def count_tokens(self, text: str) -> int:
        """Tokens the model sees for ``text`` as a prompt (the prompt prefix included)."""
        return len(self._encode_texts([text])[0]) + len(self._prefix)

    def _decode_ids(self, ids: Sequence[int]) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=True)

    def _token_string(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            text = self._token_text[token_id] = self._backend.decode([token_id], skip_special_tokens=False)
        return text

    def _prompt_ids(self, prompt: str | Sequence[int], encoded: Optional[list[int]] = None) -> list[int]:
        ids = encoded if encoded is not None else (
            self._encode_texts([prompt])[0] if isinstance(prompt, str) else list(prompt))
        return [*self._prefix, *ids]

    def check_generation(self, request: GenerationRequest) -> int:
        """Validate one request before it joins a batch; returns its prompt's token count.

        Raises :class:`InputError` for a prompt that does not fit the context
        with its ``max_tokens`` (OpenAI's ``context_length_exceeded``) or for
        token ids outside the vocabulary, so that one bad row never fails a
        batch of good ones.
        """
        if isinstance(request.prompt, str):
            prompt_tokens = self.count_tokens(request.prompt)
        else:
            bad = [token for token in request.prompt if not 0 <= int(token) < self.vocab_size]
            if bad:
                raise InputError(f"prompt: token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})",
                                 param="prompt", code="invalid_token")
            prompt_tokens = len(request.prompt) + len(self._prefix)
        if not request.truncate_prompt and prompt_tokens + request.params.max_tokens > self.max_positions:
            raise InputError(
                f"this model's context is {self.max_positions} tokens; the prompt has {prompt_tokens} "
                f"and max_tokens asks for {request.params.max_tokens} more",
                param="max_tokens" if prompt_tokens < self.max_positions else "prompt",
                code="context_length_exceeded")
        return prompt_tokens

    def _left_pad(self, sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(seq) for seq in sequences)
        ids = torch.full((len(sequences), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, seq in enumerate(sequences):
            ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
            mask[row, width - len(seq):] = 1
        return ids.to(self.device), mask.to(self.device)

    def _forward(self, input_ids, attention_mask, position_ids, past=None, use_cache=True, last_only=False):
        """Logits (``[rows, positions, vocabulary]``; with ``last_only``, at least the last position) and cache."""
        kwargs = {self._cache_kwarg: past} if use_cache else {}
        if last_only and self._keeps_logits:
            kwargs["logits_to_keep"] = 1
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=use_cache, **kwargs)
        return out.logits, (getattr(out, self._cache_kwarg, None) if use_cache else None)

    # ----------------------------------------------------------------- decoding

    def _start_rows(self, requests: Sequence[GenerationRequest]) -> list[DecodeRow]:
        text_prompts = [request.prompt for request in requests if isinstance(request.prompt, str)]
        encoded = iter(self._encode_texts(text_prompts))
        span_texts = [" " + request.span_of.strip() for request in requests if request.span_of is not None]
        span_sources = iter(self._encode_texts(span_texts))
        rows = []
        for request in requests:
            params = request.params
            ids = self._prompt_ids(request.prompt, next(encoded) if isinstance(request.prompt, str) else None)
            budget = max(1, params.max_tokens)
            if request.truncate_prompt:
                budget = min(budget, self.max_positions // 2)
                # Keep the end of an over-long prompt: the question and the answer cue live there.
                keep = self.max_positions - budget - len(self._prefix)
                if len(ids) > keep + len(self._prefix):
                    ids = [*self._prefix, *ids[len(self._prefix):][-keep:]]
            elif len(ids) + budget > self.max_positions:
                raise InputError(f"prompt of {len(ids)} tokens plus max_tokens {budget} exceeds the model's "
                                 f"context of {self.max_positions}", param="max_tokens",
                                 code="context_length_exceeded")
            generator = None
            if params.temperature > 0:
                generator = torch.Generator(device=self.device)
                if params.seed is not None:
                    generator.manual_seed(params.seed)
                else:
                    generator.seed()
            prefix = ""
            if request.echo:
                prefix = request.prompt if isinstance(request.prompt, str) else self._decode_ids(request.prompt)
            rows.append(DecodeRow(prompt_ids=ids, params=params, budget=budget,
                             span_source=next(span_sources) if request.span_of is not None else None,
                             generator=generator, prefix=prefix))
        return rows

    @torch.inference_mode()
    def stream(self, requests: Sequence[GenerationRequest]) -> Iterator[list[Optional[StreamDelta]]]:
        """Decode a batch step by step; each step yields one entry per request (None once it has ended).

        A row's text is held back while it could still be the start of one of
        its stop strings (or an incomplete UTF-8 character), so that streamed
        text never has to be taken back.
        """
        if not requests:
            return
        rows = self._start_rows(requests)
        if any(row.prefix for row in rows):
            yield [StreamDelta(text=row.prefix) if row.prefix else StreamDelta(text="") for row in rows]
        input_ids, attention_mask = self._left_pad([row.prompt_ids for row in rows])
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        active = list(range(len(rows)))  # row index of each line of the batch tensors
        past = None
        step_ids, step_positions, step_mask = input_ids, position_ids, attention_mask
        while active:
            logits, past = self._forward(step_ids, step_mask, step_positions, past)
            next_ids, chosen_logprobs, top_logprobs = self._choose(logits[:, -1, :].float(),
                                                                   [rows[index] for index in active])
            deltas: list[Optional[StreamDelta]] = [None] * len(rows)
            keep = []
            for line, index in enumerate(active):
                row = rows[index]
                deltas[index] = self._advance(row, next_ids[line], chosen_logprobs, top_logprobs, line)
                if row.finish_reason is None:
                    keep.append(line)
            yield deltas
            if not keep:
                break
            next_column = torch.tensor(next_ids, dtype=torch.long, device=self.device).unsqueeze(-1)
            if len(keep) < len(active):
                # Drop finished rows from the batch and its cache: the rest decode at the smaller size.
                lines = torch.tensor(keep, dtype=torch.long, device=self.device)
                past.batch_select_indices(lines)
                next_column, step_mask, step_positions = next_column[lines], step_mask[lines], step_positions[lines]
                active = [active[line] for line in keep]
            step_ids = next_column
            step_positions = step_positions[:, -1:] + 1
            step_mask = torch.cat([step_mask, torch.ones_like(step_ids)], dim=-1)

    def _choose(self, logits: torch.Tensor, rows: list[DecodeRow]):
        """Pick each row's next token: greedy, or sampled with its temperature / top-k / top-p / seed."""
        want_logprobs = [row.params.logprobs is not None for row in rows]
        log_probs = torch.log_softmax(logits, dim=-1) if any(want_logprobs) else None
        span_lines = [line for line, row in enumerate(rows) if row.span_source is not None]
        if span_lines:
            mask = span_mask([rows[line].span_source for line in span_lines],
                              [rows[line].generated for line in span_lines], logits.shape[-1], self.eos_id)
            logits[span_lines] += mask.to(logits.device)
        chosen = logits.argmax(dim=-1)
        sampled_lines = [line for line, row in enumerate(rows) if row.params.temperature > 0]
        if sampled_lines:
            chosen = chosen.clone()
            chosen[sampled_lines] = sample_tokens([rows[line] for line in sampled_lines], logits[sampled_lines])
        next_ids = chosen.tolist()
        chosen_logprobs = top = None
        if log_probs is not None:
            chosen_logprobs = log_probs.gather(-1, chosen.unsqueeze(-1)).squeeze(-1).tolist()
            most = max(row.params.logprobs or 0 for row in rows)
            top = log_probs.topk(most, dim=-1) if most > 0 else None
        return next_ids, chosen_logprobs, top

    def _advance(self, row: DecodeRow, token: int, chosen_logprobs, top_logprobs, line: int) -> StreamDelta:
        """Add ``token`` to ``row``; return the text it makes final, and finish the row if it ended."""
        new_logprobs = []
        if token in self._stop_ids:
            row.finish_reason = "stop"
        else:
            row.generated.append(token)
            if row.params.logprobs is not None:
                top = []
                if top_logprobs is not None and row.params.logprobs > 0:
                    values = top_logprobs.values[line, : row.params.logprobs].tolist()
                    indices = top_logprobs.indices[line, : row.params.logprobs].tolist()
                    top = [(self._token_string(index), value) for index, value in zip(indices, values)]
                entry = TokenLogprob(self._token_string(token), token, chosen_logprobs[line], top)
                row.logprobs.append(entry)
                new_logprobs.append(entry)
            row.text = self._decode_ids(row.generated)
            stops = row.params.stop
            if stops:
                # Only the tail can hold a stop string that was not there one token ago.
                start = max(0, row.emitted - max(len(stop) for stop in stops))
                hits = [position for position in (row.text.find(stop, start) for stop in stops) if position >= 0]
                if hits:
                    row.text = row.text[: min(hits)]
                    row.finish_reason = "stop"
            if row.finish_reason is None and (len(row.generated) >= row.budget
                                               or len(row.prompt_ids) + len(row.generated) >= self.max_positions):
                row.finish_reason = "length"
        if row.finish_reason is None:
            holdback = max((len(stop) for stop in row.params.stop), default=1) - 1
            end = len(row.text) - holdback
            while end > row.emitted and row.text[end - 1] == "\ufffd":
                end -= 1  # an incomplete UTF-8 character: wait for its next byte
            end = max(end, row.emitted)
        else:
            end = len(row.text)
        delta = StreamDelta(text=row.text[row.emitted:end], logprobs=new_logprobs)
        row.emitted = end
        if row.finish_reason is not None:
            delta.finish_reason = row.finish_reason
            delta.prompt_tokens = len(row.prompt_ids)
            delta.completion_tokens = len(row.generated) + (1 if row.finish_reason == "stop"
                                                            and token in self._stop_ids else 0)
        return delta

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Decode a batch to the end; one :class:`GenerationResult` per request, in order."""
        texts = [[] for _ in requests]
        logprobs: list[list[TokenLogprob]] = [[] for _ in requests]
        results: list[Optional[GenerationResult]] = [None] * len(requests)
        for deltas in self.stream(requests):
            for index, delta in enumerate(deltas):
                if delta is None:
                    continue
                texts[index].append(delta.text)
                logprobs[index].extend(delta.logprobs)
                if delta.finished:
                    results[index] = GenerationResult(
                        text="".join(texts[index]), finish_reason=delta.finish_reason,
                        prompt_tokens=delta.prompt_tokens, completion_tokens=delta.completion_tokens,
                        logprobs=logprobs[index] if requests[index].params.logprobs is not None else None)
        return results  # type: ignore[return-value]

    def render_chat(self, messages: Sequence[dict[str, str]]) -> str:
        """The model's chat template applied to ``messages``, ending with the assistant's cue."""
        return self.tokenizer.apply_chat_template(list(messages), chat_template=self.chat_template,
                                                  tokenize=False, add_generation_prompt=True)

    # ----------------------------------------------------------------- scoring

    @torch.inference_mode()
    def score_choices(self, prompts: Sequence[str], choices: Sequence[str], lead: str = " ") -> list[list[float]]:
        """Return, for each prompt, the probability of each choice (after ``lead``; normalised over the
        choices)."""
        if not prompts:
            return []
        choice_ids = self._encode_texts([lead + choice for choice in choices])
        longest = max(len(ids) for ids in choice_ids)
        limit = self.max_positions - longest - len(self._prefix)
        if longest == 1 and all(choice_ids):
            # Every choice is one token: one forward pass over each prompt alone, read at its last position
            # (the same logits as in the prompt + choice sequences below, at half the tokens for two choices).
            prompt_rows = [[*self._prefix, *ids[-limit:]] for ids in self._encode_texts(list(prompts))]
            input_ids, attention_mask = self._left_pad(prompt_rows)
            position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
            logits, _ = self._forward(input_ids, attention_mask, position_ids, use_cache=False, last_only=True)
            log_probs = torch.log_softmax(logits[:, -1, :].float(), dim=-1)
            scores = log_probs[:, torch.tensor([ids[0] for ids in choice_ids], device=log_probs.device)]
            return torch.softmax(scores.cpu(), dim=-1).tolist()
        sequences, spans = [], []
        for prompt_ids in self._encode_texts(list(prompts)):
            prompt_ids = [*self._prefix, *prompt_ids[-limit:]]
            for ids in choice_ids:
                sequences.append([*prompt_ids, *ids])
                spans.append(len(ids))
        input_ids, attention_mask = self._left_pad(sequences)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        logits, _ = self._forward(input_ids, attention_mask, position_ids, use_cache=False)
        # Only the positions that predict a choice token matter; the full-vocabulary softmax is for those alone.
        log_probs = torch.log_softmax(logits[:, -longest - 1: -1, :].float(), dim=-1)
        totals = []
        for row, span in enumerate(spans):
            targets = input_ids[row, -span:]
            predicted = log_probs[row, longest - span:, :]
            totals.append(predicted.gather(-1, targets.unsqueeze(-1)).sum().item())
        scores = torch.tensor(totals).view(len(prompts), len(choices))
        return torch.softmax(scores, dim=-1).tolist()
