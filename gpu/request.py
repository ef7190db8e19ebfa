"""The engine's public data: what a caller adds (`Request`) and what `step()` returns
(`StepOutput`).

Token ids in, token ids out: no text and no Redis here. The worker turns jobs into requests
and outputs into events; `orcd generate` does the same for a terminal.
"""

from __future__ import annotations

import time
from concurrent.futures import Future
from dataclasses import dataclass, field

from jobs.errors import OrcdError
from jobs.limits import SAMPLING_BOUNDS
from structured.matcher import GrammarMatcher


class RequestError(OrcdError):
    """A request the engine cannot run (empty prompt, too long for the context, bad parameters)."""


class DeviceLostError(OrcdError):
    """The device cannot run anything more (a sticky CUDA error such as an illegal address):
    the process must exit and be restarted; no request of it can be saved here."""


@dataclass(slots=True, frozen=True)
class SamplingParams:
    """Sampling controls, named as OpenAI/vLLM name them. temperature 0 means greedy."""

    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # >1 discourages tokens seen in prompt or output (HF rule)
    presence_penalty: float = 0.0  # subtracted once from tokens seen in the output
    frequency_penalty: float = 0.0  # subtracted per occurrence in the output
    seed: int | None = None  # same seed -> same tokens, whatever else is in the batch
    logprobs: int | None = None  # top-n logprobs per generated token (0 = only the chosen one)

    def validate(self) -> None:
        """The wire's rules (jobs/limits.py SAMPLING_BOUNDS), for requests given to the engine
        directly: a job reaching the worker was already checked against the same table."""
        for name, bound in SAMPLING_BOUNDS.items():
            value = getattr(self, name)
            if value is not None and not bound.contains(value):
                raise RequestError(f"{name} {value} is outside {bound.describe()}")

    @property
    def needs_output_ids(self) -> bool:
        """Penalties read every id so far on the host: such a row cannot sample ahead of a read."""
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)  # fmt: skip

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(slots=True)
class Request:
    """One generation: prompt ids, sampling, when to stop, and an optional session to keep KV in."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    max_tokens: int = 256
    stop_token_ids: frozenset[int] = frozenset()
    session_id: str | None = None
    ignore_eos: bool = False
    # Served first at admission, preempted last; a waiting request gains one level per
    # `Scheduler.priority_aging_s` seconds since `arrival_time` (unix s; default: when made).
    priority: int = 0
    arrival_time: float = field(default_factory=time.time)
    # Output constrained to a grammar: its matcher (structured.GrammarMatcher), or a future of
    # it while it compiles (GrammarCompiler.submit): the request waits unscheduled until then.
    grammar: GrammarMatcher | Future[GrammarMatcher] | None = None


@dataclass(slots=True)
class TokenLogprobs:
    """Logprob of the chosen token and the top-n alternatives (id, logprob), best first."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass(slots=True)
class StepOutput:
    """What one step produced for one request; `finish_reason` is set on its last output."""

    request_id: str
    new_token_ids: list[int]
    logprobs: list[TokenLogprobs] | None = None
    num_cached_tokens: int = 0
    finish_reason: str | None = None  # stop | length | abort | deadline | error
    error: str | None = None  # why, when finish_reason is error (NaN logits, a grammar that failed)
    engine_fault: bool = False  # the error is the engine's (NaN logits), not the request's

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
