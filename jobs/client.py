"""`OrcdClient`: submit jobs, stream their events, cancel them, end sessions (redis-py, sync).

    client = OrcdClient("redis://localhost:6379/0")
    job_id = client.submit("Once upon a time", max_tokens=32, temperature=0)
    for event in client.stream(job_id):          # from id 0: a late reader misses nothing
        if event.restart: ...                    # a redelivered attempt: drop shown text
        if event.kind == "token": print(event.data["text"], end="")
    done = client.generate(messages=[{"role": "user", "content": "Hi"}], session_id="s1")

Readers survive a Redis restart: `events`, `stream` and `wait` retry a lost connection with
backoff (0.1 s doubling to 2 s) for up to `reconnect_s` seconds (default 30; never past the
caller's `timeout`) and resume after the last event they read, so nothing is repeated or lost
(with a Redis that persists its data; otherwise the events written before the restart are
gone, and the reader resumes with what the worker publishes after it).

`redis_url` is anything `redis.Redis.from_url` takes: `redis://`, `rediss://` (TLS),
`redis://user:password@host:port/db` (ACL user), `unix://`. Extra keyword arguments go to it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

import redis

from jobs.errors import JobError, JobFailed, JobTimeout, NoWorker
from jobs.events import Done
from jobs.keys import CONTROL_FIELD, JOB_FIELD, Keys
from jobs.limits import DEFAULT_MODEL
from jobs.protocol import EventFollower, JobEvent, as_text, build_job, encode_job
from jobs.queue import QueuePosition, position_in, read_pipeline, serving_rate
from jobs.redis_url import connect
from jobs.schema import EndSession, GenerationJob

CANCEL_TTL_S = 3600
READ_BLOCK_MS = 500
RECONNECT_S = 30.0  # how long a reader retries an unreachable Redis, by default
BACKOFF_S = (0.1, 2.0)  # first and longest pause between reconnection attempts
# What a reader retries: the connection is gone or Redis is still loading its data
# (BusyLoadingError is a ConnectionError).
RECONNECT_ERRORS = (redis.ConnectionError, redis.TimeoutError)
SCAN_BATCH = 1000

# Called once when a reader loses Redis: (the error, the id of the last event read).
OnDisconnect = Callable[[Exception, str], None]


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


@dataclass(slots=True)
class Reconnect:
    """A reader's retries while Redis is unreachable: pauses of 0.1 s doubling to 2 s, for up
    to `reconnect_s` seconds from the first failure (None: no limit but the deadline; 0: no
    retry), never past the caller's deadline (then JobTimeout). Past `reconnect_s` the last
    Redis error is raised. `on_disconnect` is called once per outage."""

    job_id: str
    timeout: float | None
    deadline: float | None
    reconnect_s: float | None = RECONNECT_S
    on_disconnect: OnDisconnect | None = None
    since: float | None = None  # when the current outage began
    pause: float = BACKOFF_S[0]

    def failed(self, exc: Exception, last_id: str) -> float:
        """Seconds to wait before the next try; raises when there is no time left."""
        now = time.monotonic()
        if self.since is None:
            if self.reconnect_s is not None and self.reconnect_s <= 0:
                raise exc
            self.since = now
            if self.on_disconnect is not None:
                self.on_disconnect(exc, last_id)
        pause, self.pause = self.pause, min(self.pause * 2, BACKOFF_S[1])
        if self.reconnect_s is not None:
            left = self.since + self.reconnect_s - now
            if left <= 0:
                raise exc
            pause = min(pause, left)
        if self.deadline is not None:
            left = self.deadline - now - 0.05  # leave time for one last read
            if left <= 0:
                raise JobTimeout(f"job {self.job_id}: no answer within {self.timeout} s "
                                 f"(Redis unreachable for {now - self.since:.1f} s: "
                                 f"{one_line(exc)})") from exc
            pause = min(pause, left)
        return pause

    def succeeded(self) -> None:
        self.since, self.pause = None, BACKOFF_S[0]


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def shown_url(url: str | None) -> str:
    """A Redis URL fit to print or log: its password replaced by `***`."""
    if not url:
        return "Redis"
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


def serving_workers(model: str, workers: dict[str, dict]) -> list[str]:
    """Ids of the live workers (heartbeats) that take new jobs of `model`: not draining."""
    return sorted(worker_id for worker_id, info in workers.items()
                  if info.get("model") == model and info.get("state") != "draining")


def no_worker(model: str, workers: dict[str, dict]) -> NoWorker:
    return NoWorker(model, {
        worker_id: "draining" if info.get("model") == model else f"serves {info.get('model')}"
        for worker_id, info in workers.items()
    })


def live_workers(entries: dict, alive: list) -> dict[str, dict]:
    """The `workers` hash's entries whose heartbeat key still exists."""
    return {as_text(worker_id): json.loads(raw)
            for (worker_id, raw), live in zip(entries.items(), alive, strict=True) if live}


@dataclass(frozen=True, slots=True)
class JobState:
    """Where a job is, as its output stream and the job streams show it.

    `queued`: its entry is in a job stream and no worker has written an event yet; `running`:
    its output stream has events but no `done` or `error`; `finished`: it ended (`last` is that
    event); `unknown`: neither (a wrong id, another prefix, or its output stream expired:
    workers keep it `--out-ttl` seconds after the end)."""

    job_id: str
    state: Literal["queued", "running", "finished", "unknown"]
    last: JobEvent | None = None  # the newest event of its output stream
    stream: str | None = None  # the job stream holding it, when queued


def state_from_last(job_id: str, last: list) -> JobState | None:
    """The state an XREVRANGE COUNT 1 of the output stream tells, None if it is empty."""
    if not last:
        return None
    event = JobEvent.from_entry(*last[0])
    return JobState(job_id, "finished" if event.final else "running", event)


def holds_job(fields: dict, job_id: str) -> bool:
    """Whether a job stream entry is the job `job_id` (its JSON parsed; controls are not)."""
    raw = fields.get(JOB_FIELD.encode(), fields.get(JOB_FIELD))
    if raw is None or (job_id.encode() if isinstance(raw, bytes) else job_id) not in raw:
        return False
    try:
        return json.loads(raw).get("job_id") == job_id
    except (ValueError, AttributeError):
        return False


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
        self.redis = connection if connection is not None else connect(
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
        require_worker: bool = False,
        **options: Any,
    ) -> str:
        """Validate and enqueue a job; returns its id. `options`: the job's other fields
        (`stream_interval`, `metadata`, `sampling`, `parse_special`...) and sampling fields
        (`max_tokens`...). With `require_worker`, raise `NoWorker` instead of queueing when no
        live worker serves the model (a queued job would wait for one to start)."""
        job = validated_job(model=model, prompt=prompt, messages=messages,
                            session_id=session_id, job_id=job_id, **options)
        if require_worker:
            workers = self.workers()
            if not serving_workers(model, workers):
                raise no_worker(model, workers)
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

    def events(
        self,
        job_id: str,
        *,
        timeout: float | None = None,
        reconnect_s: float | None = RECONNECT_S,
        on_disconnect: OnDisconnect | None = None,
    ) -> Iterator[JobEvent]:
        """Every raw event of the job from id 0, until `done` or `error`; all attempts. A lost
        Redis is retried (see `Reconnect`) and reading resumes after the last event read."""
        key = self.keys.out(job_id)
        last_id = "0"
        deadline = None if timeout is None else time.monotonic() + timeout
        retry = Reconnect(job_id, timeout, deadline, reconnect_s, on_disconnect)
        while True:
            block = read_block_ms(job_id, deadline, timeout)
            try:
                # XREAD with BLOCK returns None (not []) when the block times out.
                reply = self.redis.xread({key: last_id}, block=block, count=512)
            except RECONNECT_ERRORS as exc:
                time.sleep(retry.failed(exc, last_id))
                continue
            retry.succeeded()
            for _, entries in reply or ():
                for entry_id, fields in entries:
                    event = JobEvent.from_entry(entry_id, fields)
                    last_id = event.id
                    yield event
                    if event.final:
                        return

    def stream(
        self,
        job_id: str,
        *,
        timeout: float | None = None,
        reconnect_s: float | None = RECONNECT_S,
        on_disconnect: OnDisconnect | None = None,
    ) -> Iterator[JobEvent]:
        """The job's events as a reader should act on them: tokens of superseded attempts
        dropped, the `started` of a redelivery marked `restart=True`; ends at done/error."""
        follower = EventFollower()
        for event in self.events(job_id, timeout=timeout, reconnect_s=reconnect_s,
                                 on_disconnect=on_disconnect):
            shown = follower.feed(event)
            if shown is not None:
                yield shown

    def wait(self, job_id: str, *, timeout: float | None = None,
             reconnect_s: float | None = RECONNECT_S) -> Done:
        """The job's `done` payload; raises `JobFailed` on an `error` event."""
        for event in self.stream(job_id, timeout=timeout, reconnect_s=reconnect_s):
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
        """Ask the worker to stop the job; it ends within one engine step (`cancelled`). A job
        still queued is cancelled as soon as a worker takes it (within `ttl_s`)."""
        self.redis.set(self.keys.cancel(job_id), 1, ex=ttl_s)

    def job_state(self, job_id: str) -> JobState:
        """Queued, running, finished or unknown (see `JobState`). Finding a queued job reads
        the job streams, which hold only jobs not yet acknowledged."""
        out = self.keys.out(job_id)
        state = state_from_last(job_id, self.redis.xrevrange(out, count=1))
        if state is not None:
            return state
        for key in self.redis.scan_iter(match=self.keys.jobs("*"), count=SCAN_BATCH,
                                        _type="stream"):
            start = "-"
            while entries := self.redis.xrange(key, min=start, count=SCAN_BATCH):
                if any(holds_job(fields, job_id) for _, fields in entries):
                    return JobState(job_id, "queued", stream=as_text(key))
                start = "(" + as_text(entries[-1][0])
        # It may have run to its end while the streams were read.
        state = state_from_last(job_id, self.redis.xrevrange(out, count=1))
        return state or JobState(job_id, "unknown")

    def queue_position(self, job_id: str, *, model: str = DEFAULT_MODEL
                       ) -> QueuePosition | None:  # fmt: skip
        """Where a job no worker has started yet stands: its position among the waiting jobs
        of its stream (the model's shared one, or a live worker's routed one) and an ETA from
        the workers' recent throughput (jobs/queue.py). None when it is not waiting (running,
        finished, or unknown)."""
        workers = {w: info for w, info in self.workers().items() if info.get("model") == model}
        rate, aging = serving_rate(model, workers)
        streams = [(self.keys.jobs(model), rate)] + [
            (self.keys.routed(model, w), serving_rate(model, {w: info})[0])
            for w, info in workers.items()]
        for stream, stream_rate in streams:
            pipe = self.redis.pipeline(transaction=False)
            read_pipeline(pipe, stream)
            replies = pipe.execute(raise_on_error=False)
            found = position_in(job_id, stream, replies, int(time.time() * 1000), aging,
                                stream_rate)
            if found is not None:
                return found
        return None

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
        pipe = self.redis.pipeline(transaction=False)
        for worker_id in entries:
            pipe.exists(self.keys.worker(as_text(worker_id)))
        return live_workers(entries, pipe.execute())

    def serving_workers(self, model: str = DEFAULT_MODEL) -> list[str]:
        """Ids of the live workers taking new jobs of `model` (not draining)."""
        return serving_workers(model, self.workers())
