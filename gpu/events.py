"""Things the engine did that its caller should narrate: evictions, expiries, preemptions."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True, frozen=True)
class EngineEvent:
    """`kind`: session_evicted | session_expired | preempted."""

    kind: str
    session_id: str | None = None
    request_id: str | None = None
    num_blocks: int = 0
    num_tokens: int = 0
    reason: str = ""
