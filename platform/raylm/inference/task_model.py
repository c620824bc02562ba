"""What a served model implements, and how a model folder picks its implementation.

Every route of the Serve application, and the evaluator, talk to a model only
through :class:`TaskModel`. A model folder holds one kind of model; the kind is
read from the folder (:func:`model_kind`) and names the class that loads it
(:data:`IMPLEMENTATIONS`):

=========================  ===============================================  ==============================
kind                       how it is recognised                             implementation
=========================  ===============================================  ==============================
``causal_lm``              ``*ForCausalLM`` / ``*LMHeadModel`` architecture  ``raylm.inference.engine:Engine``
``sequence_classification``  ``*ForSequenceClassification``                 ``raylm.inference.encoders:SequenceClassifierModel``
``question_answering``     ``*ForQuestionAnswering``                        ``raylm.inference.encoders:SpanQuestionAnsweringModel``
=========================  ===============================================  ==============================

``raylm.json``'s ``"kind"`` (when present) wins over the architecture in
``config.json``, so a folder can say what it is explicitly.

Implementing a task model (for example an encoder in ``inference/encoders.py``):

1. Subclass :class:`TaskModel`; set the class attribute ``kind`` and
   ``supported_tasks`` (a subset of :data:`TASKS`).
2. Implement ``from_directory(folder, options)`` (load with
   ``local_files_only=True``, ``trust_remote_code=False``, safetensors only; put
   the model on ``options.device`` in ``options.torch_dtype()``; call
   ``model.eval()``), and the task methods of the tasks you support. Each takes
   a *batch* (a list: the Serve layer gathers requests from many callers into
   one call) and returns one result per input, in order.
3. Do not override the methods of tasks you do not support: the base class
   raises :class:`UnsupportedTaskError`, which the HTTP layer turns into a 400
   that names the task and the tasks the model does support. The Serve layer
   checks :meth:`TaskModel.supports` before batching a request, so an
   unsupported task never reaches your code at all.
4. Raise :class:`InputError` for a bad input you can only detect inside the
   model (it becomes a 4xx; any other exception is a 500 and a bug).
5. Methods are called from one worker thread per replica (never concurrently
   on the same object), under ``torch.inference_mode()`` where you put it.

Result shapes (the HTTP layer wraps them, they are not the HTTP responses):

- ``classify_sentiment(texts) -> [{"label": str, "score": float}, ...]``: the
  label (``"negative"`` / ``"positive"``) and its probability.
- ``answer_questions(contexts, questions) -> [str, ...]``: the answer, a span of
  its context (an empty string when there is none).
- ``translate(sources, max_new_tokens=None) -> [str, ...]``.
- ``generate(requests) -> [GenerationResult, ...]`` and ``stream(requests)``
  for ``completions`` and ``chat`` (decoder models; see the dataclasses below).
"""

from __future__ import annotations

import abc
import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar, Iterator, Literal, Mapping, Optional, Sequence

# The tasks a served model may answer: the three task routes and the two OpenAI-style routes.
TASKS: tuple[str, ...] = ("sentiment", "qa", "translate", "completions", "chat")

# kind -> "module:Class". Encoders are implemented in raylm.inference.encoders (issue 12).
IMPLEMENTATIONS: dict[str, str] = {
    "causal_lm": "raylm.inference.engine:Engine",
    "sequence_classification": "raylm.inference.encoders:SequenceClassifierModel",
    "question_answering": "raylm.inference.encoders:SpanQuestionAnsweringModel",
}

# Architecture-name suffixes (config.json "architectures") -> kind.
_ARCHITECTURE_SUFFIXES: tuple[tuple[str, str], ...] = (
    ("ForCausalLM", "causal_lm"),
    ("LMHeadModel", "causal_lm"),
    ("ForSequenceClassification", "sequence_classification"),
    ("ForQuestionAnswering", "question_answering"),
)


class UnsupportedTaskError(Exception):
    """A task the model does not answer (HTTP 400, never a 500)."""

    def __init__(self, task: str, model_name: str, supported: Sequence[str]):
        self.task = task
        self.model_name = model_name
        self.supported = tuple(supported)
        super().__init__(f"model {model_name!r} does not support task {task!r} "
                         f"(it supports: {', '.join(self.supported) or 'nothing'})")


class InputError(ValueError):
    """An input the model cannot take, found inside the model (HTTP 400): e.g. a prompt longer than its context."""

    def __init__(self, message: str, param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.param = param
        self.code = code


class ModelLoadError(ValueError):
    """A folder that is not a model raylm can serve (missing files, unknown kind, bad weights); one line."""


@dataclass(frozen=True)
class InferenceOptions:
    """How to load and run a model: device, dtype and the default generation budget.

    ``device``: ``"cpu"``, ``"cuda"`` (or ``"cuda:N"``) or ``"auto"`` (CUDA when
    available). ``dtype``: ``"auto"`` (bf16 on CUDA, fp32 on CPU), ``"float32"``,
    ``"bfloat16"`` or ``"float16"``.
    """

    device: str = "cpu"
    dtype: str = "auto"
    max_new_tokens: int = 64
    num_threads: Optional[int] = None

    def resolved_device(self) -> str:
        import torch

        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ModelLoadError(f"device {self.device!r} requested but CUDA is not available on this machine")
        return self.device

    def torch_dtype(self):
        import torch

        if self.dtype == "auto":
            return torch.bfloat16 if self.resolved_device().startswith("cuda") else torch.float32
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[self.dtype]


# ------------------------------------------------------------------ generation (decoder models)


@dataclass(frozen=True)
class SamplingParams:
    """How one row is decoded. ``temperature == 0`` is greedy (top_p / top_k / seed then do nothing)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k cut
    seed: Optional[int] = None
    stop: tuple[str, ...] = ()
    logprobs: Optional[int] = None  # None: none; k >= 0: the chosen token's log-probability and the top k


@dataclass(frozen=True)
class GenerationRequest:
    """One row of a generation batch: a prompt (text, or token ids) and how to continue it."""

    prompt: str | tuple[int, ...]
    params: SamplingParams = field(default_factory=SamplingParams)
    echo: bool = False  # completions' echo: the returned text starts with the prompt
    # Task adapters only: constrain the output to a span of this text (extractive QA), and keep the end
    # of an over-long prompt instead of refusing it (the OpenAI routes refuse with context_length_exceeded).
    span_of: Optional[str] = None
    truncate_prompt: bool = False


@dataclass
class TokenLogprob:
    """One generated token: its text, log-probability and the top alternatives."""

    token: str
    token_id: int
    logprob: float
    top: list[tuple[str, float]] = field(default_factory=list)


@dataclass
class GenerationResult:
    """A finished row: text (stop sequence removed), why it ended, and token counts for ``usage``."""

    text: str
    finish_reason: Literal["stop", "length"]
    prompt_tokens: int
    completion_tokens: int
    logprobs: Optional[list[TokenLogprob]] = None


@dataclass
class StreamDelta:
    """What one decoding step adds to one row: new text (may be empty while a stop string is possible)
    and, on the row's last step, its finish reason and token counts."""

    text: str
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: Optional[Literal["stop", "length"]] = None
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


# ------------------------------------------------------------------ the interface


class TaskModel(abc.ABC):
    """A loaded model that answers some of :data:`TASKS`; all task methods take and return batches.

    See the module docstring for the contract. ``name`` is the public id of the
    model (shown by ``GET /v1/models``; never a file path).
    """

    kind: ClassVar[str] = ""
    supported_tasks: ClassVar[frozenset[str]] = frozenset()

    name: str = "model"
    # temperature / top_p / top_k for generation requests that leave them out (a checkpoint's generation_config);
    # none: OpenAI's defaults. Read only.
    sampling_defaults: Mapping[str, Any] = MappingProxyType({})

    @classmethod
    @abc.abstractmethod
    def from_directory(cls, folder: str | Path, options: InferenceOptions = InferenceOptions()) -> "TaskModel":
        """Load the model in ``folder`` onto ``options.device`` in ``options.torch_dtype()``."""

    # ---------------------------------------------------------------- capability

    def supports(self, task: str) -> bool:
        return task in self.supported_tasks

    def require(self, task: str) -> None:
        """Raise :class:`UnsupportedTaskError` unless this model answers ``task``."""
        if not self.supports(task):
            raise UnsupportedTaskError(task, self.name, sorted(self.supported_tasks))

    def describe(self) -> dict[str, Any]:
        """Public facts for ``/healthz`` and ``/v1/models`` (no file paths)."""
        return {"id": self.name, "kind": self.kind, "tasks": sorted(self.supported_tasks)}

    # ---------------------------------------------------------------- tasks (override those you support)

    def classify_sentiment(self, texts: Sequence[str]) -> list[dict[str, Any]]:
        raise UnsupportedTaskError("sentiment", self.name, sorted(self.supported_tasks))

    def answer_questions(self, contexts: Sequence[str], questions: Sequence[str]) -> list[str]:
        raise UnsupportedTaskError("qa", self.name, sorted(self.supported_tasks))

    def translate(self, sources: Sequence[str], max_new_tokens: Optional[int] = None) -> list[str]:
        raise UnsupportedTaskError("translate", self.name, sorted(self.supported_tasks))

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        raise UnsupportedTaskError("completions", self.name, sorted(self.supported_tasks))

    def stream(self, requests: Sequence[GenerationRequest]) -> Iterator[list[Optional[StreamDelta]]]:
        """Yield, per decoding step, one entry per request: its :class:`StreamDelta`, or None once it ended."""
        raise UnsupportedTaskError("completions", self.name, sorted(self.supported_tasks))

    def render_chat(self, messages: Sequence[dict[str, str]]) -> str:
        """The prompt for a chat conversation (the model's chat template, generation prompt added)."""
        raise UnsupportedTaskError("chat", self.name, sorted(self.supported_tasks))

    def count_tokens(self, text: str) -> int:
        raise UnsupportedTaskError("completions", self.name, sorted(self.supported_tasks))


# ------------------------------------------------------------------ loading


def read_model_card(folder: str | Path) -> dict[str, Any]:
    """``raylm.json`` of a model folder, or {} when it has none."""
    card = Path(folder) / "raylm.json"
    if not card.is_file():
        return {}
    try:
        return json.loads(card.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ModelLoadError(f"unreadable raylm.json in model folder {Path(folder).name!r}: {err}") from None


def model_kind(folder: str | Path) -> str:
    """The kind of the model in ``folder``: ``raylm.json``'s ``kind``, else from config.json's architecture."""
    path = Path(folder)
    card_kind = read_model_card(path).get("kind")
    if card_kind:
        if card_kind not in IMPLEMENTATIONS:
            raise ModelLoadError(f"raylm.json kind {card_kind!r} is not one of {', '.join(IMPLEMENTATIONS)}")
        return card_kind
    config = path / "config.json"
    if not config.is_file():
        raise ModelLoadError(f"not a model folder (no config.json): {path}")
    try:
        architectures = json.loads(config.read_text(encoding="utf-8")).get("architectures") or []
    except (OSError, json.JSONDecodeError) as err:
        raise ModelLoadError(f"unreadable config.json in {path}: {err}") from None
    for architecture in architectures:
        for suffix, kind in _ARCHITECTURE_SUFFIXES:
            if architecture.endswith(suffix):
                return kind
    raise ModelLoadError(f"cannot tell what kind of model {path} holds (architectures: {architectures or 'none'}); "
                         f"set \"kind\" in its raylm.json to one of {', '.join(IMPLEMENTATIONS)}")


def implementation_for(kind: str) -> type[TaskModel]:
    """The :class:`TaskModel` subclass that loads models of ``kind``."""
    target = IMPLEMENTATIONS.get(kind)
    if target is None:
        raise ModelLoadError(f"no implementation for model kind {kind!r}")
    module_name, class_name = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name != module_name:
            raise
        raise ModelLoadError(f"model kind {kind!r} needs {module_name}, which is missing") from None
    return getattr(module, class_name)


def load_task_model(folder: str | Path, options: InferenceOptions = InferenceOptions(),
                    name: Optional[str] = None) -> TaskModel:
    """Load the model in ``folder`` with the implementation its kind names; ``name`` is its public id."""
    path = Path(folder)
    if not path.is_dir():
        raise FileNotFoundError(f"model folder not found: {path}")
    model = implementation_for(model_kind(path)).from_directory(path, options)
    model.name = name or public_model_name(path)
    return model


def public_model_name(folder: str | Path) -> str:
    """A model's id when none is given: the run id in its ``raylm.json``, else the folder's name."""
    path = Path(folder)
    card = read_model_card(path)
    return str(card.get("run_id") or card.get("name") or path.resolve().name)
