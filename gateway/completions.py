"""POST /v1/chat/completions and /v1/completions: submit one job per choice, answer from their
output streams as one JSON body or as server-sent events.

A client that goes away cancels its jobs (the worker ends them within a step, `cancelled`), and
so does the request's deadline (`timeout_s`, else the gateway's --timeout: then 504, or an
error event on a stream). Cleanup runs shielded from the cancellation that a disconnect
delivers, so it is never skipped.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import anyio
from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from redis.exceptions import RedisError

from gateway.auth import Caller
from gateway.errors import APIError, error_body
from gateway.follow import Delta, Failed, Finished, follow_jobs
from gateway.ratelimit import STREAM_LEASE_MS
from gateway.requests import ChatCompletionRequest, CompletionRequest, _Generation
from gateway.service import MAX_TIMEOUT_S, Gateway
from gateway.translate import (
    Choice,
    CompletionLogprobs,
    TokenPieces,
    chat_choices,
    chat_logprobs,
    completion_choices,
    now,
    usage,
)
from jobs.client import one_line
from jobs.errors import JobTimeout
from jobs.events import INVALID_JOB, INVALID_REQUEST, UNKNOWN_MODEL

DISCONNECT_POLL_S = 0.25
# Worker error codes that mean the request itself was bad.
CLIENT_ERRORS = frozenset({INVALID_JOB, INVALID_REQUEST, UNKNOWN_MODEL})


@dataclass(slots=True)
class ChoiceState:
    """What one choice has produced so far."""

    choice: Choice
    text: str = ""
    chat_logprobs: list[dict] = field(default_factory=list)
    completion_logprobs: CompletionLogprobs = field(default_factory=CompletionLogprobs)
    finished: Finished | None = None
    failed: Failed | None = None


@dataclass(slots=True)
class Call:
    """One request in flight: what was asked, its jobs, and how to answer."""

    gateway: Gateway
    caller: Caller
    body: _Generation
    chat: bool
    request_id: str
    choices: list[Choice]
    pieces: TokenPieces | None
    timeout_s: float
    created: int = field(default_factory=now)

    @property
    def object_name(self) -> str:
        return "chat.completion" if self.chat else "text_completion"

    @property
    def wants_logprobs(self) -> bool:
        return self.pieces is not None

    def job_ids(self) -> list[str]:
        return [choice.job.job_id for choice in self.choices]

    def apply(self, state: ChoiceState, update) -> dict | None:
        """Record an update; returns the choice's logprobs for a stream chunk, if any."""
        if isinstance(update, Delta):
            state.text += update.text
            if self.pieces is not None and update.logprobs:
                if self.chat:
                    part = chat_logprobs(update.logprobs, self.pieces)
                    state.chat_logprobs += part
                    return {"content": part}
                return state.completion_logprobs.add(update.logprobs, self.pieces)
        elif isinstance(update, Finished):
            state.finished = update
            state.text += update.tail
        elif isinstance(update, Failed):
            state.failed = update
        return None

    def choice_logprobs(self, state: ChoiceState) -> dict | None:
        if not self.wants_logprobs:
            return None
        if self.chat:
            return {"content": state.chat_logprobs}
        return state.completion_logprobs.as_dict()

    def usage(self, states: list[ChoiceState]) -> dict:
        return usage([(s.choice, s.finished.done) for s in states if s.finished is not None])

    def response(self, states: list[ChoiceState]) -> dict:
        choices = []
        for state in states:
            finish = state.finished.done.finish_reason
            text = state.finished.done.text
            if self.chat:
                choices.append({"index": state.choice.index, "finish_reason": finish,
                                "message": {"role": "assistant", "content": text},
                                "logprobs": self.choice_logprobs(state)})
            else:
                choices.append({"index": state.choice.index, "finish_reason": finish,
                                "text": text, "logprobs": self.choice_logprobs(state)})
        return {"id": self.request_id, "object": self.object_name, "created": self.created,
                "model": self.body.model, "system_fingerprint": None, "choices": choices,
                "usage": self.usage(states)}

    def chunk(self, index: int, *, text: str | None = None, role: bool = False,
              logprobs: dict | None = None, finish: str | None = None) -> str:
        if self.chat:
            delta: dict = {}
            if role:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            choice = {"index": index, "delta": delta, "logprobs": logprobs,
                      "finish_reason": finish}
            name = "chat.completion.chunk"
        else:
            choice = {"index": index, "text": text or "", "logprobs": logprobs,
                      "finish_reason": finish}
            name = "text_completion"
        payload = {"id": self.request_id, "object": name, "created": self.created,
                   "model": self.body.model, "system_fingerprint": None, "choices": [choice]}
        if self.include_usage:
            payload["usage"] = None
        return sse(payload)

    @property
    def include_usage(self) -> bool:
        options = self.body.stream_options
        return bool(options and options.include_usage)

    def usage_chunk(self, states: list[ChoiceState]) -> str:
        return sse({"id": self.request_id,
                    "object": "chat.completion.chunk" if self.chat else "text_completion",
                    "created": self.created, "model": self.body.model,
                    "system_fingerprint": None, "choices": [], "usage": self.usage(states)})


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


def failure_status(failed: Failed) -> int:
    return 400 if failed.code in CLIENT_ERRORS else 500


async def chat_completions(gateway: Gateway, request: Request, caller: Caller,
                           body: ChatCompletionRequest):
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    choices = chat_choices(body, request_id)
    return await serve(gateway, request, caller, body, True, request_id, choices,
                       body.logprobs)


async def completions(gateway: Gateway, request: Request, caller: Caller,
                      body: CompletionRequest):
    request_id = f"cmpl-{uuid.uuid4().hex}"
    choices = completion_choices(body, request_id)
    return await serve(gateway, request, caller, body, False, request_id, choices,
                       body.logprobs is not None)


async def serve(gateway: Gateway, request: Request, caller: Caller, body: _Generation,
                chat: bool, request_id: str, choices: list[Choice], logprobs: bool):
    await gateway.check_model(body.model)
    pieces = await gateway.token_pieces(body.model) if logprobs else None
    timeout_s = min(body.timeout_s or gateway.config.timeout_s, MAX_TIMEOUT_S)
    call = Call(gateway, caller, body, chat, request_id, choices, pieces, timeout_s)
    refusal = await gateway.limiter.admit(caller, request_id if body.stream else None)
    if refusal is not None:
        gateway.metrics.rate_limited.labels(refusal.what).inc()
        raise APIError(429, f"rate limit reached for {refusal.what}; retry in "
                       f"{refusal.retry_after_s} s", None, "rate_limit_exceeded",
                       {"Retry-After": str(refusal.retry_after_s)})
    try:
        await gateway.submit(choices)
    except BaseException:
        if body.stream:
            await gateway.limiter.release(caller, request_id)
        raise
    if body.stream:
        return StreamingResponse(stream(call), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache",
                                          "X-Accel-Buffering": "no"})
    return JSONResponse(await collect(call, request))


async def collect(call: Call, request: Request) -> dict:
    """The whole answer; cancels the jobs if the client leaves or the deadline passes."""
    states = [ChoiceState(choice) for choice in call.choices]

    async def read() -> None:
        async for position, update in follow_jobs(call.gateway.client, call.job_ids(),
                                                  call.timeout_s):
            call.apply(states[position], update)
            if isinstance(update, Failed):
                return

    reader = asyncio.create_task(read())
    try:
        while True:
            finished, _ = await asyncio.wait({reader}, timeout=DISCONNECT_POLL_S)
            if finished:
                break
            if await request.is_disconnected():
                raise APIError(499, "client closed the request", None, "client_closed")
        reader.result()
    except JobTimeout:
        raise APIError(504, f"no complete answer within {call.timeout_s:g} s; the jobs were "
                       "cancelled", "timeout_s", "timeout") from None
    finally:
        if not reader.done():
            reader.cancel()
        await end_call(call, states)
    failed = next((s.failed for s in states if s.failed is not None), None)
    if failed is not None:
        raise APIError(failure_status(failed), f"{failed.code}: {failed.message}", None,
                       failed.code)
    return call.response(states)


async def end_call(call: Call, states: list[ChoiceState]) -> None:
    """Cancel what has not ended, charge the tokens used; never interrupted by a disconnect."""
    with anyio.CancelScope(shield=True):
        unfinished = [s.choice.job.job_id for s in states
                      if s.finished is None and s.failed is None]
        try:
            await call.gateway.cancel(unfinished)
            used = call.usage(states)
            await call.gateway.limiter.charge_tokens(call.caller, used["total_tokens"])
            call.gateway.metrics.completion_tokens.inc(used["completion_tokens"])
            if call.body.stream:
                await call.gateway.limiter.release(call.caller, call.request_id)
        except Exception:  # noqa: BLE001 - Redis gone: jobs run to their end, leases expire
            pass


async def stream(call: Call) -> AsyncIterator[str]:
    """The SSE body: role chunks (chat), deltas, one finish chunk per choice, usage, [DONE]."""
    gateway = call.gateway
    states = [ChoiceState(choice) for choice in call.choices]
    gateway.metrics.streams.inc()
    renewer = asyncio.create_task(renew_lease(call))
    try:
        if call.chat:
            for state in states:
                yield call.chunk(state.choice.index, text="", role=True)
        try:
            async for position, update in follow_jobs(gateway.client, call.job_ids(),
                                                      call.timeout_s):
                state = states[position]
                logprobs = call.apply(state, update)
                index = state.choice.index
                if isinstance(update, Delta) and (update.text or logprobs):
                    yield call.chunk(index, text=update.text, logprobs=logprobs)
                elif isinstance(update, Finished):
                    if update.tail:
                        yield call.chunk(index, text=update.tail)
                    yield call.chunk(index, text=None if call.chat else "",
                                     finish=update.done.finish_reason)
                elif isinstance(update, Failed):
                    yield sse(error_body(failure_status(update),
                                         f"{update.code}: {update.message}", None, update.code))
                    return
        except JobTimeout:
            yield sse(error_body(504, f"no complete answer within {call.timeout_s:g} s; the "
                                 "jobs were cancelled", "timeout_s", "timeout"))
            return
        except RedisError as exc:  # Redis gone for longer than the reader's retries
            yield sse(error_body(503, f"the job queue (Redis) is unavailable: "
                                 f"{one_line(exc)}", None, "queue_unavailable"))
            return
        if call.include_usage:
            yield call.usage_chunk(states)
        yield "data: [DONE]\n\n"
    finally:
        renewer.cancel()
        gateway.metrics.streams.dec()
        await end_call(call, states)


async def renew_lease(call: Call) -> None:
    """Keep this stream's slot among the key's concurrent streams while it is open."""
    while True:
        await asyncio.sleep(STREAM_LEASE_MS / 3000)
        try:
            await call.gateway.limiter.renew(call.caller, call.request_id)
        except Exception:  # noqa: BLE001 - Redis away: try again next period
            pass
