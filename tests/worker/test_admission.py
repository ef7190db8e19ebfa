"""The admission script on a real redis-server: exactly `capacity` jobs across the shared and
the routed stream, best score first (priority aged by the wait), deadline-expired jobs and
control messages taken whatever the capacity, delivery counts left at 1."""

from __future__ import annotations

import json

import pytest

from jobs.keys import GROUP, QUEUE_CONSUMER, Keys
from worker.admission import Admission
from worker.consumer import create_group

KEYS = Keys("adm")
MODEL = "m"


@pytest.fixture
def setup(redis_server):
    r = redis_server.client()
    shared, routed = KEYS.jobs(MODEL), KEYS.routed(MODEL, "w1")
    for stream in (shared, routed):
        create_group(r, stream)
    admission = Admission(r, [routed, shared], "w1", window=16, aging_s=1.0)
    return r, admission, shared, routed


def add(r, stream, ms, job_id, **fields):
    job = {"v": 1, "job_id": job_id, "model": MODEL, "prompt": "x", **fields}
    r.xadd(stream, {"job": json.dumps(job)}, id=f"{ms}-0")


def take(r, admission, capacity, now_ms):
    pipe = r.pipeline(transaction=False)
    admission.queue(pipe, capacity, now_ms)
    admitted = admission.parse(pipe.execute()[0])
    return [json.loads(e.fields["job"])["job_id"] if "job" in e.fields else "control"
            for e in admitted.entries], admitted


def test_exactly_capacity_across_both_streams(setup):
    r, admission, shared, routed = setup
    for i in range(5):
        add(r, shared, 1000 + i, f"s{i}")
        add(r, routed, 2000 + i, f"r{i}")
    got, admitted = take(r, admission, 3, now_ms=3000)
    assert got == ["s0", "s1", "s2"]  # oldest first at equal priority
    assert all(e.attempt == 1 for e in admitted.entries)
    pending = r.xpending_range(shared, GROUP, "-", "+", 10)
    assert {p["consumer"] for p in pending} == {b"w1", QUEUE_CONSUMER.encode()}
    assert all(p["times_delivered"] == 1 for p in pending)
    got, _ = take(r, admission, 100, now_ms=3000)
    assert got == ["s3", "s4", "r0", "r1", "r2", "r3", "r4"]
    assert take(r, admission, 100, now_ms=3000)[0] == []


def test_priority_with_aging(setup):
    """One level per second: at t=21 s a job from t=1 (score 20) beats a priority-15 job from
    t=20 (16) and loses to a priority-30 one from t=21."""
    r, admission, shared, routed = setup
    add(r, shared, 1_000, "old")
    add(r, shared, 20_000, "mid", priority=15)
    add(r, routed, 21_000, "urgent", priority=30)
    assert take(r, admission, 1, now_ms=21_000)[0] == ["urgent"]
    assert take(r, admission, 1, now_ms=21_000)[0] == ["old"]
    assert take(r, admission, 1, now_ms=21_000)[0] == ["mid"]


def test_expired_jobs_and_controls_are_taken_whatever_the_capacity(setup):
    r, admission, shared, routed = setup
    add(r, shared, 1000, "later", deadline=99_000)
    add(r, shared, 1001, "expired", deadline=5_000)
    add(r, shared, 1002, "timed-out", timeout_s=2.5)  # ends at 3502
    add(r, shared, 1003, "plain")
    r.xadd(routed, {"control": json.dumps({"v": 1, "op": "end_session", "session_id": "s"})},
           id="1004-0")
    assert take(r, admission, 0, now_ms=3_000)[0] == ["control"]
    assert take(r, admission, 0, now_ms=6_000)[0] == ["expired", "timed-out"]
    assert take(r, admission, 5, now_ms=6_000)[0] == ["later", "plain"]


def test_an_entry_deleted_while_queued_is_dropped_and_idle_ids_are_given(setup):
    r, admission, shared, routed = setup
    add(r, shared, 1000, "gone")
    add(r, shared, 1001, "kept")
    take(r, admission, 0, now_ms=2_000)  # both queued, neither started
    r.xdel(shared, "1000-0")
    pipe = r.pipeline(transaction=False)
    admission.queue(pipe, 5, 2_000, idle=True)
    admitted = admission.parse(pipe.execute()[0])
    assert [e.entry_id for e in admitted.entries] == ["1001-0"]
    assert admitted.last_ids == {routed: "0-0", shared: "1001-0"}
    assert r.xpending(shared, GROUP)["pending"] == 1  # the deleted one left the queue
