"""`orcd worker` processes on a private redis-server, with the real default model: crashes,
Redis restarts, SIGTERM, and session routing between two workers."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from jobs import OrcdClient
from jobs.keys import Keys
from jobs.protocol import JobEvent, build_job, encode_job
from tests.redis_server import RedisServer
from tests.worker.workers import WorkerProcess

pytestmark = pytest.mark.slow
KEYS = Keys()
MODEL = "smollm2-135m"
PROMPTS = ["The capital of France is", "Once upon a time", "def fibonacci(n):",
           "The three primary colors are"]
# The tests on the shared two-worker cluster (in order: one of them kills a worker) run on one
# pytest-xdist worker, which starts the cluster once.
CLUSTER = pytest.mark.xdist_group("worker-cluster")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """One Redis and two workers, shared by the tests that keep both alive."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    directory = tmp_path_factory.mktemp("cluster")
    server = RedisServer(directory).start()
    workers = [WorkerProcess(server.url, name, directory, "--max-jobs", "10")
               for name in ("wa", "wb")]
    try:
        for worker in workers:
            worker.wait_ready()
        yield server, workers
    finally:
        for worker in workers:
            worker.stop()
        server.kill()


def raw_events(client, job_id):
    """What the job's output stream holds now (no waiting)."""
    return [JobEvent.from_entry(i, f) for i, f in client.redis.xrange(KEYS.out(job_id))]


def wait_all(client, job_ids, timeout=180.0):
    results = {}
    for job_id in job_ids:
        results[job_id] = client.wait(job_id, timeout=timeout)
    return results


@CLUSTER
def test_session_turn_goes_to_its_holder_and_reuses_kv(cluster, reference):
    server, (wa, wb) = cluster
    client = OrcdClient(server.url)
    turn1 = [{"role": "user", "content": "What is the capital of France?"}]
    first = client.generate(messages=turn1, session_id="s1", max_tokens=8, temperature=0,
                            timeout=120)
    holder = client.redis.get(KEYS.session("s1")).decode()
    other = "wb" if holder == "wa" else "wa"
    turn2 = turn1 + [{"role": "assistant", "content": first.text},
                     {"role": "user", "content": "And of Germany?"}]
    assert client.stream_for(MODEL, "s1") == KEYS.routed(MODEL, holder)
    job_id = client.submit(messages=turn2, session_id="s1", max_tokens=8, temperature=0)
    started = [e for e in client.stream(job_id, timeout=120) if e.kind == "started"]
    assert started[0].data["worker_id"] == holder
    second = client.wait(job_id, timeout=120)
    assert second.usage.cached_tokens > 0
    # The same turn on the other worker, which holds nothing of the session: same text.
    elsewhere = build_job(model=MODEL, messages=turn2, session_id="s1-copy", max_tokens=8,
                          temperature=0)
    client.redis.xadd(KEYS.routed(MODEL, other), {"job": encode_job(elsewhere)})
    events = list(client.stream(elsewhere.job_id, timeout=120))
    assert events[1].data["worker_id"] == other
    assert client.wait(elsewhere.job_id, timeout=5).text == second.text


@CLUSTER
def test_bad_inputs_on_real_redis_each_refused_and_worker_keeps_serving(cluster, reference):
    """Garbage on the shared stream: each entry gets a dead letter and, where a job id can be
    read, an `error` event; the workers go on serving a good job afterwards."""
    server, _ = cluster
    client = OrcdClient(server.url)
    stream = KEYS.jobs(MODEL)
    good = {"v": 1, "model": MODEL, "prompt": "Hello", "sampling": {"max_tokens": 2}}
    cases = {
        "bad-json": b'{"v": 1, "job_id": "bad-json", ',
        "bad-field": json.dumps({**good, "job_id": "bad-field", "colour": "red"}),
        "bad-type": json.dumps({**good, "job_id": "bad-type", "stream": "yes please"}),
        "bad-model": json.dumps({**good, "job_id": "bad-model", "model": "no-such-model"}),
        "bad-empty": json.dumps({**good, "job_id": "bad-empty", "prompt": ""}),
        "bad-zero": json.dumps({**good, "job_id": "bad-zero", "sampling": {"max_tokens": 0}}),
        "bad-huge": json.dumps({**good, "job_id": "bad-huge",
                                "sampling": {"max_tokens": 10**9}}),
        "bad-long": json.dumps({**good, "job_id": "bad-long", "prompt": "word " * 9000}),
    }
    dead_before = client.redis.xlen(KEYS.dead)
    for payload in cases.values():
        client.redis.xadd(stream, {"job": payload})
    ok = client.generate("The capital of France is", max_tokens=4, temperature=0, timeout=120)
    assert ok.finish_reason in ("stop", "length") and ok.text == reference(
        "The capital of France is", 4)
    for job_id in cases:
        if job_id == "bad-json":
            continue  # no job id can be read: only the dead letter
        events = [e for e in client.stream(job_id, timeout=60)]
        assert events[-1].kind == "error", job_id
        assert events[-1].data["message"], job_id
    deadline = time.monotonic() + 30
    while client.redis.xlen(KEYS.dead) < dead_before + 7 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert client.redis.xlen(KEYS.dead) >= dead_before + 7  # all but the too-long prompt


@CLUSTER
def test_sigkill_mid_generation_loses_no_job(cluster, reference):
    server, (wa, wb) = cluster
    client = OrcdClient(server.url)
    jobs = {client.submit(PROMPTS[i % 4], max_tokens=12, temperature=0): PROMPTS[i % 4]
            for i in range(20)}
    deadline = time.monotonic() + 120
    victim_started = set()
    while not victim_started:  # wait until wb is generating
        assert time.monotonic() < deadline, wb.log()
        for job_id in jobs:
            events = raw_events(client, job_id)
            if any(e.kind == "started" and e.data["worker_id"] == "wb" for e in events) and any(
                    e.kind == "token" for e in events):
                victim_started.add(job_id)
        time.sleep(0.05)
    wb.signal(signal.SIGKILL)
    results = wait_all(client, jobs)
    for job_id, prompt in jobs.items():
        events = raw_events(client, job_id)
        assert sum(e.kind == "done" for e in events) == 1
        assert results[job_id].text == reference(prompt, 12), job_id
        assert results[job_id].usage.completion_tokens == 12 or results[job_id].finish_reason \
            == "stop"
    for job_id in victim_started:
        events = raw_events(client, job_id)
        attempts = [e.data for e in events if e.kind == "started"]
        if len(attempts) > 1:  # finished by wb before the kill otherwise
            resumed = attempts[-1].pop("resumed_from", 0)
            assert attempts[-1] == {"worker_id": "wa", "attempt": 2}
            # Resumed, not restarted: the new attempt goes on at the next index, and the
            # indices of the whole stream never repeat.
            tokens = [e.data for e in events if e.kind == "token"]
            indices = [data["index"] for data in tokens]
            assert indices == sorted(set(indices))
            assert resumed == sum(len(d["token_ids"]) for d in tokens if d["attempt"] == 1)
            streamed = "".join(e.data["text"] for e in events if e.kind == "token")
            assert streamed == results[job_id].text
    assert "job.reclaimed" in wa.log()
    assert client.redis.xlen(KEYS.jobs(MODEL)) == 0


def test_redis_restart_mid_run_every_job_finishes(redis_server, tmp_path, reference):
    worker = WorkerProcess(redis_server.url, "wr", tmp_path).wait_ready()
    try:
        client = OrcdClient(redis_server.url)
        jobs = {client.submit(p, max_tokens=24, temperature=0): p for p in PROMPTS}
        deadline = time.monotonic() + 120
        while not all(any(e.kind == "token" for e in raw_events(client, j)) for j in jobs):
            assert time.monotonic() < deadline, worker.log()
            time.sleep(0.05)
        redis_server.kill()
        time.sleep(1.0)
        redis_server.start()  # same port, empty: no persistence
        client = OrcdClient(redis_server.url)
        for job_id, prompt in jobs.items():
            assert client.wait(job_id, timeout=120).text == reference(prompt, 24)
        after = client.generate("The capital of France is", max_tokens=4, temperature=0,
                                timeout=120)  # groups were created again
        assert after.usage.completion_tokens == 4
        log = worker.log()
        assert "redis.lost" in log and "redis.reconnected" in log
        assert worker.process.poll() is None
    finally:
        worker.stop()


def test_sigterm_drains_running_jobs_and_exits_0(redis_server, tmp_path, reference):
    worker = WorkerProcess(redis_server.url, "wt", tmp_path, "--grace", "60").wait_ready()
    client = OrcdClient(redis_server.url)
    jobs = {client.submit(p, max_tokens=16, temperature=0): p for p in PROMPTS[:3]}
    deadline = time.monotonic() + 120
    while not all(any(e.kind == "token" for e in raw_events(client, j)) for j in jobs):
        assert time.monotonic() < deadline, worker.log()
        time.sleep(0.05)
    worker.signal(signal.SIGTERM)
    time.sleep(0.5)
    late = client.submit("Hello", max_tokens=4)
    assert worker.process.wait(120) == 0
    for job_id, prompt in jobs.items():
        assert client.wait(job_id, timeout=5).text == reference(prompt, 16)
    assert not client.redis.exists(KEYS.out(late))  # left in the stream for another worker
    assert client.redis.xlen(KEYS.jobs(MODEL)) == 1
    assert not client.redis.exists(KEYS.worker("wt"))
    assert "worker.stopped" in worker.log()


def orcd(*args, env=None):
    return subprocess.run([sys.executable, "-m", "worker.cli", *args], capture_output=True,
                          text=True, timeout=300, env=env)


@CLUSTER
def test_cli_submit_tail_status(cluster, reference):
    server, _ = cluster
    result = orcd("submit", "--redis", server.url, "--wait", "--max-tokens", "6",
                  "--temperature", "0", PROMPTS[0])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == reference(PROMPTS[0], 6).strip()
    job_id = result.stderr.split()[1]
    tail = orcd("tail", "--redis", server.url, job_id)
    events = [json.loads(line) for line in tail.stdout.splitlines()]
    assert [e["event"] for e in events][:2] == ["queued", "started"]
    assert events[-1]["event"] == "done"
    status = json.loads(orcd("status", "--redis", server.url, "--json").stdout)
    assert {"wa"} <= {w for w, info in status["workers"].items() if info["alive"]}
    assert KEYS.jobs(MODEL) in status["streams"]
    bad = orcd("submit", "--redis", server.url, "--max-tokens", "0", "x")
    assert bad.returncode == 2 and "max_tokens" in bad.stderr


def test_demo_runs_end_to_end():
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    result = orcd("demo", "--max-tokens", "12", env=env)
    assert result.returncode == 0, result.stderr + result.stdout
    assert "Paris" in result.stdout
    reused = re.search(r"second turn reused (\d+) cached tokens", result.stdout)
    assert reused and int(reused.group(1)) > 0
    assert "exit status 0" in result.stdout
