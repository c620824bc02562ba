"""Batched inference over a trained model folder: greedy generation and label scoring.

The engine is the one piece of inference code: the evaluator and the Serve
deployments both call it, so what is measured is what is served.
"""

from __future__ import annotations

import inspect
import json
import threading
from pathlib import Path
from typing import Sequence

import torch

from raylm.data.formatting import SENTIMENT_LABELS, qa_prompt, sentiment_prompt, translate_prompt


class Engine:
    """Holds a causal LM and its tokenizer; all methods take and return batches."""

    def __init__(self, model, tokenizer, max_new_tokens: int = 64, device: str = "cpu"):
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.device = device
        self.max_new_tokens = max_new_tokens
        self.max_positions = getattr(model.config, "n_positions", None) or getattr(
            model.config, "max_position_embeddings", 1024
        )
        # transformers 5 renamed the key/value cache argument from past_key_values to cache.
        self._cache_kwarg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        # A torch module is not safe to run from several threads at once.
        self._lock = threading.Lock()

    @classmethod
    def from_directory(cls, path: str | Path, max_new_tokens: int = 64, device: str = "cpu") -> "Engine":
        """Load a raylm model folder (safetensors weights, tokenizer, raylm.json)."""
        from transformers import AutoModelForCausalLM

        from raylm.data.tokenizer import load_tokenizer

        folder = Path(path)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"not a model folder (no config.json): {folder}")
        model = AutoModelForCausalLM.from_pretrained(
            folder, local_files_only=True, trust_remote_code=False, use_safetensors=True
        )
        tokenizer = load_tokenizer(folder)
        return cls(model, tokenizer, max_new_tokens=max_new_tokens, device=device)

    def _encode(self, prompts: Sequence[str], reserve: int) -> list[list[int]]:
        eos = self.tokenizer.eos_token_id
        encoded = self.tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
        limit = self.max_positions - reserve - 1
        # Keep the end of an over-long prompt: the question and the answer cue live there.
        return [[eos, *ids[-limit:]] for ids in encoded]

    def _left_pad(self, sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(seq) for seq in sequences)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(sequences), width), pad, dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, seq in enumerate(sequences):
            ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
            mask[row, width - len(seq) :] = 1
        return ids.to(self.device), mask.to(self.device)

    @torch.inference_mode()
    def generate(self, prompts: Sequence[str], max_new_tokens: int | None = None,
                 spans_of: Sequence[str] | None = None) -> list[str]:
        """Greedy-decode a continuation of each prompt, stopping at end-of-text or a newline.

        With ``spans_of`` (one text per prompt), decoding is constrained so that the
        output is a contiguous span of that text's tokens: extractive answers can
        only quote the passage, never invent a value that is not in it.
        """
        if not prompts:
            return []
        sources = None
        if spans_of is not None:
            sources = self.tokenizer([" " + text.strip() for text in spans_of], add_special_tokens=False)["input_ids"]
        budget = min(max_new_tokens or self.max_new_tokens, self.max_positions // 2)
        input_ids, attention_mask = self._left_pad(self._encode(prompts, reserve=budget))
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        eos = self.tokenizer.eos_token_id
        finished = torch.zeros(len(prompts), dtype=torch.bool, device=self.device)
        generated: list[list[int]] = [[] for _ in prompts]
        past = None
        step_ids, step_positions, step_mask = input_ids, position_ids, attention_mask
        with self._lock:
            for _ in range(budget):
                out = self.model(
                    input_ids=step_ids,
                    attention_mask=step_mask,
                    position_ids=step_positions,
                    use_cache=True,
                    **{self._cache_kwarg: past},
                )
                past = getattr(out, self._cache_kwarg)
                logits = out.logits[:, -1, :]
                if sources is not None:
                    logits = logits + _span_mask(sources, generated, logits.shape[-1], eos).to(logits.device)
                next_ids = logits.argmax(dim=-1)
                for row, token in enumerate(next_ids.tolist()):
                    if not finished[row]:
                        if token == eos:
                            finished[row] = True
                        else:
                            generated[row].append(token)
                if bool(finished.all()):
                    break
                step_ids = next_ids.unsqueeze(-1)
                step_positions = step_positions[:, -1:] + 1
                step_mask = torch.cat([step_mask, torch.ones_like(step_ids)], dim=-1)
        texts = self.tokenizer.batch_decode(generated, skip_special_tokens=True)
        return [text.split("\n", 1)[0].strip() for text in texts]

    @torch.inference_mode()
    def score_choices(self, prompts: Sequence[str], choices: Sequence[str]) -> list[list[float]]:
        """Return, for each prompt, the probability of each choice (normalised over the choices)."""
        if not prompts:
            return []
        choice_ids = [self.tokenizer(" " + choice, add_special_tokens=False)["input_ids"] for choice in choices]
        longest = max(len(ids) for ids in choice_ids)
        encoded = self._encode(prompts, reserve=longest)
        sequences, spans = [], []
        for prompt_ids in encoded:
            for ids in choice_ids:
                sequences.append([*prompt_ids, *ids])
                spans.append(len(ids))
        input_ids, attention_mask = self._left_pad(sequences)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        with self._lock:
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        totals = []
        for row, span in enumerate(spans):
            targets = input_ids[row, -span:]
            predicted = log_probs[row, -span - 1 : -1, :]
            totals.append(predicted.gather(-1, targets.unsqueeze(-1)).sum().item())
        scores = torch.tensor(totals).view(len(prompts), len(choices))
        return torch.softmax(scores, dim=-1).tolist()

    # ----------------------------------------------------------------- task adapters

    def classify_sentiment(self, texts: Sequence[str]) -> list[dict]:
        probabilities = self.score_choices([sentiment_prompt(text) for text in texts], SENTIMENT_LABELS)
        results = []
        for probs in probabilities:
            best = max(range(len(SENTIMENT_LABELS)), key=lambda index: probs[index])
            results.append({"label": SENTIMENT_LABELS[best], "score": round(probs[best], 6)})
        return results

    def answer_questions(self, contexts: Sequence[str], questions: Sequence[str],
                         max_new_tokens: int | None = None) -> list[str]:
        prompts = [qa_prompt(context, question) for context, question in zip(contexts, questions)]
        return self.generate(prompts, max_new_tokens=max_new_tokens or 16, spans_of=contexts)

    def translate(self, sources: Sequence[str], max_new_tokens: int | None = None) -> list[str]:
        return self.generate([translate_prompt(source) for source in sources], max_new_tokens=max_new_tokens)


def _span_mask(sources: list[list[int]], generated: list[list[int]], vocab_size: int, eos: int) -> torch.Tensor:
    """Additive logit mask allowing only tokens that keep each output a span of its source."""
    mask = torch.full((len(sources), vocab_size), float("-inf"))
    for row, (source, prefix) in enumerate(zip(sources, generated)):
        k = len(prefix)
        if k == 0:
            allowed = set(source)
        else:
            allowed = {source[i + k] for i in range(len(source) - k) if source[i : i + k] == prefix}
            allowed.add(eos)
        allowed.discard(-1)
        mask[row, [token for token in allowed if token < vocab_size]] = 0.0
    return mask


def read_model_card(path: str | Path) -> dict:
    card = Path(path) / "raylm.json"
    return json.loads(card.read_text()) if card.is_file() else {}
