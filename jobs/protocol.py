"""What the sync and async clients share: building jobs, decoding events, following attempts.

A job can run more than once (at-least-once delivery): a worker dies mid-answer, another
reclaims the job and publishes `started` with a higher `attempt` and `resumed_from: N`, then
goes on at token index N: the text shown so far stands. `EventFollower` turns the raw output
stream into what a reader should act on: repeated indices and tokens of superseded attempts
are dropped, and the `started` of a new attempt that starts over (no `resumed_from`: its
output stream had expired, or an older worker) carries `restart=True`, meaning "discard the
text you have shown so far".
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from jobs.keys import DATA_FIELD, EVENT_FIELD
from jobs.schema import GenerationJob, Message, Sampling


def new_job_id() -> str:
    return uuid.uuid4().hex


def build_job(
    *,
    model: str,
    prompt: str | None = None,
    messages: list[dict] | list[Message] | None = None,
    session_id: str | None = None,
    job_id: str | None = None,
    sampling: Sampling | dict | None = None,
    stream: bool = True,
    stream_interval: int = 1,
    priority: int = 0,
    metadata: dict | None = None,
    parse_special: bool = False,
    deadline: int | None = None,
    timeout_s: float | None = None,
    **sampling_fields: Any,
) -> GenerationJob:
    """A validated job; `sampling_fields` (temperature=..., max_tokens=...) override `sampling`."""
    base = sampling.model_dump() if isinstance(sampling, Sampling) else dict(sampling or {})
    base.update(sampling_fields)
    payload = {
        "v": 1,
        "job_id": job_id or new_job_id(),
        "model": model,
        "prompt": prompt,
        "messages": [m.model_dump() if isinstance(m, Message) else m for m in messages]
        if messages is not None else None,
        "session_id": session_id,
        "sampling": base,
        "stream": stream,
        "stream_interval": stream_interval,
        "priority": priority,
        "metadata": metadata or {},
        "parse_special": parse_special,
        "deadline": deadline,
        "timeout_s": timeout_s,
    }
    # Validated through JSON so that the client refuses exactly what a worker would.
    return GenerationJob.model_validate_json(json.dumps(payload))


def as_text(value: bytes | str | None) -> str | None:
    """A Redis reply value as str (redis-py gives bytes unless decode_responses is on)."""
    return value.decode() if isinstance(value, bytes) else value


@dataclass(slots=True)
class JobEvent:
    """One entry of `orcd:out:{job_id}`: its stream id, kind, payload and attempt."""

    id: str
    kind: str
    data: dict[str, Any]
    attempt: int = 1
    restart: bool = False  # a `started` superseding an earlier attempt: discard shown text

    @property
    def final(self) -> bool:
        return self.kind in ("done", "error")

    @classmethod
    def from_entry(cls, entry_id: bytes | str, fields: dict) -> JobEvent:
        fields = {as_text(k): v for k, v in fields.items()}
        kind = as_text(fields.get(EVENT_FIELD, b"?"))
        data = json.loads(fields.get(DATA_FIELD) or "{}")
        return cls(as_text(entry_id), kind, data, int(data.get("attempt", 0) or 0))


@dataclass(slots=True)
class EventFollower:
    """Filters a job's raw events down to those of the newest attempt, in order."""

    attempt: int = 0
    next_index: int = 0
    last_id: str = "0"
    finished: bool = False
    text: str = ""  # text of the current attempt so far
    _seen_started: bool = field(default=False)

    def feed(self, event: JobEvent) -> JobEvent | None:
        """The event to hand to the reader, or None when it belongs to an older attempt or
        repeats a token already seen (a publish retried after a lost connection)."""
        self.last_id = event.id
        if self.finished:
            return None
        if event.kind == "started":
            if event.attempt < self.attempt:
                return None
            # A newer attempt with `resumed_from` goes on after the text shown: no restart.
            resumed = event.data.get("resumed_from") is not None
            event.restart = self._seen_started and event.attempt > self.attempt and not resumed
            if event.restart or not self._seen_started:
                self.text, self.next_index = "", 0
            self.attempt, self._seen_started = event.attempt, True
            return event
        if event.kind == "token":
            if event.attempt < self.attempt:
                return None
            if event.attempt > self.attempt and event.data.get("index", 0) > 0:
                self.attempt = event.attempt  # its `started` was lost: a resumed attempt
            elif event.attempt > self.attempt:  # its `started` was lost: treat as a restart
                event.restart, self.attempt, self.text = self._seen_started, event.attempt, ""
                self.next_index, self._seen_started = 0, True
            if event.data.get("index", 0) < self.next_index:
                return None
            self.next_index = event.data["index"] + len(event.data.get("token_ids", ()))
            self.text += event.data.get("text", "")
            return event
        if event.final:
            self.finished = True
            if event.kind == "done":
                self.text = event.data.get("text", self.text)
        return event


def encode_job(job: GenerationJob) -> str:
    """The job's wire JSON. `parse_special` is written only when true, `deadline`,
    `timeout_s` and `sampling.response_format` only when set, so that a job that does not use
    them is read by workers that predate the fields (they refuse unknown fields); `priority`
    only when not 0, so that the workers' admission script parses only the jobs that carry
    one."""
    exclude: dict = {name: True for name, unused in (
        ("parse_special", not job.parse_special), ("deadline", job.deadline is None),
        ("timeout_s", job.timeout_s is None), ("priority", job.priority == 0)) if unused}
    if job.sampling.response_format is None:
        exclude["sampling"] = {"response_format"}
    return job.model_dump_json(exclude_none=False, exclude=exclude or None)
