"""OpenAI requests to v1 jobs, and job events back to OpenAI response objects. No I/O here.

One request becomes one job per choice (`n`, and per prompt for a list of completion prompts).
Jobs are built by `jobs.protocol.build_job`, so the job contract's bounds are the only ones;
its refusal comes back as a 400 naming the OpenAI parameter. Chat messages go in the job's
`messages` field: the worker renders the model's chat template and tokenizes message content
as plain text (`parse_special` stays off), so "<|im_start|>" typed by a client is never a
control token.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pydantic import ValidationError

from gateway.errors import bad_request
from gateway.requests import MAX_PROMPTS, ChatCompletionRequest, CompletionRequest, _Generation
from jobs.events import Done
from jobs.protocol import build_job
from jobs.schema import GenerationJob, describe_validation_error

# A token id's bytes, as the model's vocabulary holds them (for logprobs).
TokenPieces = Callable[[int], bytes]

# Where a job field's refusal points in the OpenAI request.
_PARAM_OF = {"sampling.max_tokens": "max_tokens", "messages": "messages", "prompt": "prompt"}


@dataclass(frozen=True, slots=True)
class Choice:
    """One job of a request: which choice it answers, and for completions which prompt."""

    index: int
    job: GenerationJob
    first_of_prompt: bool  # the prompt's tokens count once in usage, not once per choice


def _sampling(req: _Generation, max_tokens: int | None, logprobs: int | None) -> dict:
    fields = {
        "temperature": req.temperature, "top_p": req.top_p, "top_k": req.top_k,
        "min_p": req.min_p, "repetition_penalty": req.repetition_penalty,
        "presence_penalty": req.presence_penalty, "frequency_penalty": req.frequency_penalty,
        "max_tokens": max_tokens, "logprobs": logprobs,
    }
    sampling = {name: value for name, value in fields.items() if value is not None}
    for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                 "frequency_penalty"):
        if name in sampling:
            sampling[name] = float(sampling[name])  # the contract is strict: 1 is not 1.0
    stop = req.stop_list()
    if stop:
        sampling["stop"] = stop
    return sampling


def _job(req: _Generation, request_id: str, choice: int, sampling: dict, *, seed_offset: int,
         default_priority: int, stream: bool, **input_fields) -> GenerationJob:
    if req.seed is not None:  # the choices of one prompt differ, reproducibly
        sampling = {**sampling, "seed": req.seed + seed_offset}
    metadata = {"request_id": request_id, "choice": choice}
    if req.user is not None:
        metadata["user"] = req.user
    try:
        return build_job(
            model=req.model, job_id=f"{request_id}-{choice}", session_id=req.session_id,
            sampling=sampling, stream=stream,
            priority=default_priority if req.priority is None else req.priority,
            metadata=metadata, **input_fields)
    except ValidationError as exc:
        first = exc.errors()[0]["loc"] if exc.errors() else ()
        where = ".".join(str(part) for part in first)
        param = _PARAM_OF.get(where, where.removeprefix("sampling.") or None)
        raise bad_request(describe_validation_error(exc), param) from None


def _common_checks(req: _Generation) -> None:
    if req.session_id is not None and req.n > 1:
        raise bad_request("session_id needs n=1: one session holds one conversation", "n")
    if req.stream_options is not None and not req.stream:
        raise bad_request("stream_options is only allowed when stream is true",
                          "stream_options")


def chat_choices(req: ChatCompletionRequest, request_id: str, *,
                 default_priority: int = 0) -> list[Choice]:
    """The jobs of a chat completion request, one per choice."""
    _common_checks(req)
    if req.top_logprobs is not None and not req.logprobs:
        raise bad_request("top_logprobs needs logprobs: true", "top_logprobs")
    if req.max_tokens is not None and req.max_completion_tokens is not None:
        raise bad_request("give max_tokens or max_completion_tokens, not both", "max_tokens")
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                for m in req.messages]
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    sampling = _sampling(req, req.max_completion_tokens or req.max_tokens, logprobs)
    if req.response_format is not None:
        sampling["response_format"] = req.response_format
    stream = req.stream or logprobs is not None  # logprobs ride on token events only
    return [Choice(i, _job(req, request_id, i, sampling, seed_offset=i,
                           default_priority=default_priority, stream=stream,
                           messages=messages), i == 0)
            for i in range(req.n)]


def completion_choices(req: CompletionRequest, request_id: str, *,
                       default_priority: int = 0) -> list[Choice]:
    """The jobs of a completions request: `n` per prompt, prompt-major as OpenAI orders them."""
    _common_checks(req)
    if req.echo:
        raise bad_request("echo is not supported", "echo")
    if req.suffix:
        raise bad_request("suffix is not supported", "suffix")
    if req.best_of not in (None, req.n):
        raise bad_request("best_of other than n is not supported", "best_of")
    prompts = req.prompts()
    if not prompts or len(prompts) * req.n > MAX_PROMPTS:
        raise bad_request(f"{len(prompts)} prompts x n={req.n}: give 1 to 64 choices in all",
                          "prompt")
    if req.session_id is not None and len(prompts) > 1:
        raise bad_request("session_id needs a single prompt", "prompt")
    sampling = _sampling(req, req.max_tokens, req.logprobs)
    stream = req.stream or req.logprobs is not None
    choices = []
    for p, prompt in enumerate(prompts):
        for i in range(req.n):
            index = p * req.n + i
            job = _job(req, request_id, index, sampling, seed_offset=i,
                       default_priority=default_priority, stream=stream, prompt=prompt)
            choices.append(Choice(index, job, i == 0))
    return choices


# ----- responses -----------------------------------------------------------------------------


def _piece(pieces: TokenPieces, token_id: int) -> tuple[str, list[int]]:
    raw = pieces(token_id)
    return raw.decode("utf-8", errors="replace"), list(raw)


def chat_logprobs(entries: list[dict], pieces: TokenPieces) -> list[dict]:
    """Token events' logprobs as a chat choice's `logprobs.content` items."""
    content = []
    for entry in entries:
        token, raw = _piece(pieces, entry["token_id"])
        top = []
        for token_id, logprob in entry["top"]:
            text, top_raw = _piece(pieces, token_id)
            top.append({"token": text, "logprob": logprob, "bytes": top_raw})
        content.append({"token": token, "logprob": entry["logprob"], "bytes": raw,
                        "top_logprobs": top})
    return content


@dataclass(slots=True)
class CompletionLogprobs:
    """A completions choice's legacy `logprobs` object, built token by token."""

    offset: int = 0
    tokens: list[str] = field(default_factory=list)
    token_logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[dict[str, float]] = field(default_factory=list)
    text_offset: list[int] = field(default_factory=list)

    def add(self, entries: list[dict], pieces: TokenPieces) -> dict:
        """Append the entries; returns the object for just these (a stream chunk's)."""
        part = CompletionLogprobs(self.offset)
        for target in (self, part):
            for entry in entries:
                token, _ = _piece(pieces, entry["token_id"])
                target.tokens.append(token)
                target.token_logprobs.append(entry["logprob"])
                target.top_logprobs.append({_piece(pieces, t)[0]: lp for t, lp in entry["top"]})
                target.text_offset.append(target.offset)
                target.offset += len(token)
        return part.as_dict()

    def as_dict(self) -> dict:
        return {"tokens": self.tokens, "token_logprobs": self.token_logprobs,
                "top_logprobs": self.top_logprobs, "text_offset": self.text_offset}


def usage(done: list[tuple[Choice, Done]]) -> dict:
    """OpenAI's usage over a request's jobs: each prompt counted once, every completion."""
    prompt = sum(d.usage.prompt_tokens for c, d in done if c.first_of_prompt)
    cached = sum(d.usage.cached_tokens for c, d in done if c.first_of_prompt)
    completion = sum(d.usage.completion_tokens for _, d in done)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def now() -> int:
    return int(time.time())
