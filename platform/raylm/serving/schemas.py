"""Request and response schemas of the task endpoints."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TranslateRequest(_Request):
    text: str = Field(..., min_length=1, description="English sentence")
    max_new_tokens: int | None = Field(None, ge=1, le=2048)


class TranslateResponse(BaseModel):
    translation: str


class QARequest(_Request):
    context: str = Field(..., min_length=1)
    question: str = Field(..., min_length=1)


class QAResponse(BaseModel):
    answer: str


class SentimentRequest(_Request):
    text: str = Field(..., min_length=1)


class SentimentResponse(BaseModel):
    label: str
    score: float


class ErrorResponse(BaseModel):
    error: str
