"""One job inside the worker: the job in as an engine request, engine outputs out as contract
events (no Redis here).

`build_request(job, tokenizer, max_model_len)` is the one adapter from a validated job to the
engine's `Request`: the job's sampling fields were checked against jobs/limits.py's bounds at
the boundary, and the engine checks the same table again.

`ActiveJob.push(output)` turns a `StepOutput` into the events to publish: `token` events
coalescing `stream_interval` tokens (text deltas from `TextStream`, UTF-8-safe and with stop
strings held back), and on the last output `done` with the whole answer, usage and timings.
A stop string ends the job early: the caller aborts the engine request and the abort output
that follows finishes the job with reason `stop`; a cancel finishes it with `cancelled`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from gpu.request import Request, RequestError, SamplingParams, StepOutput
from jobs.schema import GenerationJob, grammar_spec
from structured.compiler import GrammarCompiler
from tokenizer.tokenizer import GGUFTokenizer
from worker.text_stream import TextStream


def build_request(job: GenerationJob, tokenizer: GGUFTokenizer, max_model_len: int,
                  grammars: GrammarCompiler | None = None,
                  enqueued_ms: int | None = None) -> Request:
    """The engine request of a validated job: its prompt tokenized (chat template for
    `messages`, whose own text alone makes control tokens; raw text with special-token
    parsing off, so user text cannot forge control tokens; both parsed when the job sets
    `parse_special`), its sampling, the model's end-of-generation ids, and its
    response_format's grammar submitted to `grammars` (the request carries the future; the
    engine schedules it once compiled). Raises `TokenizerError` or `RequestError` (max_tokens
    past the context, a response_format without a compiler) with a message for the client.
    `enqueued_ms` (unix ms, from the stream entry's id) is when the request started waiting:
    the engine ages its priority from then."""
    if job.messages is not None:
        _, prompt_ids = tokenizer.encode_chat(job.message_dicts(),
                                              parse_special=job.parse_special)
    else:
        prompt_ids = tokenizer.encode(job.prompt, parse_special=job.parse_special)
    sampling = job.sampling
    if sampling.max_tokens > max_model_len:
        raise RequestError(f"max_tokens {sampling.max_tokens} exceeds the context of "
                           f"{max_model_len} tokens")
    params = SamplingParams(**{name: getattr(sampling, name) for name in _SAMPLING_FIELDS})
    spec = grammar_spec(sampling.response_format)
    grammar = None
    if spec is not None:
        if grammars is None:
            raise RequestError("response_format needs a grammar compiler; none was given")
        grammar = grammars.submit(spec)
    request = Request(job.job_id, prompt_ids, params, max_tokens=sampling.max_tokens,
                      stop_token_ids=tokenizer.end_of_generation_ids,
                      session_id=job.session_id, grammar=grammar, priority=job.priority)
    if enqueued_ms is not None:
        request.arrival_time = enqueued_ms / 1000
    return request


# The wire's sampling fields that the engine's SamplingParams takes as they are.
_SAMPLING_FIELDS = tuple(SamplingParams.__dataclass_fields__)


@dataclass(slots=True)
class Delivery:
    """A valid job as read from a stream, with where it came from and its delivery count."""

    stream: str
    entry_id: str
    job: GenerationJob
    attempt: int = 1

    @property
    def enqueued_ms(self) -> int:
        """When the client added it: a stream entry id starts with Redis's clock in ms."""
        return int(self.entry_id.split("-", 1)[0])

    @property
    def deadline_ms(self) -> float | None:
        """When the job must end (unix ms; None: never), from `deadline` and `timeout_s`."""
        return self.job.deadline_ms(self.enqueued_ms)


@dataclass(slots=True)
class ActiveJob:
    """A job the engine is running, and what of its answer has been published."""

    delivery: Delivery
    prompt_tokens: int
    text_stream: TextStream
    started_at: float = field(default_factory=time.monotonic)
    queue_ms: float = 0.0
    first_token_at: float | None = None
    completion_ids: list[int] = field(default_factory=list)
    cached_tokens: int = 0
    next_index: int = 0  # index of the first token not yet in a `token` event
    pending_ids: list[int] = field(default_factory=list)
    pending_text: str = ""
    pending_logprobs: list[dict] = field(default_factory=list)
    stop_string_hit: bool = False
    cancelled: bool = False
    finish_reason: str | None = None
    deadline_ms: float | None = None  # unix ms: the engine request is ended there
    grammar_complete: bool = False  # a constrained job's engine output ended its grammar

    @classmethod
    def start(cls, delivery: Delivery, prompt_tokens: int, tokenizer: GGUFTokenizer
              ) -> ActiveJob:
        job = cls(delivery, prompt_tokens, TextStream(tokenizer, delivery.job.sampling.stop))
        job.queue_ms = max(0.0, time.time() * 1e3 - delivery.enqueued_ms)
        return job

    def resume(self, streamed) -> None:
        """Continue after what an earlier attempt streamed (worker/resume.py): its tokens
        count as this job's, its text as shown, and the next `token` event takes the index
        after them."""
        self.completion_ids = list(streamed.token_ids)
        self.next_index = streamed.next_index
        self.text_stream.resume(streamed.token_ids, streamed.text)
        self.stop_string_hit = self.text_stream.stopped

    @property
    def job(self) -> GenerationJob:
        return self.delivery.job

    @property
    def job_id(self) -> str:
        return self.delivery.job.job_id

    def push(self, output: StepOutput) -> list[tuple[str, dict]]:
        """Events for one engine output; after the job's last output `finish_reason` is set.
        When this sets `stop_string_hit`, the caller must abort the engine request."""
        now = time.monotonic()
        if self.first_token_at is None and output.new_token_ids:
            self.first_token_at = now
            # A resumed job's engine prompt includes the tokens streamed before: what the cache
            # held of those is no prompt token of the job's.
            self.cached_tokens = min(output.num_cached_tokens, self.prompt_tokens)
        self.completion_ids += output.new_token_ids
        if not self.stop_string_hit:
            self.pending_ids += output.new_token_ids
            self.pending_text += self.text_stream.push(output.new_token_ids)
            if output.logprobs and self.job.sampling.logprobs is not None:
                self.pending_logprobs += [
                    {"token_id": lp.token_id, "logprob": lp.logprob, "top": lp.top}
                    for lp in output.logprobs
                ]
            self.stop_string_hit = self.text_stream.stopped
        events: list[tuple[str, dict]] = []
        ending = output.finished or self.stop_string_hit
        if ending and not self.text_stream.stopped:
            self.pending_text += self.text_stream.finish()
        if self.pending_ids and (ending or len(self.pending_ids) >= self.job.stream_interval):
            events.extend(self._token_event())
        if output.finished:
            self.grammar_complete = output.finish_reason == "stop" and not self.stop_string_hit
            self.finish_reason = self._final_reason(output.finish_reason)
            events.append(("done", self.done_payload(now)))
        return events

    def _token_event(self) -> list[tuple[str, dict]]:
        data = {
            "index": self.next_index,
            "token_ids": self.pending_ids,
            "text": self.pending_text,
            "attempt": self.delivery.attempt,
        }
        if self.job.sampling.logprobs is not None:
            data["logprobs"] = self.pending_logprobs
        self.next_index += len(self.pending_ids)
        self.pending_ids, self.pending_text, self.pending_logprobs = [], "", []
        return [("token", data)] if self.job.stream else []

    def _final_reason(self, engine_reason: str | None) -> str:
        if self.stop_string_hit:
            return "stop"
        if engine_reason == "abort":
            return "cancelled"
        if engine_reason == "deadline":
            return "deadline"
        return engine_reason or "stop"

    def done_payload(self, now: float) -> dict:
        total = now - self.started_at
        completion = len(self.completion_ids)
        decode_s = now - self.first_token_at if self.first_token_at is not None else 0.0
        return {
            "finish_reason": self.finish_reason,
            "text": self.text_stream.text,
            "usage": {
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": completion,
                "cached_tokens": self.cached_tokens,
            },
            "timings": {
                "queue_ms": round(self.queue_ms, 1),
                "ttft_ms": round((self.first_token_at - self.started_at) * 1e3, 1)
                if self.first_token_at is not None else None,
                "total_ms": round(total * 1e3, 1),
                "decode_tokens_per_s": round((completion - 1) / decode_s, 2)
                if completion > 1 and decode_s > 0 else None,
            },
            "metadata": self.job.metadata,
        } | ({"partial": not self.grammar_complete}
             if self.job.sampling.response_format is not None
             and self.job.sampling.response_format.type != "text" else {})
