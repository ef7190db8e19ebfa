"""Wire contract v1: the events a worker writes to `orcd:out:{job_id}` (fields `event`, `data`).

Clients parse payloads with these models; the worker writes the same shapes as plain dicts
(its publisher is on the hot path), and tests check that they agree.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

EVENT_KINDS = ("queued", "started", "token", "done", "error")
FINISH_REASONS = ("stop", "length", "cancelled", "deadline")


class _Event(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Queued(_Event):
    """The worker took the job: `position` among its jobs not yet running, `queue_depth` its
    jobs."""

    position: int
    queue_depth: int


class Started(_Event):
    """The job runs on `worker_id`; `attempt` > 1 means a redelivery. A redelivery carries
    `resumed_from`: the index its `token` events go on from; the text of the indices before it
    stands (a redelivery without it, from a worker before resume, starts over: discard)."""

    worker_id: str
    attempt: int
    resumed_from: int | None = None


class TokenLogprob(_Event):
    token_id: int
    logprob: float
    top: list[tuple[int, float]]


class Token(_Event):
    """`stream_interval` tokens: `index` of the first in the answer, the UTF-8-safe text delta."""

    index: int
    token_ids: list[int]
    text: str
    attempt: int
    logprobs: list[TokenLogprob] | None = None  # only when the job asked for logprobs


class Usage(_Event):
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


class Timings(_Event):
    queue_ms: float
    ttft_ms: float | None
    total_ms: float
    decode_tokens_per_s: float | None


class Done(_Event):
    """The job ended; `text` is always the whole answer of the final attempt."""

    finish_reason: Literal["stop", "length", "cancelled", "deadline"]
    text: str
    usage: Usage
    timings: Timings
    metadata: dict[str, Any]
    # Jobs with a response_format only: true when the output ended before its grammar was
    # complete (max_tokens, a stop string, a cancel), so it may not parse.
    partial: bool | None = None


class Error(_Event):
    """The job failed alone; `code` is machine-readable, `message` one human line."""

    code: str
    message: str


PAYLOADS: dict[str, type[_Event]] = {
    "queued": Queued,
    "started": Started,
    "token": Token,
    "done": Done,
    "error": Error,
}

# Error codes the worker uses.
INVALID_JSON = "invalid_json"
INVALID_JOB = "invalid_job"
PAYLOAD_TOO_LARGE = "payload_too_large"
UNKNOWN_MODEL = "unknown_model"
INVALID_REQUEST = "invalid_request"  # the model cannot run it: too long, bad template...
TOO_MANY_DELIVERIES = "too_many_deliveries"
ENGINE_ERROR = "engine_error"
DEADLINE_EXCEEDED = "deadline_exceeded"  # still queued at its deadline: never started
