"""The decoder engine: the task model of every causal LM folder.

The engine is the one piece of inference code for decoder models: the
evaluator and the Serve deployments both call it, so what is measured is what
is served. It implements :class:`~raylm.inference.task_model.TaskModel` for
every task on top of :class:`~raylm.inference.decoder.Decoder`: sentiment by
scoring the label continuations, extractive QA by decoding constrained to
spans of the context, translation and the OpenAI-style completions and chat by
batched decoding. raylm's own models get raylm's task prompts; an instruct
checkpoint (a chat template of its own) gets each task as a user turn.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

from raylm.data.formatting import SENTIMENT_LABELS, instruct_messages, qa_prompt, sentiment_prompt, \
    translate_prompt
from raylm.data.tokenizer import load_tokenizer
from raylm.inference.decoder import Decoder
from raylm.models.lora import is_adapter_folder, load_adapted_model
from raylm.inference.task_model import (
    TASKS,
    GenerationRequest,
    InferenceOptions,
    ModelLoadError,
    SamplingParams,
    TaskModel,
    read_model_card,
)

__all__ = ["Engine", "read_model_card"]

# Extractive answers are short; a longer budget only lets an untrained model ramble inside the passage.
QA_MAX_NEW_TOKENS = 16


class Engine(Decoder, TaskModel):
    """A :class:`Decoder` that answers every task; every method takes and returns batches."""

    kind = "causal_lm"
    supported_tasks = frozenset(TASKS)

    @classmethod
    def from_directory(cls, folder: str | Path, options: Optional[InferenceOptions] = None, *,
                       max_new_tokens: Optional[int] = None, device: Optional[str] = None) -> "Engine":
        """Load a raylm model folder (safetensors weights, tokenizer, raylm.json) per ``options``; a LoRA adapter
        folder (:mod:`raylm.models.lora`) loads as its base model with the adapter merged in."""
        from transformers import AutoModelForCausalLM

        options = options or InferenceOptions()
        if max_new_tokens is not None or device is not None:
            options = InferenceOptions(device=device or options.device, dtype=options.dtype,
                                       max_new_tokens=max_new_tokens or options.max_new_tokens,
                                       num_threads=options.num_threads)
        path = Path(folder)
        adapter = is_adapter_folder(path)
        if not adapter and not (path / "config.json").is_file():
            raise FileNotFoundError(f"not a model folder (no config.json): {path}")
        resolved_device = options.resolved_device()
        try:
            if adapter:  # a LoRA adapter folder: its base with the adapter merged in
                model = load_adapted_model(path, dtype=options.torch_dtype())
            else:
                model = AutoModelForCausalLM.from_pretrained(
                    path, local_files_only=True, trust_remote_code=False, use_safetensors=True,
                    dtype=options.torch_dtype(),
                )
        except (OSError, ValueError) as err:
            raise ModelLoadError(f"cannot load the model in {path.name!r}: {str(err).splitlines()[0]}") from None
        tokenizer = load_tokenizer(path, extend=False)  # as the folder saved it
        return cls(model, tokenizer, max_new_tokens=options.max_new_tokens, device=resolved_device)

    # The base model's id when this engine answers with a LoRA adapter on it (raylm.inference.adapters).
    parent: Optional[str] = None

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "architecture": self.architecture,
                "max_positions": self.max_positions, "device": str(self.device),
                "dtype": str(next(self.model.parameters()).dtype).replace("torch.", ""),
                **({"parent": self.parent} if self.parent else {})}

    # ----------------------------------------------------------------- task adapters

    def _task_prompt(self, task: str, **fields: str) -> str:
        if self.instruct:
            return self.render_chat(instruct_messages(task, **fields))
        if task == "sentiment":
            return sentiment_prompt(fields["text"])
        return qa_prompt(fields["context"], fields["question"]) if task == "qa" else translate_prompt(fields["source"])

    def classify_sentiment(self, texts: Sequence[str]) -> list[dict]:
        prompts = [self._task_prompt("sentiment", text=text) for text in texts]
        if self.instruct:
            # The reply's first word, in either case: the two spellings of a label add up.
            scores = self.score_choices(prompts, [*SENTIMENT_LABELS, *(label.title() for label in SENTIMENT_LABELS)],
                                        lead="")
            probabilities = [[row[i] + row[i + len(SENTIMENT_LABELS)] for i in range(len(SENTIMENT_LABELS))]
                             for row in scores]
        else:
            probabilities = self.score_choices(prompts, SENTIMENT_LABELS)
        results = []
        for probs in probabilities:
            best = max(range(len(SENTIMENT_LABELS)), key=lambda index: probs[index])
            results.append({"label": SENTIMENT_LABELS[best], "score": round(probs[best], 6)})
        return results

    def task_request(self, task: str, budget: Optional[int] = None, **fields: str) -> GenerationRequest:
        """The generation request behind one input of a task route (``qa`` or ``translate``).

        Greedy, first line only, over-long prompts cut from the left; QA is
        constrained to spans of its context. The Serve layer batches these
        with completions, so all generation of a replica shares its batches.
        """
        if task == "qa":
            return GenerationRequest(self._task_prompt("qa", context=fields["context"], question=fields["question"]),
                                     SamplingParams(max_tokens=budget or QA_MAX_NEW_TOKENS, temperature=0.0,
                                                    stop=("\n",)),
                                     span_of=fields["context"], truncate_prompt=True)
        if task == "translate":
            return GenerationRequest(self._task_prompt("translate", source=fields["text"]),
                                     SamplingParams(max_tokens=budget or self.max_new_tokens, temperature=0.0,
                                                    stop=("\n",)),
                                     truncate_prompt=True)
        raise ValueError(f"no generation request for task {task!r}")

    def answer_questions(self, contexts: Sequence[str], questions: Sequence[str],
                         max_new_tokens: Optional[int] = None) -> list[str]:
        requests = [self.task_request("qa", max_new_tokens, context=context, question=question)
                    for context, question in zip(contexts, questions)]
        return [result.text.strip() for result in self.generate(requests)]

    def translate(self, sources: Sequence[str], max_new_tokens: Optional[int] = None) -> list[str]:
        requests = [self.task_request("translate", max_new_tokens, text=source) for source in sources]
        return [result.text.strip() for result in self.generate(requests)]
