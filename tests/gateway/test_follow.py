"""Following jobs: a restarted attempt never repeats text the client has (`ReplayGuard`), read
through the real event reader from output streams written into a real redis-server."""

from __future__ import annotations

import asyncio
import json

import pytest

from gateway.follow import DIVERGED, Delta, Diverged, Failed, Finished, ReplayGuard, follow_job
from jobs.async_client import AsyncOrcdClient
from jobs.keys import Keys


def lp(token_id: int) -> dict:
    return {"token_id": token_id, "logprob": -0.5, "top": []}


def test_guard_passes_a_first_attempt_through():
    guard = ReplayGuard()
    assert guard.token("Hel", [lp(1)]) == Delta("Hel", [lp(1)])
    assert guard.token("lo", [lp(2)]) == Delta("lo", [lp(2)])
    assert guard.done("Hello") == ""
    assert guard.done("Hello!") == "!"  # text the token events had not carried


def test_guard_swallows_a_replay_and_goes_on_after_it():
    guard = ReplayGuard()
    guard.token("Hel", [lp(1)])
    guard.token("lo", [lp(2)])
    guard.restart()
    assert guard.token("He", [lp(1)]) is None
    assert guard.token("llo wo", [lp(2), lp(3)]) == Delta(" wo", [lp(3)])
    assert guard.token("rld", [lp(4)]) == Delta("rld", [lp(4)])
    assert guard.done("Hello world") == ""


def test_guard_refuses_a_replay_that_departs():
    guard = ReplayGuard()
    guard.token("Hello", [])
    guard.restart()
    guard.token("He", [])
    with pytest.raises(Diverged):
        guard.token("ck", [])
    guard = ReplayGuard()
    guard.token("Hello", [])
    guard.restart()
    with pytest.raises(Diverged):
        guard.done("Hi")


def write(redis, job_id: str, events: list[tuple[str, dict]]) -> None:
    for kind, data in events:
        redis.xadd(Keys().out(job_id), {"event": kind, "data": json.dumps(data)})


DONE = {"finish_reason": "length", "usage": {"prompt_tokens": 3, "completion_tokens": 3,
                                              "cached_tokens": 0},
        "timings": {"queue_ms": 1.0, "ttft_ms": 1.0, "total_ms": 2.0,
                    "decode_tokens_per_s": None}, "metadata": {}}


def token(index: int, text: str, attempt: int) -> tuple[str, dict]:
    return "token", {"index": index, "token_ids": [index], "text": text, "attempt": attempt}


def started(attempt: int, **extra) -> tuple[str, dict]:
    return "started", {"worker_id": f"w{attempt}", "attempt": attempt, **extra}


async def updates(url: str, job_id: str) -> list:
    async with AsyncOrcdClient(url) as client:
        return [u async for u in follow_job(client, job_id, timeout=10)]


def test_follow_job_never_repeats_text(redis_server):
    redis = redis_server.client()
    first = [started(1), token(0, "Hello", 1), token(1, " wor", 1)]
    write(redis, "restarted", first + [started(2), token(0, "Hello", 2), token(1, " wor", 2),
                                       token(2, "ld", 2), ("done", {**DONE,
                                                                    "text": "Hello world"})])
    write(redis, "resumed", first + [started(2, resumed_from=2), token(2, "ld", 2),
                                     ("done", {**DONE, "text": "Hello world"})])
    write(redis, "diverged", first + [started(2), token(0, "Goodbye", 2),
                                      ("done", {**DONE, "text": "Goodbye"})])
    for job_id in ("restarted", "resumed"):
        got = asyncio.run(updates(redis_server.url, job_id))
        assert "".join(u.text for u in got if isinstance(u, Delta)) == "Hello world"
        assert isinstance(got[-1], Finished) and got[-1].tail == ""
    got = asyncio.run(updates(redis_server.url, "diverged"))
    assert [u.text for u in got if isinstance(u, Delta)] == ["Hello", " wor"]
    assert isinstance(got[-1], Failed) and got[-1].code == DIVERGED
