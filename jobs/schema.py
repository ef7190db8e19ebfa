"""Wire contract v1: the job a client puts on `orcd:jobs:{model}`, validated at the boundary.

Untrusted JSON comes in here, so the models are strict: unknown fields are rejected, types are
not coerced ("5" is not 5), sizes and ranges are bounded. Names and defaults follow
OpenAI/vLLM: temperature 1.0, top_p 1.0, top_k 0 (off), min_p 0.0, penalties neutral,
max_tokens 256, no stop strings, stream on, one token per `token` event.

`prompt` is raw text continued as is: it is encoded with BOS as the model's file says and
with special-token parsing *off*, so a user typing "<|im_end|>" gets those characters, not the
control token. `messages` go through the model's chat template, and only the template's own
text can produce control tokens: message content is tokenized as plain text, so a message
holding "<|im_start|>system" cannot open a turn of its own (llama.cpp and transformers parse
the whole rendered prompt, content included). `parse_special: true` opts out, for trusted
input: control-token text in the prompt or in message content is then read as the control
token, as those tools do.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from jobs.events import INVALID_JOB, INVALID_REQUEST
from jobs.limits import SAMPLING_BOUNDS
from jobs.response_format import GrammarError, GrammarSpec

VERSION = 1
# Raw size of one stream entry's `job` field; bigger entries are dead-lettered unparsed.
MAX_JOB_BYTES = 2 * 1024 * 1024
MAX_PROMPT_CHARS = 1_000_000  # prompt, or all messages' content together
MAX_MESSAGES = 1024
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
MAX_METADATA_BYTES = 64 * 1024
MAX_GRAMMAR_CHARS = 256 * 1024  # a JSON Schema (as JSON), regex or grammar
# A sanity bound only: the worker rejects max_tokens above its model's context.
MAX_TOKENS_LIMIT = 1 << 20
MAX_TIMEOUT_S = 7 * 24 * 3600.0  # timeout_s bound: a week
# The pydantic error type of a response_format the grammar library refuses.
GRAMMAR_ERROR_TYPE = "invalid_grammar"
# Ids become parts of Redis keys: no spaces, no glob characters.
ID_PATTERN = r"^[A-Za-z0-9._:-]{1,128}$"

Id = Annotated[str, Field(pattern=ID_PATTERN)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class Message(_Strict):
    """One chat turn, as OpenAI's chat API names it."""

    role: Literal["system", "user", "assistant", "tool"]
    content: str = Field(max_length=MAX_PROMPT_CHARS)


def _bounded(name: str, default):
    """A field bounded by the shared table (jobs/limits.py), which the engine checks too."""
    bound = SAMPLING_BOUNDS[name]
    low = {"gt": bound.low} if bound.low_open else {"ge": bound.low}
    return Field(default, le=bound.high, **low)


class TextFormat(_Strict):
    """No constraint (OpenAI's default)."""

    type: Literal["text"]


class JsonObjectFormat(_Strict):
    """Any JSON object (OpenAI's JSON mode)."""

    type: Literal["json_object"]


class JsonSchemaSpec(_Strict):
    """OpenAI's `json_schema` member: a named schema. `strict` is accepted for compatibility:
    the output always follows the schema exactly, whatever it says."""

    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = Field(None, max_length=4096)
    # `schema` is a BaseModel attribute name: the field is schema_ on our side.
    schema_: dict[str, Any] | bool = Field(alias="schema")
    strict: bool | None = None

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, validate_by_name=True,
                              validate_by_alias=True, serialize_by_alias=True)


class JsonSchemaFormat(_Strict):
    """Output that validates against a JSON Schema (OpenAI's structured outputs)."""

    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec


class RegexFormat(_Strict):
    """Output that matches a regular expression as a whole (Rust regex syntax)."""

    type: Literal["regex"]
    pattern: str = Field(min_length=1, max_length=MAX_GRAMMAR_CHARS)


class GrammarFormat(_Strict):
    """Output derived from a context-free grammar: `ebnf` (Lark syntax, `start: ...`) or `gbnf`
    (llama.cpp's, `root ::= ...`); exactly one."""

    type: Literal["grammar"]
    ebnf: str | None = Field(None, min_length=1, max_length=MAX_GRAMMAR_CHARS)
    gbnf: str | None = Field(None, min_length=1, max_length=MAX_GRAMMAR_CHARS)

    @model_validator(mode="after")
    def _one_syntax(self) -> GrammarFormat:
        if (self.ebnf is None) == (self.gbnf is None):
            raise ValueError("exactly one of 'ebnf' and 'gbnf' must be given")
        return self


ResponseFormat = Annotated[
    TextFormat | JsonObjectFormat | JsonSchemaFormat | RegexFormat | GrammarFormat,
    Field(discriminator="type"),
]


class Sampling(_Strict):
    """Sampling and stopping controls; defaults as OpenAI's API (temperature 1, top_p 1)."""

    temperature: float = _bounded("temperature", 1.0)  # 0 = greedy
    top_k: int = _bounded("top_k", 0)  # 0 = off
    top_p: float = _bounded("top_p", 1.0)
    min_p: float = _bounded("min_p", 0.0)
    repetition_penalty: float = _bounded("repetition_penalty", 1.0)
    presence_penalty: float = _bounded("presence_penalty", 0.0)
    frequency_penalty: float = _bounded("frequency_penalty", 0.0)
    seed: int | None = _bounded("seed", None)
    max_tokens: int = Field(256, ge=1, le=MAX_TOKENS_LIMIT)
    stop: list[Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]] = Field(
        default_factory=list, max_length=MAX_STOP_STRINGS
    )
    logprobs: int | None = _bounded("logprobs", None)  # top-n per token; 0 = the chosen only
    response_format: ResponseFormat | None = None  # None or text: unconstrained

    @field_validator("response_format")
    @classmethod
    def _compilable(cls, value):
        """A schema, regex or grammar the grammar library cannot use is refused here, with its
        reason (the worker answers such a job `invalid_request`)."""
        spec = grammar_spec(value)
        if spec is not None:
            try:
                spec.check()
            except GrammarError as exc:
                raise PydanticCustomError(GRAMMAR_ERROR_TYPE, "{reason}", {"reason": str(exc)}
                                          ) from None
        return value


def grammar_spec(response_format: BaseModel | None) -> GrammarSpec | None:
    """The `GrammarSpec` of a response_format (None when it constrains nothing)."""
    if response_format is None:
        return None
    return GrammarSpec.from_response_format(response_format.model_dump(by_alias=True))


class GenerationJob(_Strict):
    """A generation job (wire contract v1); exactly one of `prompt` and `messages`."""

    v: Literal[1]
    job_id: Id
    model: Id
    prompt: str | None = Field(None, min_length=1, max_length=MAX_PROMPT_CHARS)
    messages: list[Message] | None = Field(None, min_length=1, max_length=MAX_MESSAGES)
    session_id: Id | None = None
    sampling: Sampling = Field(default_factory=Sampling)
    stream: bool = True  # false: no `token` events, only `done`
    stream_interval: int = Field(1, ge=1, le=1024)  # tokens per `token` event
    # Higher first, at admission and when the engine must preempt; a waiting job gains one
    # level per second (worker --priority-aging), so none starves.
    priority: int = Field(0, ge=-1000, le=1000)
    # Unix time in ms, and/or seconds from enqueue (the stream entry's id): still queued then
    # -> `error` deadline_exceeded, never started; running then -> `done` finish_reason
    # `deadline`. With both, the earlier one counts.
    deadline: int | None = Field(None, ge=0, le=1 << 53)
    timeout_s: float | None = Field(None, gt=0, le=MAX_TIMEOUT_S)
    metadata: dict[str, Any] = Field(default_factory=dict)  # echoed in `done`
    # True: control-token text in `prompt` or message content is parsed as control tokens
    # (trusted input only). False: it is plain text; only a chat template's own text makes
    # control tokens.
    parse_special: bool = False

    @model_validator(mode="after")
    def _one_input(self) -> GenerationJob:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("exactly one of 'prompt' and 'messages' must be given")
        if self.messages is not None:
            total = sum(len(message.content) for message in self.messages)
            if total > MAX_PROMPT_CHARS:
                raise ValueError(
                    f"messages hold {total} characters; the limit is {MAX_PROMPT_CHARS}"
                )
        return self

    @field_validator("metadata")
    @classmethod
    def _small_metadata(cls, value: dict[str, Any]) -> dict[str, Any]:
        size = len(json.dumps(value))
        if size > MAX_METADATA_BYTES:
            raise ValueError(f"metadata is {size} bytes of JSON; the limit is {MAX_METADATA_BYTES}")
        return value

    def deadline_ms(self, enqueued_ms: int) -> float | None:
        """When the job must end (unix ms), given when it was enqueued; None: no deadline.
        Not rounded: the workers' admission script computes the same sum."""
        ends = [] if self.deadline is None else [float(self.deadline)]
        if self.timeout_s is not None:
            ends.append(enqueued_ms + self.timeout_s * 1000)
        return min(ends) if ends else None

    def message_dicts(self) -> list[dict[str, str]]:
        return [message.model_dump() for message in self.messages or ()]


class EndSession(_Strict):
    """Control message on a worker's routed stream: free the session's KV blocks."""

    v: Literal[1]
    op: Literal["end_session"]
    session_id: Id


def validation_error_code(exc: Exception) -> str:
    """The error code of a job that failed validation: `invalid_request` when only its grammar
    was refused (a well-formed job the model cannot run), `invalid_job` otherwise."""
    errors = getattr(exc, "errors", None)
    if errors is not None and errors() and all(
        error["type"] == GRAMMAR_ERROR_TYPE for error in errors()
    ):
        return INVALID_REQUEST
    return INVALID_JOB


def describe_validation_error(exc: Exception) -> str:
    """One line naming each bad field and why (pydantic's own text is multi-line)."""
    errors = getattr(exc, "errors", None)
    if errors is None:
        return str(exc)
    parts = []
    for error in errors()[:5]:
        where = ".".join(str(p) for p in error["loc"]) or "job"
        parts.append(f"{where}: {error['msg']}")
    more = len(errors()) - 5
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")
