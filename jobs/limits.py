"""Constants every layer shares, in a leaf module that imports nothing of ours.

The one table of sampling bounds lives here: the wire schema (`jobs/schema.py`) validates jobs
against it, and the engine (`gpu/request.py`) checks the same rules on every request it is
given directly. The default model's name and the session TTL default live here for the same
reason: the clients, the worker, the engine and the CLI take them from this one place.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MODEL = "smollm2-135m"
# How long an idle session keeps its KV (the engine) and its routing key (the worker).
DEFAULT_SESSION_TTL_S = 1800.0


@dataclass(frozen=True, slots=True)
class Bound:
    """A closed interval, or one open at its low end (`low_open`)."""

    low: float
    high: float
    low_open: bool = False

    def contains(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        return above and value <= self.high

    def describe(self) -> str:
        return f"{'(' if self.low_open else '['}{_number(self.low)}, {_number(self.high)}]"


def _number(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


# Sampling controls, named as OpenAI/vLLM name them. `seed` is optional (None: unseeded),
# `logprobs` too (None: none returned); the others always have a value.
SAMPLING_BOUNDS: dict[str, Bound] = {
    "temperature": Bound(0.0, 2.0),  # 0 = greedy
    "top_k": Bound(0, 1_000_000),  # 0 = off
    "top_p": Bound(0.0, 1.0, low_open=True),
    "min_p": Bound(0.0, 1.0),
    "repetition_penalty": Bound(0.0, 10.0, low_open=True),
    "presence_penalty": Bound(-2.0, 2.0),
    "frequency_penalty": Bound(-2.0, 2.0),
    "seed": Bound(0, 2**63 - 1),
    "logprobs": Bound(0, 20),  # top-n per token; 0 = the chosen token's only
}
