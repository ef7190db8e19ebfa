"""The queue watcher (worker/queue_watch.py) against a real redis-server: it calls back for
entries that come while it is armed, on either stream, stays quiet while disarmed, outlives a
Redis restart, and stops promptly."""

from __future__ import annotations

import threading
import time

import redis

from worker.admission import Admission
from worker.queue_watch import QueueWatcher

STREAMS = ["orcd:jobs:m:w1", "orcd:jobs:m"]  # routed, shared


def wait_for(predicate, timeout_s: float = 5.0) -> bool:
    give_up = time.monotonic() + timeout_s
    while time.monotonic() < give_up:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def test_arrivals_on_either_stream_call_back_while_armed(redis_server):
    client = redis.Redis.from_url(redis_server.url)
    calls = []
    armed = threading.Event()
    armed.set()
    watcher = QueueWatcher(Admission(client, STREAMS, "w1"),
                           lambda: calls.append(time.monotonic()), armed.is_set, block_ms=50)
    watcher.start()
    try:
        time.sleep(0.2)  # its first read is blocking on the streams
        assert calls == []
        sent = time.monotonic()
        client.xadd(STREAMS[1], {"job": "{}"})
        assert wait_for(lambda: len(calls) == 1)
        assert calls[0] - sent < 1.0
        client.xadd(STREAMS[0], {"job": "{}"})
        assert wait_for(lambda: len(calls) == 2)
        time.sleep(0.2)
        assert len(calls) == 2  # an entry is one arrival: not reported again
        assert watcher.arrivals == 2

        armed.clear()  # the worker is full or idle: nothing to wake
        time.sleep(0.2)
        client.xadd(STREAMS[1], {"job": "{}"})
        time.sleep(0.3)
        assert len(calls) == 2
        armed.set()
        time.sleep(0.2)
        client.xadd(STREAMS[1], {"job": "{}"})
        assert wait_for(lambda: len(calls) == 3)
    finally:
        started = time.monotonic()
        watcher.stop()
        assert time.monotonic() - started < 2.0


def test_the_watcher_outlives_a_redis_restart(redis_server):
    client = redis.Redis.from_url(redis_server.url, socket_timeout=2)
    calls = []
    watcher = QueueWatcher(Admission(client, STREAMS, "w1"), lambda: calls.append(1),
                           lambda: True, block_ms=50)
    watcher.start()
    try:
        time.sleep(0.2)
        redis_server.kill()
        time.sleep(0.5)  # its reads fail meanwhile
        redis_server.start()
        time.sleep(1.5)  # past its retry pause
        client.xadd(STREAMS[1], {"job": "{}"})
        assert wait_for(lambda: calls, timeout_s=5.0)
        assert watcher._thread is not None and watcher._thread.is_alive()
    finally:
        watcher.stop()
