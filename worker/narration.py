"""Narration of the worker's life: structlog events mirrored to the capped `orcd:narration`
stream, and the human sentences for what the engine reports (evictions, preemptions).

Each mirrored entry has fields `event` (machine name), `narration` (the sentence), `level`,
`ts` and `context` (JSON of every other field: worker_id, job_id, session_id, model...).
"""

from __future__ import annotations

import json

from gpu.events import EngineEvent
from worker.publisher import Publisher


class NarrationMirror:
    """A `worker.log` sink that queues each event on the publisher's narration buffer."""

    def __init__(self, publisher: Publisher) -> None:
        self.publisher = publisher

    def __call__(self, event_dict: dict) -> None:
        fields = {
            "event": str(event_dict.pop("event", "")),
            "narration": str(event_dict.pop("narration", "")),
            "level": str(event_dict.pop("level", "")),
            "ts": str(event_dict.pop("timestamp", "")),
        }
        fields["context"] = json.dumps(event_dict, default=str, ensure_ascii=False)
        self.publisher.narration(fields)


def narrate_engine_event(log, event: EngineEvent) -> None:
    """Log one `Engine.pop_events()` entry with its sentence."""
    if event.kind == "preempted":
        log.warning(
            "engine.preempted", job_id=event.request_id, session_id=event.session_id,
            narration=f"Preempted job {event.request_id}: freed {event.num_blocks} KV blocks "
            f"({event.num_tokens} tokens) for older requests; it will be recomputed",
            blocks=event.num_blocks, tokens=event.num_tokens,
        )
    elif event.kind == "session_evicted":
        log.info(
            "session.evicted", session_id=event.session_id,
            narration=f"Evicted session {event.session_id} ({event.num_tokens} cached tokens, "
            f"{event.num_blocks} blocks) to make room ({event.reason}); its next turn is "
            "recomputed",
            blocks=event.num_blocks, tokens=event.num_tokens, reason=event.reason,
        )
    elif event.kind == "session_expired":
        log.info(
            "session.expired", session_id=event.session_id,
            narration=f"Session {event.session_id} expired after its idle TTL; freed "
            f"{event.num_blocks} blocks",
            blocks=event.num_blocks, tokens=event.num_tokens,
        )
    else:
        log.info("engine.event", narration=f"Engine event {event.kind}", kind=event.kind)
