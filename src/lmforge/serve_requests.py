"""What a request to `lmforge serve` may say: OpenAI's completion and chat bodies, validated by
pydantic, and the error every refusal raises. A field that would change the output and is not
implemented here is refused, never silently ignored."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.exceptions import HTTPException


class APIError(HTTPException):
    def __init__(self, status: int, message: str, kind: str, param: str | None = None) -> None:
        super().__init__(status, message)
        self.kind, self.param = kind, param


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]
    """A string, or text parts (as many clients send), joined."""

    @property
    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(BaseModel):
    include_usage: bool = False
    """A last chunk, before [DONE], with the usage and no choices (OpenAI's shape)."""


UNSUPPORTED_DEFAULTS: dict[str, tuple[Any, ...]] = {
    "logit_bias": (None, {}),
    "echo": (None, False),
    "logprobs": (None, False, 0),
    "top_logprobs": (None, 0),
    "frequency_penalty": (None, 0, 0.0),
    "presence_penalty": (None, 0, 0.0),
    "best_of": (None, 1),
    "suffix": (None, ""),
    "tools": (None, []),
    "functions": (None, []),
    "response_format": (None, {"type": "text"}),
}
"""OpenAI fields that change the output, which this server does not implement: any value but
these is a 400 (ignoring them answered something else than was asked). Other unknown fields
(user, metadata, ...) are ignored."""

DEFAULT_WHEN_NULL = ("temperature", "top_p", "n", "stream")
"""Fields OpenAI's API also takes as null, meaning the default."""


class SamplingRequest(BaseModel):
    """What completions and chat requests share: the model and how to sample."""

    model_config = ConfigDict(extra="allow")  # checked against UNSUPPORTED_DEFAULTS, else unused

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**63)
    """None: a fresh random seed, so that repeated requests get different samples."""
    n: int = Field(default=1, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _nulls_are_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict):
            data = {k: v for k, v in data.items() if not (k in DEFAULT_WHEN_NULL and v is None)}
        return data

    @model_validator(mode="after")
    def _nothing_unsupported(self) -> SamplingRequest:
        for name, value in (self.model_extra or {}).items():
            if name in UNSUPPORTED_DEFAULTS and value not in UNSUPPORTED_DEFAULTS[name]:
                raise APIError(
                    400, f"{name} is not supported by this server", "invalid_request_error", name
                )
        return self


class CompletionRequest(SamplingRequest):
    prompt: str | list[str]


class ChatRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


def check_text(text: str, param: str) -> None:
    """JSON's \\ud800 escape parses into a str that is not text (a lone surrogate)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        where = f"character {e.start}"
        raise APIError(
            400, f"{param}: a lone surrogate at {where} is not text", "invalid_request_error", param
        ) from None
