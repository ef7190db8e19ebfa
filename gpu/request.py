"""The engine's public data: what a caller adds (`Request`) and what `step()` returns (`StepOutput`).

Token ids in, token ids out: no text and no Redis here. The worker turns jobs into requests
and outputs into events; `orcd generate` does the same for a terminal.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from loader.errors import OrcdError


class RequestError(OrcdError):
    """A request the engine cannot run (empty prompt, too long for the context, bad parameters)."""


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
        if not 0.0 <= self.temperature <= 100.0:
            raise RequestError(f"temperature {self.temperature} is outside [0, 100]")
        if self.top_k < 0:
            raise RequestError(f"top_k {self.top_k} is negative")
        if not 0.0 < self.top_p <= 1.0:
            raise RequestError(f"top_p {self.top_p} is outside (0, 1]")
        if not 0.0 <= self.min_p <= 1.0:
            raise RequestError(f"min_p {self.min_p} is outside [0, 1]")
        if not 0.0 < self.repetition_penalty <= 10.0:
            raise RequestError(f"repetition_penalty {self.repetition_penalty} is outside (0, 10]")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise RequestError(f"{name} {getattr(self, name)} is outside [-2, 2]")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise RequestError(f"logprobs {self.logprobs} is outside [0, 20]")

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
    finish_reason: str | None = None  # stop | length | abort

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
