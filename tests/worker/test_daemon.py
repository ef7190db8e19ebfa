"""The daemon loop in-process on fakeredis with the real default model: validation, dead
letters, stop strings, coalescing, cancellation, idempotency, delivery limits, sessions."""

from __future__ import annotations

import json
import time

import fakeredis
import pytest

from jobs import OrcdClient
from jobs.events import PAYLOADS
from jobs.keys import GROUP, Keys
from worker.daemon import Worker, WorkerConfig
from worker.loaded_model import load_model

KEYS = Keys()
MODEL = "smollm2-135m"


@pytest.fixture(scope="module")
def model():
    try:
        return load_model(MODEL, kv_blocks=1024, progress=False)
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"default model unavailable: {exc}")


@pytest.fixture
def setup(model):
    server = fakeredis.FakeServer()
    r = fakeredis.FakeRedis(server=server)
    worker = Worker(model, WorkerConfig(worker_id="w1", block_ms=5, max_deliveries=3,
                                        cancel_check_s=0), client=r)
    worker._setup_groups()
    worker.open()
    yield worker, OrcdClient(connection=r), r
    worker.close()
    assert not model.engine.has_work()


def run_until(worker, condition, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        worker.iteration()


def events(r, job_id):
    out = []
    for _, fields in r.xrange(KEYS.out(job_id)):
        kind = fields[b"event"].decode()
        data = json.loads(fields[b"data"])
        PAYLOADS[kind].model_validate(data)  # what the worker writes parses as the contract
        out.append((kind, data))
    return out


def final(r, job_id):
    evs = events(r, job_id)
    return evs[-1] if evs and evs[-1][0] in ("done", "error") else None


def raw_job(**fields):
    base = {"v": 1, "job_id": "j", "model": MODEL, "prompt": "The capital of France is",
            "sampling": {"temperature": 0, "max_tokens": 4}}
    base.update(fields)
    return json.dumps(base)


def test_a_job_streams_tokens_then_done(setup):
    worker, client, r = setup
    job_id = client.submit("The capital of France is", max_tokens=6, temperature=0,
                           metadata={"trace": "t1"})
    run_until(worker, lambda: final(r, job_id))
    evs = events(r, job_id)
    kinds = [k for k, _ in evs]
    assert kinds[:2] == ["queued", "started"] and kinds[-1] == "done"
    tokens = [d for k, d in evs if k == "token"]
    assert [t["index"] for t in tokens] == list(range(len(tokens)))
    done = evs[-1][1]
    assert done["text"] == "".join(t["text"] for t in tokens)
    assert done["usage"]["completion_tokens"] == sum(len(t["token_ids"]) for t in tokens) == 6
    assert done["finish_reason"] == "length" and done["metadata"] == {"trace": "t1"}
    assert r.xlen(KEYS.jobs(MODEL)) == 0  # acknowledged and deleted
    assert r.xpending(KEYS.jobs(MODEL), GROUP)["pending"] == 0
    assert 0 < r.ttl(KEYS.out(job_id)) <= 3600
    narration = [f[b"event"] for _, f in r.xrange(KEYS.narration)]
    assert b"job.started" in narration and b"job.finished" in narration


def test_a_running_jobs_stream_has_the_safety_ttl(setup):
    """Before its final event a job's output stream already expires (in a day): a worker that
    dies mid-job without anyone finishing it leaves nothing forever. The EXPIRE must follow
    the stream's first event: on a key that does not exist yet it does nothing."""
    from worker.publisher import OUT_TTL_RUNNING_S

    worker, client, r = setup
    job_id = client.submit("The capital of France is", max_tokens=24, temperature=0)
    run_until(worker, lambda: any(kind == "token" for kind, _ in events(r, job_id)))
    assert 3600 < r.ttl(KEYS.out(job_id)) <= OUT_TTL_RUNNING_S
    run_until(worker, lambda: final(r, job_id))
    assert 0 < r.ttl(KEYS.out(job_id)) <= 3600


def test_stream_interval_and_stream_false(setup):
    worker, client, r = setup
    coalesced = client.submit("Once upon a time", max_tokens=7, temperature=0, stream_interval=3)
    quiet = client.submit("Once upon a time", max_tokens=7, temperature=0, stream=False)
    run_until(worker, lambda: final(r, coalesced) and final(r, quiet))
    sizes = [len(d["token_ids"]) for k, d in events(r, coalesced) if k == "token"]
    assert sizes == [3, 3, 1]
    assert [k for k, _ in events(r, quiet)] == ["queued", "started", "done"]
    assert final(r, quiet)[1]["text"] == final(r, coalesced)[1]["text"]


def test_stop_string_ends_the_job_and_is_not_emitted(setup):
    worker, client, r = setup
    free = client.submit("The capital of France is", max_tokens=8, temperature=0)
    run_until(worker, lambda: final(r, free))
    text = final(r, free)[1]["text"]
    word = text.split()[1]  # the second word of the greedy answer
    stopped = client.submit("The capital of France is", max_tokens=8, temperature=0, stop=[word])
    run_until(worker, lambda: final(r, stopped))
    done = final(r, stopped)[1]
    assert done["finish_reason"] == "stop"
    assert done["text"] == text[: text.index(word)]
    assert word not in "".join(d["text"] for k, d in events(r, stopped) if k == "token")


BAD_ENTRIES = [
    ("malformed JSON", {"job": '{"v": 1, "job_id": "bad-json", '}, "invalid_json", "bad-json"),
    ("wrong type", {"job": raw_job(job_id="bad-type", prompt=5)}, "invalid_job", "bad-type"),
    ("unknown field", {"job": raw_job(job_id="bad-field", best_of=3)}, "invalid_job",
     "bad-field"),
    ("empty prompt", {"job": raw_job(job_id="bad-empty", prompt="")}, "invalid_job",
     "bad-empty"),
    ("both inputs", {"job": raw_job(job_id="bad-both", messages=[{"role": "user",
                                                                    "content": "x"}])},
     "invalid_job", "bad-both"),
    ("max_tokens 0", {"job": raw_job(job_id="bad-zero", sampling={"max_tokens": 0})},
     "invalid_job", "bad-zero"),
    ("max_tokens 1e9", {"job": raw_job(job_id="bad-huge", sampling={"max_tokens": 10**9})},
     "invalid_job", "bad-huge"),
    ("huge payload", {"job": raw_job(job_id="bad-size", prompt="x" * 3_000_000)},
     "payload_too_large", "bad-size"),
    ("no job field", {"jab": "x"}, "invalid_job", None),
    ("not an object", {"job": "[1, 2]"}, "invalid_job", None),
    ("unknown model", {"job": raw_job(job_id="bad-model", model="gpt-9")}, "unknown_model",
     "bad-model"),
]


def test_every_bad_entry_is_dead_lettered_and_the_worker_goes_on(setup):
    worker, client, r = setup
    for _, fields, _, _ in BAD_ENTRIES:
        r.xadd(KEYS.jobs(MODEL), fields)
    good = client.submit("Hello", max_tokens=2, temperature=0)
    run_until(worker, lambda: final(r, good))
    dead = r.xrange(KEYS.dead)
    assert len(dead) == len(BAD_ENTRIES)
    for (name, _, code, job_id), (_, letter) in zip(BAD_ENTRIES, dead, strict=True):
        assert letter[b"reason"].decode().startswith(code), name
        assert letter[b"job_id"].decode() == (job_id or ""), name
        assert len(letter[b"payload"]) <= 64 * 1024 + 1024, name
        if job_id:
            kind, data = final(r, job_id)
            assert (kind, data["code"]) == ("error", code), name
    assert final(r, good)[0] == "done"
    assert r.xpending(KEYS.jobs(MODEL), GROUP)["pending"] == 0


def test_requests_the_model_cannot_run_fail_alone(setup):
    worker, client, r = setup
    too_long = client.submit("word " * 9000, max_tokens=4, job_id="too-long")
    over_context = client.submit("Hi", max_tokens=100_000, job_id="over-context")
    good = client.submit("Hi", max_tokens=2, temperature=0)
    run_until(worker, lambda: final(r, good) and final(r, too_long) and final(r, over_context))
    for job_id, needle in [(too_long, "does not fit the context"), (over_context, "exceeds")]:
        kind, data = final(r, job_id)
        assert kind == "error" and data["code"] == "invalid_request" and needle in data["message"]
    assert final(r, good)[0] == "done"


def test_cancel_ends_the_job_and_frees_its_kv(setup, model):
    worker, client, r = setup
    job_id = client.submit("Tell me a long story", max_tokens=500, temperature=0)
    run_until(worker, lambda: sum(k == "token" for k, _ in events(r, job_id)) >= 2)
    assert model.engine.stats().kv_blocks_used > 0
    client.cancel(job_id)
    steps = 0
    while not final(r, job_id):
        worker.iteration()
        steps += 1
    # Within a few engine steps: the cancel read goes with the publisher thread's next send
    # and is applied on the turn after its reply (one step without the thread).
    assert steps <= 4
    kind, done = final(r, job_id)
    assert kind == "done" and done["finish_reason"] == "cancelled"
    assert done["usage"]["completion_tokens"] < 500
    assert model.engine.stats().kv_blocks_used == 0
    worker.heartbeat.due_now()
    worker.iteration()
    assert json.loads(r.get(KEYS.worker("w1")))["kv_blocks_used"] == 0


def test_an_answered_job_is_only_acknowledged(setup):
    worker, client, r = setup
    job_id = client.submit("Hello", max_tokens=2, temperature=0)
    run_until(worker, lambda: final(r, job_id))
    count = r.xlen(KEYS.out(job_id))
    client.submit("Hello", max_tokens=2, temperature=0, job_id=job_id)  # delivered again
    run_until(worker, lambda: r.xlen(KEYS.jobs(MODEL)) == 0)
    assert r.xlen(KEYS.out(job_id)) == count
    assert b"job.duplicate" in [f[b"event"] for _, f in r.xrange(KEYS.narration)]


def test_a_dead_workers_job_is_reclaimed_with_a_higher_attempt(setup):
    worker, client, r = setup
    worker.config.reclaim_idle_s = 0
    worker.consumer.reclaim_idle_ms = 0
    job_id = client.submit("Hello", max_tokens=3, temperature=0)
    r.xreadgroup(GROUP, "ghost", {KEYS.jobs(MODEL): ">"}, count=1)  # a worker that then died
    r.hset(KEYS.workers, "ghost", json.dumps({"model": MODEL}))
    worker._next_reclaim = 0
    run_until(worker, lambda: final(r, job_id))
    started = [d for k, d in events(r, job_id) if k == "started"]
    assert started == [{"worker_id": "w1", "attempt": 2}]
    narration = [f[b"event"] for _, f in r.xrange(KEYS.narration)]
    assert b"job.reclaimed" in narration
    run_until(worker, lambda: r.hexists(KEYS.workers, "ghost") == 0, timeout=10)


def test_a_job_delivered_too_often_is_dead_lettered(setup):
    worker, client, r = setup
    worker.consumer.reclaim_idle_ms = 0
    job_id = client.submit("Hello", max_tokens=3)
    for _ in range(3):  # three deliveries to workers that died
        r.xreadgroup(GROUP, "ghost", {KEYS.jobs(MODEL): "0" if _ else ">"}, count=1)
    pending = r.xpending_range(KEYS.jobs(MODEL), GROUP, "-", "+", 1)
    assert pending[0]["times_delivered"] == 3
    worker._next_reclaim = 0
    run_until(worker, lambda: final(r, job_id))
    assert final(r, job_id)[1]["code"] == "too_many_deliveries"
    (_, letter), = r.xrange(KEYS.dead)
    assert letter[b"reason"].startswith(b"too_many_deliveries")


def test_session_turn_reuses_cached_tokens_and_end_session_frees_them(setup, model):
    worker, client, r = setup
    turn1 = [{"role": "user", "content": "What is the capital of France?"}]
    first = client.submit(messages=turn1, session_id="s1", max_tokens=8, temperature=0)
    run_until(worker, lambda: final(r, first))
    assert r.get(KEYS.session("s1")) == b"w1"
    worker.heartbeat.due_now()
    worker.iteration()  # heartbeat: the client now routes s1 to w1
    turn2 = turn1 + [{"role": "assistant", "content": final(r, first)[1]["text"]},
                     {"role": "user", "content": "And of Italy?"}]
    assert client.stream_for(MODEL, "s1") == KEYS.routed(MODEL, "w1")
    second = client.submit(messages=turn2, session_id="s1", max_tokens=8, temperature=0)
    run_until(worker, lambda: final(r, second))
    assert final(r, second)[1]["usage"]["cached_tokens"] > 0
    narrations = [f[b"narration"].decode() for _, f in r.xrange(KEYS.narration)]
    assert any("cached tokens of session s1" in n for n in narrations)
    assert model.engine.stats().sessions == 1
    assert client.end_session("s1") is True
    run_until(worker, lambda: model.engine.stats().sessions == 0, timeout=10)


def test_a_redelivered_job_resumes_after_the_tokens_already_streamed(setup):
    """Attempt 1 streamed 12 token events and died; attempt 2 (here) goes on at the next index:
    no index repeats, the streamed text stands, and the answer equals an uninterrupted run's.
    The prefix cache holds a block of prompt + streamed tokens: none of it counts as cached
    prompt beyond the job's own prompt."""
    worker, client, r = setup
    whole = client.submit("The capital of France is", max_tokens=24, temperature=0)
    run_until(worker, lambda: final(r, whole))
    reference = final(r, whole)[1]
    first_tokens = [data for kind, data in events(r, whole) if kind == "token"][:12]
    stream = KEYS.jobs(MODEL)
    r.xadd(stream, {"job": raw_job(job_id="again", sampling={"temperature": 0,
                                                              "max_tokens": 24})})
    [(_, [(entry_id, fields)])] = r.xreadgroup(GROUP, "dead-worker", {stream: ">"})
    r.xclaim(stream, GROUP, "w1", 0, [entry_id])  # delivery 2, as a reclaim makes it
    r.xadd(KEYS.out("again"), {"event": "started",
                               "data": json.dumps({"worker_id": "dead-worker", "attempt": 1})})
    for data in first_tokens:
        r.xadd(KEYS.out("again"), {"event": "token", "data": json.dumps(data)})
    from worker.consumer import Entry

    worker._admit([Entry(stream, entry_id.decode(), {k.decode(): v for k, v in fields.items()},
                         attempt=2)])
    run_until(worker, lambda: final(r, "again"))
    got = events(r, "again")
    started = [data for kind, data in got if kind == "started"]
    resumed_from = sum(len(data["token_ids"]) for data in first_tokens)
    assert started[-1] == {"worker_id": "w1", "attempt": 2, "resumed_from": resumed_from}
    tokens = [data for kind, data in got if kind == "token"]
    indices = [data["index"] for data in tokens]
    assert indices == sorted(set(indices)) and indices[len(first_tokens)] == resumed_from
    kind, done = got[-1]
    assert kind == "done" and done["text"] == reference["text"]
    assert "".join(data["text"] for data in tokens) == reference["text"]
    assert done["usage"]["completion_tokens"] == reference["usage"]["completion_tokens"]
    assert done["usage"]["prompt_tokens"] == reference["usage"]["prompt_tokens"]
    assert 0 <= done["usage"]["cached_tokens"] <= done["usage"]["prompt_tokens"]


def test_a_job_whose_events_cannot_be_written_fails_alone(setup):
    """Someone wrote a string under a job's output key: Redis refuses its events (WRONGTYPE).
    That job is dead-lettered with the reason and acknowledged; the job beside it finishes."""
    worker, client, r = setup
    r.set(KEYS.out("clobbered"), "not a stream")
    bad = client.submit("The capital of France is", job_id="clobbered", max_tokens=6,
                        temperature=0)
    good = client.submit("Once upon a time", max_tokens=6, temperature=0)
    run_until(worker, lambda: final(r, good) and not worker.active)
    assert final(r, good)[0] == "done"
    assert r.get(KEYS.out(bad)) == b"not a stream"
    letters = [f for _, f in r.xrange(KEYS.dead)]
    assert any(f[b"job_id"] == b"clobbered" and f[b"reason"].startswith(b"engine_error: its "
               b"output stream cannot be written") for f in letters)
    assert r.xpending(KEYS.jobs(MODEL), GROUP)["pending"] == 0


def test_an_entry_delivered_but_never_started_goes_back_to_the_queue(model, redis_server):
    """A read whose reply was lost (Redis gone mid-call) leaves an entry pending with a live
    worker that never started it: the worker hands it back to the queue and then runs it."""
    r = redis_server.client()
    worker = Worker(model, WorkerConfig(worker_id="w1", redis_url=redis_server.url, block_ms=5,
                                        orphan_idle_s=0.3))
    worker._setup_groups()
    client = OrcdClient(connection=r)
    job_id = client.submit("The capital of France is", max_tokens=3, temperature=0)
    r.xreadgroup(GROUP, "w1", {KEYS.jobs(MODEL): ">"})  # delivered to w1, reply "lost"
    worker.open()
    try:
        time.sleep(0.4)
        run_until(worker, lambda: final(r, job_id))
        assert final(r, job_id)[0] == "done"
        # Counted as a redelivery: what an earlier process of this id streamed is resumed.
        assert [d["attempt"] for k, d in events(r, job_id) if k == "started"] == [2]
        assert "job.requeued" in {f[b"event"].decode() for _, f in r.xrange(KEYS.narration)}
    finally:
        worker.close()
PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age"],
          "properties": {"name": {"type": "string", "maxLength": 8},
                         "age": {"type": "integer", "minimum": 0, "maximum": 99}}}


def test_response_format_jobs_parse_or_are_marked_partial_and_bad_grammars_fail(setup):
    import jsonschema

    worker, _, r = setup
    json_schema = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    for job_id, response_format, max_tokens in [
        ("rf-whole", json_schema, 40), ("rf-short", json_schema, 3),
        ("rf-regex", {"type": "regex", "pattern": "(yes|no)"}, 5),
        ("rf-bad", {"type": "json_schema", "json_schema": {"name": "b",
                                                          "schema": {"type": "strin"}}}, 5),
        ("rf-gbnf", {"type": "grammar", "gbnf": "root ::= missing"}, 5),
    ]:
        sampling = {"temperature": 0, "max_tokens": max_tokens,
                    "response_format": response_format}
        r.xadd(KEYS.jobs(MODEL), {"job": raw_job(job_id=job_id, sampling=sampling)})
    ids = ("rf-whole", "rf-short", "rf-regex", "rf-bad", "rf-gbnf")
    run_until(worker, lambda: all(final(r, job_id) for job_id in ids))
    kind, done = final(r, "rf-whole")
    assert (kind, done["finish_reason"], done["partial"]) == ("done", "stop", False)
    jsonschema.validate(json.loads(done["text"]), PERSON)
    assert done["text"] == "".join(d["text"] for k, d in events(r, "rf-whole") if k == "token")
    kind, done = final(r, "rf-short")
    assert (kind, done["finish_reason"], done["partial"]) == ("done", "length", True)
    assert final(r, "rf-regex")[1]["text"] in ("yes", "no")
    for job_id, reason in [("rf-bad", "Invalid type: strin"), ("rf-gbnf", "missing")]:
        kind, data = final(r, job_id)
        assert (kind, data["code"]) == ("error", "invalid_request") and reason in data["message"]
    run_until(worker, lambda: not worker.engine.has_work())  # the step launched ahead of a stop
