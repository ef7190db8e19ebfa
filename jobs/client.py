"""`OrcdClient`: submit jobs, stream their events, cancel them, end sessions (redis-py, sync).

    client = OrcdClient("redis://localhost:6379/0")
    job_id = client.submit("Once upon a time", max_tokens=32, temperature=0)
    for event in client.stream(job_id):          # from id 0: a late reader misses nothing
        if event.restart: ...                    # a redelivered attempt: drop shown text
        if event.kind == "token": print(event.data["text"], end="")
    done = client.generate(messages=[{"role": "user", "content": "Hi"}], session_id="s1")

`redis_url` is anything `redis.Redis.from_url` takes: `redis://`, `rediss://` (TLS),
`redis://user:password@host:port/db` (ACL user), `unix://`. Extra keyword arguments go to it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import redis

from jobs.errors import JobError, JobFailed, JobTimeout
from jobs.events import Done
from jobs.keys import CONTROL_FIELD, JOB_FIELD, Keys
from jobs.limits import DEFAULT_MODEL
from jobs.protocol import EventFollower, JobEvent, as_text, build_job, encode_job
from jobs.schema import EndSession, GenerationJob

CANCEL_TTL_S = 3600
READ_BLOCK_MS = 500


def route_for_session(
    keys: Keys, model: str, session_id: str | None, holder: str | None, alive: bool,
    holder_info: str | None,
) -> str:
    """The stream a job goes to: its session holder's routed stream while that worker's
    heartbeat lives and it serves the job's model, the model's shared stream otherwise."""
    if session_id and holder and alive and holder_info:
        if json.loads(holder_info).get("model") == model:
            return keys.routed(model, holder)
    return keys.jobs(model)


# What the sync and async clients share: everything but the Redis calls.


def validated_job(**fields: Any) -> GenerationJob:
    """build_job, with a refusal as JobError (pydantic's ValidationError is a ValueError)."""
    try:
        return build_job(**fields)
    except ValueError as exc:
        raise JobError(f"invalid job: {exc}") from None


def read_block_ms(job_id: str, deadline: float | None, timeout: float | None) -> int:
    """How long the next XREAD may block: READ_BLOCK_MS, less near the deadline; JobTimeout
    once it has passed."""
    if deadline is None:
        return READ_BLOCK_MS
    left = deadline - time.monotonic()
    if left <= 0:
        raise JobTimeout(f"job {job_id}: no answer within {timeout} s")
    return max(1, min(READ_BLOCK_MS, int(left * 1000)))


def outcome(job_id: str, event: JobEvent) -> Done | None:
    """The `done` payload of a final event, JobFailed for an `error`; None for the others."""
    if event.kind == "done":
        return Done.model_validate(event.data)
    if event.kind == "error":
        raise JobFailed(job_id, event.data.get("code", "?"), event.data.get("message", ""))
    return None


def holder_control_stream(keys: Keys, holder: str, alive: bool, info: str | None) -> str | None:
    """Where an end_session control for a session's holder goes; None when it is gone."""
    if not alive or info is None:
        return None
    return keys.routed(json.loads(info)["model"], holder)


class OrcdClient:
    """A backend's handle on orcd workers through one Redis."""

    def __init__(
        self,
        redis_url: str = "redis://localhost:6379/0",
        *,
        prefix: str = "orcd",
        connection: redis.Redis | None = None,
        **redis_options: Any,
    ) -> None:
        self.redis = connection if connection is not None else redis.Redis.from_url(
            redis_url, **redis_options
        )
        self.keys = Keys(prefix)

    def close(self) -> None:
        self.redis.close()

    def __enter__(self) -> OrcdClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----- jobs -------------------------------------------------------------------------------

    def submit(
        self,
        prompt: str | None = None,
        *,
        messages: list[dict] | None = None,
        model: str = DEFAULT_MODEL,
        session_id: str | None = None,
        job_id: str | None = None,
        **options: Any,
    ) -> str:
        """Validate and enqueue a job; returns its id. `options`: the job's other fields
        (`stream_interval`, `metadata`, `sampling`...) and sampling fields (`max_tokens`...)."""
        job = validated_job(model=model, prompt=prompt, messages=messages,
                            session_id=session_id, job_id=job_id, **options)
        stream = self.stream_for(model, session_id)
        self.redis.xadd(stream, {JOB_FIELD: encode_job(job)})
        return job.job_id

    def stream_for(self, model: str, session_id: str | None) -> str:
        """Where a job of this model and session goes now (see `route_for_session`)."""
        if not session_id:
            return self.keys.jobs(model)
        holder = as_text(self.redis.get(self.keys.session(session_id)))
        if holder is None:
            return self.keys.jobs(model)
        pipe = self.redis.pipeline(transaction=False)
        pipe.exists(self.keys.worker(holder))
        pipe.hget(self.keys.workers, holder)
        alive, info = pipe.execute()
        return route_for_session(self.keys, model, session_id, holder, bool(alive), as_text(info))

    def events(self, job_id: str, *, timeout: float | None = None) -> Iterator[JobEvent]:
        """Every raw event of the job from id 0, until `done` or `error`; all attempts."""
        key = self.keys.out(job_id)
        last_id = "0"
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            block = read_block_ms(job_id, deadline, timeout)
            # XREAD with BLOCK returns None (not []) when the block times out.
            reply = self.redis.xread({key: last_id}, block=block, count=512)
            for _, entries in reply or ():
                for entry_id, fields in entries:
                    event = JobEvent.from_entry(entry_id, fields)
                    last_id = event.id
                    yield event
                    if event.final:
                        return

    def stream(self, job_id: str, *, timeout: float | None = None) -> Iterator[JobEvent]:
        """The job's events as a reader should act on them: tokens of superseded attempts
        dropped, the `started` of a redelivery marked `restart=True`; ends at done/error."""
        follower = EventFollower()
        for event in self.events(job_id, timeout=timeout):
            shown = follower.feed(event)
            if shown is not None:
                yield shown

    def wait(self, job_id: str, *, timeout: float | None = None) -> Done:
        """The job's `done` payload; raises `JobFailed` on an `error` event."""
        for event in self.stream(job_id, timeout=timeout):
            done = outcome(job_id, event)
            if done is not None:
                return done
        raise JobError(f"job {job_id}: output stream ended without done")  # pragma: no cover

    def generate(
        self, prompt: str | None = None, *, timeout: float | None = None, **job: Any
    ) -> Done:
        """Submit and wait: the whole answer with usage and timings."""
        return self.wait(self.submit(prompt, **job), timeout=timeout)

    def cancel(self, job_id: str, *, ttl_s: int = CANCEL_TTL_S) -> None:
        """Ask the worker to stop the job; it ends within one engine step (`cancelled`)."""
        self.redis.set(self.keys.cancel(job_id), 1, ex=ttl_s)

    # ----- sessions ---------------------------------------------------------------------------

    def end_session(self, session_id: str) -> bool:
        """Free a session's KV on the worker holding it; False if no live worker holds it.
        The next job of the session goes to the shared stream and is computed afresh."""
        control = EndSession(v=1, op="end_session", session_id=session_id)
        holder = as_text(self.redis.get(self.keys.session(session_id)))
        if holder is None:
            return False
        pipe = self.redis.pipeline(transaction=False)
        pipe.exists(self.keys.worker(holder))
        pipe.hget(self.keys.workers, holder)
        alive, info = pipe.execute()
        self.redis.delete(self.keys.session(session_id))
        stream = holder_control_stream(self.keys, holder, bool(alive), as_text(info))
        if stream is None:
            return False
        self.redis.xadd(stream, {CONTROL_FIELD: control.model_dump_json()})
        return True

    def workers(self) -> dict[str, dict]:
        """Live workers' last heartbeats, by worker id."""
        entries = self.redis.hgetall(self.keys.workers)
        if not entries:
            return {}
        ids = [as_text(k) for k in entries]
        pipe = self.redis.pipeline(transaction=False)
        for worker_id in ids:
            pipe.exists(self.keys.worker(worker_id))
        alive = pipe.execute()
        return {
            worker_id: json.loads(entries[raw])
            for worker_id, raw, live in zip(ids, entries, alive, strict=True)
            if live
        }
