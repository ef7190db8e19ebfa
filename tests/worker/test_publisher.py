"""The publisher against a real redis-server: a run of events in one call keeps their order
and fails a refused XADD alone; scripts called by SHA survive Redis losing them (NOSCRIPT)."""

from __future__ import annotations

import json
import threading

import pytest

from jobs.keys import GROUP, Keys
from worker.connection import RedisLink, connect
from worker.publisher import READS_LOST, Publisher

KEYS = Keys("pub")


def events(r, job_id):
    return [(f[b"event"].decode(), json.loads(f[b"data"])) for _, f in r.xrange(KEYS.out(job_id))]


def test_a_run_of_events_keeps_order_and_a_refused_one_fails_alone(redis_server):
    r = connect(redis_server.url)
    r.set(KEYS.out("clobbered"), "not a stream")
    publisher = Publisher(RedisLink(r), KEYS)
    for index in range(3):
        for job_id in ("a", "clobbered", "b"):
            publisher.event(job_id, "token", {"index": index, "text": "é\n\"x\""})
    assert publisher.flush()
    for job_id in ("a", "b"):
        assert events(r, job_id) == [("token", {"index": i, "text": "é\n\"x\""})
                                     for i in range(3)]
    failed = publisher.pop_unwritable()
    assert list(failed) == ["clobbered"] and "WRONGTYPE" in failed["clobbered"].error
    assert r.get(KEYS.out("clobbered")) == b"not a stream"


def test_a_final_refused_with_noscript_is_sent_again_after_its_tokens(redis_server):
    r = connect(redis_server.url)
    stream = KEYS.jobs("m")
    r.xgroup_create(stream, GROUP, id="0", mkstream=True)
    entry_id = r.xadd(stream, {"job": "{}"}).decode()
    r.xreadgroup(GROUP, "w1", {stream: ">"})
    publisher = Publisher(RedisLink(r), KEYS)
    publisher.event("j", "token", {"index": 0})
    assert publisher.flush()  # the scripts are loaded now
    r.script_flush()  # as a Redis restarted without persistence would have lost them
    publisher.event("j", "token", {"index": 1})
    publisher.final("j", "done", {"finish_reason": "stop"}, stream=stream, entry_id=entry_id,
                    consumer="w1", attempt=1)
    reads = []
    assert publisher.flush(reads=lambda pipe: reads.append(pipe.ping()) or 1)
    assert [kind for kind, _ in events(r, "j")] == ["token", "token", "done"]
    assert len(reads) == 1 and publisher.pop_reads() == [True]  # the reads went once
    assert r.xpending(stream, GROUP)["pending"] == 0 and r.xlen(stream) == 0
    assert not publisher.pop_refused_finals() and not publisher.pop_unwritable()


@pytest.fixture
def threaded(redis_server):
    """A publisher sending from its writer thread, and its client."""
    r = connect(redis_server.url)
    publisher = Publisher(RedisLink(r), KEYS)
    publisher.start_writer()
    yield publisher, r
    publisher.stop_writer()


def test_the_writer_thread_keeps_order_while_events_are_queued_and_drain_waits_for_them(
        threaded):
    publisher, r = threaded
    for index in range(2000):  # queued while the writer sends what came before
        publisher.event("a", "token", {"index": index})
        if index % 50 == 0:
            assert publisher.flush()  # only wakes the writer
    assert publisher.drain(10.0) and len(publisher) == 0
    assert [data["index"] for _, data in events(r, "a")] == list(range(2000))


def test_the_writer_thread_keeps_writes_while_redis_is_away_and_sends_them_after(
        threaded, redis_server):
    publisher, r = threaded
    publisher.event("a", "token", {"index": 0})
    assert publisher.drain(5.0)
    redis_server.kill()
    publisher.event("a", "token", {"index": 1})
    publisher.flush()
    assert not publisher.drain(0.3) and len(publisher) == 1  # kept, not lost
    redis_server.start()  # an empty Redis on the same port: the stream was lost
    publisher.event("a", "token", {"index": 2})
    publisher.flush()
    assert publisher.drain(10.0)
    assert [data["index"] for _, data in events(r, "a")] == [1, 2]


def test_reads_go_with_the_writer_threads_send_or_alone_and_are_lost_only_with_redis(
        threaded, redis_server):
    publisher, _ = threaded
    publisher.event("a", "token", {"index": 0})
    assert publisher.flush(reads=lambda pipe: pipe.xlen(KEYS.out("a")) and 1)
    assert publisher.pop_reads(5.0) == [1]  # after the write, in the same MULTI/EXEC
    publisher.flush(reads=lambda pipe: pipe.ping() and 1)  # nothing queued: alone
    assert publisher.pop_reads(5.0) == [True]
    assert publisher.pop_reads(0.05) is None  # one flush's replies, given once
    redis_server.kill()
    publisher.flush(reads=lambda pipe: pipe.ping() and 1)
    assert publisher.pop_reads(5.0) is READS_LOST


def test_the_writer_thread_calls_on_reads_once_their_replies_are_back(threaded):
    """The worker wakes its engine process's wait with it when an admission read claimed
    jobs."""
    publisher, _ = threaded
    called = threading.Event()
    seen = []
    publisher.on_reads = lambda replies: (seen.append((replies, publisher.pop_reads(0.0))),
                                          called.set())
    publisher.event("a", "token", {"index": 0})
    publisher.flush()  # no reads: no call
    assert publisher.drain(5.0) and not called.wait(0.2)
    publisher.flush(reads=lambda pipe: pipe.ping() and 1)
    assert called.wait(5.0) and seen == [([True], [True])]  # and pop_reads has them already
