"""`orcd demo`: the whole product in one terminal. A Redis ($REDIS_URL, else a private
`redis-server` on a free port, else fakeredis' TCP server), one worker process, a two-turn
chat in one session streamed with the worker's narration beside it, the second turn's cached
tokens, then everything stopped cleanly."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import redis

from jobs import JobError, OrcdClient
from jobs.protocol import EventFollower, JobEvent
from loader.registry import DEFAULT_MODEL
from worker.loaded_model import AUTO_TORCH_DTYPE, DTYPE_CHOICES

PREFIX = "orcd-demo"  # never the production prefix, even on a shared Redis
TURNS = ["What is the capital of France?", "And what is the capital of Italy?"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"default: {DEFAULT_MODEL}")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--dtype", default="auto", choices=list(DTYPE_CHOICES),
                        help=f"the worker's --dtype (default: auto, {AUTO_TORCH_DTYPE} on the "
                        "torch backend)")
    parser.add_argument("--redis", default=os.environ.get("REDIS_URL"),
                        help="use this Redis (default: $REDIS_URL, else start one)")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_ping(url: str, timeout: float = 10.0) -> None:
    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + timeout
    while True:
        try:
            client.ping()
            return
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                raise JobError(f"no Redis answered at {url}") from None
            time.sleep(0.05)


@contextmanager
def redis_for_demo(url: str | None) -> Iterator[tuple[str, str]]:
    """(url, what it is): the given URL, a private redis-server, or fakeredis over TCP."""
    if url:
        yield url, "Redis at $REDIS_URL"
        return
    port = _free_port()
    local = f"redis://127.0.0.1:{port}/0"
    binary = shutil.which("redis-server")
    if binary:
        with tempfile.TemporaryDirectory(prefix="orcd-demo-") as directory:
            process = subprocess.Popen(
                [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--dir", directory],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                _wait_ping(local)
                yield local, f"a private redis-server on port {port}"
            finally:
                process.terminate()
                process.wait(10)
        return
    from fakeredis import TcpFakeServer

    server = TcpFakeServer(("127.0.0.1", port), server_type="redis")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        _wait_ping(local)
        yield local, f"fakeredis' TCP server on port {port} (no redis-server installed)"
    finally:
        server.shutdown()
        server.server_close()


def busy_machine_threads(environ: dict[str, str] | None = None) -> tuple[dict[str, str], str]:
    """The worker's environment, and a note when it differs: one torch thread on a machine whose
    CPUs are already all busy (1-minute load average at least the CPU count) unless
    OMP_NUM_THREADS says otherwise.

    torch's OpenMP threads meet at a barrier hundreds of times per decode step; when other
    processes hold the cores, each barrier waits for a descheduled thread. On this workplace's
    shared 2-core CPU at load 4-5 (2026-12-06) the demo's answers ran at 1.0-6.7 tok/s with two
    threads and 30-44 tok/s with one (int8, same minutes)."""
    environ = dict(os.environ if environ is None else environ)
    cpus = os.cpu_count() or 1
    load = os.getloadavg()[0]
    if "OMP_NUM_THREADS" in environ or cpus == 1 or load < cpus:
        return environ, ""
    environ["OMP_NUM_THREADS"] = "1"
    return environ, (f"this machine is busy (load {load:.1f} on {cpus} CPUs): the worker uses "
                     "1 torch thread (set OMP_NUM_THREADS to choose)")


@contextmanager
def worker_process(url: str, model: str, worker_id: str, log_path: str,
                   dtype: str = "auto", env: dict[str, str] | None = None) -> Iterator[None]:
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", "worker", "--redis", url, "--prefix", PREFIX,
             "--model", model, "--id", worker_id, "--max-jobs", "4", "--dtype", dtype],
            stdout=log, stderr=log, env=env)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


class Terminal:
    """Answer text inline, narration lines beside it (dimmed on a terminal)."""

    def __init__(self) -> None:
        self.tty = sys.stdout.isatty()
        self.mid_line = False

    def narration(self, text: str) -> None:
        if self.mid_line:
            sys.stdout.write("\n")
            self.mid_line = False
        line = f"    · {text}"
        print(f"\033[2m{line}\033[0m" if self.tty else line, flush=True)

    def say(self, text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()
        self.mid_line = not text.endswith("\n")

    def end_line(self) -> None:
        if self.mid_line:
            sys.stdout.write("\n")
        self.mid_line = False


_BEFORE_TOKENS = {b"job.started", b"session.reused", b"prefix.reused", b"worker.started"}


def _order(is_narration: bool, entry_id: bytes, fields: dict) -> tuple[int, int, int]:
    ms, seq = map(int, entry_id.split(b"-"))
    if not is_narration:
        return ms, 1, seq
    return ms, 0 if fields.get(b"event") in _BEFORE_TOKENS else 2, seq


def follow(client: OrcdClient, job_id: str, narration_id: str, terminal: Terminal,
           worker_id: str) -> tuple[dict, str]:
    """Stream a job's answer and the worker's narration together (one XREAD on both)."""
    out_key, narration_key = client.keys.out(job_id), client.keys.narration
    last = {out_key: "0", narration_key: narration_id}
    follower = EventFollower()
    started_answer = False
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        # A blocked XREAD is woken by the first stream written and answers with that stream
        # only; read both again without blocking to get everything the flush wrote.
        reply = client.redis.xread(last, block=200) and client.redis.xread(last) or []
        # XREAD answers stream by stream, and ids of different streams do not order each other
        # (each stream numbers its own entries within a millisecond). One worker flush writes
        # a job's start narration before its first token and its finish narration after done:
        # order by millisecond, then by that.
        merged = sorted(
            ((_order(stream.decode() == narration_key, entry_id, fields), stream.decode(),
              entry_id, fields)
             for stream, entries in reply for entry_id, fields in entries),
            key=lambda item: item[0])
        for _, stream, entry_id, fields in merged:
            last[stream] = entry_id.decode()
            if stream == narration_key:
                context = json.loads(fields.get(b"context", b"{}"))
                if context.get("worker_id") == worker_id:
                    terminal.narration(fields[b"narration"].decode())
                    started_answer = False
                continue
            event = follower.feed(JobEvent.from_entry(entry_id, fields))
            if event is None:
                continue
            if event.restart:
                terminal.narration("the job was redelivered: its answer starts again")
            if event.kind == "token":
                if not started_answer:
                    terminal.say("orcd> ")
                    started_answer = True
                terminal.say(event.data["text"])
            elif event.kind == "error":
                raise JobError(f"job {job_id}: {event.data['code']}: {event.data['message']}")
            elif event.kind == "done":
                terminal.end_line()
                # Narration of the finish comes right after done: show it too.
                time.sleep(0.05)
                for _, tail in client.redis.xread({narration_key: last[narration_key]}) or []:
                    for tail_id, tail_fields in tail:
                        last[narration_key] = tail_id.decode()
                        context = json.loads(tail_fields.get(b"context", b"{}"))
                        if context.get("worker_id") == worker_id:
                            terminal.narration(tail_fields[b"narration"].decode())
                return event.data, last[narration_key]
    raise JobError(f"job {job_id}: no answer within 600 s")


def run(args: argparse.Namespace) -> int:
    terminal = Terminal()
    worker_id = f"demo-{uuid.uuid4().hex[:6]}"
    session_id = f"demo-session-{uuid.uuid4().hex[:6]}"
    with ExitStack() as stack:
        url, what = stack.enter_context(redis_for_demo(args.redis))
        print(f"orcd demo: {what}; starting worker {worker_id} for {args.model}...", flush=True)
        log_path = stack.enter_context(tempfile.TemporaryDirectory(prefix="orcd-demo-log-"))
        log_path = os.path.join(log_path, "worker.log")
        env, note = busy_machine_threads()
        if note:
            print(f"orcd demo: {note}", flush=True)
        process = stack.enter_context(
            worker_process(url, args.model, worker_id, log_path, args.dtype, env))
        client = stack.enter_context(OrcdClient(url, prefix=PREFIX))
        # Read narration from the start: the worker's "serves ..." line says what was loaded.
        narration_id = "0-0" if not client.redis.exists(client.keys.narration) else \
            client.redis.xinfo_stream(client.keys.narration)["last-generated-id"].decode()
        deadline = time.monotonic() + 300
        while not client.redis.exists(client.keys.worker(worker_id)):
            if process.poll() is not None or time.monotonic() > deadline:
                with open(log_path) as log:
                    sys.stderr.write(log.read()[-4000:])
                raise JobError("the demo worker did not start")
            time.sleep(0.1)
        messages: list[dict] = []
        cached = []
        for turn in TURNS:
            messages.append({"role": "user", "content": turn})
            print(f"\nyou> {turn}", flush=True)
            job_id = client.submit(messages=messages, model=args.model, session_id=session_id,
                                   max_tokens=args.max_tokens, temperature=0)
            done, narration_id = follow(client, job_id, narration_id, terminal, worker_id)
            messages.append({"role": "assistant", "content": done["text"]})
            usage = done["usage"]
            cached.append(usage["cached_tokens"])
            print(f"[{done['finish_reason']}: {usage['prompt_tokens']} prompt tokens, "
                  f"{usage['cached_tokens']} of them cached; {usage['completion_tokens']} "
                  f"generated in {done['timings']['total_ms']:.0f} ms]", flush=True)
        print(f"\nThe second turn reused {cached[-1]} cached tokens of session {session_id}: "
              "only the new part of the conversation was computed.", flush=True)
        client.end_session(session_id)
        process.send_signal(signal.SIGTERM)
        status = process.wait(60)
        print(f"worker stopped (exit status {status}); demo done.", flush=True)
    return 0
