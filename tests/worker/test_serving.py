"""Serving under load, with `orcd worker` processes on a private redis-server and the real
default model: admission never past --max-jobs, priorities with aging, both deadline paths,
a poisoned request failing alone, a lost device handing its jobs to another worker."""

from __future__ import annotations

import json
import shutil
import threading
import time

import pytest

from jobs import OrcdClient
from jobs.errors import JobFailed
from jobs.keys import JOB_FIELD, Keys
from jobs.protocol import build_job, encode_job
from tests.redis_server import RedisServer
from tests.worker.workers import WorkerProcess
from worker.daemon import EXIT_DEVICE_LOST
from worker.loaded_model import load_model

pytestmark = pytest.mark.slow
KEYS = Keys()
EIGHT = Keys("serve8")  # the 8-job worker's own prefix: no other worker reads its streams
MODEL = "smollm2-135m"
PROMPTS = ["The capital of France is", "Once upon a time", "def fibonacci(n):",
           "The three primary colors are", "In 1969, the first man on the Moon",
           "A recipe for pancakes:", "The theory of relativity says", "Dear diary, today"]
LONG = "Write a very long story about a dragon who lives in a castle by the sea. Once"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    server = RedisServer(tmp_path_factory.mktemp("serving")).start()
    yield server
    server.kill()


def events(client, job_id, keys=KEYS):
    out = []
    for entry_id, fields in client.redis.xrange(keys.out(job_id)):
        ms, seq = (int(x) for x in entry_id.decode().split("-"))
        out.append((fields[b"event"].decode(), json.loads(fields[b"data"]), ms, seq))
    return out


def submit(client, prompt, stream=None, **fields):
    job = build_job(model=MODEL, prompt=prompt, temperature=0, **fields)
    client.redis.xadd(stream or KEYS.jobs(MODEL), {JOB_FIELD: encode_job(job)})
    return job.job_id


def wait_started(client, job_id, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not any(kind == "started" for kind, *_ in events(client, job_id)):
        assert time.monotonic() < deadline, f"job {job_id} never started"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def eight(server, tmp_path_factory):
    """A worker of 8 jobs at once whose request `poisoned` gets NaN logits (fault injection)."""
    worker = WorkerProcess(server.url, "weight", tmp_path_factory.mktemp("eight"),
                           "--max-jobs", "8", "--prefix", EIGHT.prefix,
                           env={"ORCD_FAULT_INJECT": "nan=poisoned"})
    yield worker.wait_ready()
    worker.stop()


def test_admission_never_exceeds_max_jobs(server, eight):
    """Half the jobs on the worker's routed stream, half on the shared one: at most 8 run at
    once, as the heartbeat and the `started`/`done` events show, and 8 do run at once."""
    client = OrcdClient(server.url, prefix=EIGHT.prefix)
    seen: list[int] = []
    stop = threading.Event()

    def watch() -> None:
        r = server.client()
        while not stop.is_set():
            beat = r.get(EIGHT.worker("weight"))
            if beat:
                seen.append(json.loads(beat)["active_jobs"])
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        ids = [submit(client, PROMPTS[i % 8],
                      EIGHT.routed(MODEL, "weight") if i % 2 else EIGHT.jobs(MODEL),
                      max_tokens=8) for i in range(20)]
        for job_id in ids:
            client.wait(job_id, timeout=180)
    finally:
        stop.set()
        watcher.join(5)
    # Running intervals from the event ids (Redis's clock): a job runs from its `started`
    # to its `done`; at equal milliseconds an end counts before a start.
    edges = []
    for job_id in ids:
        evs = events(client, job_id, EIGHT)
        assert [k for k, *_ in evs].count("started") == 1 and evs[-1][0] == "done"
        edges += [(ms, 1) for kind, _, ms, _ in evs if kind == "started"]
        edges.append((evs[-1][2], -1))
    running, peak = 0, 0
    for _, delta in sorted(edges, key=lambda e: (e[0], e[1])):
        running += delta
        peak = max(peak, running)
    assert peak == 8
    assert seen and max(seen) <= 8


@pytest.fixture(scope="module")
def single(server, tmp_path_factory):
    """One worker taking one job at a time; a priority level is worth 50 ms of waiting."""
    worker = WorkerProcess(server.url, "wone", tmp_path_factory.mktemp("one"), "--max-jobs",
                           "1", "--priority-aging", "0.05").wait_ready()
    yield worker
    worker.stop()


def test_priorities_with_aging_decide_the_order(server, single):
    """While a long job runs: a low job, 0.6 s later two of priority 5 and one of 50. Each
    level is 50 ms, so the low job (aged 12 levels) goes before the 5s, after the 50."""
    client = OrcdClient(server.url)
    blocker = submit(client, LONG, max_tokens=96)
    wait_started(client, blocker)
    low = submit(client, PROMPTS[0], max_tokens=4)
    time.sleep(0.6)
    mid = [submit(client, PROMPTS[1 + i], max_tokens=4, priority=5) for i in range(2)]
    high = submit(client, PROMPTS[3], max_tokens=4, priority=50)
    ids = [blocker, low, *mid, high]
    assert not any(kind == "done" for kind, *_ in events(client, blocker)), \
        "the long job ended before the others were queued: the test proves nothing"
    for job_id in ids:
        client.wait(job_id, timeout=180)
    started = {job_id: next((ms, seq) for kind, _, ms, seq in events(client, job_id)
                            if kind == "started") for job_id in ids}
    assert sorted(ids, key=started.get) == [blocker, high, low, *mid]


def test_deadlines_queued_and_running(server, single, reference):
    client = OrcdClient(server.url)
    blocker = submit(client, LONG, max_tokens=96)
    wait_started(client, blocker)
    queued = submit(client, PROMPTS[0], max_tokens=4, timeout_s=0.3)
    evs = []
    deadline = time.monotonic() + 30
    while not evs or evs[-1][0] not in ("done", "error"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
        evs = events(client, queued)
    assert [kind for kind, *_ in evs] == ["error"]  # never started
    assert evs[0][1]["code"] == "deadline_exceeded"
    assert not any(kind == "done" for kind, *_ in events(client, blocker)), \
        "answered only after the running job ended, not at its deadline"
    client.wait(blocker, timeout=180)
    # Running at its deadline: ends with finish_reason deadline, the text streamed so far.
    running = submit(client, LONG, max_tokens=400, deadline=int(time.time() * 1000) + 1500)
    done = client.wait(running, timeout=60)
    assert done.finish_reason == "deadline"
    assert 0 < done.usage.completion_tokens < 400
    tokens = "".join(d["text"] for kind, d, *_ in events(client, running) if kind == "token")
    assert tokens == done.text
    assert reference(LONG, done.usage.completion_tokens).startswith(done.text)


def test_a_poisoned_request_fails_alone(server, eight, reference):
    """NaN logits for one request of 8 running together: it ends with engine_error, the 7
    others finish with the engine's own answers, and the worker serves on."""
    client = OrcdClient(server.url, prefix=EIGHT.prefix)
    ids = [submit(client, prompt, EIGHT.routed(MODEL, "weight"), max_tokens=10,
                  job_id="poisoned" if i == 3 else None)
           for i, prompt in enumerate(PROMPTS)]
    for i, job_id in enumerate(ids):
        if i == 3:
            with pytest.raises(JobFailed) as failed:
                client.wait(job_id, timeout=180)
            assert failed.value.code == "engine_error"
            assert "not finite" in failed.value.message
        else:
            assert client.wait(job_id, timeout=180).text == reference(PROMPTS[i], 10)
    assert client.wait(submit(client, PROMPTS[0], EIGHT.routed(MODEL, "weight"),
                              max_tokens=10), timeout=60).text == reference(PROMPTS[0], 10)
    assert eight.process.poll() is None


def test_a_lost_device_exits_nonzero_and_another_worker_finishes(server, tmp_path, reference):
    lost = WorkerProcess(server.url, "wlost", tmp_path, "--max-jobs", "4",
                         env={"ORCD_FAULT_INJECT": "device_lost_after=4"})
    # Started together: the second one takes the jobs (routed to the first) only once the
    # first is gone.
    other = WorkerProcess(server.url, "wnext", tmp_path)
    try:
        lost.wait_ready()
        other.wait_ready()
        client = OrcdClient(server.url)
        ids = [submit(client, prompt, KEYS.routed(MODEL, "wlost"), max_tokens=10)
               for prompt in PROMPTS[:4]]
        assert lost.process.wait(120) == EXIT_DEVICE_LOST
        assert "worker.device_lost" in lost.log()
        assert not client.redis.exists(KEYS.worker("wlost"))
        assert not any(events(client, job_id) and events(client, job_id)[-1][0] == "done"
                       for job_id in ids)
        for prompt, job_id in zip(PROMPTS, ids, strict=False):
            assert client.wait(job_id, timeout=180).text == reference(prompt, 10)
            assert [kind for kind, *_ in events(client, job_id)].count("done") == 1
    finally:
        lost.stop()
        other.stop()


def test_an_evicted_session_loses_its_routing_key(server):
    """A worker whose engine holds one session: the second session evicts the first, whose
    `orcd:session:*` key goes (its next turn takes the shared stream); the second's stays."""
    from worker.daemon import Worker, WorkerConfig

    model = load_model(MODEL, kv_blocks=256, progress=False, max_sessions=1)
    r = server.client()
    worker = Worker(model, WorkerConfig(worker_id="wsess", redis_url=server.url, block_ms=5))
    client = OrcdClient(server.url)

    def run(job_id: str) -> None:
        deadline = time.monotonic() + 60
        while not (evs := events(client, job_id)) or evs[-1][0] not in ("done", "error"):
            assert time.monotonic() < deadline
            worker.iteration()

    worker.open()
    try:
        # On its routed stream: other workers of this module's server serve the shared one.
        routed = KEYS.routed(MODEL, "wsess")
        first = submit(client, PROMPTS[0], routed, session_id="s1", max_tokens=3)
        run(first)
        assert r.get(KEYS.session("s1")) == b"wsess"
        assert client.stream_for(MODEL, "s1") == KEYS.routed(MODEL, "wsess")
        second = submit(client, PROMPTS[1], routed, session_id="s2", max_tokens=3)
        run(second)
        worker.iteration()  # the eviction's key deletion is flushed with the step's events
        assert model.engine.session_ids() == ["s2"]
        assert r.get(KEYS.session("s1")) is None
        assert client.stream_for(MODEL, "s1") == KEYS.jobs(MODEL)
        assert r.get(KEYS.session("s2")) == b"wsess"
        # A key another worker now holds is left alone.
        r.set(KEYS.session("s2"), "elsewhere")
        model.engine.kv.session_ttl_s = -1.0  # every idle session is past its TTL now
        model.engine.kv.expire_sessions()
        worker.iteration()
        assert r.get(KEYS.session("s2")) == b"elsewhere"
    finally:
        worker.close()


def test_queue_position_and_eta_while_waiting(server, single):
    """Behind a running job: two jobs of priority 0 and one of 50, which goes first. The sync
    and asyncio clients give the same places; `orcd submit --wait` prints them."""
    import asyncio
    import io

    from jobs import AsyncOrcdClient
    from worker.commands.submit import show_queue_position

    client = OrcdClient(server.url)
    blocker = submit(client, LONG, max_tokens=64)
    wait_started(client, blocker)
    first, second = (submit(client, PROMPTS[i], max_tokens=2) for i in range(2))
    urgent = submit(client, PROMPTS[2], max_tokens=2, priority=50)
    places = {job_id: client.queue_position(job_id, model=MODEL)
              for job_id in (blocker, first, second, urgent)}
    assert not any(kind == "done" for kind, *_ in events(client, blocker))
    assert places[blocker] is None  # running, not waiting
    assert [places[j].position for j in (urgent, first, second)] == [0, 1, 2]
    assert {places[j].waiting for j in (urgent, first, second)} == {3}
    assert places[first].stream == KEYS.jobs(MODEL)

    async def async_place():
        async with AsyncOrcdClient(server.url) as aclient:
            return await aclient.queue_position(second, model=MODEL)

    assert asyncio.run(async_place()).position == 2
    err = io.StringIO()
    show_queue_position(client, second, MODEL, timeout=60, err=err, poll_s=0.05)
    lines = err.getvalue().splitlines()
    assert lines[0].startswith("queued: 2 jobs ahead, 3 waiting")
    assert any(line.startswith("queued: 0 jobs ahead") for line in lines)
    for job_id in (blocker, first, second, urgent):
        client.wait(job_id, timeout=120)
    # Jobs ended lately give an ETA: a job behind a new long one waits about one job's time.
    blocker = submit(client, LONG, max_tokens=48)
    wait_started(client, blocker)
    behind = submit(client, PROMPTS[0], max_tokens=2)
    place = client.queue_position(behind, model=MODEL)
    assert place.position == 0 and place.eta_s is not None and place.eta_s > 0
    client.wait(behind, timeout=120)
    assert client.queue_position(behind, model=MODEL) is None
