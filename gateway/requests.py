"""Request bodies of the OpenAI endpoints the gateway serves, as pydantic models.

Unknown fields are refused (400 naming the field), as OpenAI's own API does, so a client never
believes a parameter was honoured when it was not (`tools`, `logit_bias`...). Ranges are not
checked here: the job contract (`jobs.schema`, through `build_job`) checks them once, and its
refusal becomes a 400 too. Our extras ride in the body, as vLLM takes its own: `top_k`,
`min_p`, `repetition_penalty`, `session_id`, `priority`, `timeout_s`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_CHOICES = 16  # `n`: jobs per request
MAX_PROMPTS = 64  # completions: prompts in one request


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Body):
    include_usage: bool = False


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None  # accepted; our chat templates have no use for it

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class _Generation(_Body):
    """What both endpoints share: sampling, stopping, streaming and our extras."""

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    seed: int | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256)
    # Our extras.
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    session_id: str | None = None
    priority: int | None = None
    timeout_s: float | None = Field(None, gt=0)

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class ChatCompletionRequest(_Generation):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    # OpenAI's text, json_object and json_schema, and the contract's regex and grammar: passed
    # to the job as it is; the contract checks it (jobs/schema.py), a refusal is a 400.
    response_format: dict[str, Any] | None = None


class CompletionRequest(_Generation):
    prompt: str | list[str]
    max_tokens: int | None = 16  # OpenAI's default for this endpoint
    logprobs: int | None = None  # top-n alternatives per token
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class BatchRequest(_Body):
    input_file_id: str
    endpoint: Literal["/v1/chat/completions", "/v1/completions"]
    completion_window: Literal["24h"] = "24h"
    metadata: dict[str, str] | None = None
