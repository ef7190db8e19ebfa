"""The Batch API through the official `openai` client: a 20-line batch completes with an
output file in OpenAI's format, and a gateway SIGKILLed mid-batch and started again finishes
it with every line answered exactly once (each line's job submitted once, one result each)."""

from __future__ import annotations

import io
import json
import time

import openai
import pytest

from jobs.keys import Keys
from tests.gateway.stack import GatewayProcess

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("gateway")]

MODEL = "smollm2-135m"
KEYS = Keys()
KILLED_LINES = 12  # run two at a time, so that the kill lands mid-batch
QUESTIONS = ["Name a fruit.", "Name a colour.", "Name a city.", "Name an animal."]


@pytest.fixture(scope="module")
def stack(worker_stack):
    return worker_stack


def batch_file(count: int, max_tokens: int, bad_line: int | None = None) -> bytes:
    lines = []
    for number in range(count):
        body = {"model": MODEL, "max_tokens": max_tokens, "temperature": 0,
                "messages": [{"role": "user", "content": QUESTIONS[number % len(QUESTIONS)]}]}
        if number == bad_line:
            body["temperature"] = 9  # refused by the job contract: this line's error
        lines.append({"custom_id": f"line-{number}", "method": "POST",
                      "url": "/v1/chat/completions", "body": body})
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


def start_batch(client: openai.OpenAI, content: bytes):
    uploaded = client.files.create(file=("batch.jsonl", io.BytesIO(content)), purpose="batch")
    assert uploaded.purpose == "batch" and uploaded.bytes == len(content)
    assert client.files.content(uploaded.id).content == content
    return client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                 completion_window="24h")


def wait_until(client: openai.OpenAI, batch_id: str, predicate, timeout: float = 180.0):
    deadline = time.monotonic() + timeout
    while True:
        batch = client.batches.retrieve(batch_id)
        if predicate(batch):
            return batch
        assert time.monotonic() < deadline, batch
        time.sleep(0.2)


def read_jsonl(client: openai.OpenAI, file_id: str) -> list[dict]:
    return [json.loads(line) for line in client.files.content(file_id).text.splitlines()]


def check_output(rows: list[dict], batch_id: str, expected_ids: set[str]) -> None:
    assert [row["custom_id"] for row in rows] == sorted(expected_ids,
                                                       key=lambda c: int(c.split("-")[1]))
    for row in rows:
        assert row["error"] is None and row["id"].startswith("batch_req_")
        response = row["response"]
        assert response["status_code"] == 200
        body = response["body"]
        assert body["object"] == "chat.completion" and body["model"] == MODEL
        choice = body["choices"][0]
        assert choice["message"]["role"] == "assistant" and choice["message"]["content"]
        assert choice["finish_reason"] in ("stop", "length")
        assert body["usage"]["completion_tokens"] >= 1
        assert response["request_id"].startswith(batch_id)


def test_batch_of_20_completes(stack):
    redis_server, directory = stack
    gateway = GatewayProcess(redis_server.url, directory, "gwb-one", "--no-auth").wait_ready()
    try:
        client = openai.OpenAI(api_key="unused", base_url=f"{gateway.url}/v1", max_retries=0)
        batch = start_batch(client, batch_file(20, 6, bad_line=7))
        assert batch.status == "in_progress" and batch.request_counts.total == 20
        batch = wait_until(client, batch.id, lambda b: b.status == "completed")
        assert batch.request_counts.completed == 19 and batch.request_counts.failed == 1
        assert batch.completed_at >= batch.created_at
        rows = read_jsonl(client, batch.output_file_id)
        check_output(rows, batch.id, {f"line-{n}" for n in range(20) if n != 7})
        # Same question, greedy, same model: the same answer, whichever line asked it.
        answers = {}
        for row in rows:
            number = int(row["custom_id"].split("-")[1])
            text = row["response"]["body"]["choices"][0]["message"]["content"]
            answers.setdefault(number % len(QUESTIONS), set()).add(text)
        assert all(len(texts) == 1 for texts in answers.values()), answers
        errors = read_jsonl(client, batch.error_file_id)
        assert [e["custom_id"] for e in errors] == ["line-7"]
        assert errors[0]["response"]["status_code"] == 400
        assert errors[0]["response"]["body"]["error"]["param"] == "temperature"
        assert client.batches.list().data[0].id == batch.id

        # Cancelled at once: its jobs are cancelled, it ends `cancelled` with what finished.
        batch = start_batch(client, batch_file(20, 64))
        assert client.batches.cancel(batch.id).status in ("cancelling", "cancelled")
        batch = wait_until(client, batch.id, lambda b: b.status == "cancelled")
        assert batch.cancelling_at and batch.cancelled_at
        counts = batch.request_counts
        rows = read_jsonl(client, batch.output_file_id) if batch.output_file_id else []
        assert len(rows) == counts.completed <= 20 and counts.failed == 0
        reasons = {row["response"]["body"]["choices"][0]["finish_reason"] for row in rows}
        assert reasons <= {"stop", "length", "cancelled"}
        assert "cancelled" in reasons or counts.completed < 20  # the cancel took effect
        with pytest.raises(openai.NotFoundError):
            client.batches.retrieve("batch_nonexistent")
    finally:
        gateway.stop()


def test_gateway_killed_mid_batch_finishes_after_restart(stack):
    redis_server, directory = stack
    options = ("--no-auth", "--batch-window", "2", "--batch-lease", "1")
    first = GatewayProcess(redis_server.url, directory, "gwb-killed", *options).wait_ready()
    client = openai.OpenAI(api_key="unused", base_url=f"{first.url}/v1", max_retries=0)
    try:
        batch = start_batch(client, batch_file(KILLED_LINES, 8))
        wait_until(client, batch.id, lambda b: 3 <= b.request_counts.completed)
    finally:
        first.kill()
    redis = redis_server.client()
    left = int(redis.hget(KEYS.gateway_batch(batch.id), "completed"))
    assert left < KILLED_LINES, "the batch ended before the gateway was killed: nothing was tested"
    second = GatewayProcess(redis_server.url, directory, "gwb-restarted", *options,
                            port=first.port).wait_ready()
    try:
        batch = wait_until(client, batch.id, lambda b: b.status == "completed")
        assert batch.request_counts.completed == KILLED_LINES and batch.request_counts.failed == 0
        check_output(read_jsonl(client, batch.output_file_id), batch.id,
                     {f"line-{n}" for n in range(KILLED_LINES)})
        # Each line's job went on the queue once and ran once: one `done` per output stream.
        for number in range(KILLED_LINES):
            events = redis.xrange(KEYS.out(f"{batch.id}-{number}-0"))
            kinds = [fields[b"event"] for _, fields in events]
            assert kinds.count(b"done") == 1 and kinds.count(b"started") == 1, (number, kinds)
        assert int(redis.hget(KEYS.gateway_batch(batch.id), "submitted")) == KILLED_LINES
    finally:
        second.stop()
