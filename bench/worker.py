"""Worker benchmarks: (1) events per second one worker's publisher writes to Redis, (2) end-
to-end tokens/s through Redis versus calling the engine directly, same 8 concurrent jobs.

    .venv/bin/python -m bench.worker [--events 50000] [--max-tokens 64] [--repeats 3]

Needs `redis-server` (started privately on a free port). Results: bench/results/worker-*.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

from bench.results_io import write_result
from gpu.request import Request, SamplingParams
from jobs import OrcdClient
from jobs.keys import Keys
from tests.redis_server import RedisServer
from worker.connection import RedisLink, connect
from worker.daemon import Worker, WorkerConfig
from worker.loaded_model import load_model
from worker.publisher import Publisher

PROMPTS = ["The capital of France is", "Once upon a time", "def fibonacci(n):",
           "The three primary colors are", "In 1969, the first man on the Moon",
           "A recipe for pancakes:", "The theory of relativity says", "Dear diary, today"]


def bench_publisher(url: str, events: int, per_flush: int) -> float:
    """Token events per second, `per_flush` events per MULTI/EXEC (one engine step's worth)."""
    publisher = Publisher(RedisLink(connect(url)), Keys("bench"))
    job_ids = [f"job{i}" for i in range(per_flush)]
    start = time.perf_counter()
    for index in range(events // per_flush):
        for job_id in job_ids:
            publisher.event(job_id, "token", {"index": index, "token_ids": [1234],
                                              "text": " word", "attempt": 1})
        publisher.flush()
    seconds = time.perf_counter() - start
    return (events // per_flush) * per_flush / seconds


def direct_run(model, max_tokens: int) -> tuple[int, float]:
    engine, tokenizer = model.engine, model.tokenizer
    start = time.perf_counter()
    for i, prompt in enumerate(PROMPTS):
        engine.add(Request(f"direct-{i}-{start}", tokenizer.encode(prompt, parse_special=False),
                           SamplingParams(temperature=0), max_tokens=max_tokens,
                           stop_token_ids=tokenizer.end_of_generation_ids))
    tokens = 0
    while engine.has_work():
        for output in engine.step():
            tokens += len(output.new_token_ids)
    return tokens, time.perf_counter() - start


def redis_run(client: OrcdClient, max_tokens: int) -> tuple[int, float]:
    start = time.perf_counter()
    ids = [client.submit(p, max_tokens=max_tokens, temperature=0) for p in PROMPTS]
    tokens = sum(client.wait(job_id, timeout=600).usage.completion_tokens for job_id in ids)
    return tokens, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if shutil.which("redis-server") is None:
        raise SystemExit("bench/worker.py needs redis-server")
    with tempfile.TemporaryDirectory() as directory:
        server = RedisServer(Path(directory)).start()
        try:
            publisher = {f"events_per_s_{n}_per_flush": round(bench_publisher(
                server.url, args.events, n)) for n in (8, 64)}
            print(json.dumps(publisher))
            # Two engines: the worker's thread steps its own, the direct runs step the other.
            model = load_model("smollm2-135m", progress=False)
            worker = Worker(load_model("smollm2-135m", progress=False), WorkerConfig(worker_id="bench", redis_url=server.url,
                                                max_jobs=8))
            thread = threading.Thread(target=worker.run, daemon=True)
            thread.start()
            client = OrcdClient(server.url)
            direct_run(model, 4)  # warm-up both paths
            redis_run(client, 4)
            direct, through = [], []
            for _ in range(args.repeats):  # interleaved: load on a shared machine hits both
                tokens, seconds = direct_run(model, args.max_tokens)
                direct.append(tokens / seconds)
                tokens, seconds = redis_run(client, args.max_tokens)
                through.append(tokens / seconds)
            worker.stop("benchmark over")
            thread.join(60)
        finally:
            server.kill()
    results = {
        **publisher,
        "concurrent_jobs": len(PROMPTS),
        "max_tokens": args.max_tokens,
        "direct_tokens_per_s": [round(x, 2) for x in direct],
        "redis_tokens_per_s": [round(x, 2) for x in through],
        "direct_median": round(statistics.median(direct), 2),
        "redis_median": round(statistics.median(through), 2),
        "overhead_pct": round(100 * (1 - statistics.median(through) /
                                     statistics.median(direct)), 2),
    }
    print(json.dumps(results, indent=2))
    print(write_result("worker", results))


if __name__ == "__main__":
    main()
