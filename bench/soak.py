"""Chaos soak on the CPU: workers killed and Redis restarted while jobs run; every job must end
with exactly one `done`, none dead-lettered, and no output stream may repeat a token index.

A private redis-server (AOF on, fsync every second) and 3 `orcd worker` processes (torch
backend, default model) serve N short jobs submitted at once through `OrcdClient`. Every
`--kill-every` seconds a random worker gets SIGKILL and is started again at once; halfway
through (by finished jobs) redis-server is stopped (SIGTERM: the AOF is flushed) and started
again on the same port and directory. Jobs taken over from a killed worker resume after the
tokens they had streamed (`started.resumed_from`). At the end each job's output stream is read:

- finals: `done`/`error` events per job (must be exactly one `done`);
- index order: `token` indices strictly increasing and contiguous (never repeated);
- text: the streamed text equals `done.text` (nothing repeated or retracted);
- dead letters: entries in `orcd:dead` (must be 0).

    python bench/soak.py --jobs 300 --workers 3 --kill-every 20 --out bench/results
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.results_io import git_commit  # noqa: E402
from jobs import OrcdClient  # noqa: E402
from jobs.keys import Keys  # noqa: E402

KEYS = Keys()
MODEL = "smollm2-135m"
PROMPTS = ["The capital of France is", "Once upon a time", "def fibonacci(n):",
           "The three primary colors are", "Water boils at", "A haiku about the sea:"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """redis-server with the AOF on, restartable on the same port and directory."""

    def __init__(self, directory: Path) -> None:
        self.directory, self.port = directory, free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [shutil.which("redis-server") or "redis-server", "--port", str(self.port),
             "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes",
             "--appendfsync", "everysec", "--dir", str(self.directory)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if redis.Redis.from_url(self.url).ping():
                    return
            except redis.RedisError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(30)
            self.process = None


class Worker:
    def __init__(self, url: str, worker_id: str, log_dir: Path, max_jobs: int,
                 extra: list[str] = ()) -> None:
        self.url, self.worker_id, self.log_dir, self.max_jobs = url, worker_id, log_dir, max_jobs
        self.extra = list(extra)
        self.process: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        log = (self.log_dir / f"{self.worker_id}.{self.starts}.log").open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", "worker", "--redis", self.url,
             "--id", self.worker_id, "--backend", "torch", "--heartbeat", "0.5",
             "--reclaim-idle", "2", "--kv-blocks", "512", "--max-jobs", str(self.max_jobs),
             "--log-json", *self.extra],
            stdout=subprocess.DEVNULL, stderr=log,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(30)


def check_job(r: redis.Redis, job_id: str) -> dict:
    """What one job's output stream shows: finals, index order, streamed vs final text."""
    entries = r.xrange(KEYS.out(job_id))
    finals, tokens, done, resumed = [], [], None, 0
    for _, fields in entries:
        kind = fields[b"event"].decode()
        data = json.loads(fields[b"data"])
        if kind in ("done", "error"):
            finals.append(kind)
            done = data if kind == "done" else done
        elif kind == "token":
            tokens.append(data)
        elif kind == "started" and data.get("resumed_from"):
            resumed += 1
    expected, ordered = 0, True
    for data in tokens:
        ordered &= data["index"] == expected
        expected += len(data["token_ids"])
    text = "".join(data["text"] for data in tokens)
    return {
        "finals": finals,
        "ordered": ordered,
        "text_matches": done is not None and text == done["text"],
        "resumed": resumed,
    }


def run(args: argparse.Namespace) -> dict:
    directory = Path(tempfile.mkdtemp(prefix="orcd-soak-"))
    server = Server(directory)
    server.start()
    workers = [Worker(server.url, f"soak-{i}", directory, args.max_jobs, args.worker_arg)
               for i in range(args.workers)]
    for worker in workers:
        worker.start()
    rng = random.Random(args.seed)
    client = OrcdClient(server.url)
    job_ids = []
    for i in range(args.jobs):
        job_ids.append(client.submit(PROMPTS[i % len(PROMPTS)], model=MODEL, temperature=0,
                                     max_tokens=rng.randint(4, args.max_tokens),
                                     job_id=f"soak-{i:04d}"))
    start = time.monotonic()
    next_kill = start + args.kill_every
    kills = redis_restarts = 0
    finished: set[str] = set()
    while len(finished) < len(job_ids):
        now = time.monotonic()
        if now - start > args.timeout:
            break
        if now >= next_kill:
            victim = rng.choice(workers)
            victim.kill()
            victim.start()
            kills += 1
            next_kill = now + args.kill_every
            print(f"{now - start:6.1f}s  SIGKILL {victim.worker_id} (restarted), "
                  f"{len(finished)}/{len(job_ids)} done", flush=True)
        if not redis_restarts and len(finished) >= len(job_ids) // 2:
            server.stop()
            server.start()
            redis_restarts += 1
            print(f"{time.monotonic() - start:6.1f}s  redis-server restarted (AOF), "
                  f"{len(finished)}/{len(job_ids)} done", flush=True)
        try:
            r = redis.Redis.from_url(server.url)
            pipe = r.pipeline(transaction=False)
            pending = [j for j in job_ids if j not in finished]
            for job_id in pending:
                pipe.xrevrange(KEYS.out(job_id), count=1)
            for job_id, last in zip(pending, pipe.execute(), strict=True):
                if last and last[0][1][b"event"] in (b"done", b"error"):
                    finished.add(job_id)
        except redis.RedisError:
            pass  # Redis is restarting: look again
        time.sleep(0.5)
    elapsed = time.monotonic() - start
    time.sleep(3)  # a reclaim pass or two after the end: a late duplicate would show now
    r = redis.Redis.from_url(server.url)
    checks = {job_id: check_job(r, job_id) for job_id in job_ids}
    dead = r.xlen(KEYS.dead)
    for worker in workers:
        worker.kill()
    server.stop()
    one_done = sum(1 for c in checks.values() if c["finals"] == ["done"])
    result = {
        "bench": "soak",
        "date": dt.date.today().isoformat(),
        "commit": git_commit(),
        "host_cpus": os.cpu_count(),
        "jobs": len(job_ids),
        "workers": args.workers,
        "worker_args": args.worker_arg,
        "kill_every_s": args.kill_every,
        "seconds": round(elapsed, 1),
        "sigkills": kills,
        "redis_restarts": redis_restarts,
        "exactly_one_done": one_done,
        "no_final": sum(1 for c in checks.values() if not c["finals"]),
        "duplicate_finals": sum(1 for c in checks.values() if len(c["finals"]) > 1),
        "errors": sum(1 for c in checks.values() if "error" in c["finals"]),
        "dead_lettered": dead,
        "index_repeats_or_gaps": sum(1 for c in checks.values() if not c["ordered"]),
        "streamed_text_differs": sum(1 for c in checks.values() if c["finals"] == ["done"]
                                     and not c["text_matches"]),
        "resumed_jobs": sum(1 for c in checks.values() if c["resumed"]),
        "logs": str(directory),
    }
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=300)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--max-jobs", type=int, default=8, help="per worker")
    parser.add_argument("--max-tokens", type=int, default=48, help="longest answer")
    parser.add_argument("--kill-every", type=float, default=20.0)
    parser.add_argument("--timeout", type=float, default=560.0, help="seconds for all jobs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker-arg", action="append", default=[], metavar="ARG",
                        help="one more argument for each `orcd worker` (repeatable), e.g. "
                        "--worker-arg=--engine-process")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args()
    result = run(args)
    width = max(map(len, result))
    for key, value in result.items():
        print(f"{key:<{width}}  {value}")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"soak-{dt.datetime.now():%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")
    ok = (result["exactly_one_done"] == result["jobs"] and result["dead_lettered"] == 0
          and result["index_repeats_or_gaps"] == 0 and result["streamed_text_differs"] == 0)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
