"""Request and response schemas: the task routes and the OpenAI-compatible routes.

Task requests are strict (an unknown field is a 422 that names it). OpenAI
requests ignore fields raylm does not use (clients send many), but every field
raylm does use is validated strictly: types are not coerced, numbers must be
finite and in range.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, field_validator, model_validator

# ------------------------------------------------------------------ task routes


class _TaskRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _not_blank(value: Optional[str]) -> Optional[str]:
    if value is not None and not value.strip():
        raise ValueError("must not be empty or only whitespace")
    return value


class TranslateInput(_TaskRequest):
    text: StrictStr = Field(..., min_length=1, description="English sentence")
    max_new_tokens: Optional[StrictInt] = Field(None, ge=1, le=2048)

    _text = field_validator("text")(_not_blank)


class QAInput(_TaskRequest):
    context: StrictStr = Field(..., min_length=1)
    question: StrictStr = Field(..., min_length=1)

    _context = field_validator("context", "question")(_not_blank)


class SentimentInput(_TaskRequest):
    text: StrictStr = Field(..., min_length=1)

    _text = field_validator("text")(_not_blank)


class _Batchable(_TaskRequest):
    """A task request: one input's fields, or ``inputs``, a list of such inputs."""

    @model_validator(mode="before")
    @classmethod
    def _one_or_many(cls, raw: Any) -> Any:
        if isinstance(raw, dict) and "inputs" in raw and len(raw) > 1:
            extra = sorted(key for key in raw if key != "inputs")
            raise ValueError(f"give either 'inputs' or the fields of one input, not both (also got {', '.join(extra)})")
        return raw

    def items(self) -> list[BaseModel]:
        """The inputs of this request, single or batched."""
        return list(self.inputs) if self.inputs is not None else [self.single()]


class TranslateRequest(_Batchable):
    text: Optional[StrictStr] = Field(None, min_length=1, description="English sentence")
    max_new_tokens: Optional[StrictInt] = Field(None, ge=1, le=2048)
    inputs: Optional[list[TranslateInput]] = Field(None, min_length=1)

    _text = field_validator("text")(_not_blank)

    @model_validator(mode="after")
    def _need_text(self) -> "TranslateRequest":
        if self.inputs is None and self.text is None:
            raise ValueError("text: field required")
        return self

    def single(self) -> TranslateInput:
        return TranslateInput(text=self.text, max_new_tokens=self.max_new_tokens)


class QARequest(_Batchable):
    context: Optional[StrictStr] = Field(None, min_length=1)
    question: Optional[StrictStr] = Field(None, min_length=1)
    inputs: Optional[list[QAInput]] = Field(None, min_length=1)

    _fields = field_validator("context", "question")(_not_blank)

    @model_validator(mode="after")
    def _need_fields(self) -> "QARequest":
        if self.inputs is None:
            missing = [name for name in ("context", "question") if getattr(self, name) is None]
            if missing:
                raise ValueError(f"{missing[0]}: field required")
        return self

    def single(self) -> QAInput:
        return QAInput(context=self.context, question=self.question)


class SentimentRequest(_Batchable):
    text: Optional[StrictStr] = Field(None, min_length=1)
    inputs: Optional[list[SentimentInput]] = Field(None, min_length=1)

    _text = field_validator("text")(_not_blank)

    @model_validator(mode="after")
    def _need_text(self) -> "SentimentRequest":
        if self.inputs is None and self.text is None:
            raise ValueError("text: field required")
        return self

    def single(self) -> SentimentInput:
        return SentimentInput(text=self.text)


class TranslateResponse(BaseModel):
    translation: str


class QAResponse(BaseModel):
    answer: str


class SentimentResponse(BaseModel):
    label: str
    score: float


class ErrorResponse(BaseModel):
    error: str


# ------------------------------------------------------------------ OpenAI-compatible routes

FiniteFloat = Annotated[float, Field(allow_inf_nan=False, strict=False)]


class _OpenAIRequest(BaseModel):
    # Clients send fields raylm does not use (user, presence_penalty, logit_bias, ...): ignore those.
    model_config = ConfigDict(extra="ignore")

    model: Optional[StrictStr] = None
    max_tokens: Optional[StrictInt] = Field(None, ge=1)
    temperature: Optional[FiniteFloat] = Field(None, ge=0, le=2)
    top_p: Optional[FiniteFloat] = Field(None, gt=0, le=1)
    top_k: Optional[StrictInt] = Field(None, ge=-1)
    n: StrictInt = Field(1, ge=1, le=16)
    stop: Optional[Union[StrictStr, list[StrictStr]]] = None
    seed: Optional[StrictInt] = None
    stream: StrictBool = False
    stream_options: Optional["StreamOptions"] = None

    @field_validator("temperature", "top_p", mode="before")
    @classmethod
    def _numbers_only(cls, value: Any) -> Any:
        # Strict about type (a string or a bool is not a number), lax about int vs float.
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ValueError("must be a number")
        return value

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: Any) -> Any:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(stop == "" for stop in stops):
            raise ValueError("stop sequences must not be empty")
        return value

    @model_validator(mode="after")
    def _check_stream_options(self) -> "_OpenAIRequest":
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    def stop_sequences(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: StrictBool = False


class CompletionRequest(_OpenAIRequest):
    prompt: Union[StrictStr, list[StrictStr], list[StrictInt], list[list[StrictInt]]]
    logprobs: Optional[StrictInt] = Field(None, ge=0, le=5)
    echo: StrictBool = False

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, value: Any) -> Any:
        if isinstance(value, list):
            if not value:
                raise ValueError("must not be empty")
            if len(value) > 64:
                raise ValueError("at most 64 prompts per request")
            for item in value:
                if isinstance(item, list) and not item:
                    raise ValueError("a token-id prompt must not be empty")
                if isinstance(item, str) and not item:
                    raise ValueError("prompts must not be empty")
        elif not value:
            raise ValueError("must not be empty")
        return value

    def prompts(self) -> list[str | tuple[int, ...]]:
        """The prompts as a list: texts, or token-id tuples."""
        value = self.prompt
        if isinstance(value, str):
            return [value]
        if value and isinstance(value[0], int):
            return [tuple(value)]
        return [item if isinstance(item, str) else tuple(item) for item in value]


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: StrictStr
    text: Optional[StrictStr] = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: Optional[Union[StrictStr, list[ContentPart]]] = None
    name: Optional[StrictStr] = None

    def text(self) -> str:
        """The message's text; only text parts are understood."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        texts = []
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise ValueError(f"content part of type {part.type!r} is not supported (only 'text')")
            texts.append(part.text)
        return "".join(texts)


class ChatCompletionRequest(_OpenAIRequest):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: Optional[StrictInt] = Field(None, ge=1)
    logprobs: StrictBool = False
    top_logprobs: Optional[StrictInt] = Field(None, ge=0, le=20)

    @model_validator(mode="after")
    def _check_messages(self) -> "ChatCompletionRequest":
        for index, message in enumerate(self.messages):
            try:
                message.text()
            except ValueError as err:
                raise ValueError(f"messages[{index}].content: {err}") from None
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        if all(not message.text().strip() for message in self.messages):
            raise ValueError("messages: all messages are empty")
        return self

    def token_budget(self) -> Optional[int]:
        return self.max_completion_tokens or self.max_tokens


_OpenAIRequest.model_rebuild()
CompletionRequest.model_rebuild()
ChatCompletionRequest.model_rebuild()
