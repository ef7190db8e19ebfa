"""The gateway through the official `openai` client (a real client none of us wrote), against a
live `orcd gateway`, a real redis-server and a real torch worker with the default model: chat
and completions streaming and not, n, seed, logprobs, stop, usage with cached tokens, models,
errors in OpenAI's shape, and a client disconnect cancelling the job. Answers are checked
against the same jobs sent straight to the queue with `OrcdClient` (redis-py)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from jobs import OrcdClient
from tests.gateway.stack import ENV, GatewayProcess

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("gateway")]

MODEL = "smollm2-135m"
KEY, HASHED_KEY, LIMITED_KEY, ONE_STREAM_KEY = "sk-test", "sk-hashed", "sk-limited", "sk-one"
ERROR_FIELDS = {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def stack(worker_stack):
    redis_server, directory = worker_stack
    keys = directory / "keys.txt"
    keys.write_text(f"# test keys\n{KEY}\nsha256:{hashlib.sha256(HASHED_KEY.encode()).hexdigest()}"
                    f"\n{LIMITED_KEY} rpm=1\n{ONE_STREAM_KEY} streams=1\n")
    gateway = GatewayProcess(redis_server.url, directory, "gw-api", "--api-keys-file",
                             str(keys), "--no-batches")
    try:
        gateway.wait_ready()
        yield redis_server, gateway
    finally:
        gateway.stop()


@pytest.fixture(scope="module")
def client(stack):
    _, gateway = stack
    return openai.OpenAI(api_key=KEY, base_url=f"{gateway.url}/v1", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def direct(stack):
    redis_server, _ = stack
    with OrcdClient(redis_server.url) as orcd:
        yield orcd


def error_of(exc: openai.APIStatusError) -> dict:
    body = exc.response.json()
    assert set(body) == {"error"} and set(body["error"]) == ERROR_FIELDS, body
    return body["error"]


CHAT = [{"role": "user", "content": "Name a fruit."}]


def test_models_health_metrics(stack, client):
    _, gateway = stack
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).owned_by == "orcd"
    assert httpx.get(f"{gateway.url}/health").json() == {"status": "ok"}
    metrics = httpx.get(f"{gateway.url}/metrics").text
    assert 'orcd_gateway_requests_total{endpoint="/v1/models",status="200"}' in metrics


def test_chat_matches_the_queue_streaming_and_not(client, direct):
    reference = direct.generate(messages=CHAT, model=MODEL, max_tokens=8, temperature=0.0,
                                timeout=120)
    answer = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8,
                                            temperature=0)
    choice = answer.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == reference.text
    assert choice.finish_reason == reference.finish_reason
    assert answer.usage.prompt_tokens == reference.usage.prompt_tokens
    assert answer.usage.completion_tokens == reference.usage.completion_tokens
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens

    chunks = list(client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=8, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reference.text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == reference.finish_reason and set(finishes[:-1]) == {None}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == \
        reference.usage.completion_tokens


def test_completions_match_the_queue_streaming_and_not(client, direct):
    prompt = "The capital of France is"
    reference = direct.generate(prompt, model=MODEL, max_tokens=6, temperature=0.0,
                                timeout=120)
    answer = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0)
    assert answer.object == "text_completion"
    assert answer.choices[0].text == reference.text
    assert answer.usage.completion_tokens == reference.usage.completion_tokens
    streamed = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6,
                                         temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == reference.text


def test_n_and_seed_reproducible(client):
    def ask():
        return client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, n=2,
                                              seed=1234, temperature=1.0)
    first, second = ask(), ask()
    assert [c.index for c in first.choices] == [0, 1]
    assert [c.message.content for c in first.choices] == \
        [c.message.content for c in second.choices]
    assert all(c.message.content for c in first.choices)
    # Each prompt's tokens count once, each choice's completion does.
    single = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=1)
    assert first.usage.prompt_tokens == single.usage.prompt_tokens
    if all(c.finish_reason == "length" for c in first.choices):
        assert first.usage.completion_tokens == 16
    assert first.usage.completion_tokens <= 16


def test_logprobs(client):
    answer = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=6,
                                            temperature=0, logprobs=True, top_logprobs=3)
    content = answer.choices[0].logprobs.content
    assert len(content) == answer.usage.completion_tokens
    assert "".join(t.token for t in content) == answer.choices[0].message.content
    for token in content:
        assert len(token.top_logprobs) == 3
        # Greedy: the chosen token is the most likely one, its logprob the top one's.
        assert token.top_logprobs[0].token == token.token
        assert token.top_logprobs[0].logprob == pytest.approx(token.logprob, abs=1e-5)
        assert bytes(token.bytes).decode() == token.token
        assert token.logprob <= 0
    legacy = client.completions.create(model=MODEL, prompt="One, two,", max_tokens=4,
                                       temperature=0, logprobs=2)
    logprobs = legacy.choices[0].logprobs
    assert "".join(logprobs.tokens) == legacy.choices[0].text
    assert logprobs.text_offset[0] == 0 and len(logprobs.top_logprobs[0]) == 2


def test_stop(client):
    free = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=12,
                                     temperature=0).choices[0].text
    stop = free.strip().split()[1]  # a word the free answer reaches
    stopped = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=12,
                                        temperature=0, stop=[stop]).choices[0]
    assert stopped.finish_reason == "stop"
    assert stopped.text == free[:free.index(stop)]


def test_session_second_turn_uses_cached_tokens(client):
    first_turn = [{"role": "system", "content": "You are a terse assistant who answers in one "
                   "word and never explains anything at all."},
                  {"role": "user", "content": "Name a colour."}]
    first = client.chat.completions.create(model=MODEL, messages=first_turn, max_tokens=4,
                                           temperature=0, extra_body={"session_id": "gw-s1"})
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    second_turn = first_turn + [
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "Another one."}]
    second = client.chat.completions.create(model=MODEL, messages=second_turn, max_tokens=4,
                                            temperature=0, extra_body={"session_id": "gw-s1"})
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert 16 <= cached < second.usage.prompt_tokens


def test_auth_errors(stack, client):
    _, gateway = stack
    bad = openai.OpenAI(api_key="sk-wrong", base_url=f"{gateway.url}/v1", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        bad.models.list()
    assert error_of(caught.value)["code"] == "invalid_api_key"
    assert httpx.get(f"{gateway.url}/v1/models").status_code == 401  # no header at all
    hashed = openai.OpenAI(api_key=HASHED_KEY, base_url=f"{gateway.url}/v1", max_retries=0)
    assert hashed.models.list().data[0].id == MODEL


def test_request_errors(stack, client):
    _, gateway = stack
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="no-such-model", messages=CHAT, max_tokens=2)
    assert error_of(caught.value)["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=CHAT, temperature=5)
    error = error_of(caught.value)
    assert error["param"] == "temperature" and error["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=CHAT,
                                       extra_body={"tools_of_my_own": []})
    assert error_of(caught.value)["param"] == "tools_of_my_own"
    huge = {"model": MODEL, "prompt": "x" * (5 * 1024 * 1024)}
    response = httpx.post(f"{gateway.url}/v1/completions", json=huge,
                          headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert response.status_code == 413
    assert set(response.json()["error"]) == ERROR_FIELDS


def test_response_format_json_schema_and_refusals(client):
    """OpenAI's structured outputs: the answer parses and follows the schema; a schema the
    grammar library refuses is a 400 naming response_format and the reason."""
    schema = {"type": "object", "additionalProperties": False, "required": ["city"],
              "properties": {"city": {"type": "string", "maxLength": 20}}}
    answer = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0, max_tokens=32,
        response_format={"type": "json_schema",
                         "json_schema": {"name": "capital", "schema": schema, "strict": True}})
    choice = answer.choices[0]
    assert choice.finish_reason == "stop" and json.loads(choice.message.content) == {
        "city": "Paris"}
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=MODEL, messages=CHAT, max_tokens=4,
            response_format={"type": "json_schema",
                             "json_schema": {"name": "bad", "schema": {"type": "strin"}}})
    error = error_of(caught.value)
    assert error["param"] == "response_format" and "Invalid type: strin" in error["message"]


def test_rate_limits(stack):
    _, gateway = stack
    limited = openai.OpenAI(api_key=LIMITED_KEY, base_url=f"{gateway.url}/v1", max_retries=0)
    refused = []
    for _ in range(3):  # rpm=1: at most one per minute window, and 3 calls span at most two
        try:
            limited.completions.create(model=MODEL, prompt="Hi", max_tokens=1)
        except openai.RateLimitError as exc:
            refused.append(exc)
    assert refused
    assert error_of(refused[0])["code"] == "rate_limit_exceeded"
    assert 1 <= int(refused[0].response.headers["retry-after"]) <= 60

    headers = {"Authorization": f"Bearer {ONE_STREAM_KEY}"}
    body = {"model": MODEL, "prompt": "Count:", "max_tokens": 64, "stream": True}
    with httpx.Client(base_url=gateway.url, headers=headers, timeout=60) as http:
        with http.stream("POST", "/v1/completions", json=body) as first:
            assert first.status_code == 200
            second = http.post("/v1/completions", json=body)
            assert second.status_code == 429
            assert "concurrent streams" in second.json()["error"]["message"]
        # The first stream's slot is released when it ends (here: closed by the client).
        deadline = time.monotonic() + 10
        while http.post("/v1/completions", json={**body, "stream": False,
                                                 "max_tokens": 1}).status_code != 200:
            assert time.monotonic() < deadline


# An answer that cannot end before max_tokens (no end of text until 4,000 letters), so a
# client that leaves early always leaves a running job behind: at temperature 1 an
# unconstrained answer sometimes ended by itself within the client's patience.
ENDLESS = {"type": "regex", "pattern": "[a-z]{4000}"}


def test_deadline_is_504(client):
    # ENDLESS: the greedy answer to CHAT is a few tokens, which an idle worker sometimes
    # finished inside the 0.3 s (CI, 2026-12-07).
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=400,
                                        response_format=ENDLESS,
                                        extra_body={"timeout_s": 0.3})
    assert caught.value.status_code == 504
    assert error_of(caught.value)["code"] == "timeout"


def test_disconnect_cancels_the_job(stack, direct):
    _, gateway = stack
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 400, "stream": True,
            "temperature": 1.0, "response_format": ENDLESS}
    with httpx.Client(base_url=gateway.url, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=60) as http:
        with http.stream("POST", "/v1/chat/completions", json=body) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    request_id = json.loads(line[6:])["id"]
                    break
    done = direct.wait(f"{request_id}-0", timeout=60)
    assert done.finish_reason == "cancelled"
    assert done.usage.completion_tokens < 400


def test_disconnect_cancels_a_non_streaming_request(stack):
    redis_server, gateway = stack
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 400, "temperature": 1.0,
            "user": "leaves-early", "response_format": ENDLESS}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{gateway.url}/v1/chat/completions", json=body,
                   timeout=httpx.Timeout(60, read=1.5),  # the client gives up waiting
                   headers={"Authorization": f"Bearer {KEY}"})
    redis = redis_server.client()
    deadline = time.monotonic() + 60
    while True:  # the job is found by the `user` the gateway put in its metadata
        finals = [json.loads(fields[b"data"])
                  for key in redis.scan_iter(match=b"orcd:out:chatcmpl-*")
                  for _, fields in redis.xrevrange(key, count=1)
                  if fields[b"event"] == b"done"]
        mine = [d for d in finals if d["metadata"].get("user") == "leaves-early"]
        if mine:
            break
        assert time.monotonic() < deadline, "the job did not end"
        time.sleep(0.2)
    assert mine[0]["finish_reason"] == "cancelled"
    assert mine[0]["usage"]["completion_tokens"] < 400


def test_files_belong_to_the_key_that_uploaded_them(stack, client):
    _, gateway = stack
    other = openai.OpenAI(api_key=HASHED_KEY, base_url=f"{gateway.url}/v1", max_retries=0)
    line = {"custom_id": "a", "method": "POST", "url": "/v1/completions",
            "body": {"model": MODEL, "prompt": "Hi", "max_tokens": 1}}
    uploaded = client.files.create(file=("in.jsonl", json.dumps(line).encode()),
                                   purpose="batch")
    assert client.files.retrieve(uploaded.id).id == uploaded.id
    assert uploaded.id in [f.id for f in client.files.list().data]
    with pytest.raises(openai.NotFoundError):
        other.files.retrieve(uploaded.id)
    with pytest.raises(openai.NotFoundError):
        other.files.content(uploaded.id)
    with pytest.raises(openai.NotFoundError):
        other.batches.create(input_file_id=uploaded.id, endpoint="/v1/completions",
                             completion_window="24h")
    assert uploaded.id not in [f.id for f in other.files.list().data]
    client.files.delete(uploaded.id)
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(uploaded.id)


def test_gateway_never_imports_torch(stack):
    _, gateway = stack
    maps = Path(f"/proc/{gateway.process.pid}/maps")
    if maps.exists():  # the live gateway, after every test above (logprobs too): no torch
        assert "torch" not in maps.read_text()
    code = ("import sys; from worker.cli import build_parser; "
            "from worker.commands.gateway import config_from; from gateway.app import create_app; "
            "args = build_parser('gateway').parse_args(['gateway', '--no-auth']); "
            "create_app(config_from(args)); print(sorted(m for m in sys.modules "
            "if m.split('.')[0] in ('torch', 'gpu')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV,
                         timeout=60, check=True).stdout
    assert out.strip() == "[]"
