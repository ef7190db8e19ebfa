"""Gateway overhead: the same jobs through `orcd gateway` (HTTP, SSE) and straight through
redis-py (`OrcdClient`), one after the other, so that only the gateway differs.

    .venv/bin/python -m bench.gateway [--requests 200] [--tokens 256] [--real-tokens 48]

1. Per request: a fake worker (a process answering each job at once with `started`, one token
   and `done`) isolates what the gateway adds to a request's latency: HTTP, auth, validation,
   the model check, XADD, reading the output stream, the response.
2. Per streamed token: the fake worker writes `--tokens` token events per job at once; the time
   to receive them all, over the count, is each path's cost per token.
3. Real worker: tokens/s of a streamed greedy answer from `orcd worker` (torch backend, the
   default model) through both paths, interleaved, median of `--repeats`.

Needs `redis-server` (started privately on a free port). Results: bench/results/gateway-*.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from bench.results_io import write_result
from jobs import OrcdClient
from jobs.keys import DATA_FIELD, EVENT_FIELD, GROUP, JOB_FIELD, Keys
from tests.gateway.stack import GatewayProcess
from tests.redis_server import RedisServer
from tests.worker.workers import WorkerProcess

FAKE_MODEL = "fake-model"
REAL_MODEL = "smollm2-135m"


def fake_worker(url: str, tokens: int) -> None:
    """Answer every job of FAKE_MODEL at once: started, `max_tokens` (or `tokens`) token
    events of one token each, done; with a heartbeat, so the gateway sees a live worker."""
    import redis

    keys, r = Keys(), redis.Redis.from_url(url)
    stream = keys.jobs(FAKE_MODEL)
    try:
        r.xgroup_create(stream, GROUP, id="0", mkstream=True)
    except redis.ResponseError:
        pass
    info = json.dumps({"worker_id": "fake", "model": FAKE_MODEL, "state": "running",
                       "started_at": time.time()})
    beat = 0.0
    while True:
        if time.monotonic() - beat > 1:
            r.set(keys.worker("fake"), info, px=5000)
            r.hset(keys.workers, "fake", info)
            beat = time.monotonic()
        reply = r.xreadgroup(GROUP, "fake", {stream: ">"}, count=16, block=200)
        for _, entries in reply or ():
            for entry_id, fields in entries:
                job = json.loads(fields[JOB_FIELD.encode()])
                count = min(job["sampling"]["max_tokens"], tokens)
                out = keys.out(job["job_id"])
                pipe = r.pipeline(transaction=False)
                pipe.xadd(out, {EVENT_FIELD: "started",
                                DATA_FIELD: json.dumps({"worker_id": "fake", "attempt": 1})})
                for index in range(count):
                    if job["stream"]:
                        pipe.xadd(out, {EVENT_FIELD: "token", DATA_FIELD: json.dumps(
                            {"index": index, "token_ids": [index], "text": " w",
                             "attempt": 1})})
                pipe.xadd(out, {EVENT_FIELD: "done", DATA_FIELD: json.dumps({
                    "finish_reason": "length", "text": " w" * count,
                    "usage": {"prompt_tokens": 4, "completion_tokens": count,
                              "cached_tokens": 0},
                    "timings": {"queue_ms": 0.0, "ttft_ms": 0.0, "total_ms": 0.0,
                                "decode_tokens_per_s": None},
                    "metadata": job["metadata"]})})
                pipe.expire(out, 600)
                pipe.xack(stream, GROUP, entry_id)
                pipe.xdel(stream, entry_id)
                pipe.execute()


def direct_request(client: OrcdClient, model: str, max_tokens: int, stream: bool) -> int:
    """One job through redis-py: submit, read events to done; returns the tokens read."""
    job_id = client.submit("Hello", model=model, max_tokens=max_tokens, temperature=0.0,
                           stream=stream)
    count = 0
    for event in client.stream(job_id, timeout=300):
        if event.kind == "token":
            count += len(event.data["token_ids"])
        elif event.kind == "done":
            return count if stream else event.data["usage"]["completion_tokens"]
    raise RuntimeError("no done")


def gateway_request(http: httpx.Client, model: str, max_tokens: int, stream: bool) -> int:
    """The same job through the gateway; returns the tokens (SSE chunks with text) read."""
    body = {"model": model, "prompt": "Hello", "max_tokens": max_tokens, "temperature": 0,
            "stream": stream}
    if not stream:
        answer = http.post("/v1/completions", json=body)
        answer.raise_for_status()
        return answer.json()["usage"]["completion_tokens"]
    count = 0
    with http.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["text"]:
                count += 1
    return count


def timed(function, *args) -> tuple[float, int]:
    start = time.perf_counter()
    result = function(*args)
    return time.perf_counter() - start, result


def bench_fake(url: str, gateway_url: str, requests: int, tokens: int) -> dict:
    with OrcdClient(url) as client, httpx.Client(base_url=gateway_url, timeout=300) as http:
        for _ in range(20):  # warm up connections and caches
            direct_request(client, FAKE_MODEL, 1, False)
            gateway_request(http, FAKE_MODEL, 1, False)
        direct_ms, gateway_ms, ping_ms, health_ms = [], [], [], []
        for _ in range(requests):  # interleaved, so drift hits both alike
            direct_ms.append(timed(direct_request, client, FAKE_MODEL, 1, False)[0] * 1e3)
            gateway_ms.append(timed(gateway_request, http, FAKE_MODEL, 1, False)[0] * 1e3)
            ping_ms.append(timed(client.redis.ping)[0] * 1e3)
            health_ms.append(timed(http.get, "/health")[0] * 1e3)
        direct_tok, gateway_tok = [], []
        for _ in range(max(3, requests // 20)):
            seconds, count = timed(direct_request, client, FAKE_MODEL, tokens, True)
            assert count == tokens, count
            direct_tok.append(seconds * 1e6 / count)
            seconds, count = timed(gateway_request, http, FAKE_MODEL, tokens, True)
            assert count == tokens, count
            gateway_tok.append(seconds * 1e6 / count)
    per_request = statistics.median(gateway_ms) - statistics.median(direct_ms)
    per_token = statistics.median(gateway_tok) - statistics.median(direct_tok)
    return {
        "requests": requests, "tokens_per_stream": tokens,
        "direct_request_ms_median": round(statistics.median(direct_ms), 3),
        "gateway_request_ms_median": round(statistics.median(gateway_ms), 3),
        "direct_request_ms_p90": round(statistics.quantiles(direct_ms, n=10)[-1], 3),
        "gateway_request_ms_p90": round(statistics.quantiles(gateway_ms, n=10)[-1], 3),
        "overhead_per_request_ms": round(per_request, 3),
        # The HTTP stack's own floor: GET /health (one PING) against a PING from redis-py.
        "http_floor_ms": round(statistics.median(health_ms) - statistics.median(ping_ms), 3),
        "direct_us_per_streamed_token": round(statistics.median(direct_tok), 2),
        "gateway_us_per_streamed_token": round(statistics.median(gateway_tok), 2),
        "overhead_per_streamed_token_us": round(per_token, 2),
    }


def bench_real(url: str, gateway_url: str, tokens: int, repeats: int) -> dict:
    with OrcdClient(url) as client, httpx.Client(base_url=gateway_url, timeout=300) as http:
        direct_request(client, REAL_MODEL, 4, True)
        gateway_request(http, REAL_MODEL, 4, True)
        direct_rate, gateway_rate = [], []
        for _ in range(repeats):
            seconds, count = timed(direct_request, client, REAL_MODEL, tokens, True)
            direct_rate.append(count / seconds)
            seconds, count = timed(gateway_request, http, REAL_MODEL, tokens, True)
            gateway_rate.append(count / seconds)
    direct, gateway = statistics.median(direct_rate), statistics.median(gateway_rate)
    return {"tokens": tokens, "repeats": repeats,
            "direct_tokens_per_s": round(direct, 2), "gateway_tokens_per_s": round(gateway, 2),
            "gateway_throughput_loss_pct": round(100 * (direct - gateway) / direct, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--real-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-real", action="store_true", help="skip the real worker")
    args = parser.parse_args()
    if shutil.which("redis-server") is None:
        raise SystemExit("bench.gateway: redis-server is not installed")
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        redis_server = RedisServer(directory).start()
        fake = multiprocessing.Process(target=fake_worker, args=(redis_server.url, args.tokens),
                                       daemon=True)
        fake.start()
        worker = None
        gateway = GatewayProcess(redis_server.url, directory, "bench-gateway", "--no-auth",
                                 "--no-batches")
        try:
            gateway.wait_ready()
            results = {"fake_worker": bench_fake(redis_server.url, gateway.url, args.requests,
                                                 args.tokens)}
            print(json.dumps(results["fake_worker"], indent=2))
            if not args.no_real:
                worker = WorkerProcess(redis_server.url, "bench-worker", directory,
                                       "--backend", "torch", "--dtype", "int8").wait_ready()
                results["real_worker"] = bench_real(redis_server.url, gateway.url,
                                                    args.real_tokens, args.repeats)
                results["real_worker"]["worker"] = "orcd worker --backend torch --dtype int8"
                print(json.dumps(results["real_worker"], indent=2))
        finally:
            gateway.stop()
            if worker is not None:
                worker.stop()
            fake.terminate()
            redis_server.kill()
    print(write_result("gateway", results))


if __name__ == "__main__":
    main()
