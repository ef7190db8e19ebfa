"""Client protocol on fakeredis (sync and asyncio): where jobs go, reading events from id 0,
attempts, cancel, end_session; URLs passed through; `import jobs` stays free of torch."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import fakeredis
import pytest
import redis

from jobs import (
    AsyncOrcdClient,
    EventFollower,
    JobEvent,
    JobFailed,
    JobTimeout,
    NoWorker,
    OrcdClient,
)
from jobs.errors import JobError
from jobs.keys import CONTROL_FIELD, JOB_FIELD, Keys

KEYS = Keys()
MODEL = "smollm2-135m"


@pytest.fixture
def server():
    return fakeredis.FakeServer()


@pytest.fixture
def client(server):
    return OrcdClient(connection=fakeredis.FakeRedis(server=server))


def publish(r, job_id, kind, data):
    r.xadd(KEYS.out(job_id), {"event": kind, "data": json.dumps(data)})


def done_data(text="ok"):
    return {"finish_reason": "stop", "text": text,
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "cached_tokens": 0},
            "timings": {"queue_ms": 0, "ttft_ms": 1, "total_ms": 2, "decode_tokens_per_s": None},
            "metadata": {"k": "v"}}


def test_submit_puts_a_valid_job_on_the_shared_stream(client):
    job_id = client.submit("Hello", max_tokens=8, temperature=0, metadata={"k": "v"})
    entries = client.redis.xrange(KEYS.jobs(MODEL))
    assert len(entries) == 1
    job = json.loads(entries[0][1][JOB_FIELD.encode()])
    assert job["job_id"] == job_id and job["v"] == 1 and job["prompt"] == "Hello"
    assert job["sampling"]["max_tokens"] == 8 and job["sampling"]["temperature"] == 0
    assert job["messages"] is None and job["metadata"] == {"k": "v"}


def test_submit_refuses_what_a_worker_would_refuse(client):
    with pytest.raises(JobError, match="exactly one"):
        client.submit()
    with pytest.raises(JobError, match="max_tokens"):
        client.submit("x", max_tokens=0)
    assert client.redis.exists(KEYS.jobs(MODEL)) == 0


def test_session_job_goes_to_its_live_worker_only(client):
    r = client.redis
    assert client.stream_for(MODEL, "s1") == KEYS.jobs(MODEL)  # no holder yet
    r.set(KEYS.session("s1"), "w1")
    r.hset(KEYS.workers, "w1", json.dumps({"model": MODEL}))
    assert client.stream_for(MODEL, "s1") == KEYS.jobs(MODEL)  # holder's heartbeat is gone
    r.set(KEYS.worker("w1"), "{}", px=5000)
    assert client.stream_for(MODEL, "s1") == KEYS.routed(MODEL, "w1")
    assert client.stream_for("other-model", "s1") == KEYS.jobs("other-model")
    job_id = client.submit("Hi", session_id="s1")
    routed = r.xrange(KEYS.routed(MODEL, "w1"))
    assert json.loads(routed[0][1][b"job"])["job_id"] == job_id


def test_late_reader_gets_every_event_from_id_0(client):
    r = client.redis
    publish(r, "j1", "queued", {"position": 0, "queue_depth": 1})
    publish(r, "j1", "started", {"worker_id": "w1", "attempt": 1})
    publish(r, "j1", "token", {"index": 0, "token_ids": [1], "text": "Hel", "attempt": 1})
    publish(r, "j1", "token", {"index": 1, "token_ids": [2], "text": "lo", "attempt": 1})
    publish(r, "j1", "done", done_data("Hello"))
    kinds = [e.kind for e in client.stream("j1", timeout=5)]
    assert kinds == ["queued", "started", "token", "token", "done"]
    done = client.wait("j1", timeout=5)
    assert done.text == "Hello" and done.metadata == {"k": "v"}


def test_a_redelivered_attempt_discards_the_earlier_text(client):
    r = client.redis
    publish(r, "j2", "started", {"worker_id": "w1", "attempt": 1})
    publish(r, "j2", "token", {"index": 0, "token_ids": [1], "text": "Par", "attempt": 1})
    publish(r, "j2", "started", {"worker_id": "w2", "attempt": 2})
    publish(r, "j2", "token", {"index": 1, "token_ids": [9], "text": "late", "attempt": 1})
    publish(r, "j2", "token", {"index": 0, "token_ids": [1], "text": "Par", "attempt": 2})
    publish(r, "j2", "token", {"index": 0, "token_ids": [1], "text": "Par", "attempt": 2})
    publish(r, "j2", "token", {"index": 1, "token_ids": [2], "text": "is", "attempt": 2})
    publish(r, "j2", "done", done_data("Paris"))
    shown = list(client.stream("j2", timeout=5))
    assert [(e.kind, e.attempt, e.restart) for e in shown] == [
        ("started", 1, False), ("token", 1, False), ("started", 2, True),
        ("token", 2, False), ("token", 2, False), ("done", 0, False)]
    text = ""
    for event in shown:
        if event.restart:
            text = ""
        if event.kind == "token":
            text += event.data["text"]
    assert text == "Paris"
    assert len(list(client.events("j2", timeout=5))) == 8  # the raw view keeps everything


def test_follower_treats_tokens_of_a_newer_attempt_without_started_as_restart():
    follower = EventFollower()
    assert follower.feed(JobEvent("1-0", "started", {"attempt": 1}, 1)) is not None
    follower.feed(JobEvent("2-0", "token", {"index": 0, "token_ids": [1], "text": "a"}, 1))
    event = follower.feed(JobEvent("3-0", "token", {"index": 0, "token_ids": [1], "text": "b"}, 2))
    assert event.restart and follower.text == "b"


def test_follower_keeps_the_text_shown_when_an_attempt_resumes():
    """A reclaimed attempt that resumes (started.resumed_from) goes on after the shown text:
    no restart, no repeated index, and the text reads as one answer."""
    follower = EventFollower()
    follower.feed(JobEvent("1-0", "started", {"attempt": 1}, 1))
    follower.feed(JobEvent("2-0", "token", {"index": 0, "token_ids": [1, 2], "text": "Pa"}, 1))
    started = follower.feed(JobEvent("3-0", "started", {"attempt": 2, "resumed_from": 2}, 2))
    assert started is not None and not started.restart
    assert follower.feed(JobEvent("4-0", "token", {"index": 1, "token_ids": [2], "text": "a"},
                                  2)) is None  # an index already shown
    follower.feed(JobEvent("5-0", "token", {"index": 2, "token_ids": [3], "text": "ris"}, 2))
    assert follower.text == "Paris"
    # a resumed attempt whose `started` was lost is no restart either
    lost = EventFollower()
    lost.feed(JobEvent("1-0", "started", {"attempt": 1}, 1))
    lost.feed(JobEvent("2-0", "token", {"index": 0, "token_ids": [1], "text": "a"}, 1))
    event = lost.feed(JobEvent("3-0", "token", {"index": 1, "token_ids": [2], "text": "b"}, 2))
    assert not event.restart and lost.text == "ab"


def test_error_event_raises_job_failed(client):
    publish(client.redis, "j3", "error", {"code": "invalid_request", "message": "too long"})
    with pytest.raises(JobFailed) as info:
        client.wait("j3", timeout=5)
    assert info.value.code == "invalid_request" and "too long" in str(info.value)


def test_wait_times_out(client):
    with pytest.raises(JobTimeout):
        client.wait("nobody", timeout=0.2)


def test_cancel_sets_the_key_with_a_ttl(client):
    client.cancel("j4")
    assert client.redis.get(KEYS.cancel("j4")) == b"1"
    assert 3500 < client.redis.ttl(KEYS.cancel("j4")) <= 3600


def test_end_session_sends_a_control_message_to_the_holder(client):
    r = client.redis
    assert client.end_session("s9") is False
    r.set(KEYS.session("s9"), "w1")
    r.set(KEYS.worker("w1"), "{}")
    r.hset(KEYS.workers, "w1", json.dumps({"model": MODEL}))
    assert client.end_session("s9") is True
    assert r.exists(KEYS.session("s9")) == 0
    (_, fields), = r.xrange(KEYS.routed(MODEL, "w1"))
    assert json.loads(fields[CONTROL_FIELD.encode()]) == {
        "v": 1, "op": "end_session", "session_id": "s9"}


def test_workers_lists_only_live_heartbeats(client):
    r = client.redis
    r.hset(KEYS.workers, mapping={"w1": json.dumps({"model": "a"}), "w2": json.dumps({})})
    r.set(KEYS.worker("w1"), "{}")
    assert client.workers() == {"w1": {"model": "a"}}


def test_prefix_is_configurable(server):
    client = OrcdClient(connection=fakeredis.FakeRedis(server=server), prefix="tenant7")
    client.submit("Hi")
    assert client.redis.exists(f"tenant7:jobs:{MODEL}") == 1


@pytest.mark.parametrize("url, expected", [
    ("redis://alice:s3cret@cache.example:6380/2",
     {"username": "alice", "password": "s3cret", "host": "cache.example", "port": 6380, "db": 2}),
    ("rediss://:tok@secure.example:6390/0", {"password": "tok", "host": "secure.example",
                                             "port": 6390}),
])
def test_urls_are_passed_to_redis_py(url, expected):
    for cls in (OrcdClient, AsyncOrcdClient):
        pool = cls(url).redis.connection_pool
        kwargs = pool.connection_kwargs
        assert {k: kwargs.get(k) for k in expected} == expected
        if url.startswith("rediss"):
            assert "SSL" in pool.connection_class.__name__


def test_import_jobs_does_not_import_torch():
    code = "import sys, jobs; print('torch' in sys.modules, 'gpu' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_async_client_speaks_the_same_protocol(server):
    async def scenario():
        r = fakeredis.aioredis.FakeRedis(server=server)
        client = AsyncOrcdClient(connection=r)
        await r.set(KEYS.session("s1"), "w1")
        await r.set(KEYS.worker("w1"), "{}")
        await r.hset(KEYS.workers, "w1", json.dumps({"model": MODEL}))
        job_id = await client.submit(messages=[{"role": "user", "content": "Hi"}],
                                     session_id="s1", max_tokens=4)
        assert len(await r.xrange(KEYS.routed(MODEL, "w1"))) == 1
        for kind, data in [("started", {"worker_id": "w1", "attempt": 1}),
                           ("token", {"index": 0, "token_ids": [1], "text": "x", "attempt": 1}),
                           ("started", {"worker_id": "w2", "attempt": 2}),
                           ("token", {"index": 0, "token_ids": [1], "text": "y", "attempt": 2}),
                           ("done", done_data("y"))]:
            await r.xadd(KEYS.out(job_id), {"event": kind, "data": json.dumps(data)})
        shown = [(e.kind, e.restart) async for e in client.stream(job_id, timeout=5)]
        assert shown == [("started", False), ("token", False), ("started", True),
                         ("token", False), ("done", False)]
        assert (await client.wait(job_id, timeout=5)).text == "y"
        await client.cancel(job_id)
        assert await r.exists(KEYS.cancel(job_id)) == 1
        assert await client.end_session("s1") is True
        with pytest.raises(JobTimeout):
            await client.wait("nobody", timeout=0.2)
        publish_error = {"event": "error", "data": json.dumps({"code": "c", "message": "m"})}
        await r.xadd(KEYS.out("bad"), publish_error)
        with pytest.raises(JobFailed):
            await client.wait("bad", timeout=5)

    asyncio.run(scenario())


class Flaky:
    """A connection whose XREAD fails `failures` times (Redis restarting), then works."""

    def __init__(self, connection, failures: int) -> None:
        self.connection, self.failures, self.reads = connection, failures, []

    def __getattr__(self, name):
        return getattr(self.connection, name)

    def xread(self, streams, **options):
        self.reads.append(dict(streams))
        if self.failures:
            self.failures -= 1
            raise redis.ConnectionError("Connection closed by server.")
        return self.connection.xread(streams, **options)


def test_readers_reconnect_and_resume_after_the_last_event(server):
    r = fakeredis.FakeRedis(server=server)
    publish(r, "j5", "started", {"worker_id": "w1", "attempt": 1})
    publish(r, "j5", "token", {"index": 0, "token_ids": [1], "text": "Hel", "attempt": 1})
    flaky = Flaky(r, 0)
    client = OrcdClient(connection=flaky)
    notes = []
    events = client.stream("j5", timeout=10, on_disconnect=lambda exc, last: notes.append(last))
    assert [next(events).kind, next(events).kind] == ["started", "token"]
    flaky.failures = 3  # Redis goes away; the worker goes on
    publish(r, "j5", "token", {"index": 1, "token_ids": [2], "text": "lo", "attempt": 1})
    publish(r, "j5", "done", done_data("Hello"))
    rest = list(events)
    assert [e.kind for e in rest] == ["token", "done"] and rest[0].data["text"] == "lo"
    token_id = r.xrange(KEYS.out("j5"))[1][0].decode()
    assert notes == [token_id]  # one note per outage, naming where reading resumes
    assert [read[KEYS.out("j5")] for read in flaky.reads[-4:]] == [token_id] * 4


def test_readers_give_up_when_told(server):
    client = OrcdClient(connection=Flaky(fakeredis.FakeRedis(server=server), 10**6))
    with pytest.raises(redis.ConnectionError):
        list(client.events("j6", reconnect_s=0))
    started = time.monotonic()
    with pytest.raises(redis.ConnectionError):
        list(client.events("j6", reconnect_s=0.3))
    assert 0.25 < time.monotonic() - started < 2
    with pytest.raises(JobTimeout, match="Redis unreachable"):
        list(client.events("j6", timeout=0.3))


def test_async_readers_reconnect_too(server):
    async def scenario():
        r = fakeredis.aioredis.FakeRedis(server=server)
        await r.xadd(KEYS.out("j7"), {"event": "started",
                                      "data": json.dumps({"worker_id": "w", "attempt": 1})})
        await r.xadd(KEYS.out("j7"), {"event": "done", "data": json.dumps(done_data("x"))})
        failures = [redis.ConnectionError("gone")] * 2

        async def xread(streams, **options):
            if failures:
                raise failures.pop()
            return await fakeredis.aioredis.FakeRedis.xread(r, streams, **options)

        r.xread = xread
        notes = []
        client = AsyncOrcdClient(connection=r)
        kinds = [e.kind async for e in client.stream(
            "j7", timeout=10, on_disconnect=lambda exc, last: notes.append(last))]
        return kinds, notes

    assert asyncio.run(scenario()) == (["started", "done"], ["0"])


def test_submit_can_require_a_live_worker(client):
    r = client.redis
    with pytest.raises(NoWorker, match=f"no live worker serves model {MODEL}"):
        client.submit("Hi", require_worker=True)
    assert r.exists(KEYS.jobs(MODEL)) == 0
    r.hset(KEYS.workers, mapping={"w1": json.dumps({"model": "other"}),
                                  "w2": json.dumps({"model": MODEL, "state": "draining"})})
    r.set(KEYS.worker("w1"), "{}")
    r.set(KEYS.worker("w2"), "{}")
    with pytest.raises(NoWorker, match=r"w1 \(serves other\), w2 \(draining\)"):
        client.submit("Hi", require_worker=True)
    client.submit("Hi")  # the default queues it for a worker yet to start
    assert r.xlen(KEYS.jobs(MODEL)) == 1
    r.hset(KEYS.workers, "w3", json.dumps({"model": MODEL, "state": "serving"}))
    r.set(KEYS.worker("w3"), "{}")
    client.submit("Hi", require_worker=True)
    assert client.serving_workers(MODEL) == ["w3"] and r.xlen(KEYS.jobs(MODEL)) == 2


def test_job_state(client):
    r = client.redis
    assert client.job_state("nope").state == "unknown"
    queued = client.submit("Hi", session_id=None)
    r.xadd(KEYS.jobs("other"), {CONTROL_FIELD: "{}"})  # not a job: skipped
    state = client.job_state(queued)
    assert (state.state, state.stream) == ("queued", KEYS.jobs(MODEL))
    publish(r, queued, "started", {"worker_id": "w1", "attempt": 1})
    assert client.job_state(queued).state == "running"
    publish(r, queued, "done", done_data())
    state = client.job_state(queued)
    assert state.state == "finished" and state.last.kind == "done"
