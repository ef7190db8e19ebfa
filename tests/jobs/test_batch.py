"""Batch runner on fakeredis: fan-out in order, one XREAD over many streams, retries, failures
that do not fail the batch, validation, timeouts; RQ enqueue and meta; the JSONL writer.

Item job ids are deterministic (`{batch}.{index}`, `.r{attempt}` on retries), so a test writes
the workers' answers before the runner starts and no thread plays the worker."""

from __future__ import annotations

import json

import fakeredis
import pytest
from rq import Queue

from jobs import OrcdClient
from jobs.batch import QUEUE, WINDOW, BatchRunner, enqueue_batch, run_batch, write_jsonl
from jobs.keys import JOB_FIELD, Keys
from jobs.schema import GenerationJob

KEYS = Keys()
MODEL = "smollm2-135m"


@pytest.fixture
def r():
    return fakeredis.FakeRedis(server=fakeredis.FakeServer())


def answer(r, job_id, kind="done", text="ok", **error):
    r.xadd(KEYS.out(job_id), {"event": "started", "data": json.dumps(
        {"worker_id": "w", "attempt": 1})})
    if kind == "done":
        data = {"finish_reason": "length", "text": text,
                "usage": {"prompt_tokens": 3, "completion_tokens": 4, "cached_tokens": 0},
                "timings": {"queue_ms": 0, "ttft_ms": 1, "total_ms": 2,
                            "decode_tokens_per_s": None}, "metadata": {}}
    else:
        data = {"code": error["code"], "message": error.get("message", "boom")}
    r.xadd(KEYS.out(job_id), {"event": kind, "data": json.dumps(data)})


def runner(r, **options) -> BatchRunner:
    options.setdefault("block_ms", 20)
    return BatchRunner(OrcdClient(connection=r), "b", MODEL, {"max_tokens": 4}, **options)


def submitted(r) -> list[GenerationJob]:
    return [GenerationJob.model_validate_json(fields[JOB_FIELD.encode()])
            for _, fields in r.xrange(KEYS.jobs(MODEL))]


def test_results_keep_input_order_and_jobs_are_fanned_out_in_order(r):
    for index in (2, 0, 1):  # answers arrive out of order
        answer(r, f"b.{index}", text=f"answer {index}")
    results = runner(r).run([{"prompt": f"p{i}"} for i in range(3)])
    assert [(x["index"], x["status"], x["text"]) for x in results] == [
        (0, "done", "answer 0"), (1, "done", "answer 1"), (2, "done", "answer 2")]
    assert results[0]["usage"]["completion_tokens"] == 4 and results[0]["error"] is None
    jobs = submitted(r)
    assert [job.prompt for job in jobs] == ["p0", "p1", "p2"]
    assert all(job.sampling.max_tokens == 4 and not job.stream for job in jobs)


def test_item_sampling_overrides_the_batch_and_messages_are_accepted(r):
    answer(r, "b.0")
    answer(r, "b.1")
    items = [{"prompt": "x", "sampling": {"temperature": 0}, "max_tokens": 2},
             {"messages": [{"role": "user", "content": "hi"}], "metadata": {"k": 1}}]
    assert [x["status"] for x in runner(r).run(items)] == ["done", "done"]
    first, second = submitted(r)
    assert (first.sampling.temperature, first.sampling.max_tokens) == (0, 2)
    assert second.messages[0].content == "hi" and second.metadata == {"k": 1}


def test_bad_payloads_fail_at_validation_without_failing_the_batch(r):
    answer(r, "b.0")
    items = [{"prompt": "fine"},
             {"prompt": "x", "messages": [{"role": "user", "content": "y"}]},
             {"prompt": "x", "temperature": 7},
             {"prompt": "x", "model": "other"},
             "not an object",
             {"prompt": "x", "sampling": 5}]
    results = runner(r).run(items)
    assert [x["status"] for x in results] == ["done"] + ["failed"] * 5
    assert "exactly one of 'prompt' and 'messages'" in results[1]["error"]["message"]
    assert "temperature" in results[2]["error"]["message"]
    assert all(x["error"]["code"] == "invalid_job" and x["attempts"] == 0 for x in results[1:])
    assert len(submitted(r)) == 1  # invalid items never reach the stream


def test_retryable_errors_are_retried_under_a_new_job_id_then_given_up(r):
    answer(r, "b.0", "error", code="engine_error")
    answer(r, "b.0.r2", text="second try")
    for job_id in ("b.1", "b.1.r2", "b.1.r3"):
        answer(r, job_id, "error", code="engine_error", message="out of memory")
    answer(r, "b.2", "error", code="invalid_request", message="prompt too long")
    progress = []
    batch = runner(r, max_attempts=3, on_progress=lambda p, final: progress.append(p.as_meta()))
    results = batch.run([{"prompt": "a"}, {"prompt": "b"}, {"prompt": "c"}])
    assert results[0]["status"] == "done" and results[0]["text"] == "second try"
    assert results[0]["attempts"] == 2 and results[0]["job_id"] == "b.0.r2"
    assert results[1]["status"] == "failed" and results[1]["attempts"] == 3
    assert results[1]["error"] == {"code": "engine_error", "message": "out of memory"}
    assert results[2]["attempts"] == 1  # a permanent error is not retried
    assert [job.job_id for job in submitted(r)] == ["b.0", "b.1", "b.2", "b.0.r2", "b.1.r2",
                                                     "b.1.r3"]
    assert progress[-1] == {"total": 3, "done": 1, "failed": 2, "completed": 3, "retries": 3,
                            "progress": 1.0}


def test_unanswered_items_time_out_and_are_cancelled(r):
    answer(r, "b.0")
    results = runner(r, timeout_s=0.2).run([{"prompt": "a"}, {"prompt": "b"}])
    assert results[0]["status"] == "done"
    assert results[1]["error"]["code"] == "timeout"
    assert r.exists(KEYS.cancel("b.1"))


def test_more_items_than_one_read_window(r):
    count = WINDOW + 40
    for index in reversed(range(count)):
        answer(r, f"b.{index}", text=str(index))
    results = runner(r).run([{"prompt": str(i)} for i in range(count)])
    assert [x["text"] for x in results] == [str(i) for i in range(count)]


def test_enqueue_puts_one_rq_job_with_progress_meta_and_run_batch_writes_jsonl(r, tmp_path):
    batch_id = enqueue_batch([{"prompt": "a"}, {"prompt": "b"}], MODEL, {"max_tokens": 4},
                             connection=r, out_path=str(tmp_path / "out.jsonl"))
    queue = Queue(QUEUE, connection=r)
    assert queue.job_ids == [batch_id]
    job = queue.fetch_job(batch_id)
    assert job.meta["total"] == 2 and job.meta["progress"] == 0
    assert job.result_ttl >= 24 * 3600 and job.timeout > 3600
    assert job.func_name == "jobs.batch.run_batch"


def test_run_batch_outside_rq_returns_results_and_writes_them(tmp_path, monkeypatch):
    server = fakeredis.FakeServer()
    monkeypatch.setattr("jobs.batch.OrcdClient", lambda url, prefix: OrcdClient(
        connection=fakeredis.FakeRedis(server=server), prefix=prefix))
    out = tmp_path / "out.jsonl"
    results = run_batch([{"prompt": "x", "top_p": 0}], MODEL, {}, "redis://unused",
                        out_path=str(out))
    assert results[0]["status"] == "failed"
    assert [json.loads(line) for line in out.read_text().splitlines()] == results


def test_write_jsonl_replaces_the_file_whole(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text("old\n")
    write_jsonl(str(path), [{"index": 0, "text": "é"}])
    assert path.read_text(encoding="utf-8") == '{"index": 0, "text": "é"}\n'
    assert list(tmp_path.iterdir()) == [path]
