"""A stream through the gateway whose worker is SIGKILLed mid-answer: another worker takes the
job over and resumes it, and the client's stream goes on without repeating or losing text."""

from __future__ import annotations

import json
import shutil

import httpx
import pytest

from jobs import OrcdClient
from jobs.keys import Keys
from tests.gateway.stack import GatewayProcess
from tests.redis_server import RedisServer
from tests.worker.workers import WorkerProcess

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("gateway-resume")]


def test_stream_survives_its_worker_dying(tmp_path, default_model_path):
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    redis_server = RedisServer(tmp_path).start()
    workers = {name: WorkerProcess(redis_server.url, name, tmp_path, "--backend", "torch",
                                   "--dtype", "int8") for name in ("wa", "wb")}
    gateway = GatewayProcess(redis_server.url, tmp_path, "gw-resume", "--no-auth",
                             "--no-batches")
    try:
        for worker in workers.values():
            worker.wait_ready()
        gateway.wait_ready()
        body = {"model": "smollm2-135m", "prompt": "The history of Rome, in short:",
                "max_tokens": 48, "temperature": 0, "stream": True}
        texts, job_id, killed = [], None, None
        redis = redis_server.client()
        with httpx.stream("POST", f"{gateway.url}/v1/completions", json=body,
                          timeout=120) as response:
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                assert "error" not in chunk, chunk
                job_id = f"{chunk['id']}-0"
                texts.append(chunk["choices"][0]["text"])
                if killed is None and len(texts) == 4:
                    started = [json.loads(fields[b"data"]) for _, fields in
                               redis.xrange(Keys().out(job_id)) if fields[b"event"] == b"started"]
                    killed = started[0]["worker_id"]
                    workers[killed].stop()  # SIGKILL, mid-answer
        with OrcdClient(redis_server.url) as client:
            done = client.wait(job_id, timeout=10)
            attempts = [e.data for e in client.events(job_id, timeout=10) if e.kind == "started"]
        assert killed is not None and len(attempts) == 2, attempts  # really taken over
        assert attempts[1]["worker_id"] != killed
        assert "".join(texts) == done.text  # nothing repeated, nothing lost
        assert done.usage.completion_tokens == 48
    finally:
        gateway.stop()
        for worker in workers.values():
            worker.stop()
        redis_server.kill()
