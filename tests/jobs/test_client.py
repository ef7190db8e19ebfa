"""Client protocol on fakeredis (sync and asyncio): where jobs go, reading events from id 0,
attempts, cancel, end_session; URLs passed through; `import jobs` stays free of torch."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import fakeredis
import pytest

from jobs import AsyncOrcdClient, EventFollower, JobEvent, JobFailed, JobTimeout, OrcdClient
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
