"""`orcd submit PROMPT`: put a job on the stream; with `--wait`, stream its answer.

The job is refused (exit 2, nothing queued) when no live worker serves its model, unless
`--queue-anyway`. With `--wait`, a Redis restart is ridden out: a note on stderr, then the
answer resumes after the last event read (`--reconnect` seconds at most, and never past
`--timeout`). Ctrl-C (exit 130) and `--timeout` (exit 2) cancel the job, unless `--detach`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import TextIO

from redis.exceptions import RedisError

from jobs import JobError, JobTimeout, NoWorker, OrcdClient
from jobs.client import RECONNECT_S, OnDisconnect, one_line, shown_url
from loader.registry import DEFAULT_MODEL
from worker.commands.worker import DEFAULT_REDIS_URL

INTERRUPTED = 130  # 128 + SIGINT, as shells report it
CONNECT_TIMEOUT_S = 5.0  # an unreachable host fails in seconds, not the system's minutes
REPLY_TIMEOUT_S = 30.0  # a blocked XREAD waits 0.5 s: longer means a dead connection


def add_redis_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--redis", default=os.environ.get("REDIS_URL", DEFAULT_REDIS_URL),
                        help=f"Redis URL (default: $REDIS_URL or {DEFAULT_REDIS_URL})")
    parser.add_argument("--prefix", default="orcd", help="Redis key prefix (default: orcd)")


def add_reconnect_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--reconnect", type=float, default=RECONNECT_S, metavar="S",
                        help="seconds to keep retrying a lost Redis, resuming after the last "
                        f"event read (default {RECONNECT_S:g}; never past --timeout)")


def redis_client(args: argparse.Namespace) -> OrcdClient:
    """The commands' client, with bounded connect and reply times."""
    return OrcdClient(args.redis, prefix=args.prefix, socket_connect_timeout=CONNECT_TIMEOUT_S,
                      socket_timeout=REPLY_TIMEOUT_S)


def reconnect_note(command: str, url: str) -> OnDisconnect:
    """The one line on stderr when a reader loses Redis and starts retrying."""
    def note(exc: Exception, last_id: str) -> None:
        print(f"orcd {command}: lost Redis at {shown_url(url)} ({one_line(exc)}); "
              f"reconnecting, will resume after event {last_id}", file=sys.stderr, flush=True)
    return note


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", nargs="?", help="raw text to continue (or use --messages)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"default: {DEFAULT_MODEL}")
    parser.add_argument("--messages", help="JSON file of chat messages [{role, content}...]")
    parser.add_argument("--session", help="session id: later turns reuse the KV cache")
    parser.add_argument("--wait", action="store_true",
                        help="stream the answer to stdout (default: print the job id)")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--parse-special", action="store_true",
                        help="read control-token text such as <|im_start|> in the prompt or "
                        "message content as control tokens (trusted input only; default: "
                        "plain text)")
    parser.add_argument("--timeout", type=float,
                        help="seconds to wait for the answer; then the job is cancelled")
    parser.add_argument("--detach", action="store_true",
                        help="on Ctrl-C or --timeout leave the job running (default: cancel it)")
    parser.add_argument("--queue-anyway", action="store_true",
                        help="queue the job even if no live worker serves the model")
    add_reconnect_argument(parser)
    add_redis_arguments(parser)


class Answer:
    """The answer's text as written to `out`, remembering whether a line is left open."""

    def __init__(self, out: TextIO) -> None:
        self.out, self.open_line = out, False

    def write(self, text: str) -> None:
        if text:
            self.out.write(text)
            self.out.flush()
            self.open_line = not text.endswith("\n")

    def end_line(self) -> None:
        if self.open_line:
            self.write("\n")


def stream_answer(client: OrcdClient, job_id: str, timeout: float | None, out=sys.stdout, *,
                  reconnect_s: float | None = RECONNECT_S,
                  on_disconnect: OnDisconnect | None = None) -> dict | None:
    """Print the answer as it comes; a redelivered attempt restarts it. Returns `done`."""
    answer = out if isinstance(out, Answer) else Answer(out)
    for event in client.stream(job_id, timeout=timeout, reconnect_s=reconnect_s,
                               on_disconnect=on_disconnect):
        if event.restart:
            answer.write(f"\n[attempt {event.attempt} on {event.data['worker_id']}: "
                         "restarting]\n")
        if event.kind == "token":
            answer.write(event.data["text"])
        elif event.kind == "error":
            raise JobError(f"job {job_id}: {event.data['code']}: {event.data['message']}")
        elif event.kind == "done":
            answer.write("\n")
            return event.data
    return None


def show_queue_position(client: OrcdClient, job_id: str, model: str, timeout: float | None,
                        err=sys.stderr, poll_s: float = 0.5) -> None:
    """While no worker has taken the job, say where it stands in the queue (on change).
    Best effort: if Redis goes away meanwhile, the answer's stream (with its reconnection)
    takes over at once."""
    shown = None
    give_up = None if timeout is None else time.monotonic() + timeout
    while True:
        try:
            if client.redis.exists(client.keys.out(job_id)):
                return
            place = client.queue_position(job_id, model=model)
        except RedisError:
            return
        if place is None:
            return  # taken meanwhile (or not found): the stream says the rest
        eta = f", ETA ~{place.eta_s:.0f} s" if place.eta_s is not None else ""
        line = (f"queued: {place.position} job{'s' if place.position != 1 else ''} ahead, "
                f"{place.waiting} waiting{eta}")
        if line != shown:
            print(line, file=err, flush=True)
            shown = line
        if give_up is not None and time.monotonic() >= give_up:
            return
        time.sleep(poll_s)


def leave(client: OrcdClient, job_id: str, detach: bool) -> str:
    """Cancel the job we stop waiting for (unless `detach`); says what was done."""
    if detach:
        return f"job {job_id} left running (--detach); orcd tail {job_id} follows it"
    try:
        client.cancel(job_id)
    except RedisError as exc:
        return f"job {job_id} NOT cancelled: {one_line(exc)}"
    return f"cancel requested for job {job_id}"


def run(args: argparse.Namespace) -> int:
    if (args.prompt is None) == (args.messages is None):
        raise JobError("give a PROMPT or --messages FILE, not both")
    messages = None
    if args.messages:
        with open(args.messages, encoding="utf-8") as file:
            messages = json.load(file)
    with redis_client(args) as client:
        sampling = {"max_tokens": args.max_tokens, "temperature": args.temperature,
                    "top_p": args.top_p, "seed": args.seed, "stop": args.stop}
        try:
            job_id = client.submit(args.prompt, messages=messages, model=args.model,
                                   session_id=args.session, sampling=sampling,
                                   parse_special=args.parse_special,
                                   require_worker=not args.queue_anyway)
        except NoWorker as exc:
            raise JobError(f"{exc}; the job was not queued (--queue-anyway queues it for a "
                           "worker yet to start)") from None
        if not args.wait:
            print(job_id)
            return 0
        print(f"job {job_id}", file=sys.stderr, flush=True)
        answer = Answer(sys.stdout)
        try:
            show_queue_position(client, job_id, args.model, args.timeout)
            done = stream_answer(client, job_id, args.timeout, answer,
                                 reconnect_s=args.reconnect,
                                 on_disconnect=reconnect_note("submit", args.redis))
        except KeyboardInterrupt:
            answer.end_line()
            print(f"orcd submit: interrupted; {leave(client, job_id, args.detach)}",
                  file=sys.stderr)
            return INTERRUPTED
        except JobTimeout as exc:
            answer.end_line()
            raise JobError(f"{exc}; {leave(client, job_id, args.detach)}") from None
        if done is not None:
            usage, timings = done["usage"], done["timings"]
            print(f"[{done['finish_reason']}: {usage['completion_tokens']} tokens, "
                  f"{usage['cached_tokens']} cached, ttft {timings['ttft_ms']} ms, "
                  f"{timings['decode_tokens_per_s']} tok/s]", file=sys.stderr)
    return 0
