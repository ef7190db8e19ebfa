"""Worker benchmarks: (1) events per second one worker's publisher writes to Redis, (2) end-
to-end tokens/s through Redis versus calling the engine directly, same 8 concurrent jobs,
(3) the worker loop's own cost while it serves them: host milliseconds per loop iteration
outside `Engine.step()`, and Redis round trips and commands per iteration that stepped.

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


class LoopMeter:
    """Times a running worker's loop from outside: its iterations that stepped the engine
    (host time outside the step), and their Redis round trips (each `execute_command` or pipeline `execute` of its
    connection) and the commands Redis counted meanwhile (INFO stats, all clients: the
    benchmark's own client polls too, so commands are an upper bound)."""

    def __init__(self, worker: Worker, admin) -> None:
        self.worker, self.admin = worker, admin
        self.on = False
        self.iterations = self.steps = self.round_trips = 0
        self.loop_s = self.step_s = 0.0
        self.stepping_round_trips = 0
        iteration, step = worker.iteration, worker.engine.step

        def timed_iteration():
            # Only iterations that stepped count: an idle one waits on Redis by design.
            start, steps, step_s, trips = (time.perf_counter(), self.steps, self.step_s,
                                           self.round_trips)
            iteration()
            if self.on and self.steps > steps:
                self.iterations += 1
                self.loop_s += time.perf_counter() - start - (self.step_s - step_s)
                self.stepping_round_trips += self.round_trips - trips

        def timed_step():
            start = time.perf_counter()
            try:
                return step()
            finally:
                if self.on:
                    self.steps += 1
                    self.step_s += time.perf_counter() - start

        worker.iteration, worker.engine.step = timed_iteration, timed_step
        client = worker.redis
        command, pipeline = client.execute_command, client.pipeline

        def counted_command(*args, **kwargs):
            if self.on and threading.current_thread() is self.thread:
                self.round_trips += 1
            return command(*args, **kwargs)

        def counted_pipeline(*args, **kwargs):
            pipe = pipeline(*args, **kwargs)
            execute = pipe.execute

            def counted_execute(*a, **k):
                if self.on and threading.current_thread() is self.thread:
                    self.round_trips += 1
                return execute(*a, **k)

            pipe.execute = counted_execute
            return pipe

        client.execute_command, client.pipeline = counted_command, counted_pipeline
        self.thread: threading.Thread | None = None

    def _commands(self) -> int:
        return int(self.admin.info("stats")["total_commands_processed"])

    def start(self, thread: threading.Thread) -> None:
        """Count from now on, the round trips made from `thread` (the worker's loop)."""
        self.thread = thread
        self.commands0 = self._commands()
        self.on = True

    def result(self) -> dict:
        self.on = False
        commands = self._commands() - self.commands0
        steps = max(self.steps, 1)
        return {
            "loop_iterations_stepping": self.iterations,
            "engine_steps": self.steps,
            "host_ms_per_step": round(1e3 * self.loop_s / max(self.iterations, 1), 3),
            "round_trips_per_step": round(self.stepping_round_trips / max(self.iterations, 1),
                                          2),
            "redis_commands_per_step": round(commands / steps, 1),
        }


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
            loop = LoopMeter(worker, server.client())
            thread = threading.Thread(target=worker.run, daemon=True)
            thread.start()
            client = OrcdClient(server.url)
            direct_run(model, 4)  # warm-up both paths
            redis_run(client, 4)
            direct, through = [], []
            loop.start(thread)
            for _ in range(args.repeats):  # interleaved: load on a shared machine hits both
                tokens, seconds = direct_run(model, args.max_tokens)
                direct.append(tokens / seconds)
                tokens, seconds = redis_run(client, args.max_tokens)
                through.append(tokens / seconds)
            loop_costs = loop.result()
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
        **loop_costs,
    }
    print(json.dumps(results, indent=2))
    print(write_result("worker", results))


if __name__ == "__main__":
    main()
