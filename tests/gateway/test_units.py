"""The gateway's parts without a worker: request translation onto the job contract, API keys,
the shared rate limits (atomic under concurrency, on a real redis-server), batch input files."""

from __future__ import annotations

import asyncio
import hashlib

import pytest
import redis.asyncio as aioredis
from pydantic import ValidationError

from gateway.app import endpoint_label
from gateway.auth import ApiKeys, Caller, Limits
from gateway.batches import parse_input
from gateway.errors import APIError
from gateway.ratelimit import RateLimiter
from gateway.requests import ChatCompletionRequest, CompletionRequest
from gateway.translate import chat_choices, completion_choices
from jobs.errors import OrcdError
from jobs.keys import Keys


def chat(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "Hi"}], **fields})


def test_chat_parameters_map_onto_the_job():
    choices = chat_choices(chat(
        messages=[{"role": "developer", "content": "Be brief."},
                  {"role": "user", "content": [{"type": "text", "text": "Hi "},
                                               {"type": "text", "text": "there"}]}],
        max_completion_tokens=7, temperature=0, top_p=0.5, n=2, seed=10, stop="END",
        presence_penalty=0.5, frequency_penalty=-0.5, logprobs=True, top_logprobs=3,
        top_k=40, min_p=0.1, repetition_penalty=1.1, priority=5, user="u1"), "chatcmpl-x")
    assert [c.job.job_id for c in choices] == ["chatcmpl-x-0", "chatcmpl-x-1"]
    job = choices[1].job
    assert job.message_dicts() == [{"role": "system", "content": "Be brief."},
                                   {"role": "user", "content": "Hi there"}]
    assert job.parse_special is False and job.priority == 5 and job.stream is True
    s = job.sampling
    assert (s.max_tokens, s.temperature, s.top_p, s.top_k, s.min_p, s.repetition_penalty) == \
        (7, 0.0, 0.5, 40, 0.1, 1.1)
    assert (s.presence_penalty, s.frequency_penalty, s.stop, s.logprobs) == \
        (0.5, -0.5, ["END"], 3)
    assert [c.job.sampling.seed for c in choices] == [10, 11]
    assert job.metadata == {"request_id": "chatcmpl-x", "choice": 1, "user": "u1"}
    plain = chat_choices(chat(), "r")[0].job
    assert plain.stream is False and plain.sampling.logprobs is None


def test_completion_choices_are_prompt_major():
    request = CompletionRequest.model_validate(
        {"model": "m", "prompt": ["a", "b"], "n": 2, "seed": 3})
    choices = completion_choices(request, "cmpl-x")
    assert [(c.index, c.job.prompt, c.job.sampling.seed, c.first_of_prompt) for c in choices] \
        == [(0, "a", 3, True), (1, "a", 4, False), (2, "b", 3, True), (3, "b", 4, False)]
    assert choices[0].job.sampling.max_tokens == 16  # OpenAI's default for completions


@pytest.mark.parametrize(("fields", "param"), [
    ({"temperature": 3}, "temperature"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"n": 2, "session_id": "s"}, "n"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"session_id": "has space"}, "session_id"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
])
def test_bad_parameters_are_400_naming_the_parameter(fields, param):
    with pytest.raises(APIError) as caught:
        chat_choices(chat(**fields), "r")
    assert caught.value.status == 400 and caught.value.param == param


def test_unknown_fields_are_refused():
    with pytest.raises(ValidationError):
        chat(tools=[])
    with pytest.raises(APIError):
        completion_choices(CompletionRequest.model_validate(
            {"model": "m", "prompt": "x", "echo": True}), "r")


def test_api_keys_file(tmp_path):
    path = tmp_path / "keys"
    digest = hashlib.sha256(b"sk-hashed").hexdigest()
    path.write_text(f"# comment\n\nsk-plain\nsha256:{digest.upper()} rpm=5\nsk-c tpm=9 streams=2\n")
    keys = ApiKeys.load(path, Limits(requests_per_min=100))
    assert len(keys) == 3
    assert keys.caller("Bearer sk-plain").limits == Limits(requests_per_min=100)
    assert keys.caller("bearer sk-hashed").limits == Limits(requests_per_min=5)
    assert keys.caller("Bearer sk-c").limits == Limits(100, 9, 2)
    assert keys.caller("Bearer sk-hashed").key_id == digest[:16]
    for header in (None, "", "Bearer", "Basic sk-plain", "Bearer sk-other", f"Bearer {digest}"):
        assert keys.caller(header) is None
    for bad in ("sha256:abc\n", "sk-x rpm=lots\n", "# only a comment\n"):
        path.write_text(bad)
        with pytest.raises(OrcdError):
            ApiKeys.load(path, Limits())
    with pytest.raises(OrcdError):
        ApiKeys.load(tmp_path / "missing", Limits())


def test_rate_limits_hold_under_concurrency(redis_server):
    async def scenario():
        redis = aioredis.Redis.from_url(redis_server.url)
        limiter = RateLimiter(redis, Keys())
        per_minute = Caller("k1", Limits(requests_per_min=5))
        refusals = await asyncio.gather(*(limiter.admit(per_minute, None) for _ in range(30)))
        admitted = sum(r is None for r in refusals)
        refused = [r for r in refusals if r is not None]
        streams = Caller("k2", Limits(streams=2))
        opened = [await limiter.admit(streams, f"s{i}") for i in range(3)]
        await limiter.release(streams, "s0")
        reopened = await limiter.admit(streams, "s3")
        tokens = Caller("k3", Limits(tokens_per_min=50))
        before = await limiter.admit(tokens, None)
        await limiter.charge_tokens(tokens, 60)
        after = await limiter.admit(tokens, None)
        await redis.aclose()
        return admitted, refused, opened, reopened, before, after

    admitted, refused, opened, reopened, before, after = asyncio.run(scenario())
    # A minute boundary inside the burst would let 10 through; never more.
    assert admitted in (5, 10) and all(r.what == "requests per minute" for r in refused)
    assert 1 <= refused[0].retry_after_s <= 60
    assert opened[:2] == [None, None] and opened[2].what == "concurrent streams"
    assert reopened is None
    assert before is None and after is not None and after.what == "tokens per minute"


def test_batch_input_errors():
    good = b'{"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {}}\n'
    lines, errors = parse_input(good + b"\n", "/v1/completions")
    assert len(lines) == 1 and errors == []
    _, errors = parse_input(good + good + b"not json\n", "/v1/completions")
    assert [e["code"] for e in errors] == ["duplicate_custom_id", "invalid_json_line"]
    assert [e["line"] for e in errors] == [2, 3]
    _, errors = parse_input(good, "/v1/chat/completions")
    assert errors[0]["code"] == "invalid_url"
    _, errors = parse_input(b"\n", "/v1/completions")
    assert errors[0]["code"] == "empty_file"


def test_endpoint_labels_keep_ids_out():
    assert endpoint_label("/v1/batches/batch_123/cancel") == "/v1/batches/{id}/cancel"
    assert endpoint_label("/v1/files/file-1/content") == "/v1/files/{id}/content"
    assert endpoint_label("/v1/chat/completions") == "/v1/chat/completions"
    assert endpoint_label("/secret/path/42") == "other"


def test_redis_down_is_503_in_openai_shape():
    import httpx

    from gateway.app import create_app
    from gateway.service import GatewayConfig
    from tests.redis_server import free_port

    async def scenario():
        app = create_app(GatewayConfig(redis_url=f"redis://127.0.0.1:{free_port()}/0"),
                         run_batches=False)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as http:
            health = await http.get("/health")
            answer = await http.post("/v1/chat/completions", json={
                "model": "m", "messages": [{"role": "user", "content": "Hi"}]})
        return health, answer

    health, answer = asyncio.run(scenario())
    assert health.status_code == 503
    assert answer.status_code == 503 and answer.headers["retry-after"] == "5"
    assert answer.json()["error"]["code"] == "queue_unavailable"


def test_a_model_whose_workers_are_gone_is_503_an_unknown_one_404(redis_server):
    import json

    import httpx

    from gateway.app import create_app
    from gateway.service import GatewayConfig

    keys = Keys()
    redis = redis_server.client()
    # A worker of `gone-model` left its hash entry (as a crashed one does) but no live key.
    redis.hset(keys.workers, "dead-worker", json.dumps({"model": "gone-model"}))

    async def ask(model: str) -> httpx.Response:
        app = create_app(GatewayConfig(redis_url=redis_server.url), run_batches=False)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as http:
            return await http.post("/v1/chat/completions", json={
                "model": model, "messages": [{"role": "user", "content": "Hi"}]})

    gone, unknown = asyncio.run(ask("gone-model")), asyncio.run(ask("never-served"))
    assert gone.status_code == 503 and gone.json()["error"]["code"] == "model_not_available"
    assert gone.headers["retry-after"]
    assert unknown.status_code == 404 and unknown.json()["error"]["param"] == "model"
    assert redis.xlen(keys.jobs("gone-model")) == 0  # nothing was queued


def test_the_command_refuses_to_start_without_keys_or_no_auth(tmp_path, monkeypatch, capsys):
    from worker.cli import main

    monkeypatch.delenv("ORCD_API_KEYS_FILE", raising=False)
    assert main(["gateway"]) == 2
    assert "--api-keys-file" in capsys.readouterr().err
    keys = tmp_path / "keys"
    keys.write_text("sk-x\n")
    assert main(["gateway", "--no-auth", "--api-keys-file", str(keys)]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["gateway", "--api-keys-file", str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err
