"""`AsyncOrcdClient`: the asyncio twin of `OrcdClient` (redis.asyncio), for backend services.

    async with AsyncOrcdClient("rediss://user:secret@redis:6380/0") as client:
        job_id = await client.submit(messages=[...], session_id="s1", max_tokens=64)
        async for event in client.stream(job_id):
            ...

Same contract, same routing, attempt handling and reconnection as the sync client
(`jobs.protocol`, `jobs.client`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import redis.asyncio as aioredis

from jobs.client import (
    CANCEL_TTL_S,
    RECONNECT_ERRORS,
    RECONNECT_S,
    SCAN_BATCH,
    JobState,
    OnDisconnect,
    Reconnect,
    holder_control_stream,
    holds_job,
    live_workers,
    no_worker,
    outcome,
    read_block_ms,
    route_for_session,
    serving_workers,
    state_from_last,
    validated_job,
)
from jobs.errors import JobError
from jobs.events import Done
from jobs.keys import CONTROL_FIELD, JOB_FIELD, Keys
from jobs.limits import DEFAULT_MODEL
from jobs.protocol import EventFollower, JobEvent, as_text, encode_job
from jobs.queue import QueuePosition, position_in, read_pipeline, serving_rate
from jobs.redis_url import connect_async
from jobs.schema import EndSession


class AsyncOrcdClient:
    """A backend's asyncio handle on orcd workers through one Redis."""

    def __init__(
        self,
        redis_url: str = "redis://localhost:6379/0",
        *,
        prefix: str = "orcd",
        connection: aioredis.Redis | None = None,
        **redis_options: Any,
    ) -> None:
        self.redis = connection if connection is not None else connect_async(
            redis_url, **redis_options
        )
        self.keys = Keys(prefix)

    async def close(self) -> None:
        await self.redis.aclose()

    async def __aenter__(self) -> AsyncOrcdClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def submit(
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
        job = validated_job(model=model, prompt=prompt, messages=messages,
                            session_id=session_id, job_id=job_id, **options)
        if require_worker:
            workers = await self.workers()
            if not serving_workers(model, workers):
                raise no_worker(model, workers)
        await self.redis.xadd(await self.stream_for(model, session_id),
                              {JOB_FIELD: encode_job(job)})
        return job.job_id

    async def stream_for(self, model: str, session_id: str | None) -> str:
        if not session_id:
            return self.keys.jobs(model)
        holder = as_text(await self.redis.get(self.keys.session(session_id)))
        if holder is None:
            return self.keys.jobs(model)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.exists(self.keys.worker(holder))
            pipe.hget(self.keys.workers, holder)
            alive, info = await pipe.execute()
        return route_for_session(self.keys, model, session_id, holder, bool(alive), as_text(info))

    async def events(self, job_id: str, *, timeout: float | None = None,
                     reconnect_s: float | None = RECONNECT_S,
                     on_disconnect: OnDisconnect | None = None) -> AsyncIterator[JobEvent]:
        key = self.keys.out(job_id)
        last_id = "0"
        deadline = None if timeout is None else time.monotonic() + timeout
        retry = Reconnect(job_id, timeout, deadline, reconnect_s, on_disconnect)
        while True:
            block = read_block_ms(job_id, deadline, timeout)
            try:
                reply = await self.redis.xread({key: last_id}, block=block, count=512)
            except RECONNECT_ERRORS as exc:
                await asyncio.sleep(retry.failed(exc, last_id))
                continue
            retry.succeeded()
            for _, entries in reply or ():
                for entry_id, fields in entries:
                    event = JobEvent.from_entry(entry_id, fields)
                    last_id = event.id
                    yield event
                    if event.final:
                        return

    async def stream(self, job_id: str, *, timeout: float | None = None,
                     reconnect_s: float | None = RECONNECT_S,
                     on_disconnect: OnDisconnect | None = None) -> AsyncIterator[JobEvent]:
        follower = EventFollower()
        async for event in self.events(job_id, timeout=timeout, reconnect_s=reconnect_s,
                                       on_disconnect=on_disconnect):
            shown = follower.feed(event)
            if shown is not None:
                yield shown

    async def wait(self, job_id: str, *, timeout: float | None = None,
                   reconnect_s: float | None = RECONNECT_S) -> Done:
        async for event in self.stream(job_id, timeout=timeout, reconnect_s=reconnect_s):
            done = outcome(job_id, event)
            if done is not None:
                return done
        raise JobError(f"job {job_id}: output stream ended without done")  # pragma: no cover

    async def generate(self, prompt: str | None = None, *, timeout: float | None = None,
                       **job: Any) -> Done:
        return await self.wait(await self.submit(prompt, **job), timeout=timeout)

    async def cancel(self, job_id: str, *, ttl_s: int = CANCEL_TTL_S) -> None:
        await self.redis.set(self.keys.cancel(job_id), 1, ex=ttl_s)

    async def job_state(self, job_id: str) -> JobState:
        out = self.keys.out(job_id)
        state = state_from_last(job_id, await self.redis.xrevrange(out, count=1))
        if state is not None:
            return state
        async for key in self.redis.scan_iter(match=self.keys.jobs("*"), count=SCAN_BATCH,
                                              _type="stream"):
            start = "-"
            while entries := await self.redis.xrange(key, min=start, count=SCAN_BATCH):
                if any(holds_job(fields, job_id) for _, fields in entries):
                    return JobState(job_id, "queued", stream=as_text(key))
                start = "(" + as_text(entries[-1][0])
        state = state_from_last(job_id, await self.redis.xrevrange(out, count=1))
        return state or JobState(job_id, "unknown")

    async def workers(self) -> dict[str, dict]:
        entries = await self.redis.hgetall(self.keys.workers)
        if not entries:
            return {}
        async with self.redis.pipeline(transaction=False) as pipe:
            for worker_id in entries:
                pipe.exists(self.keys.worker(as_text(worker_id)))
            alive = await pipe.execute()
        return live_workers(entries, alive)

    async def serving_workers(self, model: str = DEFAULT_MODEL) -> list[str]:
        return serving_workers(model, await self.workers())

    async def queue_position(self, job_id: str, *, model: str = DEFAULT_MODEL
                             ) -> QueuePosition | None:  # fmt: skip
        """As `OrcdClient.queue_position`."""
        workers = {w: info for w, info in (await self.workers()).items()
                   if info.get("model") == model}
        rate, aging = serving_rate(model, workers)
        streams = [(self.keys.jobs(model), rate)] + [
            (self.keys.routed(model, w), serving_rate(model, {w: info})[0])
            for w, info in workers.items()]
        for stream, stream_rate in streams:
            async with self.redis.pipeline(transaction=False) as pipe:
                read_pipeline(pipe, stream)
                replies = await pipe.execute(raise_on_error=False)
            found = position_in(job_id, stream, replies, int(time.time() * 1000), aging,
                                stream_rate)
            if found is not None:
                return found
        return None

    async def end_session(self, session_id: str) -> bool:
        control = EndSession(v=1, op="end_session", session_id=session_id)
        holder = as_text(await self.redis.get(self.keys.session(session_id)))
        if holder is None:
            return False
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.exists(self.keys.worker(holder))
            pipe.hget(self.keys.workers, holder)
            alive, info = await pipe.execute()
        await self.redis.delete(self.keys.session(session_id))
        stream = holder_control_stream(self.keys, holder, bool(alive), as_text(info))
        if stream is None:
            return False
        await self.redis.xadd(stream, {CONTROL_FIELD: control.model_dump_json()})
        return True
