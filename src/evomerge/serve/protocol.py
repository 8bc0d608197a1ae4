"""The OpenAI request bodies `evomerge serve` accepts, validated by pydantic before any work is queued.

Fields OpenAI defines and the server cannot honour (penalties, logit_bias, best_of, suffix) are refused
with a 400 naming the field, rather than silently ignored; fields it does not know (`user`, ...) are
ignored, as OpenAI's own server ignores what a newer client sends.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_N = 16  # choices per request
MAX_LOGPROBS = 20  # OpenAI's limit for top_logprobs (the legacy `logprobs` allows 5; we allow 20 too)
MAX_STOPS = 4


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int | None = Field(default=None, ge=1, le=MAX_N)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop strings, got {len(value)}")
        return value

    @model_validator(mode="after")
    def _unsupported(self) -> _Common:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0, 0.0):
                raise ValueError(f"{name} is not supported by evomerge serve; leave it out or set it to 0")
        if self.logit_bias:
            raise ValueError("logit_bias is not supported by evomerge serve; leave it out")
        return self

    @property
    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def choices_per_prompt(self) -> int:
        return self.n or 1


class CompletionRequest(_Common):
    """POST /v1/completions. `logprobs` is the legacy integer: the chosen token's and that many more."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=0)
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    echo: bool | None = False
    best_of: int | None = None
    suffix: str | None = None

    @model_validator(mode="after")
    def _completion_only(self) -> CompletionRequest:
        if self.best_of is not None and self.best_of != self.choices_per_prompt:
            raise ValueError("best_of is not supported by evomerge serve; leave it out (or equal to n)")
        if self.suffix:
            raise ValueError("suffix is not supported by evomerge serve; leave it out")
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("prompt is an empty list; give a string, a list of strings or token ids")
        return self


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None

    @property
    def text(self) -> str:
        """The message's text; text parts of a list content are joined (other parts are refused)."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"only text content parts are supported, got {part.get('type')!r}")
            parts.append(part["text"])
        return "".join(parts)


class ChatRequest(_Common):
    """POST /v1/chat/completions. `logprobs` is a flag; `top_logprobs` how many alternatives per token."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)

    @model_validator(mode="after")
    def _top_needs_logprobs(self) -> ChatRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        for index, message in enumerate(self.messages):
            try:
                message.text  # noqa: B018 (validates content parts)
            except ValueError as error:
                raise ValueError(f"messages[{index}]: {error}") from error
        return self

    @property
    def token_budget(self) -> int | None:
        """The asked budget; None: up to the end of the context (as OpenAI's chat default)."""
        return self.max_completion_tokens or self.max_tokens
