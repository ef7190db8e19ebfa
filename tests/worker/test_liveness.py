"""Exactly one final event per job under stress, on a real redis-server: a worker whose steps
outlast its heartbeat's TTL is not taken for dead, a worker that lost a job cannot finish it,
a stopped worker hands its jobs over at once, and a stuck loop ends the process."""

from __future__ import annotations

import signal
import time

import pytest
import redis

from jobs import OrcdClient
from jobs.keys import GROUP, JOB_FIELD, Keys
from jobs.protocol import JobEvent, build_job, encode_job
from tests.worker.workers import WorkerProcess
from worker.connection import RedisLink
from worker.consumer import Consumer
from worker.liveness import STALL_EXIT_STATUS
from worker.publisher import Publisher

pytestmark = pytest.mark.slow
KEYS = Keys()
MODEL = "smollm2-135m"
HEARTBEAT_S = 0.2  # the test workers' beat (tests/worker/workers.py): TTL 5 beats = 1 s


@pytest.fixture
def server(redis_server):
    """The private redis-server of tests/worker/conftest.py."""
    return redis_server


def events(client: OrcdClient, job_id: str) -> list[JobEvent]:
    return [JobEvent.from_entry(i, f) for i, f in client.redis.xrange(KEYS.out(job_id))]


def wait_for(condition, timeout: float, what: str) -> float:
    """Poll until `condition()`; returns the monotonic time it became true."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)
    return time.monotonic()


def test_steps_longer_than_the_heartbeat_ttl_never_get_a_job_reclaimed(server, tmp_path):
    """Worker A's every step takes 3x its heartbeat's TTL; worker B reclaims after 1 s idle.
    The heartbeat comes from A's liveness thread, so B never takes A's job over: the job is
    started once, by A, and ends with exactly one `done`."""
    client = OrcdClient(server.url)
    slow = WorkerProcess(server.url, "slow", tmp_path, launcher=("tests.worker.slow_worker",
                                                                 str(15 * HEARTBEAT_S)))
    fast = None
    try:
        slow.wait_ready()
        job_id = client.submit("The capital of France is", max_tokens=3, temperature=0)
        wait_for(lambda: any(e.kind == "started" for e in events(client, job_id)), 60,
                 "the slow worker to start the job")
        fast = WorkerProcess(server.url, "fast", tmp_path).wait_ready()
        done = client.wait(job_id, timeout=120)
        assert done.finish_reason in ("length", "stop")
        time.sleep(1.5)  # a reclaim pass or two after the end: nothing may be written
        seen = events(client, job_id)
        assert [e.kind for e in seen].count("done") == 1
        assert [e.data["worker_id"] for e in seen if e.kind == "started"] == ["slow"]
        assert "Reclaimed" not in fast.log()
    finally:
        slow.stop()
        if fast is not None:
            fast.stop()


@pytest.mark.parametrize("order", [("B", "A"), ("A", "B")], ids=["owner-first", "loser-first"])
def test_a_worker_that_lost_a_job_cannot_finish_it(server, order):
    """A reads the job, B claims it over (as after A was taken for dead): B's `done` is
    written, A's is refused, whichever comes first, and the job has exactly one final."""
    r = redis.Redis.from_url(server.url)
    stream = KEYS.jobs(MODEL)
    consumers = {name: Consumer(r, KEYS, MODEL, name, reclaim_idle_ms=0) for name in "AB"}
    consumers["A"].ensure_groups()
    job = build_job(prompt="Hi", model=MODEL, job_id="lost-job")
    r.xadd(stream, {JOB_FIELD: encode_job(job)})
    [(_, [(entry_id, _)])] = r.xreadgroup(GROUP, "A", {stream: ">"})
    r.xclaim(stream, GROUP, "B", 0, [entry_id])  # delivery 2, owned by B
    publishers = {name: Publisher(RedisLink(r), KEYS) for name in "AB"}
    for name in order:
        attempt = 2 if name == "B" else 1
        publishers[name].final("lost-job", "done", {"by": name}, stream=stream,
                               entry_id=entry_id.decode(), consumer=name, attempt=attempt)
        assert publishers[name].flush()
    assert publishers["A"].pop_refused_finals() == ["lost-job"]
    assert publishers["B"].pop_refused_finals() == []
    finals = [f for _, f in r.xrange(KEYS.out("lost-job")) if f[b"event"] in (b"done", b"error")]
    assert len(finals) == 1 and b'"B"' in finals[0][b"data"]
    assert r.xpending(stream, GROUP)["pending"] == 0  # B's final acknowledged the entry


def test_a_worker_stopped_with_no_grace_hands_its_jobs_over_at_once(server, tmp_path):
    """SIGTERM with --grace 0 and a job running (sent to that worker's own stream): the job
    is released as it stops and the other worker starts it within 10 s, though --reclaim-idle
    is 30 s (seconds, not the 30 a reclaim would take: 2 s was missed at load ~5)."""
    client = OrcdClient(server.url)
    options = ("--grace", "0", "--reclaim-idle", "30")
    leaving = WorkerProcess(server.url, "leaving", tmp_path, *options)
    staying = WorkerProcess(server.url, "staying", tmp_path, *options)
    try:
        leaving.wait_ready()
        staying.wait_ready()
        job = build_job(prompt="Once upon a time", model=MODEL, job_id="handed-over",
                        sampling={"max_tokens": 64, "temperature": 0})
        client.redis.xadd(KEYS.routed(MODEL, "leaving"), {JOB_FIELD: encode_job(job)})
        job_id = job.job_id
        wait_for(lambda: any(e.kind == "token" for e in events(client, job_id)), 60,
                 "the first worker's first token")
        leaving.signal(signal.SIGTERM)
        stopped_at = time.monotonic()
        assert leaving.process.wait(30) == 0
        started = wait_for(
            lambda: any(e.kind == "started" and e.data["worker_id"] == "staying"
                        for e in events(client, job_id)),
            20, "the second worker to start the job",
        )
        assert started - stopped_at < 10.0
        done = client.wait(job_id, timeout=180)
        assert done.finish_reason in ("length", "stop")
        assert [e.kind for e in events(client, job_id)].count("done") == 1
    finally:
        leaving.stop()
        staying.stop()


def test_a_stuck_loop_stops_the_heartbeat_and_exits_non_zero(server, tmp_path):
    """One step that takes longer than --stall-timeout: the liveness thread removes the
    heartbeat (others may reclaim the job) and ends the process with status 70."""
    client = OrcdClient(server.url)
    worker = WorkerProcess(server.url, "stuck", tmp_path, "--stall-timeout", "1",
                           launcher=("tests.worker.slow_worker", "30"))
    try:
        worker.wait_ready()
        client.submit("Hello", max_tokens=2, temperature=0)
        assert worker.process.wait(60) == STALL_EXIT_STATUS
        assert not client.redis.exists(KEYS.worker("stuck"))
        assert "made no progress" in worker.log()
    finally:
        worker.stop()
